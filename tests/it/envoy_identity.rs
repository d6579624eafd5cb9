//! Workload identity through real Envoy: Envoy terminates mTLS with client
//! certificates whose URI SAN is a SPIFFE ID (made per run with openssl), and
//! Valet decides from the principal Envoy forwards in `source.principal`.

use crate::common;
use crate::envoy::{Envoy, start_envoy, validate};

use std::path::Path;

use common::http1::upstream;
use common::tools::{envoy_path, free_port};
use common::*;
use serde_json::{Value, json};

const WORKER: &str = "spiffe://cluster.local/ns/billing/sa/worker";
const EVIL: &str = "spiffe://cluster.local/ns/billing-evil/sa/worker";

const POLICY: &str = r#"
providers:
  - name: corp
    issuer: https://idp.test/
    audiences: [orders-api]
    jwks: { file: jwks.json }
    claims_to_headers: { sub: x-user-id }
  - name: partners
    issuer: api-keys:partners
    api_keys: { file: keys.yaml }
    tokens_from: [{ header: x-api-key }]
    claims_to_headers: { partner: x-partner }
routes:
  - name: health
    match: { path: /healthz }
    anonymous: true
  - name: internal
    match: { path_prefix: /internal }
    require: { principals: ['spiffe://cluster.local/ns/billing/sa/*'] }
  - name: invoices
    match: { path_prefix: /invoices }
    require:
      any_of:
        - { scopes: [invoices:read] }
        - { principals: [spiffe://cluster.local/ns/billing/sa/worker] }
  - name: partner
    match: { path_prefix: /partner }
    require: { providers: [partners], claims: { partner: acme } }
"#;

/// Valet in process on `policy`, with the JWKS and a key file holding `key`'s digest.
fn start_valet(policy: &str, key: &str) -> Valet {
    let dir = tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks().to_string()).unwrap();
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!(
            "keys:\n  - sha256: {}\n    claims: {{ partner: acme }}\n",
            valet::api_keys::hex_digest(key)
        ),
    )
    .unwrap();
    let path = dir.path().join("valet.yaml");
    std::fs::write(&path, with_free_ports(policy)).unwrap();
    Valet::in_process_at(dir, &path)
}

/// Client certificates whose only URI SAN is each SPIFFE ID: `client<i>`.
fn make_spiffe_pki(dir: &Path, ids: &[&str]) {
    let exts: Vec<(String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let ext = format!("subjectAltName=URI:{id}\nextendedKeyUsage=clientAuth\n");
            (format!("client{i}"), ext)
        })
        .collect();
    let clients: Vec<(&str, &str)> = exts.iter().map(|(n, e)| (n.as_str(), e.as_str())).collect();
    common::pki::make(dir, &clients);
}

