//! Start-up and shutdown: SIGTERM makes Valet unready first, keeps answering while
//! Envoy drains, then exits 0.

use crate::common;

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
    // Its last lines may still be in the pipe when the process is reaped.
    assert!(v.wait_for_log("stopped"), "{}", v.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_checks_are_shed_with_a_clear_answer() {
    use common::jwks_server::{JwksServer, Mode};
    // One slow server: the JWKS of `corp` and the introspection endpoint of `opaque`.
    let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
    let dir = tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s\n").unwrap();
    let path = dir.path().join("valet.yaml");
    std::fs::write(
        &path,
        with_free_ports(&format!(
            "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks:\n      uri: {0}/jwks\n      unknown_kid_wait: 800ms\n      timeout: 2s\n  - name: opaque\n    issuer: https://opaque.test/\n    introspection: {{ endpoint: {0}/jwks, client_id: valet, client_secret_file: secret, timeout: 2s }}\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n",
            server.url()
        )),
    )
    .unwrap();
    let v = Valet::spawn(dir, &path, &[("VALET_MAX_IN_FLIGHT", "1")]);
    assert!(v.wait_ready(200, Duration::from_secs(10)).await);
    // The server holds its answers until released: no guess at how long a Check waits.
    let gate = common::jwks_server::held();
    server.set_mode(Mode::Held(gate.clone()));
    let mut c2 = v.client().await;

    // A token with a new kid makes its Check wait for a refetch; waiting holds no
    // slot, so the only slot is free for a valid token meanwhile.
    let (key, _) = signing_key(jsonwebtoken::Algorithm::RS256);
    let new_kid = sign_raw(
        &serde_json::json!({"alg": "RS256", "kid": "new"}),
        &claims(""),
        &key,
        jsonwebtoken::Algorithm::RS256,
    );
    let mut c1 = v.client().await;
    let asked = server.requests();
    let waiting = common::spawn(async move { check(&mut c1, get("/").bearer(&new_kid)).await });
    // The refetch has reached the server: the Check is waiting on it.
    assert!(
        server
            .wait_requests(asked, 1, Duration::from_secs(10))
            .await
    );
    assert!(check(&mut c2, get("/").bearer(&rs256(""))).await.allowed());
    assert_eq!(waiting.await.unwrap().reason(), "unknown_key");

    // An opaque token's Check awaits its introspection, working on it: it holds
    // the only slot, and the next Check is shed.
    let mut c1 = v.client().await;
    let asked = server.requests();
    let introspecting =
        common::spawn(async move { check(&mut c1, get("/").bearer("opaque-token")).await });
    // The introspection has reached the server: its Check holds the slot.
    assert!(
        server
            .wait_requests(asked, 1, Duration::from_secs(10))
            .await
    );
    let a = check(&mut c2, get("/").bearer(&rs256(""))).await;
    assert_eq!(
        (a.http_status, a.grpc_code, a.reason().as_str()),
        (503, 14, "overloaded")
    );
    // The endpoint answers (a JWKS, not an introspection response).
    common::jwks_server::release(&gate);
    assert_eq!(
        introspecting.await.unwrap().reason(),
        "introspection_unavailable"
    );
    // The slot is free again.
    assert!(check(&mut c2, get("/").bearer(&rs256(""))).await.allowed());
}
