//! Token misuse signals: one token from too many addresses, one client denied
//! too often; counted by provider and signal, logged once with the token's
//! SHA-256, never the token.

use crate::common;

use crate::audit::POLICY;
use aws_lc_rs::digest::{SHA256, digest};
use common::*;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use serde_json::json;

fn policy() -> String {
    format!("{POLICY}misuse:\n  max_addresses_per_token: 2\n  client_denials_per_minute: 3\n")
}

fn from(req: Req, source: &str) -> CheckRequest {
    from_address(req.build(), source)
}

const TOKEN_SIGNAL: &str =
    "valet_misuse_signals_total{provider=\"corp\",signal=\"token_addresses\"}";
const CLIENT_SIGNAL: &str =
    "valet_misuse_signals_total{provider=\"corp\",signal=\"client_denials\"}";

#[tokio::test]
async fn a_token_from_too_many_addresses_is_reported_once_by_its_hash() {
    let v = Valet::in_process(&policy());
    let mut c = v.client().await;
    assert_eq!(v.metric(TOKEN_SIGNAL).await, Some(0.0), "exists from zero");
    let token = rs256("orders:read");
    let other = rs256("orders:read orders:list");
    // Two addresses, again and again: within the bound.
    for source in ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"] {
        let a = c
            .check(from(get("/orders/1").bearer(&token), source))
            .await
            .unwrap();
        assert_eq!(a.into_inner().status.unwrap().code, 0);
    }
    // Another token from yet other addresses is its own.
    for source in ["10.0.0.3", "10.0.0.4"] {
        c.check(from(get("/orders/1").bearer(&other), source))
            .await
            .unwrap();
    }
    assert_eq!(v.metric(TOKEN_SIGNAL).await, Some(0.0));
    // A third and a fourth address: reported once, and the Check still allowed
    // (a signal, not a decision).
    for source in ["192.0.2.9", "192.0.2.10"] {
        let a = c
            .check(from(get("/orders/1").bearer(&token), source))
            .await
            .unwrap();
        assert_eq!(a.into_inner().status.unwrap().code, 0);
    }
    assert_eq!(v.metric(TOKEN_SIGNAL).await, Some(1.0));
    let hash: String = digest(&SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        v.logged(&format!("token_sha256={hash}")).await,
        "{}",
        v.logs()
    );
    let logs = v.logs();
    assert_eq!(
        logs.matches("more source addresses than").count(),
        1,
        "logged once: {logs}"
    );
    for part in token.split('.').skip(1) {
        assert!(!logs.contains(part), "a token part was logged");
    }
}

#[tokio::test]
async fn a_client_denied_too_often_in_a_minute_is_reported() {
    // Valet's minute stands still: the six denials fall in one.
    let clock = valet::clock::Clock::fixed_at(now() as u64);
    let v = Valet::in_process_on(&policy(), clock);
    let mut c = v.client().await;
    let mut claims = claims("profile");
    claims["azp"] = json!("web-app");
    let weak = token(jsonwebtoken::Algorithm::RS256, &claims);
    // Three denials a minute are within the bound, from any address.
    for source in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        c.check(from(get("/orders/1").bearer(&weak), source))
            .await
            .unwrap();
    }
    assert_eq!(v.metric(CLIENT_SIGNAL).await, Some(0.0));
    for _ in 0..3 {
        c.check(from(get("/orders/1").bearer(&weak), "10.0.0.4"))
            .await
            .unwrap();
    }
    assert_eq!(v.metric(CLIENT_SIGNAL).await, Some(1.0), "once a minute");
    assert!(v.logged("client=web-app").await, "{}", v.logs());
}
