//! Micro-benchmarks of the synchronous data path: one Check per algorithm and
//! outcome, route matching, policy compilation, and protobuf decoding for scale.
//!
//!   cargo bench --bench check                  # everything, ~1 minute once built
//!   cargo bench --bench check -- check/        # one group
//!
//! Keys are published straight into the providers' key cells (no Supervisor, no
//! runtime); tokens are signed with the fixture keys in tests/fixtures/keys/.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};
use prost::Message;
use serde_json::json;
use valet::decision::{Decision, Reason};
use valet::jwks::KeySet;
use valet::stores::Snapshot;

#[path = "../tests/it/common/pem_key.rs"]
mod pem_key;
#[path = "../tests/it/common/tempdir.rs"]
mod tempdir;

const ISSUER: &str = "https://idp.bench/";
const AUDIENCE: &str = "orders-api";

/// The policy the Check benches run against: one provider with one key per
/// algorithm, a few routes, the matching one for /orders/7 second. The
/// verified-token cache is off so that every Check verifies its signature;
/// `check/rs256_cached` turns it back on (`cache_on`).
const POLICY: &str = r#"
realm: bench
cache: { max_entries: 0 }
providers:
  - name: corp
    issuer: https://idp.bench/
    audiences: [orders-api]
    jwks: { file: jwks.json }
    algorithms: [RS256, ES256, EdDSA]
    clock_skew: 60s
    tokens_from:
      - { header: authorization, prefix: "Bearer " }
    claims_to_headers: { sub: x-user-id, scope: x-user-scopes }
    forward_token: false
routes:
  - name: health
    match: { path: /healthz }
    anonymous: true
  - name: orders-read
    match: { methods: [GET, HEAD], path_prefix: /orders }
    require: { scopes: [orders:read] }
  - name: orders-write
    match: { methods: [POST, PUT, DELETE], path_prefix: /orders }
    require: { scopes: [orders:write] }
  - name: admin
    match: { path_prefix: /admin }
    require:
      any_scopes: [admin, orders:admin]
      claims: { tenant: acme }
default: deny
"#;

fn config_path() -> PathBuf {
    // Only names the policy in errors and anchors `jwks.json`; never read.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-policy/valet.yaml")
}

fn fixture_key(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Signer {
    alg: Algorithm,
    kid: &'static str,
    key: EncodingKey,
}

fn signers() -> Vec<Signer> {
    vec![
        Signer {
            alg: Algorithm::RS256,
            kid: "rsa-1",
            key: pem_key::encoding_key(&fixture_key("rsa.pem"), Algorithm::RS256).unwrap(),
        },
        Signer {
            alg: Algorithm::ES256,
            kid: "ec256-1",
            key: pem_key::encoding_key(&fixture_key("ec256.pem"), Algorithm::ES256).unwrap(),
        },
        Signer {
            alg: Algorithm::EdDSA,
            kid: "ed-1",
            key: pem_key::encoding_key(&fixture_key("ed25519.pem"), Algorithm::EdDSA).unwrap(),
        },
    ]
}

fn jwks(signers: &[Signer]) -> Vec<u8> {
    let keys = signers
        .iter()
        .map(|s| {
            let mut jwk = Jwk::from_encoding_key(&s.key, s.alg).unwrap();
            jwk.common.key_id = Some(s.kid.into());
            jwk
        })
        .collect();
    serde_json::to_vec(&JwkSet { keys }).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token as an IdP would mint it: typical claims, a day of validity.
fn token(alg: Algorithm, kid: &str, key: &EncodingKey) -> String {
    let now = now();
    let header = json!({ "alg": alg_name(alg), "typ": "JWT", "kid": kid });
    let claims = json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "nbf": now,
        "exp": now + 24 * 3600,
        "jti": "5b2f7c0e-8d4a-4f7b-9a51-3c2d1e0f9a8b",
        "azp": "orders-web",
        "scope": "openid profile orders:read orders:write",
        "tenant": "acme",
    });
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{sig}")
}

fn alg_name(alg: Algorithm) -> String {
    serde_json::to_value(alg).unwrap().as_str().unwrap().into()
}

