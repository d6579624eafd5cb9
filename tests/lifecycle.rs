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
