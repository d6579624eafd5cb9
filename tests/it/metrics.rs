//! Operators' view: /metrics after a mixed run, bounded label sets, probes.

use crate::common;

use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use rand::Rng;
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const POLICY: &str = "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\nroutes:\n  - name: health\n    match: { path: /healthz }\n    anonymous: true\n  - name: orders\n    match: { path_prefix: /orders }\n    require: { scopes: [orders:read] }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_mixed_checks_shows_the_rejection_rate_by_reason() {
    let v = Valet::in_process(POLICY);
    let mut c = v.client().await;
    for _ in 0..3 {
        check(&mut c, get("/orders").bearer(&rs256("orders:read"))).await;
    }
    check(&mut c, get("/orders")).await;
    check(&mut c, get("/orders").bearer(&rs256("other"))).await;
    check(&mut c, get("/healthz")).await;
    check(&mut c, get("/nowhere")).await;

    let (status, body) = v.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for series in [
        "valet_check_total{decision=\"allow\",reason=\"verified\",route=\"orders\"} 3",
        "valet_check_total{decision=\"deny\",reason=\"missing_token\",route=\"orders\"} 1",
        "valet_check_total{decision=\"deny\",reason=\"insufficient_scope\",route=\"orders\"} 1",
        "valet_check_total{decision=\"allow\",reason=\"anonymous\",route=\"health\"} 1",
        "valet_check_total{decision=\"deny\",reason=\"no_route\",route=\"_none\"} 1",
        "valet_check_duration_seconds_bucket{le=\"0.00001\"}",
        "valet_check_duration_seconds_count 7",
        "valet_jwks_keys{provider=\"corp\"} 5",
        "valet_jwks_refresh_total{provider=\"corp\",result=\"success\",trigger=\"startup\"} 1",
        "valet_jwks_refresh_total{provider=\"corp\",result=\"error\",trigger=\"interval\"} 0",
        "valet_policy_reload_total{result=\"error\"} 0",
        "valet_build_info{version=",
        "valet_jwks_age_seconds{provider=\"corp\"}",
    ] {
        assert!(body.contains(series), "no {series} in\n{body}");
    }
    for name in [
        "valet_check_total",
        "valet_check_duration_seconds",
        "valet_jwks_refresh_total",
        "valet_jwks_keys",
        "valet_policy_reload_total",
        "valet_build_info",
    ] {
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "{name} is not described"
        );
    }
    eprintln!("--- /metrics after a mixed run ---\n{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_stay_bounded_under_random_input() {
    let v = Valet::in_process(POLICY);
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(v.client().await);
    }
    // 512 distinct random inputs: over five times the 96 series labels may make.
    let (key, _) = signing_key(Algorithm::ES256);
    let key = std::sync::Arc::new(key);
    let mut tasks = Vec::new();
    for (t, mut c) in clients.into_iter().enumerate() {
        let key = key.clone();
        tasks.push(common::spawn(async move {
            for i in 0..64 {
                let (path, kid, sub) = {
                    let mut r = rand::rng();
                    let prefix = ["/orders", "/healthz", "/x", ""][r.random_range(0..4)];
                    (
                        format!("{prefix}/{}", r.random::<u64>()),
                        if r.random_bool(0.5) {
                            "ec256-1".to_string()
                        } else {
                            format!("kid-{}", r.random::<u64>())
                        },
                        format!("user-{t}-{i}-{}", r.random::<u32>()),
                    )
                };
                let mut cl = claims("orders:read");
                cl["sub"] = json!(sub);
                let tok = sign_raw(
                    &json!({"alg": "ES256", "kid": kid}),
                    &cl,
                    &key,
                    Algorithm::ES256,
                );
                check(&mut c, get(&path).bearer(&tok).header("x-random", &sub)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, body) = v.admin_get("/metrics").await;
    let series: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("valet_check_total{"))
        .collect();
    // Bounded by routes (2 + `_none`) x reasons x decisions, whatever the input.
    assert!(series.len() <= 3 * 16 * 2, "{series:#?}");
    assert!(!body.contains("user-"), "a subject became a label");
    assert!(!body.contains("kid-"), "a kid became a label");
    let total: f64 = series
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 512.0);
    eprintln!(
        "512 random Checks → {} valet_check_total series",
        series.len()
    );
}

#[tokio::test]
async fn probes_and_grpc_health_tell_the_truth() {
    let v = Valet::in_process(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks: { file: missing.json }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n",
    );
    assert_eq!(v.admin_get("/healthz").await.0, 200, "alive");
    let (status, body) = v.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", v.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    assert!(
        wait_health(
            &mut health,
            "envoy.service.auth.v3.Authorization",
            ServingStatus::NotServing
        )
        .await
    );

    // The keys arrive: both turn ready.
    std::fs::write(v.dir.path().join("missing.json"), jwks().to_string()).unwrap();
    assert!(v.wait_ready(200, Duration::from_secs(10)).await);
    assert!(wait_health(&mut health, "", ServingStatus::Serving).await);
    assert_eq!(v.admin_get("/nope").await.0, 404);
}

/// Polls gRPC health for `service` until it answers `want`: the reporter follows
/// readiness on its own tick, so the answer changes a moment after /readyz does.
async fn wait_health(
    health: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
    want: ServingStatus,
) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let request = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        if let Ok(r) = health.check(request).await
            && r.into_inner().status == want as i32
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn json_logs_on_request() {
    let v = Valet::start_with(POLICY, &[("VALET_LOG_FORMAT", "json")]);
    let mut c = v.client().await;
    check(&mut c, get("/orders")).await;
    assert!(v.wait_for_log("missing_token"));
    let line = v
        .logs()
        .lines()
        .find(|l| l.contains("missing_token"))
        .unwrap()
        .to_string();
    let parsed: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(parsed["fields"]["deny.reason"], "missing_token");
    assert_eq!(parsed["fields"]["route.name"], "orders");
}
