//! RFC 7662 introspection against the real oidc-provider: opaque tokens decide
//! like JWTs (scopes, audience, identity headers, DPoP binding), answers are
//! cached (a hit never reaches the IdP; measured against a miss), concurrent
//! Checks of one token share one request, inactive answers are cached briefly,
//! and a failing endpoint times out and opens the circuit.

use crate::common;
use crate::common::idp;

use std::time::{Duration, Instant};

use common::jwks_server::{JwksServer, Mode};
use common::*;
use idp::{DpopKey, Idp, ORDERS};

fn config(idp: &Idp, dir: &std::path::Path, extra: &str) -> String {
    let (endpoint, id, secret) = idp.introspection();
    std::fs::write(dir.join("introspection-secret"), format!("{secret}\n")).unwrap();
    // A patient timeout unless the test sets its own: the IdP (node) shares two
    // cores with the rest of the suite, and a slow IdP is not what these tests are about.
    let extra = if extra.contains("timeout:") {
        extra.to_string()
    } else {
        format!("      timeout: 10s\n{extra}")
    };
    format!(
        "providers:\n  - name: idp\n    issuer: {}\n    audiences: [\"{ORDERS}\"]\n    jwks: {{ discovery: true }}\n    claims_to_headers: {{ client_id: x-client-id }}\n    introspection:\n      endpoint: {endpoint}\n      client_id: {id}\n      client_secret_file: introspection-secret\n{extra}routes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\n",
        idp.issuer
    )
}

