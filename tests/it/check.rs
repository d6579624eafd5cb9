//! Black-box: the real binary, real gRPC, Envoy's messages.

use crate::common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

/// The policy most tests run against.
const POLICY: &str = r#"
realm: test
providers:
  - name: corp
    issuer: https://idp.test/
    audiences: [orders-api]
    jwks: { file: jwks.json }
    algorithms: [RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512]
    clock_skew: 60s
    claims_to_headers: { sub: x-user-id, tenant: x-tenant }
routes:
  - name: health
    match: { path: /healthz }
    anonymous: true
  - name: by-context
    match: { context: { route: special } }
    require: { scopes: [special] }
  - name: orders-read
    match: { methods: [GET], path_prefix: /orders }
    require: { scopes: [orders:read] }
  - name: orders-item
    match: { methods: [PUT], path_template: "/orders/{id}" }
    require: { scopes: [orders:read, orders:write] }
  - name: reports
    match: { hosts: ["*.reports.example.com"], path_regex: "/v[0-9]+/reports" }
    require: { any_scopes: [reports:read, admin] }
  - name: tenant
    match: { path_prefix: /tenant }
    require:
      claims: { tenant: acme, "realm_access.roles": admin }
  - name: partner
    match: { path_prefix: /partner }
    require: { audiences: [partner-api] }
default: deny
"#;

async fn valet() -> (
    Valet,
    envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<
        tonic::transport::Channel,
    >,
) {
    let v = Valet::in_process(POLICY);
    let c = v.client().await;
    (v, c)
}

#[tokio::test]
async fn allows_a_good_token_and_passes_identity_upstream() {
    let (_v, mut c) = valet().await;
    let a = check(&mut c, get("/orders/7").bearer(&rs256("orders:read"))).await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(a.grpc_code, 0);
    assert_eq!(
        a.headers.get("x-user-id").map(String::as_str),
        Some("alice")
    );
    assert!(
        a.remove.contains(&"authorization".to_string()),
        "token stripped: {a:?}"
    );
    assert!(
        a.remove.contains(&"x-tenant".to_string()),
        "unset identity header removed: {a:?}"
    );
    assert!(
        !a.remove.contains(&"x-user-id".to_string()),
        "never remove what is set"
    );
    assert_eq!(meta_str(&a.metadata, "route"), "orders-read");
    assert_eq!(meta_str(&a.metadata, "provider"), "corp");
    assert_eq!(a.reason(), "verified");
    // The verified claims travel as dynamic metadata.
    use envoy_types::pb::google::protobuf::value::Kind;
    let claims = a.metadata.as_ref().unwrap().fields.get("claims").unwrap();
    let Some(Kind::StructValue(s)) = &claims.kind else {
        panic!("claims not a struct")
    };
    assert_eq!(
        s.fields.get("sub").unwrap().kind,
        Some(Kind::StringValue("alice".into()))
    );
}

#[tokio::test]
async fn every_algorithm_verifies() {
    let (_v, mut c) = valet().await;
    use Algorithm::*;
    for alg in [
        RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512,
    ] {
        let t = token(alg, &claims("orders:read"));
        let a = check(&mut c, get("/orders").bearer(&t)).await;
        assert!(a.allowed(), "{alg:?}: {a:?}");
    }
}

#[tokio::test]
async fn default_algorithms_exclude_hmac() {
    let v = Valet::in_process(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks: { file: jwks.json }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n",
    );
    let mut c = v.client().await;
    assert!(check(&mut c, get("/").bearer(&rs256(""))).await.allowed());
    let a = check(
        &mut c,
        get("/").bearer(&token(Algorithm::HS256, &claims(""))),
    )
    .await;
    assert_eq!(
        (a.http_status, a.reason().as_str()),
        (401, "unsupported_algorithm")
    );
}

