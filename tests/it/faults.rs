//! Faults under load: while valid Checks run throughout, the IdP dies, stalls and
//! talks nonsense, the policy file is deleted, truncated, replaced by binary and
//! made unreadable, and junk arrives on the Check port. Not one valid Check may
//! fail, each fault must be logged, and everything must recover when it ends.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::jwks_server::{JwksServer, Mode};
use common::*;
use jsonwebtoken::Algorithm;
use tokio::io::AsyncWriteExt;

struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Valid Checks from 4 clients throughout, at `common::load::STEADY` a second
/// together: every fault meets Checks in flight (`fault_seen` waits for 20 more
/// after each), and a failure among them is what the tests look for, not speed.
async fn start_load(v: &Valet, path: &'static str) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = v.client().await;
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let token = token(Algorithm::ES256, &claims("orders:read"));
        tasks.push(common::spawn(async move {
            let mut pace = common::load::Pace::share(common::load::STEADY, 4);
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                let a = check(&mut c, get(path).bearer(&token)).await;
                if a.allowed() {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("valid Check failed: {} {}", a.reason(), a.body);
                }
            }
        }));
    }
    Load {
        stop,
        ok,
        failed,
        tasks,
    }
}

impl Load {
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_faults_under_load() {
    let mut server = JwksServer::start(jwks_with(&["ec256-1"])).await;
    let v = Valet::start(&format!(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks:\n      uri: {}/jwks\n      refresh_interval: 1s\n      min_refresh: 1s\n      max_refresh: 1s\n      timeout: 300ms\nroutes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\n",
        server.url()
    ));
    assert!(v.wait_ready(200, Duration::from_secs(10)).await);
    let _load = common::load_slot().await;
    let load = start_load(&v, "/orders").await;

    // Each fault lasts until Valet has logged the failed refresh it causes.
    server.stop();
    assert!(v.logged("connection failed").await, "{}", v.logs());
    server.restart().await;
    server.set_mode(Mode::Slow(Duration::from_secs(2)));
    assert!(v.logged("timed out").await, "{}", v.logs());
    server.set_mode(Mode::Garbage);
    assert!(v.logged("not a JWKS document").await, "{}", v.logs());
    server.set_mode(Mode::Status(503));
    assert!(v.logged("HTTP 503").await, "{}", v.logs());
    // Recovery: a rotation published now is followed.
    server.set_mode(Mode::Ok);
    server.set_jwks(jwks_with(&["ec256-1", "rsa-1"]));
    let mut c = v.client().await;
    let mut recovered = false;
    for _ in 0..100 {
        if check(&mut c, get("/orders").bearer(&rs256("orders:read")))
            .await
            .allowed()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, failed) = load.finish().await;
    eprintln!("idp faults: {ok} valid Checks passed, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 100);
    assert!(recovered, "new keys after the faults");
    let logs = v.logs();
    for why in [
        "connection failed",
        "timed out",
        "not a JWKS document",
        "HTTP 503",
    ] {
        assert!(logs.contains(why), "no log line says {why:?}");
    }
}

/// Makes a change to the policy file and lasts until Valet has read it (its
/// `valet_policy_reload_total{result}` moved) and 20 more valid Checks have run
/// since: each fault is in force under load, however quick the machine.
async fn fault_seen(v: &Valet, load: &Load, result: &str, change: impl FnOnce()) {
    let series = format!("valet_policy_reload_total{{result=\"{result}\"}}");
    let before = v.metric(&series).await.unwrap_or(0.0);
    let ok = load.ok.load(Ordering::Relaxed);
    change();
    for _ in 0..1000 {
        if v.metric(&series).await.unwrap_or(0.0) > before
            && load.ok.load(Ordering::Relaxed) >= ok + 20
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "no {series} after a change to the policy file:\n{}",
        v.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_faults_under_load() {
    let base = "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks: { file: jwks.json }\nroutes:\n  - name: orders\n    match: { path_prefix: /orders }\n    require: { scopes: [orders:read] }\n";
    let v = Valet::start(base);
    let path = v.dir.path().join("valet.yaml");
    let good = std::fs::read(&path).unwrap();
    let _load = common::load_slot().await;
    let load = start_load(&v, "/orders").await;

    fault_seen(&v, &load, "error", || std::fs::remove_file(&path).unwrap()).await;
    fault_seen(&v, &load, "success", || {
        std::fs::write(&path, &good).unwrap()
    })
    .await;
    fault_seen(&v, &load, "error", || std::fs::write(&path, b"").unwrap()).await;
    let half = &good[..good.len() / 2];
    fault_seen(&v, &load, "error", || std::fs::write(&path, half).unwrap()).await;
    let binary = [0u8, 159, 146, 150, 0xff, 0xfe, 7, 0];
    fault_seen(&v, &load, "error", || {
        std::fs::write(&path, binary).unwrap()
    })
    .await;
    // Unreadable: as root chmod does not stop a read, so a directory takes its place,
    // then a dangling symlink.
    fault_seen(&v, &load, "error", || {
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
    })
    .await;
    fault_seen(&v, &load, "error", || {
        std::fs::remove_dir(&path).unwrap();
        std::os::unix::fs::symlink("/nonexistent/valet.yaml", &path).unwrap();
    })
    .await;
    std::fs::remove_file(&path).unwrap();
    // Recovery: a valid, different policy takes effect.
    let changed = String::from_utf8(good.clone()).unwrap()
        + "  - name: extra\n    match: { path: /extra }\n    anonymous: true\n";
    std::fs::write(&path, changed).unwrap();
    let mut c = v.client().await;
    let mut recovered = false;
    for _ in 0..100 {
        if check(&mut c, get("/extra")).await.allowed() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, failed) = load.finish().await;
    eprintln!("policy faults: {ok} valid Checks passed, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 100);
    assert!(recovered, "a valid policy after the faults takes effect");
    let logs = v.logs();
    for why in [
        "No such file or directory",
        "the file is empty",
        "not UTF-8",
        "Is a directory",
    ] {
        assert!(logs.contains(why), "no log line says {why:?}:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_on_the_check_port_under_load() {
    let v = Valet::start(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks: { file: jwks.json }\nroutes:\n  - name: orders\n    match: { path_prefix: /orders }\n    require: { scopes: [orders:read] }\n",
    );
    let _load = common::load_slot().await;
    let load = start_load(&v, "/orders").await;
    // Raw garbage, a truncated HTTP/2 preface, and an HTTP/1 request.
    for i in 0..50u32 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(v.grpc).await {
            let junk: Vec<u8> = match i % 3 {
                0 => (0..4096).map(|b| (b * 7 + i) as u8).collect(),
                1 => {
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\xff\x04\x00\x00\x00\x00\x00".to_vec()
                }
                _ => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            };
            let _ = s.write_all(&junk).await;
        }
    }
    // Well-formed HTTP/2 with gRPC bodies that are not CheckRequests.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for body in [
        vec![0u8, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff],
        vec![1u8, 0, 0, 0, 1, 0],
        vec![0u8, 0xff, 0xff, 0xff, 0xff],
        vec![],
    ] {
        for _ in 0..10 {
            let _ = h2
                .post(format!(
                    "http://{}/envoy.service.auth.v3.Authorization/Check",
                    v.grpc
                ))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(body.clone())
                .send()
                .await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed) = load.finish().await;
    eprintln!("junk: {ok} valid Checks passed, {failed} failed");
    assert_eq!(failed, 0);
    let mut c = v.client().await;
    assert!(
        check(&mut c, get("/orders").bearer(&rs256("orders:read")))
            .await
            .allowed(),
        "still serving"
    );
}
