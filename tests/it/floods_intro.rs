//! Introspection under a flood of random opaque tokens, against the real IdP
//! (tests/idp/server.mjs): legitimate new opaque tokens the IdP issued keep passing
//! while unique random tokens arrive from other clients, with a healthy IdP and
//! with one that rate-limits introspection (429 + Retry-After); and a flood of
//! inactive answers does not evict the active ones (counted at the IdP).
//!
//! Counts, not timings. Each test runs a few seconds; VALET_FLOOD_LONG=1 runs a
//! bigger flood for longer.

use crate::common;
use crate::common::idp;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use envoy_types::ext_authz::v3::pb::{CheckRequest, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use idp::{Idp, ORDERS};
use tonic::transport::Channel;

fn long() -> bool {
    std::env::var_os("VALET_FLOOD_LONG").is_some_and(|v| v == "1")
}

fn config(idp: &Idp, dir: &std::path::Path, extra: &str) -> String {
    let (endpoint, id, secret) = idp.introspection();
    std::fs::write(dir.join("introspection-secret"), format!("{secret}\n")).unwrap();
    // A patient timeout (10 s) and circuit: the 2-core test machines are shared
    // (the IdP competes with the flood and the rest of the suite for CPU; with a
    // 2 s timeout, legitimate tokens were refused "did not answer in time" in a
    // loaded run), and a slow IdP is not what these tests are about.
    format!(
        "providers:\n  - name: idp\n    issuer: {}\n    audiences: [\"{ORDERS}\"]\n    jwks: {{ discovery: true }}\n    introspection:\n      endpoint: {endpoint}\n      client_id: {id}\n      client_secret_file: introspection-secret\n      timeout: 10s\n      failure_threshold: 20\n{extra}routes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\n",
        idp.issuer
    )
}

/// A random token shaped like the IdP's (43 base64url characters).
fn random_token() -> String {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    URL_SAFE_NO_PAD.encode(b)
}

/// A Check of `token` on /orders/1 from the client at `source` (Envoy's
/// `attributes.source.address`), or from no known address.
fn request(token: &str, source: Option<&str>) -> CheckRequest {
    let mut r = get("/orders/1").bearer(token).build();
    if let Some(ip) = source {
        r.attributes.as_mut().unwrap().source = Some(Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: ip.to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(40000)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        });
    }
    r
}

/// `Ok(())` when allowed, else the denial's `error` and `error_description`.
async fn ask(c: &mut AuthorizationClient<Channel>, r: CheckRequest) -> Result<(), String> {
    let resp = c
        .check(r)
        .await
        .expect("Check must never fail as a gRPC error")
        .into_inner();
    if resp.status.as_ref().is_some_and(|s| s.code == 0) {
        return Ok(());
    }
    match resp.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            let body: serde_json::Value = serde_json::from_str(&d.body).unwrap_or_default();
            Err(format!(
                "{} ({})",
                body["error"].as_str().unwrap_or("?"),
                body["error_description"].as_str().unwrap_or("")
            ))
        }
        other => Err(format!("no denied response: {other:?}")),
    }
}

struct Flood {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    /// `workers` concurrent Checks, each with a new random token, from `sources`
    /// (round robin) until stopped. Each worker asks at most 10 times a second:
    /// a Check that reaches the IdP takes longer than that under a flood, so
    /// without the gate the workers would still hold up to `workers` introspection
    /// slots at once (64: all of them by default); a shed one is answered at once,
    /// and spinning on those would only burn the CPU the suite shares. 10 a second
    /// is 80 new tokens a second from each of 8 attacker addresses, 40 times what a
    /// client's inactive budget forgives (2 a second).
    async fn start(v: &Valet, workers: usize, sources: &[String]) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        // Envoy multiplexes Checks over a few connections.
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(v.client().await);
        }
        for w in 0..workers {
            let mut c = channels[w % channels.len()].clone();
            let stop = stop.clone();
            let answered = answered.clone();
            let sources = sources.to_vec();
            tasks.push(common::spawn(async move {
                let mut i = w;
                let mut pace = common::load::Pace::share(10, 1);
                while !stop.load(Ordering::Relaxed) {
                    pace.tick().await;
                    let source = (!sources.is_empty()).then(|| sources[i % sources.len()].as_str());
                    let r = ask(&mut c, request(&random_token(), source)).await;
                    assert!(r.is_err(), "a random token passed");
                    answered.fetch_add(1, Ordering::Relaxed);
                    i += workers;
                }
            }));
        }
        Flood {
            stop,
            answered,
            tasks,
        }
    }

    /// Waits until the flood has had `n` answers (it is under way).
    async fn warm(&self, n: u64) {
        for _ in 0..3000 {
            if self.answered.load(Ordering::Relaxed) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the flood did not get going");
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.answered.load(Ordering::Relaxed)
    }
}

