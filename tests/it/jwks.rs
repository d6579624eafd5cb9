//! Remote JWKS against a real HTTP server on 127.0.0.1 that the test controls:
//! rotations followed, outages survived, floods of unknown kids contained.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::jwks_server::{JwksServer, Mode};
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

fn remote_config(uri: &str, extra: &str) -> String {
    format!(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks:\n      uri: {uri}\n{extra}routes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_is_followed_without_dropping_a_valid_check() {
    let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
    let v = Valet::in_process(&remote_config(&format!("{}/jwks", server.url()), ""));
    assert!(
        v.wait_ready(200, Duration::from_secs(10)).await,
        "{}",
        v.logs()
    );

    // Checks run throughout, each signed with whatever key the IdP signs with now.
    let signer = Arc::new(AtomicU64::new(0)); // 0 = RS256 (rsa-1), 1 = ES256 (ec256-1)
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_new_ok = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let load = {
        let (signer, stop, ok, failed, first) = (
            signer.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            first_new_ok.clone(),
        );
        let mut c = v.client().await;
        common::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let alg = if signer.load(Ordering::Relaxed) == 0 {
                    Algorithm::RS256
                } else {
                    Algorithm::ES256
                };
                let a = check(
                    &mut c,
                    get("/orders").bearer(&token(alg, &claims("orders:read"))),
                )
                .await;
                if a.allowed() {
                    ok.fetch_add(1, Ordering::Relaxed);
                    if alg == Algorithm::ES256 {
                        first.lock().unwrap().get_or_insert(Instant::now());
                    }
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed during rotation: {} {}", a.reason(), a.body);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fetches_before = server.requests();
    // The IdP publishes a new key and signs with it at once: the worst case.
    server.set_jwks(jwks_with(&["ec256-1", "rsa-1"]));
    let rotated = Instant::now();
    signer.store(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Then retires the old key.
    server.set_jwks(jwks_with(&["ec256-1"]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    let latency = first_new_ok
        .lock()
        .unwrap()
        .expect("a token with the new kid passed")
        - rotated;
    eprintln!(
        "rotation: first new-kid token accepted {:.1} ms after the rotation; {} IdP fetches; {} checks ok",
        latency.as_secs_f64() * 1e3,
        server.requests() - fetches_before,
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no valid Check may fail during a rotation"
    );
    assert!(ok.load(Ordering::Relaxed) > 20);
    assert_eq!(
        server.requests() - fetches_before,
        1,
        "one refetch for the new kid"
    );
    assert_eq!(
        v.metric("valet_jwks_keyset_changes_total{provider=\"corp\"}")
            .await,
        Some(2.0),
        "startup and rotation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_keep_the_last_good_keys() {
    let mut server = JwksServer::start(jwks_with(&["rsa-1"])).await;
    let extra = "      refresh_interval: 1s\n      min_refresh: 1s\n      max_refresh: 1s\n      timeout: 300ms\n";
    let v = Valet::in_process(&remote_config(&format!("{}/jwks", server.url()), extra));
    assert!(v.wait_ready(200, Duration::from_secs(10)).await);
    let mut c = v.client().await;
    let good = rs256("orders:read");

    // Unchanged sets are confirmed with ETag / 304.
    let seen = server.requests();
    assert!(server.wait_requests(seen, 1, Duration::from_secs(5)).await);
    assert!(server.state.lock().unwrap().not_modified >= 1);

    // Each outage, until Valet has logged the failed refresh it causes.
    for (mode, why) in [
        (Mode::Status(500), "HTTP 500"),
        (Mode::Status(404), "HTTP 404"),
        (Mode::Slow(Duration::from_secs(2)), "timed out"),
        (Mode::Garbage, "not a JWKS document"),
        (Mode::Huge(10 * 1024 * 1024), "more than 1048576 bytes"),
    ] {
        server.set_mode(mode.clone());
        assert!(v.logged(why).await, "{mode:?}: no failed refresh logged");
        let a = check(&mut c, get("/orders").bearer(&good)).await;
        assert!(a.allowed(), "{mode:?}: {a:?}");
    }
    // A set with no usable key is refused too.
    server.set_mode(Mode::Ok);
    server.set_jwks(
        json!({"keys": [{"kty": "RSA", "use": "enc", "kid": "x", "n": "AQAB", "e": "AQAB"}]}),
    );
    assert!(v.logged("no usable key").await);
    assert!(check(&mut c, get("/orders").bearer(&good)).await.allowed());
    // And the server gone entirely.
    server.stop();
    assert!(v.logged("connection failed").await);
    assert!(check(&mut c, get("/orders").bearer(&good)).await.allowed());
    assert_eq!(
        v.admin_get("/readyz").await.0,
        200,
        "stale keys still serve"
    );

    let logs = v.logs();
    assert!(logs.contains("keeping the last good key set"), "{logs}");
    for why in [
        "HTTP 500",
        "HTTP 404",
        "timed out",
        "not a JWKS document",
        "more than 1048576 bytes",
        "no usable key",
        "connection failed",
    ] {
        assert!(logs.contains(why), "no log line says {why:?}");
    }
    let errors = v
        .metric("valet_jwks_refresh_total{provider=\"corp\",result=\"error\",trigger=\"interval\"}")
        .await;
    assert!(errors.unwrap_or(0.0) >= 7.0, "{errors:?}");
    assert!(v.metric("valet_jwks_refresh_total{provider=\"corp\",result=\"not_modified\",trigger=\"interval\"}").await.is_some());

    // Recovery: the server returns with a new key, which is picked up.
    server.set_jwks(jwks_with(&["rsa-1", "ec256-1"]));
    server.restart().await;
    let es = token(Algorithm::ES256, &claims("orders:read"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check(&mut c, get("/orders").bearer(&es)).await.allowed() {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_kids_causes_at_most_one_fetch() {
    let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
    let v = Valet::in_process(&remote_config(&format!("{}/jwks", server.url()), ""));
    assert!(v.wait_ready(200, Duration::from_secs(10)).await);
    let before = server.requests();
    let signed = rs256("orders:read");
    let sig: Arc<str> = signed.rsplit('.').next().unwrap().into();
    let mut tasks = Vec::new();
    for t in 0..20 {
        let mut c = v.client().await;
        let sig = sig.clone();
        tasks.push(common::spawn(async move {
            let mut reasons = Vec::new();
            for i in 0..50 {
                let kid = format!("random-{t}-{i}-{}", now());
                // The signature of the first token, reused: a kid Valet does not
                // know is refused before any signature is looked at, and an
                // attacker cannot sign for the IdP's key anyway.
                let tok = format!(
                    "{}.{}.{sig}",
                    URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "kid": kid}).to_string()),
                    URL_SAFE_NO_PAD.encode(claims("orders:read").to_string()),
                );
                reasons.push(check(&mut c, get("/orders").bearer(&tok)).await.reason());
            }
            reasons
        }));
    }
    let mut denied = 0;
    for t in tasks {
        for r in t.await.unwrap() {
            assert_eq!(r, "unknown_key");
            denied += 1;
        }
    }
    let fetches = server.requests() - before;
    eprintln!("flood: {denied} Checks with random kids caused {fetches} JWKS fetch(es)");
    assert_eq!(denied, 1000);
    assert!(fetches <= 1, "{fetches} fetches");
    // Valid tokens were never affected.
    let mut c = v.client().await;
    assert!(
        check(&mut c, get("/orders").bearer(&rs256("orders:read")))
            .await
            .allowed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_an_outage_serves_from_the_cache() {
    let mut server = JwksServer::start(jwks_with(&["rsa-1"])).await;
    let cache = tempdir().unwrap();
    let extra = format!("      cache_dir: {}\n", cache.path().display());
    let config = remote_config(&format!("{}/jwks", server.url()), &extra);
    {
        let v = Valet::in_process(&config);
        assert!(v.wait_ready(200, Duration::from_secs(10)).await);
        // The cache file is written after the keys are published (ready), not before.
        let cached = cache.path().join("corp.jwks.json");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cached.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(cached.exists());
    }
    server.stop();
    let v = Valet::in_process(&config);
    assert_eq!(
        v.admin_get("/readyz").await.0,
        200,
        "ready from the cache at once"
    );
    let mut c = v.client().await;
    assert!(
        check(&mut c, get("/orders").bearer(&rs256("orders:read")))
            .await
            .allowed()
    );
    assert!(v.logs().contains("jwks loaded from cache"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_checks_are_503_and_readiness_waits() {
    let mut server = JwksServer::start(jwks_with(&["rsa-1"])).await;
    server.stop();
    let v = Valet::in_process(&remote_config(&format!("{}/jwks", server.url()), ""));
    let (status, body) = v.admin_get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("corp"), "{body}");
    let mut c = v.client().await;
    let a = check(&mut c, get("/orders").bearer(&rs256("orders:read"))).await;
    assert_eq!(
        (a.http_status, a.grpc_code, a.reason().as_str()),
        (503, 14, "keys_unavailable")
    );
    // Anonymous and missing-token answers do not need keys.
    assert_eq!(
        check(&mut c, get("/orders")).await.reason(),
        "missing_token"
    );
    server.restart().await;
    assert!(
        v.wait_ready(200, Duration::from_secs(10)).await,
        "{}",
        v.logs()
    );
    assert!(
        check(&mut c, get("/orders").bearer(&rs256("orders:read")))
            .await
            .allowed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_must_report_the_configured_issuer() {
    let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
    let issuer = server.url();
    let config = format!(
        "providers:\n  - name: corp\n    issuer: {issuer}\n    jwks: {{ discovery: true }}\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n"
    );
    let v = Valet::in_process(&config);
    assert!(
        v.wait_ready(200, Duration::from_secs(10)).await,
        "{}",
        v.logs()
    );
    let mut cl = claims("");
    cl["iss"] = json!(issuer);
    let mut c = v.client().await;
    assert!(
        check(&mut c, get("/").bearer(&token(Algorithm::RS256, &cl)))
            .await
            .allowed()
    );
    drop(v);

    server.state.lock().unwrap().issuer = Some("https://impostor.test".into());
    let v = Valet::in_process(&config);
    assert!(v.wait_for_log("configured"), "{}", v.logs());
    assert!(v.logs().contains("issuer is \"https://impostor.test\""));
    assert_eq!(v.admin_get("/readyz").await.0, 503);
}

#[tokio::test]
async fn a_jwks_file_is_reread_when_it_changes() {
    let v = Valet::in_process(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks: { file: jwks.json }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n",
    );
    let mut c = v.client().await;
    let es = token(Algorithm::ES256, &claims(""));
    assert!(check(&mut c, get("/").bearer(&rs256(""))).await.allowed());
    // Replace the file the way Kubernetes does: a new file renamed over the old.
    let path = v.dir.path().join("jwks.json");
    let swap = |content: String| {
        let tmp = v.dir.path().join(".jwks.tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    swap(jwks_with(&["ec256-1"]).to_string());
    assert!(v.wait_for_log("trigger=\"file_change\""), "{}", v.logs());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        check(&mut c, get("/").bearer(&rs256(""))).await.reason(),
        "unknown_key"
    );
    assert!(check(&mut c, get("/").bearer(&es)).await.allowed());
    // A broken file keeps the last good keys.
    swap("{ not json".into());
    assert!(v.wait_for_log("keeping the last good key set"));
    assert!(check(&mut c, get("/").bearer(&es)).await.allowed());
}
