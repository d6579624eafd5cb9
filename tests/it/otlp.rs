//! Valet's spans, as a real OTLP/gRPC receiver (built from the official
//! protobuf definitions) gets them: a child of the span Envoy forwards,
//! attributes present, never the token; a dead or stuck collector drops spans
//! (counted) and never holds a Check.

use crate::common;

use crate::audit::POLICY;
use common::otlp::Receiver;
use common::*;
use serde_json::json;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn tracing_to(endpoint: &str, extra: &str) -> String {
    format!(
        "{POLICY}tracing:\n  service_name: valet-test\n  otlp: {{ endpoint: \"{endpoint}\", timeout: 30s{extra} }}\n"
    )
}

#[tokio::test]
async fn a_span_per_check_child_of_the_callers_with_attributes_and_no_token() {
    let receiver = Receiver::start().await;
    let config = format!(
        "{}  sample_ratio: 0\n",
        tracing_to(&receiver.endpoint(), "")
    );
    let v = Valet::in_process(&config);
    let mut c = v.client().await;
    let mut claims = claims("orders:read");
    claims["client_id"] = json!("mobile-app");
    let good = token(jsonwebtoken::Algorithm::RS256, &claims);

    // A root with sample_ratio 0 is not sampled; a sampled parent is followed.
    check(&mut c, get("/orders/0").bearer(&good)).await;
    let unsampled = format!("00-{}-{PARENT}-00", "1".repeat(32));
    check(
        &mut c,
        get("/orders/1")
            .bearer(&good)
            .header("traceparent", &unsampled),
    )
    .await;
    let allowed = check(
        &mut c,
        get("/orders/7")
            .bearer(&good)
            .header("traceparent", &format!("00-{TRACE_ID}-{PARENT}-01"))
            .header("tracestate", "vendor=x"),
    )
    .await;
    assert!(allowed.allowed(), "{allowed:?}");
    // B3 from a Zipkin setup: the Check's span joins that trace too.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    check(
        &mut c,
        get("/orders/8").header("b3", &format!("{b3_trace}-e457b5a2e4d86bd1-1")),
    )
    .await;

    let span = receiver
        .wait_for(|s| s.trace_id() == TRACE_ID)
        .await
        .expect("Valet's span reached the receiver");
    assert_eq!(span.service, "valet-test");
    assert_eq!(span.span.name, "valet.check");
    assert_eq!(span.parent_span_id(), PARENT);
    assert_eq!(span.attr("valet.route").as_deref(), Some("orders-read"));
    assert_eq!(span.attr("valet.decision").as_deref(), Some("allow"));
    assert_eq!(span.attr("valet.reason").as_deref(), Some("verified"));
    assert_eq!(span.attr("valet.provider").as_deref(), Some("corp"));
    assert_eq!(span.attr("valet.client_id").as_deref(), Some("mobile-app"));
    assert_eq!(span.attr("valet.subject").as_deref(), Some("alice"));
    assert_eq!(
        span.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(span.attr("valet.kid").is_some());
    assert_eq!(span.span.trace_state, "vendor=x");

    let b3 = receiver
        .wait_for(|s| s.trace_id() == b3_trace)
        .await
        .expect("the B3 Check's span");
    assert_eq!(b3.parent_span_id(), "e457b5a2e4d86bd1");
    assert_eq!(b3.attr("valet.decision").as_deref(), Some("deny"));
    assert_eq!(b3.attr("valet.reason").as_deref(), Some("missing_token"));
    assert_eq!(b3.attr("valet.subject"), None, "no subject on a denial");

    // Only the two sampled Checks were exported (the queue is in order, the
    // unsampled ones came first), and nothing in them holds the token.
    let spans = receiver.spans();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let text = format!("{spans:?}");
    let parts: Vec<&str> = good.split('.').collect();
    for needle in [good.as_str(), parts[1], parts[2]] {
        assert!(!text.contains(needle), "a token part was exported");
    }
}

#[tokio::test]
async fn a_stuck_or_absent_collector_drops_spans_and_never_holds_a_check() {
    // A collector that accepts and never answers: the export waits its 30 s
    // timeout while Checks go on; a queue of 4 overflows.
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    let held = common::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = stuck.accept().await {
            open.push(s);
        }
    });
    let v = Valet::in_process(&tracing_to(&format!("http://{stuck_addr}"), ", queue: 4"));
    let mut c = v.client().await;
    for i in 0..40 {
        let a = check(
            &mut c,
            get(&format!("/orders/{i}")).bearer(&rs256("orders:read")),
        )
        .await;
        assert!(a.allowed(), "{a:?}");
    }
    let dropped = v
        .metric("valet_trace_spans_dropped_total{reason=\"queue_full\"}")
        .await
        .unwrap();
    assert!(
        dropped >= 30.0,
        "40 spans, 4 queued, one batch in export: {dropped}"
    );
    held.abort();

    // No collector at all: every export fails and is counted; Checks are answered.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let v = Valet::in_process(&tracing_to(&format!("http://{closed_addr}"), ""));
    let mut c = v.client().await;
    for i in 0..5 {
        let a = check(
            &mut c,
            get(&format!("/orders/{i}")).bearer(&rs256("orders:read")),
        )
        .await;
        assert!(a.allowed(), "{a:?}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut failed = 0.0;
    while std::time::Instant::now() < deadline && failed < 5.0 {
        failed = v
            .metric("valet_trace_spans_dropped_total{reason=\"export_failed\"}")
            .await
            .unwrap_or(0.0);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(failed, 5.0, "every span of the absent collector counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_awaited_key_refetch_is_a_child_span() {
    use common::jwks_server::JwksServer;
    let receiver = Receiver::start().await;
    let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
    let config = format!(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: {{ uri: \"{}/jwks\" }}\n    algorithms: [RS256, ES256]\nroutes:\n  - name: orders-read\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\ntracing:\n  otlp: {{ endpoint: \"{}\" }}\n",
        server.url(),
        receiver.endpoint()
    );
    let v = Valet::in_process(&config);
    assert!(
        v.wait_ready(200, std::time::Duration::from_secs(10)).await,
        "{}",
        v.logs()
    );
    // The IdP rotates: a token signed with the new key names a kid Valet must fetch.
    server.set_jwks(jwks_with(&["ec256-1", "rsa-1"]));
    let mut c = v.client().await;
    let rotated = token(jsonwebtoken::Algorithm::ES256, &claims("orders:read"));
    let a = check(
        &mut c,
        get("/orders/1")
            .bearer(&rotated)
            .header("traceparent", &format!("00-{TRACE_ID}-{PARENT}-01")),
    )
    .await;
    assert!(a.allowed(), "{a:?}");
    let check_span = receiver
        .wait_for(|s| s.span.name == "valet.check")
        .await
        .expect("the Check's span");
    let refetch = receiver
        .wait_for(|s| s.span.name == "valet.jwks.refetch")
        .await
        .expect("the refetch's span");
    assert_eq!(refetch.trace_id(), TRACE_ID);
    assert_eq!(refetch.parent_span_id(), check_span.span_id());
    assert_eq!(refetch.attr("valet.provider").as_deref(), Some("corp"));
}