/// A CheckRequest like Envoy's HTTP filter sends for a browser-ish client:
/// 12 headers (13 with the token), pseudo-headers included.
fn check_request(method: &str, path: &str, token: Option<&str>) -> CheckRequest {
    let mut headers: HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", method),
        (":path", path),
        (":scheme", "https"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) orders-web/2.14.1",
        ),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "0f6c2b8e-7a41-4d3b-bc39-5e2a9d1f4c77"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(t) = token {
        headers.insert("authorization".into(), format!("Bearer {t}"));
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "13859305421738719487".into(),
                    method: method.into(),
                    path: path.into(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The bench policy with the default verified-token cache.
fn cache_on() -> String {
    POLICY.replace("cache: { max_entries: 0 }\n", "")
}

/// The bench policy with every provider's keys published.
fn warm_policy(source: &str, signers: &[Signer]) -> Snapshot {
    let policy = valet::load::parse(source, &config_path())
        .expect("bench policy compiles")
        .into_snapshot();
    let set = jwks(signers);
    for cell in &policy.stores.keys {
        cell.publish(KeySet::parse(&set).unwrap(), now());
    }
    assert!(policy.providers_without_keys().is_empty());
    policy
}

fn expect(policy: &Snapshot, req: &CheckRequest, allow: bool, reason: Reason) {
    let d = valet::check::check(policy, req, now());
    assert_eq!(
        matches!(d, Decision::Allow(_)),
        allow,
        "unexpected decision {:?} (want reason {reason:?})",
        d.reason()
    );
    assert_eq!(d.reason(), reason);
}

fn bench_check(c: &mut Criterion) {
    let signers = signers();
    let policy = warm_policy(POLICY, &signers);
    let cached = warm_policy(&cache_on(), &signers);
    let now = now();

    let mut cases: Vec<(&str, CheckRequest, bool, Reason)> = vec![(
        "noop_baseline",
        check_request("GET", "/healthz", None),
        true,
        Reason::Anonymous,
    )];
    for (name, s) in ["rs256", "es256", "eddsa"].into_iter().zip(&signers) {
        let t = token(s.alg, s.kid, &s.key);
        cases.push((
            name,
            check_request("GET", "/orders/7", Some(&t)),
            true,
            Reason::Verified,
        ));
    }
    cases.push((
        "missing_token",
        check_request("GET", "/orders/7", None),
        false,
        Reason::MissingToken,
    ));
    // Signed by a key the JWKS does not hold, under the kid of one it does.
    let other = pem_key::encoding_key(&fixture_key("rsa-other.pem"), Algorithm::RS256).unwrap();
    let forged = token(Algorithm::RS256, "rsa-1", &other);
    cases.push((
        "bad_signature",
        check_request("GET", "/orders/7", Some(&forged)),
        false,
        Reason::BadSignature,
    ));

    let mut g = c.benchmark_group("check");
    for (name, req, allow, reason) in &cases {
        expect(&policy, req, *allow, *reason);
        g.bench_function(*name, |b| {
            b.iter(|| valet::check::check(black_box(&policy), black_box(req), now))
        });
    }
    // The same RS256 Check, its token already in the cache (the first Check fills it).
    let rs256 = &cases[1].1;
    expect(&cached, rs256, true, Reason::Verified);
    g.bench_function("rs256_cached", |b| {
        b.iter(|| valet::check::check(black_box(&cached), black_box(rs256), now))
    });
    g.finish();
}

/// Who is calling (README "Who is calling"): the cached RS256 Check on a plain
/// route against the same token on an `any_of` route whose token alternative
/// comes second, a workload on a principal route, and an API key; all in one run.
fn bench_identity(c: &mut Criterion) {
    let signers = signers();
    let dir = tempdir::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks(&signers)).unwrap();
    let key = "bench-key-bench-key-bench-key-bench-key-00";
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!(
            "keys:\n  - sha256: {}\n    claims: {{ sub: acme, scope: 'orders:read' }}\n",
            valet::api_keys::hex_digest(key)
        ),
    )
    .unwrap();
    let source = cache_on().replace(
        "routes:\n",
        "  - name: partners\n    issuer: api-keys:bench\n    api_keys: { file: keys.yaml }\n    \
             tokens_from: [{ header: x-api-key }]\nroutes:\n  - name: either\n    \
             match: { path_prefix: /either }\n    require:\n      any_of:\n        \
             - { principals: [spiffe://cluster.local/ns/billing/sa/worker] }\n        \
             - { providers: [corp], scopes: [orders:read] }\n  - name: workload\n    \
             match: { path_prefix: /internal }\n    \
             require: { principals: ['spiffe://cluster.local/ns/billing/sa/*'] }\n  \
             - name: partner\n    match: { path_prefix: /partner }\n    \
             require: { providers: [partners], scopes: [orders:read] }\n",
    );
    let path = dir.path().join("valet.yaml");
    let policy = valet::load::parse(&source, &path)
        .expect("identity bench policy compiles")
        .into_snapshot();
    let set = jwks(&signers);
    for cell in &policy.stores.keys {
        cell.publish(KeySet::parse(&set).unwrap(), now());
    }
    let now = now();
    let t = token(signers[0].alg, signers[0].kid, &signers[0].key);
    let mut workload = check_request("GET", "/internal/run", None);
    workload.attributes.as_mut().unwrap().source = Some(
        envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer {
            principal: "spiffe://cluster.local/ns/billing/sa/worker".into(),
            ..Default::default()
        },
    );
    let mut api_key = check_request("GET", "/partner/1", None);
    if let Some(http) = api_key
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.headers.insert("x-api-key".into(), key.into());
    }
    let cases = [
        (
            "rs256_cached_plain_route",
            check_request("GET", "/orders/7", Some(&t)),
            Reason::Verified,
        ),
        (
            "rs256_cached_any_of_second",
            check_request("GET", "/either/7", Some(&t)),
            Reason::Verified,
        ),
        ("principal_only", workload, Reason::Principal),
        ("api_key", api_key, Reason::Verified),
    ];
    let mut g = c.benchmark_group("identity");
    for (name, req, reason) in &cases {
        expect(&policy, req, true, *reason);
        g.bench_function(*name, |b| {
            b.iter(|| valet::check::check(black_box(&policy), black_box(req), now))
        });
    }
    g.finish();
}