/// Envoy on `cfg` (validated first), ready, with a client for each certificate:
/// the billing worker's, and the other namespace's.
async fn run(
    cfg: &Value,
    pki: &Path,
    listen: u16,
) -> ((Envoy, TempDir), reqwest::Client, reqwest::Client) {
    let dir = tempdir().unwrap();
    let config_path = dir.path().join("envoy.yaml");
    std::fs::write(&config_path, serde_json::to_string_pretty(cfg).unwrap()).unwrap();
    let envoy_bin = envoy_path();
    validate(&envoy_bin, &config_path);
    let envoy = start_envoy(&envoy_bin, &config_path, dir.path());
    let (worker, evil) = (
        common::pki::client(pki, "client0"),
        common::pki::client(pki, "client1"),
    );
    let url = format!("https://127.0.0.1:{listen}/healthz");
    common::pki::wait_ok(&worker, &url, || envoy.log()).await;
    // Its config and log stay as long as Envoy runs.
    ((envoy, dir), worker, evil)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_mtls_principals_decide_alone_or_as_one_alternative() {
    let pki = tempdir().unwrap();
    make_spiffe_pki(pki.path(), &[WORKER, EVIL]);
    let (up_addr, seen) = upstream().await;
    let (key, _) = valet::api_keys::generate().unwrap();
    let valet = start_valet(POLICY, &key);
    let (listen, admin) = (free_port(), free_port());
    // The Envoy side generated from the policy (`valet envoy-config`), behind mTLS.
    let mut cfg: Value =
        serde_yaml::from_slice(&crate::envoy::generated(&valet, listen, up_addr, admin)).unwrap();
    common::pki::require_mtls(&mut cfg, pki.path());
    let (_envoy, worker, evil) = run(&cfg, pki.path(), listen).await;
    let url = |p: &str| format!("https://127.0.0.1:{listen}{p}");
    let reached = |n: usize| seen.lock().unwrap().len() == n;

    // The allowed workload, no token at all.
    let before = seen.lock().unwrap().len();
    let r = worker.get(url("/internal/run")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert!(reached(before + 1));

    // Another namespace's workload: 403 principal_not_allowed, even with a token.
    let r = evil
        .get(url("/internal/run"))
        .bearer_auth(rs256("invoices:read"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["error"], "principal_not_allowed");
    assert!(reached(before + 1), "denied: never reached the upstream");

    // any_of: the user token works from any workload; the worker without one.
    let r = evil
        .get(url("/invoices/1"))
        .bearer_auth(rs256("invoices:read"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.all("x-user-id"), ["alice"]);
    assert!(
        last.all("authorization").is_empty(),
        "the token is not forwarded"
    );
    let r = worker.get(url("/invoices/1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = evil.get(url("/invoices/1")).send().await.unwrap();
    assert_eq!(r.status(), 401, "a token would do: the challenge");
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );

    // The partner's API key: sent to Valet, removed before the upstream.
    let r = evil
        .get(url("/partner/x"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.all("x-partner"), ["acme"]);
    assert!(
        last.all("x-api-key").is_empty(),
        "the key never reaches the upstream"
    );
    let r = evil
        .get(url("/partner/x"))
        .header("x-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// HTTP mode behind real Envoy (`http_service`), Envoy terminating mTLS and
/// writing `x-forwarded-client-cert` (SANITIZE_SET): the principal Valet reads is
/// the certificate's, and a client's forged header never counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_http_service_forwards_the_principal_in_xfcc_and_drops_a_forged_one() {
    let pki = tempdir().unwrap();
    make_spiffe_pki(pki.path(), &[WORKER, EVIL]);
    let (up_addr, seen) = upstream().await;
    let policy = POLICY.replacen(
        "providers:",
        "listen:\n  grpc: 127.0.0.1:0\n  admin: 127.0.0.1:0\n  http: 127.0.0.1:0\n  http_proxy: envoy\n  http_client_cert: xfcc\nproviders:",
        1,
    );
    let valet = start_valet(&policy, "unused");
    let (listen, admin) = (free_port(), free_port());
    let mut cfg: Value = serde_yaml::from_str(&crate::http_proxies::envoy_config(
        listen,
        valet.http.expect("http listener").port(),
        up_addr.port(),
        admin,
    ))
    .unwrap();
    common::pki::require_mtls(&mut cfg, pki.path());
    let hcm = &mut cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["forward_client_cert_details"] = json!("SANITIZE_SET");
    hcm["set_current_client_cert_details"] = json!({ "uri": true });
    hcm["http_filters"][0]["typed_config"]["allowed_headers"] = json!({
        "patterns": [
            { "exact": "x-forwarded-client-cert" },
            { "exact": "authorization" }
        ]
    });
    let (_envoy, worker, evil) = run(&cfg, pki.path(), listen).await;
    let url = |p: &str| format!("https://127.0.0.1:{listen}{p}");
    let r = worker.get(url("/internal/run")).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "{}\n{}",
        r.text().await.unwrap(),
        valet.logs()
    );
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert!(last.all("x-forwarded-client-cert")[0].contains(WORKER));

    let forged = format!("URI={WORKER}");
    let r = evil
        .get(url("/internal/run"))
        .header("x-forwarded-client-cert", &forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a client's own XFCC never counts");
    assert_eq!(r.headers()["x-valet-reason"], "principal_not_allowed");
    let r = evil
        .get(url("/invoices/1"))
        .bearer_auth(rs256("invoices:read"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "any_of: the user token works");
}
