//! Policy hot reload under load: valid changes decide requests within seconds,
//! invalid ones never do, and no Check fails meanwhile.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const PROVIDER: &str = "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\n";

/// Two valid policies that differ on /beta only; /orders is the same in both.
fn policy(beta_public: bool) -> String {
    let beta = if beta_public {
        "    anonymous: true\n"
    } else {
        "    require: { scopes: [beta] }\n"
    };
    with_free_ports(&format!(
        "{PROVIDER}routes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\n  - name: beta\n    match: {{ path_prefix: /beta }}\n{beta}"
    ))
}

const INVALID: &[&str] = &[
    "routes: [ this is: not yaml",
    "routes:\n  - name: x\n    match: { pathh: /x }\n",
    "routes:\n  - name: x\n    match: { path_regex: '(' }\n    anonymous: true\n",
    "\u{0}\u{1}binary\u{2}",
    "",
];

/// Writes atomically (new file renamed over the old), as editors and tools do.
fn write(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Kubernetes' ConfigMap layout: valet.yaml -> ..data/valet.yaml, ..data -> ..<ts>.
fn k8s_write(dir: &Path, content: &str, n: usize) {
    let ts = dir.join(format!("..2026_{n:04}"));
    std::fs::create_dir(&ts).unwrap();
    std::fs::write(ts.join("valet.yaml"), content).unwrap();
    std::fs::write(ts.join("jwks.json"), jwks().to_string()).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

/// Every other write is invalid: 5 valid and 5 invalid, one of each kind in INVALID.
const WRITES: usize = 10;
const RELOAD_ERRORS: &str = "valet_policy_reload_total{result=\"error\"}";

async fn reload_under_load(k8s: bool) {
    let dir = tempdir().unwrap();
    let path = dir.path().join("valet.yaml");
    if k8s {
        k8s_write(dir.path(), &policy(true), 0);
        std::os::unix::fs::symlink("..data/valet.yaml", &path).unwrap();
        std::os::unix::fs::symlink("..data/jwks.json", dir.path().join("jwks.json")).unwrap();
    } else {
        std::fs::write(dir.path().join("jwks.json"), jwks().to_string()).unwrap();
        std::fs::write(&path, policy(true)).unwrap();
    }
    let root = dir.path().to_path_buf();
    let v = Valet::in_process_at(dir, &path);

    // Checks that every policy allows run throughout, at `common::load::STEADY` a
    // second: each write lands among them (a reload takes 150 ms of
    // debounce at least, so dozens of Checks each), and none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let mut c = v.client().await;
        let token = rs256("orders:read");
        common::spawn(async move {
            let mut pace = common::load::Pace::share(common::load::STEADY, 1);
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                if check(&mut c, get("/orders/1").bearer(&token))
                    .await
                    .allowed()
                {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let mut c = v.client().await;
    let mut public = true;
    let mut latencies = Vec::new();
    for n in 1..=WRITES {
        let valid = n % 2 != 0;
        let written = Instant::now();
        let content = if valid {
            public = !public;
            policy(public)
        } else {
            INVALID[n % INVALID.len()].to_string()
        };
        let errors = v.metric(RELOAD_ERRORS).await.unwrap_or(0.0);
        if k8s {
            k8s_write(&root, &content, n);
        } else {
            write(&path, &content);
        }
        let want = if public { "anonymous" } else { "missing_token" };
        if valid {
            loop {
                if check(&mut c, get("/beta")).await.reason() == want {
                    latencies.push(written.elapsed());
                    break;
                }
                // Below the 10 s fallback poll: a write the watcher missed fails here.
                assert!(
                    written.elapsed() < Duration::from_secs(5),
                    "write {n} not in force after 5 s"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        } else {
            // Valet read the broken file and refused it (its error counter moved);
            // the decisions are still the last good policy's.
            assert!(
                v.wait_metric_above(RELOAD_ERRORS, errors, Duration::from_secs(5))
                    .await,
                "invalid write {n} not read within 5 s"
            );
            for _ in 0..5 {
                assert_eq!(
                    check(&mut c, get("/beta")).await.reason(),
                    want,
                    "invalid write {n} changed a decision"
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    latencies.sort();
    eprintln!(
        "reload ({}): write → first Check under the new policy: median {:.0} ms, max {:.0} ms over {} valid writes; {} Checks ok during the test",
        if k8s {
            "ConfigMap symlink swap"
        } else {
            "rename"
        },
        latencies[latencies.len() / 2].as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        latencies.len(),
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "a Check failed during reloads"
    );
    let errors = v.metric(RELOAD_ERRORS).await.unwrap();
    assert!(errors >= (WRITES / 2) as f64, "{errors}");
    assert!(
        v.metric("valet_policy_reload_total{result=\"success\"}")
            .await
            .unwrap()
            >= (WRITES - WRITES / 2) as f64
    );
    let logs = v.logs();
    assert!(
        logs.contains("valet.yaml:3:"),
        "errors carry file:line:column"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_with_atomic_writes() {
    reload_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_with_configmap_symlink_swaps() {
    reload_under_load(true).await;
}

#[tokio::test]
async fn status_shows_the_last_error_and_sighup_reloads() {
    let v = Valet::start(&policy(true).replace(&with_free_ports(""), ""));
    let path = v.dir.path().join("valet.yaml");
    let status = || async {
        let (_, body) = v.admin_get("/statusz").await;
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    assert_eq!(status().await["policy"]["generation"], 1);
    write(&path, "routes:\n  - name: x\n    match: { pathh: /x }\n");
    assert!(v.wait_for_log("policy reload failed"));
    let s = status().await;
    assert_eq!(s["policy"]["generation"], 1);
    let err = s["policy"]["last_error"].as_str().unwrap();
    assert!(
        err.contains("valet.yaml:3:") && err.contains("unknown field `pathh`"),
        "{err}"
    );
    assert_eq!(
        v.metric("valet_policy_last_reload_successful").await,
        Some(0.0)
    );

    // A write the watcher cannot see (same inode, no event is needed for SIGHUP).
    std::fs::write(&path, policy(false)).unwrap();
    let _ = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(v.pid().to_string())
        .status();
    assert!(v.wait_for_log("trigger=\"sighup\""), "{}", v.logs());
    let s = status().await;
    assert_eq!(s["policy"]["generation"], 2);
    assert!(s["policy"]["last_error"].is_null());
    assert_eq!(
        v.metric("valet_policy_last_reload_successful").await,
        Some(1.0)
    );
    assert_eq!(v.metric("valet_policy_generation").await, Some(2.0));
}

#[tokio::test]
async fn providers_come_and_go_with_the_policy() {
    let v = Valet::start(&policy(true).replace(&with_free_ports(""), ""));
    let path = v.dir.path().join("valet.yaml");
    let mut c = v.client().await;
    let mut cl = claims("");
    cl["iss"] = serde_json::json!("https://partner.test/");
    let partner = token(jsonwebtoken::Algorithm::RS256, &cl);
    let route = "routes:\n  - name: any\n    match: { path_prefix: /any }\n";
    write(&path, &with_free_ports(&format!("{PROVIDER}{route}")));
    assert!(v.wait_for_log("generation=2"));
    assert_eq!(
        check(&mut c, get("/any").bearer(&partner)).await.reason(),
        "issuer_not_allowed"
    );
    let added = format!(
        "{PROVIDER}  - name: partner\n    issuer: https://partner.test/\n    jwks: {{ file: jwks.json }}\n{route}"
    );
    write(&path, &with_free_ports(&added));
    assert!(v.wait_for_log("generation=3"));
    assert!(check(&mut c, get("/any").bearer(&partner)).await.allowed());
    // Changing the listen addresses needs a restart, and says so.
    write(&path, &format!("listen:\n  grpc: 127.0.0.1:1\n{added}"));
    assert!(v.wait_for_log("take effect only after a restart"));
    assert!(
        check(&mut c, get("/any").bearer(&partner)).await.allowed(),
        "still serving"
    );
}