/// A policy of `n` routes mixing every kind of match, none of which fits
/// GET api.example.com/orders/7 except the last.
fn many_routes(n: usize) -> String {
    let mut y = String::from(
        "realm: bench\nproviders:\n  - name: corp\n    issuer: https://idp.bench/\n    \
         audiences: [orders-api]\n    jwks: { file: jwks.json }\n    algorithms: [RS256]\n\
         routes:\n",
    );
    for i in 0..n - 1 {
        let m = match i % 5 {
            0 => format!("{{ path_prefix: /svc{i} }}"),
            1 => format!("{{ methods: [GET], path_template: \"/svc{i}/items/{{id}}\" }}"),
            2 => format!("{{ path_regex: \"/v[0-9]+/svc{i}/.*\" }}"),
            3 => format!(
                "{{ hosts: [\"svc{i}.example.com\", \"*.svc{i}.internal\"], path_prefix: /orders }}"
            ),
            _ => format!("{{ methods: [POST, PUT], path_prefix: /orders/{i} }}"),
        };
        let access = if i % 7 == 0 {
            "anonymous: true".to_string()
        } else {
            format!("require: {{ scopes: [svc{i}:read] }}")
        };
        writeln!(y, "  - name: r{i}\n    match: {m}\n    {access}").unwrap();
    }
    y.push_str(
        "  - name: orders-read\n    match: { hosts: [api.example.com], methods: [GET], \
         path_template: \"/orders/{id}\" }\n    require: { scopes: [orders:read] }\n\
         default: deny\n",
    );
    y
}

fn bench_routes(c: &mut Criterion) {
    let req = check_request("GET", "/orders/7", None);
    let view = valet::request::Request::from_check(&req).unwrap();
    let sources: Vec<(usize, String)> = [10, 1000]
        .into_iter()
        .map(|n| (n, many_routes(n)))
        .collect();

    let mut g = c.benchmark_group("route_for");
    for (n, yaml) in &sources {
        let policy = valet::load::parse(yaml, &config_path()).unwrap().policy;
        assert_eq!(policy.routes.len(), *n);
        let hit = policy.route_for(&view).map(|r| r.name.as_str());
        assert_eq!(hit, Some("orders-read"), "only the last route matches");
        g.bench_function(format!("{n}_routes"), |b| {
            b.iter(|| black_box(&policy).route_for(black_box(&view)).is_some())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    for (n, yaml) in &sources {
        let path = config_path();
        g.bench_function(format!("{n}_routes"), |b| {
            b.iter(|| valet::load::parse(black_box(yaml), &path).unwrap())
        });
    }
    g.finish();
}

fn bench_decode(c: &mut Criterion) {
    let s = &signers()[0];
    let req = check_request("GET", "/orders/7", Some(&token(s.alg, s.kid, &s.key)));
    let bytes = req.encode_to_vec();
    c.bench_function("decode/check_request", |b| {
        b.iter(|| CheckRequest::decode(black_box(bytes.as_slice())).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(2));
    targets = bench_check, bench_identity, bench_routes, bench_decode
}
criterion_main!(benches);
