//! HTTP mode: the same decisions for Envoy's http_service, nginx auth_request and
//! Traefik forwardAuth, over plain HTTP.

use crate::common;

use common::*;

const POLICY: &str = "listen:\n  grpc: 127.0.0.1:0\n  admin: 127.0.0.1:0\n  http: 127.0.0.1:0\nproviders:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\n    claims_to_headers: { sub: x-user-id }\nroutes:\n  - name: health\n    match: { path: /healthz }\n    anonymous: true\n  - name: read\n    match: { methods: [GET], path_prefix: /orders }\n    require: { scopes: [orders:read] }\n  - name: write\n    match: { methods: [POST], path_prefix: /orders }\n    require: { scopes: [orders:write] }\n";

/// POLICY with `listen.http_proxy: proxy`.
fn behind(proxy: &str) -> String {
    POLICY.replace(
        "  http: 127.0.0.1:0\n",
        &format!("  http: 127.0.0.1:0\n  http_proxy: {proxy}\n"),
    )
}

async fn ask(v: &Valet, method: &str, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let url = format!("http://{}{path}", v.http.expect("http listener"));
    let mut req = reqwest::Client::new().request(method.parse().unwrap(), url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn traefik_forward_auth_is_read_from_x_forwarded_only() {
    let v = Valet::in_process(&behind("traefik"));
    let read = format!("Bearer {}", rs256("orders:read"));
    let fwd = |method: &'static str, uri: &'static str| {
        vec![
            ("x-forwarded-method", method),
            ("x-forwarded-uri", uri),
            ("x-forwarded-host", "api.example.com"),
            ("x-forwarded-proto", "https"),
        ]
    };
    let mut h = fwd("GET", "/orders/7?x=1");
    h.push(("authorization", &read));
    let r = ask(&v, "GET", "/", &h).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-user-id"], "alice");
    assert_eq!(r.headers()["x-valet-reason"], "verified");
    // Only Envoy is told what to remove.
    assert!(r.headers().get("x-envoy-auth-headers-to-remove").is_none());

    // nginx's family is ignored even when present.
    let mut h = fwd("GET", "/orders/7");
    h.extend([("x-original-uri", "/healthz"), ("x-original-method", "GET")]);
    assert_eq!(ask(&v, "GET", "/", &h).await.status(), 401);

    // Normalisation applies to the forwarded URI too.
    let r = ask(&v, "GET", "/", &fwd("GET", "/healthz/../orders/1")).await;
    assert_eq!(r.status(), 401);
    let r = ask(&v, "GET", "/", &fwd("GET", "/healthz")).await;
    assert_eq!(r.status(), 200);

    // Missing or repeated: 400, never a fallback to the request line.
    let r = ask(&v, "GET", "/healthz", &[("x-forwarded-method", "GET")]).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-valet-reason"], "malformed_request");
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "malformed_request");
    let mut h = fwd("GET", "/orders/1");
    h.push(("x-forwarded-uri", "/healthz"));
    assert_eq!(ask(&v, "GET", "/healthz", &h).await.status(), 400);
    assert!(
        v.metric(
            "valet_check_total{decision=\"deny\",reason=\"malformed_request\",route=\"_none\"}"
        )
        .await
        .unwrap()
            >= 2.0,
        "the refusals are counted"
    );
}

#[tokio::test]
async fn nginx_auth_request_is_read_from_x_original_only() {
    let v = Valet::in_process(&behind("nginx"));
    let read = format!("Bearer {}", rs256("orders:read"));
    let orig = |method: &'static str, uri: &'static str| {
        vec![
            ("x-original-method", method),
            ("x-original-uri", uri),
            ("x-original-host", "api.example.com"),
        ]
    };
    let mut h = orig("POST", "/orders/7");
    h.push(("authorization", &read));
    let r = ask(&v, "GET", "/_valet", &h).await;
    assert_eq!(r.status(), 403);
    let challenge = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.contains("error=\"insufficient_scope\"")
            && challenge.contains("scope=\"orders:write\""),
        "{challenge}"
    );
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "insufficient_scope");

    // Traefik's family is ignored: GET /orders/7 spoofed as /healthz is still /orders/7.
    let mut h = orig("GET", "/orders/7");
    h.extend([
        ("x-forwarded-uri", "/healthz"),
        ("x-forwarded-method", "GET"),
    ]);
    assert_eq!(ask(&v, "GET", "/_valet", &h).await.status(), 401);
    // Without its own headers nginx's subrequest is never decided on its own path.
    let r = ask(&v, "GET", "/healthz", &[("x-forwarded-uri", "/healthz")]).await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn envoy_http_service_trusts_no_forwarded_header() {
    // No http_proxy: envoy, with a warning at startup.
    let v = Valet::in_process(POLICY);
    assert!(
        v.wait_for_log("listen.http_proxy is not set"),
        "no warning:\n{}",
        v.logs()
    );
    let read = format!("Bearer {}", rs256("orders:read"));
    let r = ask(&v, "GET", "/orders/7", &[("authorization", &read)]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-user-id"], "alice");
    // The token is not the upstream's business; nor is a client's own x-user-id.
    assert_eq!(
        r.headers()["x-envoy-auth-headers-to-remove"],
        "authorization"
    );
    let r = ask(&v, "GET", "/healthz", &[("x-user-id", "mallory")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-envoy-auth-headers-to-remove"], "x-user-id");
    let r = ask(&v, "GET", "/orders/7", &[]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"valet\"");
    let r = ask(&v, "GET", "/orders/7", &[("authorization", "Bearer nope")]).await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    // Neither family moves the decision.
    for spoof in [
        [
            ("x-forwarded-uri", "/healthz"),
            ("x-forwarded-method", "GET"),
        ],
        [("x-original-uri", "/healthz"), ("x-original-method", "GET")],
    ] {
        assert_eq!(ask(&v, "GET", "/orders/7", &spoof).await.status(), 401);
    }

    // Counted like gRPC Checks.
    assert!(
        v.metric("valet_check_total{decision=\"allow\",reason=\"verified\",route=\"read\"}")
            .await
            .unwrap()
            >= 1.0
    );
}

/// A token header that is not UTF-8 is a bad token, not an absent one: it must
/// not let the next token source (here a cookie with a good token) be read.
#[tokio::test]
async fn a_token_header_that_is_not_utf8_is_not_dropped() {
    let policy = behind("envoy").replace(
        "    claims_to_headers: { sub: x-user-id }\n",
        "    claims_to_headers: { sub: x-user-id }\n    tokens_from: [{ header: x-token }, { cookie: session }]\n",
    );
    let v = Valet::in_process(&policy);
    let good = rs256("orders:read");
    let url = format!("http://{}/orders/7", v.http.unwrap());
    let client = reqwest::Client::new();
    let r = client
        .get(&url)
        .header("cookie", format!("session={good}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the cookie alone is a good token");
    let r = client
        .get(&url)
        .header(
            "x-token",
            reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        )
        .header("cookie", format!("session={good}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "x-token came first and is not a token");
}

/// RFC 9728: the metadata document from HTTP mode, and `resource_metadata=` in the
/// challenges of the routes it covers (over HTTP and gRPC alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_resource_metadata_is_served_and_named_in_challenges() {
    let policy = format!(
        "{POLICY}protected_resources:\n  - resource: https://api.example.com/orders\n    routes: [read, write]\n    resource_documentation: https://docs.example.com/orders\n"
    );
    let v = Valet::in_process(&policy);
    let r = ask(
        &v,
        "GET",
        "/.well-known/oauth-protected-resource/orders",
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(doc["resource"], "https://api.example.com/orders");
    assert_eq!(
        doc["authorization_servers"],
        serde_json::json!(["https://idp.test/"])
    );
    assert_eq!(
        doc["scopes_supported"],
        serde_json::json!(["orders:read", "orders:write"])
    );
    assert_eq!(
        doc["bearer_methods_supported"],
        serde_json::json!(["header"])
    );
    assert_eq!(
        doc["resource_documentation"],
        "https://docs.example.com/orders"
    );
    assert!(
        doc["dpop_signing_alg_values_supported"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "ES256")
    );
    // Another well-known path is not a document: decided like any request (no route: 403).
    let r = ask(
        &v,
        "GET",
        "/.well-known/oauth-protected-resource/other",
        &[],
    )
    .await;
    assert_eq!(r.status(), 403);

    let url = "https://api.example.com/.well-known/oauth-protected-resource/orders";
    let r = ask(&v, "GET", "/orders/1", &[]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        format!("Bearer realm=\"valet\", resource_metadata=\"{url}\"").as_str()
    );
    let mut c = v.client().await;
    let a = check(&mut c, get("/orders/1").bearer("x.y.z")).await;
    assert!(
        a.challenge()
            .contains(&format!("resource_metadata=\"{url}\"")),
        "{}",
        a.challenge()
    );
    let a = check(&mut c, get("/orders/1").bearer(&rs256("other"))).await;
    assert!(
        a.challenge().contains("error=\"insufficient_scope\"")
            && a.challenge().contains("resource_metadata=")
    );
    // The anonymous route is not part of the resource.
    assert!(check(&mut c, get("/healthz")).await.allowed());
}