/// What legitimate clients saw: how many of their new tokens passed, and the
/// denials of the others (reason and description, counted).
struct Legit {
    passed: usize,
    denied: std::collections::BTreeMap<String, usize>,
}

/// Checks each of `tokens` once, from its own client address, `workers` at a time,
/// each worker pausing `pace` between its Checks.
async fn check_legit(v: &Valet, tokens: Vec<String>, workers: usize, pace: Duration) -> Legit {
    let queue = Arc::new(std::sync::Mutex::new(
        tokens.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let mut c = v.client().await;
        let queue = queue.clone();
        tasks.push(common::spawn(async move {
            let mut out = Vec::new();
            loop {
                let Some((i, t)) = queue.lock().unwrap().pop() else {
                    break;
                };
                let source = format!("10.1.{}.{}", i / 250, i % 250 + 1);
                out.push(ask(&mut c, request(&t, Some(&source))).await);
                tokio::time::sleep(pace).await;
            }
            out
        }));
    }
    let mut legit = Legit {
        passed: 0,
        denied: Default::default(),
    };
    for t in tasks {
        for r in t.await.unwrap() {
            match r {
                Ok(()) => legit.passed += 1,
                Err(e) => *legit.denied.entry(e).or_default() += 1,
            }
        }
    }
    legit
}

async fn opaque_tokens(idp: &Idp, n: usize) -> Vec<String> {
    let mut tokens = Vec::new();
    for _ in 0..n {
        tokens.push(idp.opaque_token("orders:read").await);
    }
    tokens
}

/// Attacker addresses: a few IPv4 hosts and IPv6 hosts spread over one /64.
fn attackers(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                format!("192.0.2.{}", i + 1)
            } else {
                format!("2001:db8:6:6::{:x}", i * 7919 + 1)
            }
        })
        .collect()
}

