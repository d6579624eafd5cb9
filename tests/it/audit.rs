//! The audit trail and the last denials: the real binary at trace level, its
//! JSON lines read back field by field; `/denials` on the admin port.

use crate::common;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use serde_json::{Value, json};

/// The policy of the audit, tracing and misuse suites.
pub const POLICY: &str = r#"
providers:
  - name: corp
    issuer: https://idp.test/
    audiences: [orders-api]
    jwks: { file: jwks.json }
routes:
  - name: orders-read
    match: { methods: [GET], path_prefix: /orders }
    require: { scopes: [orders:read] }
default: deny
"#;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// `req` as Envoy sends it from `source`, in the trace [`TRACE_ID`].
fn from(req: Req, source: &str) -> CheckRequest {
    let req = req.header("traceparent", &format!("00-{TRACE_ID}-00f067aa0ba902b7-01"));
    from_address(req.build(), source)
}

fn token_with(scope: &str, client: &str) -> String {
    let mut c = claims(scope);
    c["azp"] = json!(client);
    rs256_claims(&c)
}

fn rs256_claims(c: &Value) -> String {
    token(jsonwebtoken::Algorithm::RS256, c)
}

/// The audit lines of `logs` (JSON, target `audit`), by their `reason`.
fn audit_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "audit" && v["fields"]["message"] == "audit")
        .map(|v| v["fields"].clone())
        .collect()
}

#[tokio::test]
async fn one_json_line_per_decision_with_who_what_and_trace_never_the_token() {
    let config = format!("{POLICY}audit: {{ allow: true, deny: true }}\n");
    let v = Valet::start_with(
        &config,
        &[("VALET_LOG", "trace"), ("VALET_LOG_FORMAT", "json")],
    );
    let mut c = v.client().await;
    let good = token_with("orders:read orders:list", "mobile-app");
    let weak = token_with("profile", "web-app");
    let mut forged = good.clone();
    forged.pop();
    forged.push(if good.ends_with('A') { 'B' } else { 'A' });

    let allowed = c
        .check(from(
            get("/orders/7?card=4111111111111111").bearer(&good),
            "203.0.113.7",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.status.unwrap().code, 0);
    for (token, path) in [(&weak, "/orders/8"), (&forged, "/orders/9")] {
        let denied = c
            .check(from(get(path).bearer(token), "198.51.100.2"))
            .await
            .unwrap()
            .into_inner();
        assert_ne!(denied.status.unwrap().code, 0);
    }
    assert!(
        v.logged("\"reason\":\"bad_signature\"").await,
        "{}",
        v.logs()
    );

    let logs = v.logs();
    let lines = audit_lines(&logs);
    assert_eq!(lines.len(), 3, "{logs}");
    let allow = &lines[0];
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["reason"], "verified");
    assert_eq!(allow["route"], "orders-read");
    assert_eq!(allow["provider"], "corp");
    assert_eq!(allow["subject"], "alice");
    assert_eq!(allow["client_id"], "mobile-app");
    assert_eq!(allow["scopes"], "orders:read orders:list");
    assert_eq!(allow["source"], "203.0.113.7");
    assert_eq!(allow["method"], "GET");
    assert_eq!(allow["path"], "/orders/7", "the query is left out");
    assert_eq!(allow["trace_id"], TRACE_ID);
    assert_eq!(allow["status"], 200);
    assert!(
        allow["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{allow}"
    );

    let scope = &lines[1];
    assert_eq!(scope["decision"], "deny");
    assert_eq!(scope["reason"], "insufficient_scope");
    assert_eq!(scope["status"], 403);
    assert_eq!(scope["client_id"], "web-app", "verified, then refused");
    assert_eq!(scope["subject"], "alice");
    assert_eq!(scope["scopes"], "", "scopes are listed on allow only");

    let forged_line = &lines[2];
    assert_eq!(forged_line["reason"], "bad_signature");
    assert_eq!(
        forged_line["client_id"], "",
        "claims of an unverified token are not trusted"
    );
    assert_eq!(forged_line["trace_id"], TRACE_ID);

    // Nothing Valet wrote at trace level holds a token or any of its parts.
    for t in [&good, &weak, &forged] {
        let parts: Vec<&str> = t.split('.').collect();
        for needle in [t.as_str(), parts[1], parts[2]] {
            assert!(
                !logs.contains(needle),
                "a token part was logged: {}",
                logs.lines().find(|l| l.contains(needle)).unwrap()
            );
        }
    }
    assert!(!logs.contains("4111111111111111"), "the query was logged");
}

#[tokio::test]
async fn lines_past_the_budget_are_counted_not_written() {
    let config = format!("{POLICY}audit: {{ deny: true, max_per_second: 1 }}\n");
    let v = Valet::in_process(&config);
    let mut c = v.client().await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        check(&mut c, get("/orders/1")).await;
    }
    // One line a second: at most one per second the denials spanned was written.
    let seconds = started.elapsed().as_secs_f64().ceil() + 1.0;
    let dropped = v.metric("valet_audit_dropped_total").await.unwrap();
    assert!(dropped >= 20.0 - seconds, "{dropped} dropped in {seconds}s");
    assert!(dropped < 20.0, "the first line of a second is written");
}

#[tokio::test]
async fn the_admin_port_lists_the_last_denials_newest_first() {
    let config = format!("{POLICY}audit: {{ deny: false, recent_denials: 2 }}\n");
    let v = Valet::in_process(&config);
    let mut c = v.client().await;
    let weak = token_with("profile", "web-app");
    check(&mut c, get("/orders/1")).await;
    c.check(from(get("/orders/2").bearer(&weak), "198.51.100.2"))
        .await
        .unwrap();
    check(&mut c, get("/nowhere")).await;
    check(&mut c, get("/orders/3").bearer(&rs256("orders:read"))).await;

    let (status, body) = v.admin_get("/denials").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["capacity"], 2);
    let denials = doc["denials"].as_array().unwrap();
    assert_eq!(denials.len(), 2, "{doc}");
    assert_eq!(denials[0]["reason"], "no_route");
    assert_eq!(denials[0]["route"], "_none");
    assert_eq!(denials[1]["reason"], "insufficient_scope");
    assert_eq!(denials[1]["route"], "orders-read");
    assert_eq!(denials[1]["provider"], "corp");
    assert_eq!(denials[1]["client_id"], "web-app");
    assert_eq!(denials[1]["trace_id"], TRACE_ID);
    assert_eq!(denials[1]["status"], 403);
    assert!(!body.contains(weak.split('.').nth(2).unwrap()));
    // No audit line was asked for.
    assert!(!v.logs().contains("target=audit") && !v.logs().contains("audit:"));
}

#[tokio::test]
async fn a_reload_says_which_settings_wait_for_a_restart() {
    let v = Valet::start(&format!("{POLICY}audit: {{ recent_denials: 5 }}\n"));
    let path = v.dir.path().join("valet.yaml");
    let changed = with_free_ports(&format!(
        "{POLICY}audit: {{ recent_denials: 9, allow: true }}\n"
    ));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, changed).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(
        v.logged("audit.recent_denials changed").await,
        "{}",
        v.logs()
    );
    // The rest of `audit:` applies at once: allows are audited now.
    let mut c = v.client().await;
    check(&mut c, get("/orders/1").bearer(&rs256("orders:read"))).await;
    assert!(v.logged("decision=\"allow\"").await, "{}", v.logs());
    let (_, body) = v.admin_get("/denials").await;
    assert!(body.contains("\"capacity\":5"), "{body}");
}