#[tokio::test]
async fn missing_token_is_401_without_error() {
    let (_v, mut c) = valet().await;
    let a = check(&mut c, get("/orders/7")).await;
    assert_eq!(a.http_status, 401);
    assert_eq!(a.grpc_code, 16, "UNAUTHENTICATED");
    assert_eq!(a.reason(), "missing_token");
    assert_eq!(a.challenge(), "Bearer realm=\"test\"");
    assert_eq!(
        a.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(a.body["route"], "orders-read");
    // Another scheme is not our token.
    let a = check(
        &mut c,
        get("/orders/7").header("authorization", "Basic YTpi"),
    )
    .await;
    assert_eq!(a.reason(), "missing_token");
}

async fn expect_invalid(c: &mut Client, token: &str, reason: &str) {
    let a = check(c, get("/orders/7").bearer(token)).await;
    assert_eq!(a.http_status, 401, "{reason}: {a:?}");
    assert_eq!(a.grpc_code, 16);
    assert_eq!(a.reason(), reason, "{a:?}");
    assert!(
        a.challenge()
            .starts_with("Bearer realm=\"test\", error=\"invalid_token\", error_description=\""),
        "{}",
        a.challenge()
    );
}

type Client = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<
    tonic::transport::Channel,
>;

#[tokio::test]
async fn bad_tokens_are_401_invalid_token_with_a_reason() {
    let (_v, mut c) = valet().await;
    let good = claims("orders:read");
    let with = |patch: serde_json::Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let rs = |claims: &serde_json::Value| token(Algorithm::RS256, claims);

    // Wrong key: signed by a key the JWKS does not hold, under a kid it does.
    let forged = sign_raw(
        &json!({"alg": "RS256", "kid": "rsa-1"}),
        &good,
        &other_rsa_key(),
        Algorithm::RS256,
    );
    expect_invalid(&mut c, &forged, "bad_signature").await;
    let unknown = sign_raw(
        &json!({"alg": "RS256", "kid": "nope"}),
        &good,
        &other_rsa_key(),
        Algorithm::RS256,
    );
    expect_invalid(&mut c, &unknown, "unknown_key").await;
    // No kid: tried against the keys that fit the algorithm.
    let (key, _) = signing_key(Algorithm::ES256);
    let no_kid = sign_raw(&json!({"alg": "ES256"}), &good, &key, Algorithm::ES256);
    assert!(
        check(&mut c, get("/orders").bearer(&no_kid))
            .await
            .allowed()
    );
    let no_kid_forged = sign_raw(
        &json!({"alg": "RS256"}),
        &good,
        &other_rsa_key(),
        Algorithm::RS256,
    );
    expect_invalid(&mut c, &no_kid_forged, "bad_signature").await;

    // Time, with 60s of skew either way.
    let t = now();
    assert!(
        check(
            &mut c,
            get("/orders").bearer(&rs(&with(json!({"exp": t - 30}))))
        )
        .await
        .allowed()
    );
    expect_invalid(&mut c, &rs(&with(json!({"exp": t - 120}))), "expired").await;
    assert!(
        check(
            &mut c,
            get("/orders").bearer(&rs(&with(json!({"nbf": t + 30}))))
        )
        .await
        .allowed()
    );
    expect_invalid(&mut c, &rs(&with(json!({"nbf": t + 120}))), "not_yet_valid").await;
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    expect_invalid(&mut c, &rs(&no_exp), "malformed_token").await;
    expect_invalid(
        &mut c,
        &rs(&with(json!({"exp": "never"}))),
        "malformed_token",
    )
    .await;

    // Issuer and audience.
    expect_invalid(
        &mut c,
        &rs(&with(json!({"iss": "https://evil.test/"}))),
        "issuer_not_allowed",
    )
    .await;
    expect_invalid(
        &mut c,
        &rs(&with(json!({"iss": "https://idp.test"}))),
        "issuer_not_allowed",
    )
    .await;
    let mut no_iss = good.clone();
    no_iss.as_object_mut().unwrap().remove("iss");
    expect_invalid(&mut c, &rs(&no_iss), "issuer_not_allowed").await;
    expect_invalid(
        &mut c,
        &rs(&with(json!({"aud": "other-api"}))),
        "audience_not_allowed",
    )
    .await;
    expect_invalid(
        &mut c,
        &rs(&with(json!({"aud": ["a", "b"]}))),
        "audience_not_allowed",
    )
    .await;
    expect_invalid(
        &mut c,
        &rs(&with(json!({"aud": 7}))),
        "audience_not_allowed",
    )
    .await;
    assert!(
        check(
            &mut c,
            get("/orders").bearer(&rs(&with(json!({"aud": ["x", "orders-api"]}))))
        )
        .await
        .allowed()
    );
}

#[tokio::test]
async fn attacks_on_the_header_are_refused() {
    let (_v, mut c) = valet().await;
    let good = claims("orders:read");
    let b64 = |v: &serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    // alg none, in any spelling, with or without a signature.
    for alg in ["none", "None", "NONE", "nOnE"] {
        let t = format!(
            "{}.{}.",
            b64(&json!({"alg": alg, "typ": "JWT"})),
            b64(&good)
        );
        expect_invalid(&mut c, &t, "unsupported_algorithm").await;
        let t = format!(
            "{}.{}.c2ln",
            b64(&json!({"alg": alg, "typ": "JWT"})),
            b64(&good)
        );
        expect_invalid(&mut c, &t, "unsupported_algorithm").await;
    }
    // RSA public key used as an HMAC secret, under the RSA key's kid and without one.
    let secret = EncodingKey::from_secret(&rsa_public_pem());
    for header in [
        json!({"alg": "HS256", "kid": "rsa-1"}),
        json!({"alg": "HS256"}),
    ] {
        let t = sign_raw(&header, &good, &secret, Algorithm::HS256);
        let a = check(&mut c, get("/orders").bearer(&t)).await;
        assert_eq!(a.http_status, 401, "{header}: {a:?}");
        assert!(
            ["unsupported_algorithm", "bad_signature"].contains(&a.reason().as_str()),
            "{a:?}"
        );
    }
    // ES256 header on the P-384 key.
    let (p384, _) = signing_key(Algorithm::ES384);
    let t = sign_raw(
        &json!({"alg": "ES384", "kid": "ec256-1"}),
        &good,
        &p384,
        Algorithm::ES384,
    );
    expect_invalid(&mut c, &t, "unsupported_algorithm").await;
    // An embedded key, a key URL, crit: never trusted.
    let attacker = other_rsa_key();
    let jwk = {
        let mut j = jsonwebtoken::jwk::Jwk::from_encoding_key(&attacker, Algorithm::RS256).unwrap();
        j.common.key_id = Some("rsa-1".into());
        serde_json::to_value(j).unwrap()
    };
    for header in [
        json!({"alg": "RS256", "kid": "rsa-1", "jwk": jwk}),
        json!({"alg": "RS256", "jwk": jwk}),
        json!({"alg": "RS256", "kid": "rsa-1", "jku": "https://evil.test/jwks"}),
        json!({"alg": "RS256", "kid": "rsa-1", "x5u": "https://evil.test/cert"}),
        json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
    ] {
        let t = sign_raw(&header, &good, &attacker, Algorithm::RS256);
        expect_invalid(&mut c, &t, "malformed_token").await;
    }
    // Unknown algorithms.
    let t = format!(
        "{}.{}.c2ln",
        b64(&json!({"alg": "ES512", "kid": "ec256-1"})),
        b64(&good)
    );
    expect_invalid(&mut c, &t, "unsupported_algorithm").await;
}

#[tokio::test]
async fn malformed_tokens_are_denied_not_errors() {
    let (_v, mut c) = valet().await;
    let good = rs256("orders:read");
    // Over the 16 KiB token limit, under the 256 KiB CheckRequest cap (past it the
    // request is refused unread: 413 request_too_large, tests/adversarial.rs).
    let huge = "a".repeat(200 * 1024);
    let five = format!("{good}.x.y");
    let dots = ".".repeat(5000);
    for t in [
        "abc",
        "a.b",
        "a.b.c",
        "!!!.@@@.###",
        &format!("{good}=="),
        &five,
        &dots,
        &huge,
        "e30.e30.e30",
    ] {
        let a = check(&mut c, get("/orders").bearer(t)).await;
        assert_eq!(
            (a.http_status, a.reason().as_str()),
            (401, "malformed_token"),
            "{}",
            &t[..t.len().min(40)]
        );
    }
    let a = check(&mut c, get("/orders").header("authorization", "Bearer ")).await;
    assert_eq!(a.reason(), "malformed_token");
    // Two Authorization headers arrive joined by a comma.
    let a = check(
        &mut c,
        get("/orders").header("authorization", &format!("Bearer {good},Bearer {good}")),
    )
    .await;
    assert_eq!(a.reason(), "malformed_token");
    // Trailing garbage after the signature breaks it.
    let a = check(&mut c, get("/orders").bearer(&format!("{good}AA"))).await;
    assert_eq!(a.http_status, 401);
}

#[tokio::test]
async fn scopes_in_every_shape_and_403_insufficient_scope() {
    let (_v, mut c) = valet().await;
    let base = claims("");
    let with_scope = |name: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove("scope");
        c[name] = v;
        token(Algorithm::RS256, &c)
    };
    let put = |t: &str| get("/orders/7").method("PUT").bearer(t);
    for t in [
        with_scope("scope", json!("orders:read orders:write")),
        with_scope("scope", json!(["orders:write", "orders:read"])),
        with_scope("scp", json!("orders:read orders:write")),
        with_scope("scp", json!(["orders:read", "orders:write"])),
    ] {
        assert!(check(&mut c, put(&t)).await.allowed());
    }
    let a = check(&mut c, put(&with_scope("scope", json!("orders:read")))).await;
    assert_eq!(a.http_status, 403);
    assert_eq!(a.grpc_code, 7, "PERMISSION_DENIED");
    assert_eq!(a.reason(), "insufficient_scope");
    assert!(
        a.challenge()
            .starts_with("Bearer realm=\"test\", error=\"insufficient_scope\"")
            && a.challenge()
                .ends_with("scope=\"orders:read orders:write\""),
        "{}",
        a.challenge()
    );
    // A path template matches one segment only.
    let a = check(
        &mut c,
        get("/orders/7/x")
            .method("PUT")
            .bearer(&rs256("orders:read orders:write")),
    )
    .await;
    assert_eq!(a.reason(), "no_route");

    // any_scopes, hosts and regex.
    let reports = |t: &str| {
        get("/v2/reports?x=1")
            .host("eu.reports.example.com:8443")
            .bearer(t)
    };
    assert!(check(&mut c, reports(&rs256("admin"))).await.allowed());
    assert!(
        check(&mut c, reports(&rs256("reports:read other")))
            .await
            .allowed()
    );
    let a = check(&mut c, reports(&rs256("orders:read"))).await;
    assert_eq!(a.reason(), "insufficient_scope");
    assert!(a.challenge().ends_with("scope=\"reports:read admin\""));
    let a = check(
        &mut c,
        get("/v2/reports")
            .host("reports.example.com")
            .bearer(&rs256("admin")),
    )
    .await;
    assert_eq!(a.reason(), "no_route", "the wildcard needs a label");
}