async fn shed(v: &Valet) -> String {
    let (_, metrics) = v.admin_get("/metrics").await;
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("valet_introspection_shed_total")
                || l.starts_with("valet_introspection_requests_total")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tokens_pass_during_a_random_token_flood() {
    let (workers, n) = if long() { (512, 400) } else { (64, 30) };
    let idp = Idp::shared();
    let dir = tempdir().unwrap();
    let v = Valet::start_ready_in(&config(&idp, dir.path(), ""), dir).await;
    let tokens = opaque_tokens(&idp, n).await;
    let _load = common::load_slot().await;
    // The shared IdP counts other tests' introspections too: this one's is the delta.
    let (asked_before, _) = idp.introspection_stats().await;

    let flood = Flood::start(&v, workers, &attackers(8)).await;
    flood.warm(workers as u64 * 4).await;
    let legit = check_legit(&v, tokens, 8, Duration::ZERO).await;
    let flooded = flood.stop().await;
    let asked = idp.introspection_stats().await.0 - asked_before;
    println!(
        "healthy IdP: {} of {n} new legitimate opaque tokens passed during a flood of {flooded} random-token Checks ({workers} concurrent, 8 attacker addresses); the IdP was asked {asked} times (by this and any concurrent test); denials: {:?}\n{}",
        legit.passed,
        legit.denied,
        shed(&v).await
    );
    assert!(
        flooded >= 4 * n as u64,
        "the flood was real: {flooded} Checks"
    );
    assert!(
        legit.passed * 10 >= n * 9,
        "at least 90% of new legitimate tokens pass: {} of {n}; {:?}",
        legit.passed,
        legit.denied
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tokens_pass_during_a_flood_when_the_idp_rate_limits() {
    let (workers, n) = if long() { (512, 200) } else { (64, 20) };
    // The IdP (or its gateway) admits 25 introspections a second and answers the
    // rest 429 with Retry-After: 1. Legitimate clients bring ~10 new tokens a second.
    // Its own IdP: the rate limit is its environment.
    let idp = Idp::start_with(&[("IDP_INTROSPECTION_RPS", "25")]);
    let dir = tempdir().unwrap();
    let v = Valet::start_ready_in(&config(&idp, dir.path(), ""), dir).await;
    let tokens = opaque_tokens(&idp, n).await;
    let _load = common::load_slot().await;

    let flood = Flood::start(&v, workers, &attackers(8)).await;
    flood.warm(workers as u64 * 4).await;
    let legit = check_legit(&v, tokens, 2, Duration::from_millis(200)).await;
    let flooded = flood.stop().await;
    let (asked, limited) = idp.introspection_stats().await;
    println!(
        "rate-limiting IdP (25/s): {} of {n} new legitimate opaque tokens passed during a flood of {flooded} random-token Checks ({workers} concurrent, 8 attacker addresses); the IdP was asked {asked} times and answered 429 {limited} times; denials: {:?}\n{}",
        legit.passed,
        legit.denied,
        shed(&v).await
    );
    assert!(limited > 0, "the IdP did rate-limit");
    assert!(
        flooded >= 4 * n as u64,
        "the flood was real: {flooded} Checks"
    );
    assert!(
        legit.passed * 2 >= n,
        "at least half of the new legitimate tokens pass: {} of {n}; {:?}",
        legit.passed,
        legit.denied
    );
    // A 429 is the IdP asking for less, not failing: the circuit stays closed.
    assert_ne!(
        v.metric("valet_introspection_circuit_open{provider=\"idp\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_answers_survive_a_flood_of_inactive_ones() {
    let flood_tokens = if long() { 20_000 } else { 200 };
    // Its own IdP: "no new IdP request" below is read from the IdP's own counter,
    // which another test's introspections would move.
    let idp = Idp::start();
    let dir = tempdir().unwrap();
    // A small cache, so that the flood is many times its size (4x; 400x when long).
    let v =
        Valet::start_ready_in(&config(&idp, dir.path(), "      cache_entries: 50\n"), dir).await;
    let mut c = v.client().await;
    let kept = opaque_tokens(&idp, 20).await;
    let _load = common::load_slot().await;
    for t in &kept {
        assert_eq!(ask(&mut c, request(t, Some("10.1.0.1"))).await, Ok(()));
    }
    let (before, _) = idp.introspection_stats().await;
    assert!(before >= kept.len() as u64);

    // Unique random tokens, each answered inactive by the IdP and cached. Sent
    // without a client address (as HTTP mode does): no per-client budget applies,
    // so every one of them reaches the IdP and the negative cache.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = v.client().await;
        tasks.push(common::spawn(async move {
            let mut inactive = 0;
            for _ in (w..flood_tokens).step_by(8) {
                if let Err(e) = ask(&mut c, request(&random_token(), None)).await
                    && e.starts_with("inactive_token")
                {
                    inactive += 1;
                }
            }
            inactive
        }));
    }
    let mut inactive = 0;
    for t in tasks {
        inactive += t.await.unwrap();
    }
    let (after_flood, _) = idp.introspection_stats().await;
    println!(
        "{inactive} of {flood_tokens} random tokens answered inactive by the IdP ({} introspections)",
        after_flood - before
    );
    assert!(
        inactive * 10 >= flood_tokens * 9,
        "the flood reached the IdP: {inactive}"
    );

    let mut passed = 0;
    for t in &kept {
        if ask(&mut c, request(t, Some("10.1.0.1"))).await.is_ok() {
            passed += 1;
        }
    }
    let (after, _) = idp.introspection_stats().await;
    println!(
        "after the flood: {passed} of {} cached active tokens passed; {} new introspections for them",
        kept.len(),
        after - after_flood
    );
    assert_eq!(passed, kept.len());
    assert_eq!(
        after, after_flood,
        "cached active answers were kept: no new IdP request"
    );
}
