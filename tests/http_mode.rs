//! HTTP mode: the same decisions for Envoy's http_service, nginx auth_request and
//! Traefik forwardAuth, over plain HTTP.

mod common;

use common::*;

const POLICY: &str = "listen:\n  grpc: 127.0.0.1:0\n  admin: 127.0.0.1:0\n  http: 127.0.0.1:0\nproviders:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\n    claims_to_headers: { sub: x-user-id }\nroutes:\n  - name: health\n    match: { path: /healthz }\n    anonymous: true\n  - name: read\n    match: { methods: [GET], path_prefix: /orders }\n    require: { scopes: [orders:read] }\n  - name: write\n    match: { methods: [POST], path_prefix: /orders }\n    require: { scopes: [orders:write] }\n";

async fn ask(v: &Valet, method: &str, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let url = format!("http://{}{path}", v.http.expect("http listener"));
    let mut req = reqwest::Client::new().request(method.parse().unwrap(), url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn proxies_get_the_same_decisions_over_http() {
    let v = Valet::start(POLICY);
    let read = format!("Bearer {}", rs256("orders:read"));

    // Traefik forwardAuth.
    let r = ask(
        &v,
        "GET",
        "/",
        &[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/orders/7?x=1"),
            ("x-forwarded-host", "api.example.com"),
            ("authorization", &read),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-user-id"], "alice");
    assert_eq!(r.headers()["x-valet-reason"], "verified");

    // nginx auth_request.
    let r = ask(
        &v,
        "GET",
        "/auth",
        &[
            ("x-original-method", "POST"),
            ("x-original-uri", "/orders/7"),
            ("authorization", &read),
        ],
    )
    .await;
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

    // Envoy http_service: the original method and path, as they are.
    let r = ask(&v, "GET", "/orders/7", &[("authorization", &read)]).await;
    assert_eq!(r.status(), 200);
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

    // Normalisation applies to the forwarded URI too.
    let r = ask(
        &v,
        "GET",
        "/",
        &[("x-forwarded-uri", "/healthz/../orders/1")],
    )
    .await;
    assert_eq!(r.status(), 401);
    let r = ask(&v, "GET", "/", &[("x-forwarded-uri", "/healthz")]).await;
    assert_eq!(r.status(), 200);

    // Counted like gRPC Checks.
    assert!(
        v.metric("valet_check_total{decision=\"allow\",reason=\"verified\",route=\"read\"}")
            .await
            .unwrap()
            >= 2.0
    );
}

/// RFC 9728: the metadata document from HTTP mode, and `resource_metadata=` in the
/// challenges of the routes it covers (over HTTP and gRPC alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_resource_metadata_is_served_and_named_in_challenges() {
    let policy = format!(
        "{POLICY}protected_resources:\n  - resource: https://api.example.com/orders\n    routes: [read, write]\n    resource_documentation: https://docs.example.com/orders\n"
    );
    let v = Valet::start(&policy);
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
