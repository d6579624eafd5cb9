//! Start-up and shutdown: SIGTERM makes Valet unready first, keeps answering while
//! Envoy drains, then exits 0.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_cleanly() {
    let policy = "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks: { file: jwks.json }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n";
    let mut v = Valet::start_with(
        policy,
        &[
            ("VALET_DRAIN", "1500ms"),
            ("VALET_SHUTDOWN_GRACE", "2s"),
            ("VALET_LOG", "info"),
        ],
    );
    let mut c = v.client().await;
    let token = rs256("");
    assert!(check(&mut c, get("/").bearer(&token)).await.allowed());
    assert_eq!(v.admin_get("/readyz").await.0, 200);

    let sent = Instant::now();
    v.terminate();
    assert!(v.wait_for_log("draining"));
    assert_eq!(
        v.admin_get("/readyz").await.0,
        503,
        "not ready once draining"
    );
    // Still answering on the open connection during the drain.
    assert!(check(&mut c, get("/").bearer(&token)).await.allowed());
    let status = v.wait_exit(Duration::from_secs(10)).expect("valet exits");
    assert!(status.success(), "{status:?}");
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(1400), "drained for {took:?}");
    assert!(v.logs().contains("stopped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_checks_are_shed_with_a_clear_answer() {
    use common::jwks_server::{JwksServer, Mode};
    let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
    let policy = format!(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks:\n      uri: {}/jwks\n      unknown_kid_wait: 800ms\n      timeout: 2s\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n",
        server.url()
    );
    let v = Valet::start_with(&policy, &[("VALET_MAX_IN_FLIGHT", "1")]);
    assert!(v.wait_ready(200, Duration::from_secs(10)).await);
    // The IdP turns slow; a token with a new kid makes its Check wait for a refetch,
    // holding the only slot.
    server.set_mode(Mode::Slow(Duration::from_secs(2)));
    let (key, _) = signing_key(jsonwebtoken::Algorithm::RS256);
    let new_kid = sign_raw(
        &serde_json::json!({"alg": "RS256", "kid": "new"}),
        &claims(""),
        &key,
        jsonwebtoken::Algorithm::RS256,
    );
    let mut c1 = v.client().await;
    let waiting = tokio::spawn(async move { check(&mut c1, get("/").bearer(&new_kid)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c2 = v.client().await;
    let a = check(&mut c2, get("/").bearer(&rs256(""))).await;
    assert_eq!(
        (a.http_status, a.grpc_code, a.reason().as_str()),
        (503, 14, "overloaded")
    );
    assert_eq!(waiting.await.unwrap().reason(), "unknown_key");
    // The slot is free again.
    assert!(check(&mut c2, get("/").bearer(&rs256(""))).await.allowed());
}