#[tokio::test]
async fn claims_and_route_audiences_are_403() {
    let (_v, mut c) = valet().await;
    let mut cl = claims("");
    cl["tenant"] = json!("acme");
    cl["realm_access"] = json!({"roles": ["user", "admin"]});
    let a = check(
        &mut c,
        get("/tenant/x").bearer(&token(Algorithm::RS256, &cl)),
    )
    .await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(a.headers.get("x-tenant").map(String::as_str), Some("acme"));
    cl["realm_access"] = json!({"roles": ["user"]});
    let a = check(
        &mut c,
        get("/tenant/x").bearer(&token(Algorithm::RS256, &cl)),
    )
    .await;
    assert_eq!(
        (a.http_status, a.grpc_code, a.reason().as_str()),
        (403, 7, "claim_mismatch")
    );
    assert_eq!(a.challenge(), "");

    let mut cl = claims("");
    cl["aud"] = json!(["orders-api", "partner-api"]);
    assert!(
        check(
            &mut c,
            get("/partner").bearer(&token(Algorithm::RS256, &cl))
        )
        .await
        .allowed()
    );
    let a = check(&mut c, get("/partner").bearer(&rs256(""))).await;
    assert_eq!(
        (a.http_status, a.reason().as_str()),
        (403, "audience_not_allowed")
    );
}

