//! Who is calling: `require.principals` (the workload identity Envoy forwards),
//! `require.any_of` alternatives over the one token, and (HTTP mode) the
//! principal from Envoy's `x-forwarded-client-cert`.

use crate::common;

use common::*;

const BILLING: &str = "spiffe://cluster.local/ns/billing/sa/worker";
const EVIL: &str = "spiffe://cluster.local/ns/billing-evil/sa/worker";

const POLICY: &str = r#"
realm: test
providers:
  - name: corp
    issuer: https://idp.test/
    audiences: [orders-api]
    jwks: { file: jwks.json }
    claims_to_headers: { sub: x-user-id }
routes:
  - name: internal
    match: { path_prefix: /internal }
    require: { principals: ['spiffe://cluster.local/ns/billing/sa/*'] }
  - name: invoices
    match: { path_prefix: /invoices }
    require:
      any_of:
        - { scopes: [invoices:read] }
        - { principals: [spiffe://cluster.local/ns/billing/sa/worker] }
  - name: both
    match: { path_prefix: /both }
    require: { scopes: [orders:read], principals: [spiffe://cluster.local/ns/billing/sa/worker] }
"#;

async fn client() -> (
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
async fn a_principal_route_admits_its_workloads_without_a_token() {
    let (v, mut c) = client().await;
    let a = check(&mut c, get("/internal/run").principal(BILLING)).await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(a.reason(), "principal");
    assert!(
        a.remove.contains(&"x-user-id".to_string()),
        "no identity from a token, and the client's own removed: {a:?}"
    );
    for (who, what) in [
        (EVIL, "another namespace"),
        (
            "spiffe://cluster.local/ns/billing/sa/../../billing-evil/sa/x",
            "dot segments",
        ),
        ("spiffe://cluster.local/ns/billing/sa/%77orker", "an escape"),
        ("", "no principal"),
    ] {
        let a = check(
            &mut c,
            get("/internal/run")
                .principal(who)
                .bearer(&rs256("orders:read")),
        )
        .await;
        assert_eq!(a.http_status, 403, "{what}: {a:?}");
        assert_eq!(a.reason(), "principal_not_allowed", "{what}");
        assert_eq!(a.body["status"], 403);
        assert_eq!(a.body["route"], "internal");
        assert_eq!(a.challenge(), "", "a token would not help: no challenge");
    }
    let m = v
        .metric("valet_check_total{decision=\"deny\",reason=\"principal_not_allowed\",route=\"internal\"}")
        .await;
    assert_eq!(m, Some(4.0));
    let (_, metrics) = v.admin_get("/metrics").await;
    assert!(!metrics.contains("spiffe"), "principals are never labels");
}

#[tokio::test]
async fn any_of_takes_a_user_token_or_the_workload() {
    let (_v, mut c) = client().await;
    // The user with the scope.
    let a = check(&mut c, get("/invoices/1").bearer(&rs256("invoices:read"))).await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(a.reason(), "verified");
    assert_eq!(a.headers["x-user-id"], "alice");
    // The workload, no token.
    let a = check(&mut c, get("/invoices/1").principal(BILLING)).await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(a.reason(), "principal");
    // The workload with a token that fails: the second alternative still holds.
    let a = check(
        &mut c,
        get("/invoices/1").principal(BILLING).bearer("not-a-jwt"),
    )
    .await;
    assert!(a.allowed(), "{a:?}");
    // Nobody, no token: the 401 challenge, since a token would do.
    let a = check(&mut c, get("/invoices/1").principal(EVIL)).await;
    assert_eq!((a.http_status, a.reason().as_str()), (401, "missing_token"));
    assert!(a.challenge().starts_with("Bearer realm=\"test\""), "{a:?}");
    // A token without the scope: the token alternative's own answer.
    let a = check(&mut c, get("/invoices/1").bearer(&rs256("orders:read"))).await;
    assert_eq!(
        (a.http_status, a.reason().as_str()),
        (403, "insufficient_scope")
    );
    assert!(a.challenge().contains("scope=\"invoices:read\""), "{a:?}");
    // A bad token: invalid_token.
    let mut bad = rs256("invoices:read");
    bad.push('x');
    let a = check(&mut c, get("/invoices/1").bearer(&bad)).await;
    assert_eq!((a.http_status, a.reason().as_str()), (401, "bad_signature"));
}

#[tokio::test]
async fn a_requirement_of_both_needs_both() {
    let (_v, mut c) = client().await;
    let token = rs256("orders:read");
    let a = check(&mut c, get("/both").principal(BILLING).bearer(&token)).await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(a.headers["x-user-id"], "alice");
    let a = check(&mut c, get("/both").principal(EVIL).bearer(&token)).await;
    assert_eq!(
        (a.http_status, a.reason().as_str()),
        (403, "principal_not_allowed")
    );
    let a = check(&mut c, get("/both").principal(BILLING)).await;
    assert_eq!((a.http_status, a.reason().as_str()), (401, "missing_token"));
}

/// HTTP mode behind Envoy (`http_client_cert: xfcc`): the principal comes from
/// the one XFCC element Envoy writes; a second element (appended to a client's
/// own header) is refused, and nginx's family never counts.
#[tokio::test]
async fn http_mode_reads_the_principal_from_envoys_xfcc_only() {
    let policy = POLICY.replace(
        "realm: test\n",
        "realm: test\nlisten:\n  grpc: 127.0.0.1:0\n  admin: 127.0.0.1:0\n  http: 127.0.0.1:0\n  http_proxy: envoy\n  http_client_cert: xfcc\n",
    );
    let v = Valet::in_process(&policy);
    let ask = |headers: Vec<(&'static str, String)>| {
        let url = format!("http://{}/internal/x", v.http.expect("http listener"));
        async move {
            let mut req = reqwest::Client::new().get(url);
            for (k, val) in headers {
                req = req.header(k, val);
            }
            req.send().await.unwrap()
        }
    };
    let xfcc =
        format!("By=spiffe://cluster.local/ns/app/sa/app;Hash=ab;Subject=\"CN=w\";URI={BILLING}");
    let r = ask(vec![("x-forwarded-client-cert", xfcc.clone())]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-valet-reason"], "principal");
    let r = ask(vec![("x-forwarded-client-cert", format!("URI={EVIL}"))]).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-valet-reason"], "principal_not_allowed");
    let r = ask(vec![(
        "x-forwarded-client-cert",
        format!("URI={BILLING},{xfcc}"),
    )])
    .await;
    assert_eq!(
        r.status(),
        400,
        "two elements: a client's header with one appended"
    );
    let r = ask(vec![]).await;
    assert_eq!(r.status(), 403);

    // Behind nginx, xfcc is a configuration error, and the header is never read.
    let nginx = policy.replace("http_proxy: envoy", "http_proxy: nginx");
    let dir = tempdir().unwrap();
    let path = dir.path().join("valet.yaml");
    std::fs::write(&path, &nginx).unwrap();
    let e = valet::load::load(&path).err().expect("refused").to_string();
    assert!(
        e.contains("listen.http_client_cert: xfcc needs listen.http_proxy: envoy"),
        "{e}"
    );
}

/// The generated Envoy and Istio config: a route that admits workloads without
/// a token is still checked (never skipped as anonymous, no token demanded in
/// front), and an API key's header is among those Envoy sends Valet.
#[test]
fn generators_check_principal_routes_and_forward_api_key_headers() {
    let dir = tempdir().unwrap();
    std::fs::write(dir.path().join("keys.yaml"), "keys: []\n").unwrap();
    let src = format!(
        "{}  - name: partners\n    issuer: api-keys:partners\n    api_keys: {{ file: keys.yaml }}\n    tokens_from: [{{ header: x-api-key }}]\n",
        POLICY.split("routes:").next().unwrap().replace(
            "jwks: { file: jwks.json }",
            "jwks: { uri: 'https://idp.test/jwks' }"
        )
    ) + "routes:"
        + POLICY.split("routes:").nth(1).unwrap();
    let path = dir.path().join("valet.yaml");
    let loaded = valet::load::parse(&src, &path).unwrap_or_else(|e| panic!("{e}"));
    let a: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let b = valet::envoy_config::bootstrap(
        &loaded.policy,
        &valet::envoy_config::Options {
            listen: a,
            upstream: a,
            valet: a,
            admin: a,
            timeout_ms: 250,
        },
    );
    let hcm =
        &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let text = hcm.to_string();
    assert!(!text.contains("jwt_authn"), "no token demanded in front");
    let patterns =
        hcm["http_filters"][0]["typed_config"]["allowed_headers"]["patterns"].to_string();
    assert!(patterns.contains("x-api-key"), "{patterns}");
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]
        .as_array()
        .unwrap()
    {
        assert!(
            route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"].is_null(),
            "every route here is checked: {route}"
        );
    }
    let plan = valet::envoy_config::istio_plan(&loaded.policy);
    assert!(plan.skipped.is_empty(), "Istio skips no workload route");
}

fn valet_cli(args: &[&str]) -> (bool, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_valet"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// The example of README "Who is calling": users, one workload, one partner.
#[test]
fn the_identity_example_checks_tests_and_explains() {
    let config = "examples/identity/valet.yaml";
    let (ok, out) = valet_cli(&["check-config", "--config", config]);
    assert!(ok, "{out}");
    let (ok, out) = valet_cli(&["test", "examples/identity/policy-tests.yaml"]);
    assert!(ok && out.contains("10 passed, 0 failed"), "{out}");
    let (ok, out) = valet_cli(&[
        "explain",
        "--config",
        config,
        "--path",
        "/invoices/7",
        "--principal",
        EVIL,
        "--claims",
        r#"{"iss":"https://idp.example.com/","aud":"invoices-api","scope":"profile"}"#,
    ]);
    assert!(ok, "{out}");
    for line in [
        "(1) a workload identity one of [spiffe://cluster.local/ns/billing/sa/*] (no token)",
        "decision: DENY 403 insufficient_scope",
        "alternative (0) failed: insufficient_scope",
        "alternative (1) failed: principal_not_allowed",
        "alternative (2) failed: issuer_not_allowed: the token is of a provider this alternative does not take",
    ] {
        assert!(out.contains(line), "{line:?} in\n{out}");
    }
    let (_, out) = valet_cli(&[
        "explain",
        "--config",
        config,
        "--path",
        "/invoices/7",
        "--principal",
        BILLING,
    ]);
    assert!(
        out.contains("decision: ALLOW 200 (principal)") && out.contains("alternative (1) held"),
        "{out}"
    );
}

#[test]
fn valet_api_key_prints_a_key_once_and_its_entry() {
    let (ok, out) = valet_cli(&["api-key", "--claims", r#"{"sub":"acme"}"#]);
    assert!(ok, "{out}");
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .expect("a key");
    assert_eq!(key.len(), 43, "32 random bytes, base64url");
    let sha = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("- sha256: "))
        .expect("an entry");
    assert_eq!(sha, valet::api_keys::hex_digest(key));
    assert!(out.contains(r#"claims: {"sub":"acme"}"#), "{out}");
    let (again, _) = valet_cli(&["api-key"]);
    assert!(again);
    let (bad, out) = valet_cli(&["api-key", "--claims", "[1]"]);
    assert!(!bad && out.contains("not a JSON object"), "{out}");
}
