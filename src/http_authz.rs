//! HTTP mode: the same decisions over plain HTTP, for proxies that speak the HTTP
//! flavour of external auth: Envoy's `http_service`, nginx `auth_request`, Traefik
//! `forwardAuth`. The original request is read from the headers those proxies
//! send (`X-Forwarded-Method`/`-Uri`/`-Host`, `X-Original-Method`/`-URI`), else
//! from the request itself (Envoy forwards the original method and path). 200 with
//! the identity headers on allow; 401/403 with the challenge and a JSON body on
//! deny. Only the proxy may reach this port: it trusts those headers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::decision::Decision;
use crate::resource_metadata::WELL_KNOWN;
use crate::response::challenge;
use crate::service::decide;
use crate::state::State;

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, req).await) }
            });
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let check = to_check(&req);
    if let Some(doc) = metadata_document(state, &check) {
        return doc;
    }
    let (decision, policy) = decide(state, &check, None).await;
    match decision {
        Decision::Allow(a) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            for (k, v) in &a.set_headers {
                if let (Ok(k), Ok(v)) = (k.parse::<hyper::header::HeaderName>(), v.parse()) {
                    r.headers_mut().insert(k, v);
                }
            }
            if let Some(reason) = a.reason {
                r.headers_mut().insert(
                    "x-valet-reason",
                    hyper::header::HeaderValue::from_static(reason.label()),
                );
            }
            r
        }
        Decision::Deny(d) => {
            let status = d.kind.http_status();
            let body = serde_json::json!({
                "error": d.reason.label(),
                "error_description": d.description,
                "status": status,
                "route": d.route,
            });
            let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
            let h = r.headers_mut();
            h.insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            h.insert(
                hyper::header::CACHE_CONTROL,
                hyper::header::HeaderValue::from_static("no-store"),
            );
            h.insert(
                "x-valet-reason",
                hyper::header::HeaderValue::from_static(d.reason.label()),
            );
            if let Some(c) = challenge(&d, &policy.realm)
                && let Ok(v) = c.parse()
            {
                h.insert(hyper::header::WWW_AUTHENTICATE, v);
            }
            r
        }
    }
}

/// The CheckRequest Envoy would have sent for the original request.
fn to_check(req: &Request<Incoming>) -> CheckRequest {
    let mut headers: HashMap<String, String> = HashMap::new();
    for (name, value) in req.headers() {
        let Ok(v) = value.to_str() else { continue };
        headers
            .entry(name.as_str().to_string())
            .and_modify(|old| {
                old.push(',');
                old.push_str(v);
            })
            .or_insert_with(|| v.to_string());
    }
    let first = |names: &[&str]| names.iter().find_map(|n| headers.get(*n).cloned());
    let method = first(&["x-forwarded-method", "x-original-method"])
        .unwrap_or_else(|| req.method().to_string());
    let path = first(&["x-forwarded-uri", "x-original-uri"]).unwrap_or_else(|| {
        req.uri()
            .path_and_query()
            .map_or("/".to_string(), |p| p.to_string())
    });
    let host = first(&["x-forwarded-host", "host"]).unwrap_or_default();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method,
                    path,
                    host,
                    headers,
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// RFC 9728: a GET for a protected resource's metadata is answered with the
/// document itself (public by definition), not with a decision.
fn metadata_document(state: &State, check: &CheckRequest) -> Option<Response<Full<Bytes>>> {
    let http = check.attributes.as_ref()?.request.as_ref()?.http.as_ref()?;
    let path = http.path.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with(WELL_KNOWN) || !matches!(http.method.as_str(), "GET" | "HEAD") {
        return None;
    }
    let policy = state.policy();
    let resource = policy
        .protected_resources
        .iter()
        .find(|r| r.well_known_path == path)?;
    let mut r = Response::new(Full::new(Bytes::from(resource.document.clone())));
    let h = r.headers_mut();
    h.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        "cache-control",
        hyper::header::HeaderValue::from_static("max-age=300"),
    );
    Some(r)
}