async fn requests(v: &Valet, result: &str) -> f64 {
    v.metric(&format!(
        "valet_introspection_requests_total{{provider=\"idp\",result=\"{result}\"}}"
    ))
    .await
    .unwrap_or(0.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tokens_are_introspected_and_cached() {
    let idp = Idp::shared();
    let dir = tempdir().unwrap();
    let v =
        Valet::in_process_ready_in(&config(&idp, dir.path(), "      cache_ttl: 2s\n"), dir).await;
    let mut c = v.client().await;

    let t = idp.opaque_token("orders:read").await;
    assert!(!t.contains('.'), "an opaque token");
    let a = check(&mut c, get("/orders/1").bearer(&t)).await;
    assert_eq!(a.reason(), "verified", "{a:?}");
    assert_eq!(
        a.headers.get("x-client-id").map(String::as_str),
        Some("valet-opaque")
    );
    assert_eq!(meta_str(&a.metadata, "provider"), "idp");
    assert_eq!(requests(&v, "active").await, 1.0);
    assert!(check(&mut c, get("/orders/2").bearer(&t)).await.allowed());
    assert_eq!(
        requests(&v, "active").await,
        1.0,
        "the second Check is a cache hit"
    );

    // Route requirements apply to introspected claims.
    let w = idp.opaque_token("orders:write").await;
    assert_eq!(
        check(&mut c, get("/orders/1").bearer(&w)).await.reason(),
        "insufficient_scope"
    );

    // Unknown tokens are inactive, and the negative answer is cached.
    let before = requests(&v, "inactive").await;
    for _ in 0..5 {
        let a = check(
            &mut c,
            get("/orders/1").bearer("not-a-token-the-idp-issued"),
        )
        .await;
        assert_eq!(
            (a.http_status, a.reason().as_str()),
            (401, "inactive_token")
        );
        assert!(a.challenge().contains("error=\"invalid_token\""));
    }
    assert_eq!(requests(&v, "inactive").await, before + 1.0);

    // Revoked at the IdP: still served from the cache until cache_ttl (2s here), then inactive.
    idp.revoke(&t).await;
    assert!(check(&mut c, get("/orders/1").bearer(&t)).await.allowed());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        check(&mut c, get("/orders/1").bearer(&t)).await.reason(),
        "inactive_token"
    );

    // 20 concurrent Checks of a fresh token: one request to the IdP. The clients
    // connect first: connecting one after another, under load, could outlast the
    // 2 s cache_ttl, and a Check after that asks again (rightly).
    let fresh = idp.opaque_token("orders:read").await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(v.client().await);
    }
    let before = requests(&v, "active").await;
    let mut all = Vec::new();
    for mut c in clients {
        let t = fresh.clone();
        all.push(common::spawn(async move {
            check(&mut c, get("/orders/1").bearer(&t)).await
        }));
    }
    for a in all {
        assert!(a.await.unwrap().allowed());
    }
    assert_eq!(requests(&v, "active").await, before + 1.0, "singleflight");

    // Miss versus hit, end to end over gRPC (debug build).
    let (mut misses, mut hits) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        let t = idp.opaque_token("orders:read").await;
        let started = Instant::now();
        assert!(check(&mut c, get("/orders/1").bearer(&t)).await.allowed());
        misses.push(started.elapsed());
        for _ in 0..10 {
            let started = Instant::now();
            assert!(check(&mut c, get("/orders/1").bearer(&t)).await.allowed());
            hits.push(started.elapsed());
        }
    }
    // The baseline in the same run: a JWT of the same IdP, verified once then cached.
    let jwt = idp.token(ORDERS, "orders:read").await;
    let mut jwt_hits = Vec::new();
    for _ in 0..150 {
        let started = Instant::now();
        assert!(check(&mut c, get("/orders/1").bearer(&jwt)).await.allowed());
        jwt_hits.push(started.elapsed());
    }
    let (miss, hit, jwt) = (median(misses), median(hits), median(jwt_hits));
    println!(
        "introspection (Check round trip over gRPC, medians): cache miss {:.2} ms, cache hit {:.3} ms, cached JWT {:.3} ms; miss/hit {:.1}x, hit/JWT {:.2}x",
        miss.as_secs_f64() * 1e3,
        hit.as_secs_f64() * 1e3,
        jwt.as_secs_f64() * 1e3,
        miss.as_secs_f64() / hit.as_secs_f64(),
        hit.as_secs_f64() / jwt.as_secs_f64(),
    );
    let metrics = v.admin_get("/metrics").await.1;
    assert!(metrics.contains("valet_introspection_duration_seconds_bucket{provider=\"idp\""));
    assert!(metrics.contains("valet_introspection_cache_total{provider=\"idp\",result=\"hit\"}"));
    // The secret never shows.
    assert!(!v.logs().contains("valet-introspector-secret") && !metrics.contains("secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_bound_opaque_tokens_need_their_proof() {
    let idp = Idp::shared();
    let dir = tempdir().unwrap();
    let v = Valet::in_process_ready_in(&config(&idp, dir.path(), ""), dir).await;
    let mut c = v.client().await;
    let key = DpopKey::generate();
    let t = idp
        .opaque_dpop_token(
            ORDERS,
            "orders:read",
            &key.proof("POST", &idp.token_endpoint(), None),
        )
        .await;
    let htu = "https://api.example.com/orders/1";
    let a = check(
        &mut c,
        get("/orders/1").dpop(&t, &key.proof("GET", htu, Some(&t))),
    )
    .await;
    assert_eq!(a.reason(), "verified", "{a:?}");
    assert_eq!(
        check(&mut c, get("/orders/1").bearer(&t)).await.reason(),
        "binding_mismatch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_times_out_then_the_circuit_opens() {
    let idp = Idp::shared();
    let bad = JwksServer::start(serde_json::json!({})).await;
    // The endpoint never answers until released: an answer at all is the timeout's.
    let gate = common::jwks_server::held();
    bad.set_mode(Mode::Held(gate.clone()));
    let dir = tempdir().unwrap();
    let cfg = config(
        &idp,
        dir.path(),
        "      timeout: 200ms\n      failure_threshold: 3\n      open_for: 1s\n",
    )
    .replace(&idp.introspection().0, &format!("{}/jwks", bad.url()));
    let v = Valet::in_process_ready_in(&cfg, dir).await;
    let mut c = v.client().await;

    for i in 0..3 {
        let a = check(&mut c, get("/orders/1").bearer(&format!("opaque-{i}"))).await;
        assert_eq!(
            (a.http_status, a.reason().as_str()),
            (503, "introspection_unavailable")
        );
        assert!(
            a.body["error_description"]
                .as_str()
                .unwrap()
                .contains("in time"),
            "{a:?}"
        );
    }
    // Open: answered at once, without asking the endpoint.
    let asked = bad.requests();
    let a = check(&mut c, get("/orders/1").bearer("opaque-x")).await;
    assert_eq!(a.reason(), "introspection_unavailable");
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .contains("circuit open")
    );
    assert_eq!(bad.requests(), asked);
    assert_eq!(requests(&v, "circuit_open").await, 1.0);
    assert_eq!(
        v.metric("valet_introspection_circuit_open{provider=\"idp\"}")
            .await,
        Some(1.0)
    );
    // JWTs of the same provider do not depend on introspection.
    let jwt = idp.token(ORDERS, "orders:read").await;
    assert!(check(&mut c, get("/orders/1").bearer(&jwt)).await.allowed());

    // The endpoint answers garbage (not an introspection response): still unavailable.
    common::jwks_server::release(&gate);
    bad.set_mode(Mode::Ok);
    // Until open_for (1 s) has passed, the circuit answers: ask until it lets a trial through.
    let deadline = Instant::now() + Duration::from_secs(10);
    let a = loop {
        let a = check(&mut c, get("/orders/1").bearer("opaque-y")).await;
        let open = a.body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("circuit open"));
        if !open || Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .contains("not an introspection response"),
        "{a:?}"
    );
    assert!(v.logs().contains("circuit open"));
}