#[tokio::test]
async fn anonymous_routes_strip_smuggled_identity() {
    let (_v, mut c) = valet().await;
    let a = check(&mut c, get("/healthz?probe=1").header("x-user-id", "root")).await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(a.reason(), "anonymous");
    assert!(a.remove.contains(&"x-user-id".to_string()));
    assert!(a.remove.contains(&"x-tenant".to_string()));
    // A verified request overwrites the smuggled header rather than appending.
    let a = check(
        &mut c,
        get("/orders")
            .header("x-user-id", "root")
            .bearer(&rs256("orders:read")),
    )
    .await;
    assert_eq!(
        a.headers.get("x-user-id").map(String::as_str),
        Some("alice")
    );
}

#[tokio::test]
async fn paths_are_normalised_before_matching() {
    let (_v, mut c) = valet().await;
    for path in [
        "/healthz/../admin",
        "/healthz/%2e%2e/orders",
        "/healthz/./../orders",
        "//healthz/..//orders",
    ] {
        let a = check(&mut c, get(path)).await;
        assert!(!a.allowed(), "{path} rode the public route: {a:?}");
    }
    let a = check(&mut c, get("/healthz/../orders")).await;
    assert_eq!(
        (a.reason().as_str(), a.body["route"].as_str()),
        ("missing_token", Some("orders-read"))
    );
    for path in [
        "//healthz",
        "/./healthz",
        "/%68ealthz",
        "/healthz?x=/orders",
        "/healthz#frag",
    ] {
        let a = check(&mut c, get(path)).await;
        assert_eq!(a.reason(), "anonymous", "{path}");
    }
    assert_eq!(check(&mut c, get("/healthzx")).await.reason(), "no_route");
    assert_eq!(
        check(&mut c, get("/ordersx").bearer(&rs256("orders:read")))
            .await
            .reason(),
        "no_route"
    );
    // RFC 3986 5.2.4, as Envoy's normalize_path: `..` at the root stays there.
    assert_eq!(
        check(&mut c, get("/../healthz")).await.reason(),
        "anonymous"
    );
    // One spelling per resource: escapes of segment characters decoded, the
    // rest re-encoded in upper case.
    let t = rs256("orders:read");
    for path in ["/%6Frders/7", "/ord%65rs/x%3A/..", "/orders/%c3%a9"] {
        let a = check(&mut c, get(path).bearer(&t)).await;
        assert!(a.allowed(), "{path}: {a:?}");
        assert_eq!(meta_str(&a.metadata, "route"), "orders-read", "{path}");
    }
    for path in [
        "/a%2Fb",
        "/a\\b",
        "relative",
        "/a%zz",
        "/orders%09",
        "/orders/%7f",
        "/orders/%00",
    ] {
        let a = check(&mut c, get(path)).await;
        assert_eq!(
            (a.http_status, a.grpc_code, a.reason().as_str()),
            (400, 3, "malformed_request"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn default_deny_and_default_allow() {
    let (_v, mut c) = valet().await;
    let a = check(&mut c, get("/nowhere").bearer(&rs256("admin"))).await;
    assert_eq!(
        (a.http_status, a.grpc_code, a.reason().as_str()),
        (403, 7, "no_route")
    );
    let v = Valet::in_process(
        "routes:\n  - name: h\n    match: { path: /healthz }\n    anonymous: true\ndefault: allow\n",
    );
    let mut c = v.client().await;
    let a = check(&mut c, get("/nowhere")).await;
    assert!(a.allowed());
    assert_eq!(a.reason(), "no_route");
}

#[tokio::test]
async fn context_extensions_name_routes() {
    let (_v, mut c) = valet().await;
    let a = check(
        &mut c,
        get("/orders")
            .context("route", "special")
            .bearer(&rs256("orders:read")),
    )
    .await;
    assert_eq!(
        (a.reason().as_str(), a.body["route"].as_str()),
        ("insufficient_scope", Some("by-context"))
    );
    let a = check(
        &mut c,
        get("/anything")
            .context("route", "special")
            .bearer(&rs256("special")),
    )
    .await;
    assert!(a.allowed());
    assert_eq!(meta_str(&a.metadata, "route"), "by-context");
}

#[tokio::test]
async fn tokens_from_cookies_and_query_are_removed_before_upstream() {
    let v = Valet::in_process(
        r#"
providers:
  - name: corp
    issuer: https://idp.test/
    jwks: { file: jwks.json }
    tokens_from:
      - { header: x-api-token }
      - { cookie: access_token }
      - { query: access_token }
  - name: keep
    issuer: https://keep.test/
    jwks: { file: jwks.json }
    forward_token: true
routes:
  - name: r
    match: { path_prefix: / }
"#,
    );
    let mut c = v.client().await;
    let t = rs256("");
    let a = check(&mut c, get("/x").header("x-api-token", &t)).await;
    assert!(a.allowed(), "{a:?}");
    assert!(a.remove.contains(&"x-api-token".to_string()));
    let a = check(
        &mut c,
        get("/x").header("cookie", &format!("theme=dark; access_token={t}; lang=en")),
    )
    .await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(
        a.headers.get("cookie").map(String::as_str),
        Some("theme=dark; lang=en")
    );
    // Commas belong to values: nothing else is rewritten.
    let a = check(
        &mut c,
        get("/x").header("cookie", &format!("access_token={t}; prefs=a,b")),
    )
    .await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(
        a.headers.get("cookie").map(String::as_str),
        Some("prefs=a,b")
    );
    let a = check(
        &mut c,
        get("/x").header("cookie", &format!("access_token={t}")),
    )
    .await;
    assert!(a.remove.contains(&"cookie".to_string()));
    let a = check(&mut c, get(&format!("/x?a=1&access_token={t}"))).await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(a.remove_query, vec!["access_token".to_string()]);
    // The default source still works for the other provider, which forwards.
    let mut cl = claims("");
    cl["iss"] = json!("https://keep.test/");
    let a = check(&mut c, get("/x").bearer(&token(Algorithm::RS256, &cl))).await;
    assert!(a.allowed(), "{a:?}");
    assert!(
        !a.remove.contains(&"authorization".to_string()),
        "forward_token keeps it"
    );
}

#[tokio::test]
async fn providers_restrict_issuers_per_route() {
    let v = Valet::in_process(
        r#"
providers:
  - name: corp
    issuer: https://idp.test/
    jwks: { file: jwks.json }
  - name: partner
    issuer: https://partner.test/
    jwks: { file: jwks.json }
routes:
  - name: internal
    match: { path_prefix: /internal }
    require: { providers: [corp] }
"#,
    );
    let mut c = v.client().await;
    assert!(
        check(&mut c, get("/internal").bearer(&rs256("")))
            .await
            .allowed()
    );
    let mut cl = claims("");
    cl["iss"] = json!("https://partner.test/");
    let a = check(
        &mut c,
        get("/internal").bearer(&token(Algorithm::RS256, &cl)),
    )
    .await;
    assert_eq!(a.reason(), "issuer_not_allowed");
}

#[tokio::test]
async fn providers_without_keys_answer_503_keys_unavailable() {
    let v = Valet::in_process(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks: { file: missing.json }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n",
    );
    assert!(v.wait_for_log("jwks load failed"));
    let mut c = v.client().await;
    let a = check(&mut c, get("/").bearer(&rs256(""))).await;
    assert_eq!(
        (a.http_status, a.grpc_code, a.reason().as_str()),
        (503, 14, "keys_unavailable")
    );
}

#[tokio::test]
async fn requests_without_http_attributes_are_denied() {
    let (_v, mut c) = valet().await;
    let r = c
        .check(envoy_types::ext_authz::v3::pb::CheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, 3);
}

#[tokio::test]
async fn logs_never_carry_the_token() {
    let v = Valet::start_with(POLICY, &[("VALET_LOG", "trace")]);
    let mut c = v.client().await;
    let good = rs256("orders:read");
    let expired = {
        let mut cl = claims("orders:read");
        cl["exp"] = json!(now() - 1000);
        token(Algorithm::RS256, &cl)
    };
    let tokens = [
        good.clone(),
        expired,
        format!("{good}x"),
        "not.a.token".to_string(),
    ];
    for t in &tokens {
        check(&mut c, get("/orders").bearer(t)).await;
        check(&mut c, get("/orders").method("PUT").bearer(t)).await;
    }
    let logs = v.logs();
    assert!(logs.contains("deny"), "logs were captured");
    for t in &tokens {
        for part in t.split('.').filter(|p| p.len() >= 8) {
            assert!(!logs.contains(part), "a token fragment reached the logs");
        }
    }
}

#[tokio::test]
async fn the_verified_token_cache_never_outlives_exp_nor_skips_the_route() {
    // Valet's clock, moved past exp instead of sleeping until then.
    let clock = valet::clock::Clock::system();
    let v = Valet::in_process_on(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks: { file: jwks.json }\n    clock_skew: 0s\nroutes:\n  - name: read\n    match: { methods: [GET], path_prefix: /orders }\n    require: { scopes: [orders:read] }\n  - name: write\n    match: { methods: [PUT], path_prefix: /orders }\n    require: { scopes: [orders:write] }\n",
        clock.clone(),
    );
    let mut c = v.client().await;
    let mut cl = claims("orders:read");
    cl["exp"] = json!(now() + 2);
    let t = token(Algorithm::RS256, &cl);
    for _ in 0..5 {
        assert!(check(&mut c, get("/orders").bearer(&t)).await.allowed());
    }
    // Cached claims, but the route is still evaluated.
    let a = check(&mut c, get("/orders").method("PUT").bearer(&t)).await;
    assert_eq!(a.reason(), "insufficient_scope");
    assert!(
        v.metric("valet_verify_cache_total{result=\"hit\"}")
            .await
            .unwrap()
            >= 5.0
    );
    assert_eq!(
        v.metric("valet_verify_cache_total{result=\"miss\"}").await,
        Some(1.0)
    );
    // Past exp the cached entry is gone and the token is expired.
    clock.advance_unix(3);
    assert_eq!(
        check(&mut c, get("/orders").bearer(&t)).await.reason(),
        "expired"
    );
}

#[tokio::test]
async fn a_route_envoy_names_is_not_taken_on_trust() {
    let (_v, mut c) = valet().await;
    // Envoy compares some spellings differently from Valet, so the route it names
    // could be a later, weaker one: Valet matches by itself, whatever the name.
    let t = rs256("orders:read");
    let a = check(
        &mut c,
        get("/whatever/envoy/matched")
            .context("valet_route", "orders-read")
            .bearer(&t),
    )
    .await;
    assert_eq!(a.reason(), "no_route", "{a:?}");
    let a = check(&mut c, get("/orders").context("valet_route", "health")).await;
    assert_eq!(a.reason(), "missing_token", "{a:?}");
    let a = check(
        &mut c,
        get("/healthz").context("valet_route", "renamed-long-ago"),
    )
    .await;
    assert_eq!(a.reason(), "anonymous");
    let a = check(
        &mut c,
        get("/orders")
            .context("valet_route", "orders-read")
            .bearer(&t),
    )
    .await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(meta_str(&a.metadata, "route"), "orders-read");
}
