//! A fleet on one machine: three Valet replicas (in process, each its own
//! runtime and metrics), one Redis (Debian's redis-server, started here on a
//! free port, no persistence) as `store.redis`, one IdP on 127.0.0.1 serving
//! the denylist URL and introspection. What a fleet promises:
//!
//! - a DPoP proof spent at one replica is refused at every other;
//! - one introspection request serves a token (active or not) at every replica;
//! - a denylist change at the URL is enforced by every replica within
//!   `refresh_interval` + one fetch (`timeout`): measured and printed, asserted
//!   only against that bound;
//! - Redis killed (SIGKILL, by PID) and restarted under load loses no valid Check
//!   (`dpop.on_store_error: local`: proofs spent per replica meanwhile, counted),
//!   and the replicas reconnect without a restart;
//! - a hung Redis (SIGSTOP) costs a Check the store's `timeout`, then the fallback;
//! - nothing of a token is in Redis: every key and value is scanned.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::denylist_server::DenylistServer;
use common::idp::DpopKey;
use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use serde_json::json;
use valet::shared_store::resp::Value;
use valet::shared_store::{Conn, Target};

const REFRESH: Duration = Duration::from_millis(500);
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Our own redis-server on `port`; killed (by PID) when dropped.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    fn start(port: u16) -> Redis {
        let bin = std::env::var("VALET_REDIS").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{bin}: {e} (scripts/install-test-deps.sh installs it; set VALET_REDIS)")
            });
        Redis { port, child }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A connection of the test's own (Valet's RESP client: the `redis` crate
    /// is no longer built), once Redis answers PING.
    async fn connect(&self) -> Conn {
        let target = Target::parse(&self.url(), None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = Conn::connect(&target).await
                && c.call(&[b"PING"]).await.is_ok()
            {
                return c;
            }
            assert!(Instant::now() < deadline, "redis did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGSTOP/SIGCONT to our redis-server, by its PID.
    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} {pid}");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A bulk string reply as text.
fn bulk(v: Value) -> Option<String> {
    match v {
        Value::Bulk(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        _ => None,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn replica(config: &str) -> Valet {
    let dir = tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks().to_string()).unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    let path = dir.path().join("valet.yaml");
    std::fs::write(&path, with_free_ports(config)).unwrap();
    Valet::in_process_at(dir, &path)
}

/// The fleet's config without `store:` (nor its DPoP fallback).
fn without_store(config: &str) -> String {
    let at = config.find("store:\n").expect("a store section");
    config[..at].to_string()
}

fn jwt(extra: serde_json::Value) -> String {
    let mut c = claims("orders:read");
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    token(jsonwebtoken::Algorithm::ES256, &c)
}

async fn metric_sum(fleet: &[Valet], series: &str) -> f64 {
    let mut sum = 0.0;
    for v in fleet {
        sum += v.metric(series).await.unwrap_or(0.0);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_shares_replay_introspection_and_revocation_and_survives_redis() {
    let started = Instant::now();
    let mut redis = Redis::start(free_port());
    drop(redis.connect().await);
    let idp = DenylistServer::start("revoked: []\n").await;
    let config = format!(
        "providers:\n  - name: corp\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n    jwks: {{ file: jwks.json }}\n    introspection:\n      endpoint: {}\n      client_id: valet\n      client_secret_file: secret\n      timeout: 2s\nroutes:\n  - name: dpop\n    match: {{ path_prefix: /dpop }}\n    require: {{ binding: dpop }}\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\nrevocation: {{ uri: \"{}\", refresh_interval: {}ms, timeout: {}s }}\nstore:\n  redis: {{ url: \"{}\", key_prefix: \"fleet:\", timeout: 200ms }}\ndpop: {{ on_store_error: local }}\n",
        idp.introspection_url(),
        idp.url,
        REFRESH.as_millis(),
        FETCH_TIMEOUT.as_secs(),
        redis.url()
    );
    let fleet: Vec<Valet> = (0..3).map(|_| replica(&config)).collect();
    for v in &fleet {
        assert!(
            v.wait_ready(200, Duration::from_secs(30)).await,
            "{}",
            v.logs()
        );
        assert!(
            v.wait_metric("valet_store_up", 1.0, Duration::from_secs(10))
                .await
        );
    }
    let mut clients = Vec::new();
    for v in &fleet {
        clients.push(v.client().await);
    }
    let mut tokens: Vec<String> = Vec::new();

    // 1. A DPoP proof spent at one replica is refused at the others.
    let key = DpopKey::generate();
    let bound = jwt(json!({"cnf": {"jkt": key.thumbprint()}, "jti": "bound-1"}));
    let proof = key.proof("GET", "https://api.example.com/dpop/1", Some(&bound));
    let a = check(&mut clients[0], get("/dpop/1").dpop(&bound, &proof)).await;
    assert_eq!(a.reason(), "verified", "{a:?}");
    for c in &mut clients[1..] {
        let a = check(c, get("/dpop/1").dpop(&bound, &proof)).await;
        assert_eq!(
            a.reason(),
            "invalid_dpop_proof",
            "replayed at another replica"
        );
        assert!(
            a.body["error_description"]
                .as_str()
                .unwrap()
                .contains("already used")
        );
    }
    println!("fleet: a proof spent at replica 0 is refused at replicas 1 and 2");
    tokens.extend([bound.clone(), proof.clone()]);

    // 2. One introspection request per token for the whole fleet.
    let (active, inactive) = ("active-7f3a9c1d2e", "forged-0b1c2d3e4f");
    for c in &mut clients {
        assert_eq!(
            check(c, get("/orders/1").bearer(active)).await.reason(),
            "verified"
        );
        assert_eq!(
            check(c, get("/orders/1").bearer(inactive)).await.reason(),
            "inactive_token"
        );
    }
    assert_eq!(
        idp.introspections(),
        2,
        "one request for the active token and one for the inactive, at 3 replicas"
    );
    println!(
        "fleet: 2 tokens × 3 replicas → {} introspection requests",
        idp.introspections()
    );
    tokens.extend([active.to_string(), inactive.to_string()]);
    // The same without a store: every replica asks.
    let plain: Vec<Valet> = (0..3).map(|_| replica(&without_store(&config))).collect();
    let before = idp.introspections();
    for v in &plain {
        let mut c = v.client().await;
        assert_eq!(
            check(&mut c, get("/orders/1").bearer(active))
                .await
                .reason(),
            "verified"
        );
        assert_eq!(
            check(&mut c, get("/orders/1").bearer(inactive))
                .await
                .reason(),
            "inactive_token"
        );
    }
    assert_eq!(
        idp.introspections() - before,
        6,
        "one per token per replica"
    );
    println!("fleet: without the store, 2 tokens × 3 replicas → 6 introspection requests");
    drop(plain);

    // 3. A denylist change at the URL reaches every replica within the bound.
    let victim = jwt(json!({"jti": "victim-1"}));
    tokens.push(victim.clone());
    for c in &mut clients {
        assert_eq!(
            check(c, get("/orders/1").bearer(&victim)).await.reason(),
            "verified"
        );
    }
    idp.set("revoked:\n  - jti: victim-1\n");
    let written = Instant::now();
    let bound_at = REFRESH + FETCH_TIMEOUT;
    let mut took = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        loop {
            if check(c, get("/orders/1").bearer(&victim)).await.reason() == "revoked" {
                took.push(written.elapsed());
                break;
            }
            assert!(
                written.elapsed() <= bound_at,
                "replica {i}: not revoked within refresh_interval + timeout ({bound_at:?})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!(
        "fleet: denylist URL change → revoked at each replica after {took:?} (bound {bound_at:?})"
    );

    // 4. Redis killed and restarted under load: no valid Check lost.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for (i, v) in fleet.iter().enumerate() {
        let mut c = v.client().await;
        let (stop, ok, lost) = (stop.clone(), ok.clone(), lost.clone());
        load.push(common::spawn(async move {
            let key = DpopKey::generate();
            let t = jwt(json!({"cnf": {"jkt": key.thumbprint()}, "jti": format!("load-{i}")}));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // A fresh proof each time (its own jti): valid, never a replay.
                let p = key.proof(
                    "GET",
                    &format!("https://api.example.com/dpop/{i}/{n}"),
                    Some(&t),
                );
                let a = check(&mut c, get(&format!("/dpop/{i}/{n}")).dpop(&t, &p)).await;
                if a.allowed() {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    eprintln!("replica {i}: a valid Check was {}", a.reason());
                    lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.kill();
    let killed = Instant::now();
    for v in &fleet {
        assert!(
            v.wait_metric("valet_store_up", 0.0, Duration::from_secs(10))
                .await,
            "the outage is visible"
        );
    }
    let fallbacks = metric_sum(&fleet, "valet_store_fallback_total{use=\"dpop\"}").await;
    let port = redis.port;
    redis = Redis::start(port);
    let scan = redis.connect().await;
    for v in &fleet {
        assert!(
            v.wait_metric("valet_store_up", 1.0, Duration::from_secs(15))
                .await,
            "reconnected without a restart:\n{}",
            v.logs()
        );
    }
    let outage = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (ok, lost) = (ok.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
    println!(
        "fleet: Redis killed and restarted under load: {ok} valid Checks allowed, {lost} lost, {fallbacks} decided by the local fallback, outage to reconnect {outage:?}"
    );
    assert_eq!(lost, 0, "no valid Check lost with on_store_error: local");
    assert!(fallbacks > 0.0, "the outage's decisions are counted");
    let (_, status) = fleet[0].admin_get("/statusz").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["store"]["up"], true, "{status}");

    // After the restart the fleet shares spent proofs again.
    let proof = key.proof("GET", "https://api.example.com/dpop/2", Some(&bound));
    assert!(
        check(&mut clients[1], get("/dpop/2").dpop(&bound, &proof))
            .await
            .allowed()
    );
    assert_eq!(
        check(&mut clients[2], get("/dpop/2").dpop(&bound, &proof))
            .await
            .reason(),
        "invalid_dpop_proof"
    );
    tokens.push(proof);

    // A hung Redis (SIGSTOP, by PID): a call ends at `timeout`, then the fallback.
    redis.signal("STOP");
    let proof = key.proof("GET", "https://api.example.com/dpop/3", Some(&bound));
    let asked = Instant::now();
    let a = check(&mut clients[0], get("/dpop/3").dpop(&bound, &proof)).await;
    let waited = asked.elapsed();
    assert_eq!(a.reason(), "verified", "on_store_error: local");
    redis.signal("CONT");
    let (_, metrics) = fleet[0].admin_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("valet_store_errors_total{op=\"spend\",kind=\"timeout\"}")),
        "{metrics}"
    );
    println!(
        "fleet: a DPoP Check while Redis hangs (SIGSTOP) answered in {waited:?} (store timeout 200ms), by the local fallback"
    );
    tokens.push(proof);

    // 5. Nothing of a token in Redis: every key and value, scanned.
    let payloads: Vec<String> = tokens
        .iter()
        .filter_map(|t| t.split('.').nth(1).map(str::to_owned))
        .collect();
    let Ok(Value::Array(keys)) = scan.call(&[b"KEYS", b"*"]).await else {
        panic!("KEYS *")
    };
    let keys: Vec<String> = keys.into_iter().map(|k| bulk(k).unwrap()).collect();
    assert!(!keys.is_empty(), "the fleet wrote to the store");
    for k in &keys {
        assert!(k.starts_with("fleet:"), "{k}");
        let value = bulk(scan.call(&[b"GET", k.as_bytes()]).await.unwrap()).unwrap_or_default();
        for secret in tokens.iter().chain(&payloads) {
            assert!(
                !k.contains(secret.as_str()) && !value.contains(secret.as_str()),
                "{k} holds a token"
            );
        }
    }
    println!(
        "fleet: {} keys in Redis, none holds a token, proof or payload; wall time {:?}",
        keys.len(),
        started.elapsed()
    );
}

/// A Redis that accepts connections and never answers (a partition, a hung
/// server): the health task's connect times out (no Check waits for it), the
/// store's calls fail at once, and each use takes its documented fallback. `refuse` answers DPoP 503 `dpop_store_unavailable`;
/// `local` spends in the replica and counts it; bearer tokens never touch the
/// store; introspection goes to the IdP (and is counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_store_costs_each_use_its_fallback_only() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}/", silent.local_addr().unwrap());
    let hold = common::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let idp = DenylistServer::start("revoked: []\n").await;
    let config = |on_error: &str| {
        format!(
            "providers:\n  - name: corp\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n    jwks: {{ file: jwks.json }}\n    introspection:\n      endpoint: {}\n      client_id: valet\n      client_secret_file: secret\n      timeout: 2s\nroutes:\n  - name: dpop\n    match: {{ path_prefix: /dpop }}\n    require: {{ binding: dpop }}\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\nstore:\n  redis: {{ url: \"{url}\", timeout: 100ms }}\ndpop: {{ on_store_error: {on_error} }}\n",
            idp.introspection_url()
        )
    };
    let refuse = replica(&config("refuse"));
    let local = replica(&config("local"));
    let key = DpopKey::generate();
    let bound = jwt(json!({"cnf": {"jkt": key.thumbprint()}}));

    let mut c = refuse.client().await;
    let proof = key.proof("GET", "https://api.example.com/dpop/1", Some(&bound));
    let a = check(&mut c, get("/dpop/1").dpop(&bound, &proof)).await;
    assert_eq!(
        (a.http_status, a.reason().as_str()),
        (503, "dpop_store_unavailable"),
        "{a:?}"
    );
    assert_eq!(
        check(&mut c, get("/orders/1").bearer(&jwt(json!({}))))
            .await
            .reason(),
        "verified",
        "a bearer token needs no store"
    );
    assert_eq!(
        check(&mut c, get("/orders/1").bearer("active-silent-1"))
            .await
            .reason(),
        "verified",
        "introspection falls back to the IdP"
    );
    assert_eq!(idp.introspections(), 1);
    assert_eq!(
        refuse
            .metric("valet_store_fallback_total{use=\"introspection\"}")
            .await,
        Some(1.0)
    );

    let mut c = local.client().await;
    let proof = key.proof("GET", "https://api.example.com/dpop/2", Some(&bound));
    let a = check(&mut c, get("/dpop/2").dpop(&bound, &proof)).await;
    assert_eq!(a.reason(), "verified", "{a:?}");
    assert_eq!(
        check(&mut c, get("/dpop/2").dpop(&bound, &proof))
            .await
            .reason(),
        "invalid_dpop_proof",
        "still spent in this replica"
    );
    assert_eq!(
        local
            .metric("valet_store_fallback_total{use=\"dpop\"}")
            .await,
        Some(1.0)
    );
    for v in [&refuse, &local] {
        assert_eq!(v.metric("valet_store_up").await, Some(0.0));
        let (_, metrics) = v.admin_get("/metrics").await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("valet_store_errors_total{op=\"spend\"")
                    || l.starts_with("valet_store_errors_total{op=\"get\"")),
            "{metrics}"
        );
    }
    hold.abort();
}

/// The Check latency the store adds, measured in one run (VALET_MEASURE_STORE=1;
/// printed, never asserted): replicas with and without the store, same IdP, same
/// Redis, Checks interleaved so drift hits both alike. Scenarios: a DPoP-bound
/// JWT with a fresh proof (+1 SET NX), an opaque token in the local cache (the
/// store is not asked), an opaque token missing locally (with the store: a GET
/// that finds another replica's answer; without: the IdP), and the first Check
/// of a token in the fleet (GET miss + IdP + SET, against the IdP alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_latency_measured() {
    if std::env::var("VALET_MEASURE_STORE").is_err() {
        eprintln!("skipped: set VALET_MEASURE_STORE=1 to measure");
        return;
    }
    let redis = Redis::start(free_port());
    drop(redis.connect().await);
    let idp = DenylistServer::start("revoked: []\n").await;
    let config = format!(
        "providers:\n  - name: corp\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n    jwks: {{ file: jwks.json }}\n    introspection:\n      endpoint: {}\n      client_id: valet\n      client_secret_file: secret\n      timeout: 2s\nroutes:\n  - name: dpop\n    match: {{ path_prefix: /dpop }}\n    require: {{ binding: dpop }}\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\nstore:\n  redis: {{ url: \"{}\" }}\n",
        idp.introspection_url(),
        redis.url()
    );
    let (s1, s2, n) = (
        replica(&config),
        replica(&config),
        replica(&without_store(&config)),
    );
    for v in [&s1, &s2, &n] {
        assert!(v.wait_ready(200, Duration::from_secs(30)).await);
    }
    assert!(
        s1.wait_metric("valet_store_up", 1.0, Duration::from_secs(10))
            .await
    );
    let (mut c1, mut c2, mut cn) = (s1.client().await, s2.client().await, n.client().await);
    let rounds: usize = std::env::var("VALET_MEASURE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(300);
    async fn timed(
        c: &mut AuthorizationClient<tonic::transport::Channel>,
        req: Req,
        want: &str,
    ) -> Duration {
        let t = Instant::now();
        let a = check(c, req).await;
        let took = t.elapsed();
        assert_eq!(a.reason(), want, "{a:?}");
        took
    }
    let key = DpopKey::generate();
    let bound = jwt(json!({"cnf": {"jkt": key.thumbprint()}}));
    let cached = "active-cached-token";
    for c in [&mut c1, &mut cn] {
        check(c, get("/orders/1").bearer(cached)).await;
    }
    let mut m: Vec<(&str, Vec<Duration>, Vec<Duration>)> = vec![
        ("DPoP, fresh proof (+1 SET NX)", vec![], vec![]),
        ("opaque, local cache hit", vec![], vec![]),
        (
            "opaque, local miss (store: GET hit; none: IdP)",
            vec![],
            vec![],
        ),
        (
            "opaque, first in fleet (GET miss + IdP + SET; none: IdP)",
            vec![],
            vec![],
        ),
    ];
    for i in 0..rounds {
        let p = |path: &str| {
            key.proof(
                "GET",
                &format!("https://api.example.com{path}"),
                Some(&bound),
            )
        };
        let (a, b) = (format!("/dpop/s/{i}"), format!("/dpop/n/{i}"));
        m[0].1
            .push(timed(&mut c1, get(&a).dpop(&bound, &p(&a)), "verified").await);
        m[0].2
            .push(timed(&mut cn, get(&b).dpop(&bound, &p(&b)), "verified").await);
        m[1].1
            .push(timed(&mut c1, get("/orders/1").bearer(cached), "verified").await);
        m[1].2
            .push(timed(&mut cn, get("/orders/1").bearer(cached), "verified").await);
        let t = format!("active-measure-{i}");
        m[3].1
            .push(timed(&mut c2, get("/orders/1").bearer(&t), "verified").await);
        m[2].1
            .push(timed(&mut c1, get("/orders/1").bearer(&t), "verified").await);
        let u = format!("active-measure-n-{i}");
        let none = timed(&mut cn, get("/orders/1").bearer(&u), "verified").await;
        m[2].2.push(none);
        m[3].2.push(none);
    }
    let q = |v: &mut Vec<Duration>, f: f64| {
        v.sort();
        v[((v.len() as f64 * f) as usize).min(v.len() - 1)]
    };
    println!("store latency, {rounds} Checks each, one run (p50 / p90; with store vs without):");
    for (name, with, without) in &mut m {
        let (w50, w90, n50, n90) = (q(with, 0.5), q(with, 0.9), q(without, 0.5), q(without, 0.9));
        println!(
            "  {name}: with {w50:.2?} / {w90:.2?}, without {n50:.2?} / {n90:.2?}, added at p50 {:+.0} µs",
            w50.as_secs_f64() * 1e6 - n50.as_secs_f64() * 1e6
        );
    }
}

#[test]
fn store_and_spread_settings_are_checked() {
    let dir = tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "hunter2\n").unwrap();
    std::fs::write(dir.path().join("empty"), "").unwrap();
    let path = dir.path().join("valet.yaml");
    let err = |src: &str| match valet::load::parse(&format!("routes: []\n{src}"), &path) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        err("store: { redis: { url: \"redis://127.0.0.1:6379/0\" } }\n"),
        ""
    );
    assert_eq!(
        err(
            "store: { redis: { url: \"rediss://r.example:6380\", password_file: pw, key_prefix: \"shop:\", timeout: 20ms } }\ndpop: { on_store_error: refuse }\n"
        ),
        ""
    );
    assert!(
        err("store: { redis: { url: \"http://r:6379\" } }\n").contains("redis:// or rediss://")
    );
    assert!(
        err("store: { redis: { url: \"redis://:secret@r:6379\" } }\n")
            .contains("use password_file")
    );
    assert!(
        err("store: { redis: { url: \"redis://r\", timeout: 10s } }\n")
            .contains("between 1ms and 5s")
    );
    assert!(
        err("store: { redis: { url: \"redis://r\", password_file: empty } }\n")
            .contains("the file is empty")
    );
    assert!(
        err("store: { redis: { url: \"redis://r\", password_file: nope } }\n")
            .contains("cannot read")
    );
    assert!(
        err("store: { redis: { url: \"redis://r\" } }\ndpop: { on_store_error: maybe }\n")
            .contains("expected refuse or local")
    );
    assert!(err("dpop: { on_store_error: local }\n").contains("applies with `store` only"));
    assert!(err("store: { redis: { url: \"redis://r\", db: 1 } }\n").contains("unknown field"));
    let provider = |jwks: &str| {
        format!("providers:\n  - name: p\n    issuer: https://idp.test/\n    jwks: {{ {jwks} }}\n")
    };
    assert_eq!(
        err(&provider(
            "uri: \"https://idp.test/jwks\", unknown_kid_spread: 500ms"
        )),
        ""
    );
    assert!(
        err(&provider(
            "uri: \"https://idp.test/jwks\", unknown_kid_spread: 950ms, unknown_kid_wait: 100ms"
        ))
        .contains("unknown_kid_spread + unknown_kid_wait at most 1s")
    );
    assert!(
        err(&provider("file: j.json, unknown_kid_spread: 1ms"))
            .contains("applies to uri and discovery only")
    );
}

/// Pushed, not polled: with a store, `PUBLISH <prefix>denylist` after changing the
/// list makes every replica fetch the URL at once, long before its interval
/// (60s here). Measured and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_denylist_change_is_fetched_at_once() {
    let redis = Redis::start(free_port());
    let publisher = redis.connect().await;
    let idp = DenylistServer::start("revoked: []\n").await;
    let config = format!(
        "providers:\n  - name: corp\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n    jwks: {{ file: jwks.json }}\nroutes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\nrevocation: {{ uri: \"{}\", refresh_interval: 60s, max_stale: 120s }}\nstore:\n  redis: {{ url: \"{}\", key_prefix: \"push:\" }}\n",
        idp.url,
        redis.url()
    );
    let fleet: Vec<Valet> = (0..2).map(|_| replica(&config)).collect();
    for v in &fleet {
        assert!(v.wait_ready(200, Duration::from_secs(30)).await);
        assert!(
            v.logged("listening for denylist changes").await,
            "{}",
            v.logs()
        );
    }
    let victim = jwt(json!({"jti": "pushed-1"}));
    let mut clients = Vec::new();
    for v in &fleet {
        let mut c = v.client().await;
        assert_eq!(
            check(&mut c, get("/orders/1").bearer(&victim))
                .await
                .reason(),
            "verified"
        );
        clients.push(c);
    }
    idp.set("revoked:\n  - jti: pushed-1\n");
    let published = Instant::now();
    publisher
        .call(&[b"PUBLISH", b"push:denylist", b"changed"])
        .await
        .unwrap();
    let mut took = Vec::new();
    for c in &mut clients {
        loop {
            if check(c, get("/orders/1").bearer(&victim)).await.reason() == "revoked" {
                took.push(published.elapsed());
                break;
            }
            assert!(
                published.elapsed() < Duration::from_secs(30),
                "not fetched at the push (the interval is 60s)"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!(
        "fleet: PUBLISH push:denylist → revoked at each replica after {took:?} (refresh_interval 60s)"
    );

    // Redis restarted: the subscription comes back by itself.
    let port = redis.port;
    let mut redis = redis;
    redis.kill();
    let redis = Redis::start(port);
    let publisher = redis.connect().await;
    for v in &fleet {
        assert!(
            v.wait_metric("valet_store_up", 1.0, Duration::from_secs(15))
                .await
        );
    }
    let second = jwt(json!({"jti": "pushed-2"}));
    idp.set("revoked:\n  - jti: pushed-1\n  - jti: pushed-2\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in &mut clients {
        loop {
            // Published until heard: the resubscription may follow the reconnect.
            publisher
                .call(&[b"PUBLISH", b"push:denylist", b"changed"])
                .await
                .unwrap();
            if check(c, get("/orders/1").bearer(&second)).await.reason() == "revoked" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no push after the restart (the interval is 60s)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