/// An endpoint the test scripts (introspection-only provider, no JWKS): what Valet
/// makes of each kind of answer, and Envoy's deadline answered by Valet itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_checked_like_claims_and_deadlines_are_valets() {
    use serde_json::json;
    let endpoint = JwksServer::start(json!({})).await;
    let dir = tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    let cfg = format!(
        "providers:\n  - name: opaque\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    claims_to_headers: {{ client_id: x-client-id }}\n    introspection:\n      endpoint: {}/jwks\n      client_id: valet\n      client_secret_file: secret\n      timeout: 2s\n      negative_cache_ttl: 1s\nroutes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\n",
        endpoint.url()
    );
    let v = Valet::in_process_ready_in(&cfg, dir).await; // ready: a provider without JWKS has no keys to wait for
    let mut c = v.client().await;
    let exp = now() + 600;
    let cases = [
        (
            json!({"active": true, "scope": "orders:read", "aud": "orders-api", "client_id": "app", "exp": exp}),
            "verified",
        ),
        (
            json!({"active": true, "scope": "orders:read", "aud": "orders-api", "token_type": "Bearer", "iss": "https://idp.test/"}),
            "verified",
        ),
        (
            json!({"active": true, "scope": "orders:read", "aud": "orders-api", "token_type": "refresh_token"}),
            "inactive_token",
        ),
        (
            json!({"active": true, "scope": "orders:read", "aud": "orders-api", "typ": "Refresh"}),
            "inactive_token",
        ),
        (
            json!({"active": true, "scope": "orders:read", "aud": "orders-api", "exp": now() - 5}),
            "inactive_token",
        ),
        (
            json!({"active": true, "scope": "orders:read", "aud": "orders-api", "iss": "https://evil.test/"}),
            "issuer_not_allowed",
        ),
        (
            json!({"active": true, "scope": "orders:read", "aud": "other-api"}),
            "audience_not_allowed",
        ),
        (
            json!({"active": true, "scope": "orders:write", "aud": "orders-api"}),
            "insufficient_scope",
        ),
        (json!({"active": false}), "inactive_token"),
        (json!({"active": "yes"}), "introspection_unavailable"),
    ];
    for (i, (answer, want)) in cases.iter().enumerate() {
        endpoint.set_jwks(answer.clone());
        let a = check(
            &mut c,
            get("/orders/1").bearer(&format!("opaque-token-{i}")),
        )
        .await;
        assert_eq!(a.reason(), *want, "{answer}: {a:?}");
        if *want == "verified" && i == 0 {
            assert_eq!(
                a.headers.get("x-client-id").map(String::as_str),
                Some("app")
            );
        }
    }

    // Envoy waits 1 s (grpc-timeout); the endpoint holds its answer until the test
    // lets it go: Valet answers 503 itself, before the deadline (tonic's own
    // deadline would make it a gRPC error), and the late answer is kept for the
    // next Check. No timing is guessed: the endpoint answers only when released.
    endpoint.set_jwks(json!({"active": true, "scope": "orders:read", "aud": "orders-api"}));
    let gate = common::jwks_server::held();
    endpoint.set_mode(Mode::Held(gate.clone()));
    let asked = endpoint.requests();
    let mut req = tonic::Request::new(get("/orders/1").bearer("slow-token").build());
    req.set_timeout(Duration::from_secs(1));
    let r = c
        .check(req)
        .await
        .expect("an answer, not a gRPC deadline error")
        .into_inner();
    assert_eq!(r.status.unwrap().code, 14, "UNAVAILABLE");
    common::jwks_server::release(&gate);
    // The next Check joins the request still in flight or finds its cached answer.
    let a = check(&mut c, get("/orders/1").bearer("slow-token")).await;
    assert_eq!(a.reason(), "verified", "the late answer was kept: {a:?}");
    assert_eq!(
        endpoint.requests(),
        asked + 1,
        "the endpoint was asked once"
    );

    // `valet explain --token` introspects an opaque token once, as the server would.
    endpoint.set_mode(Mode::Ok);
    let explain = |token: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_valet"))
            .args(["explain", "--config"])
            .arg(v.dir.path().join("valet.yaml"))
            .args(["--path", "/orders/1", "--token", token])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(
        explain("explain-me").contains("decision: ALLOW 200 (verified)"),
        "{}",
        explain("explain-me-2")
    );
    endpoint.set_jwks(json!({"active": false}));
    assert!(explain("explain-me-3").contains("inactive_token"));
}
