//! The admin port: `/metrics`, `/healthz`, `/readyz`, `/statusz`, `/denials`. Plain HTTP/1.1, separate
//! from the Check port so probes and scrapes never queue behind Envoy's traffic.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::conn::Gate;
use crate::observe::Observer;
use crate::state::State;

pub struct Admin {
    pub state: Arc<State>,
    pub metrics: PrometheusHandle,
    /// For `/denials`.
    pub observer: Arc<Observer>,
}

/// Serves within `gate`, its own small connection budget: a flood of the Check
/// port never takes the descriptors probes need, nor does one of this port.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, gate: Gate) {
    loop {
        let (stream, slot) = crate::conn::accept(&listener, &gate).await;
        let admin = admin.clone();
        crate::telemetry::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, &req)) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
        });
    }
}

fn route(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let now = admin.state.clock().unix();
            let policy = admin.state.snapshot();
            crate::telemetry::verify_cache_entries(policy.stores.verified.entries());
            crate::telemetry::dpop_replay_entries(policy.stores.replay.len());
            for (p, keys) in policy.providers.iter().zip(&policy.stores.keys) {
                let at = keys.confirmed_at();
                if at > 0 {
                    crate::telemetry::jwks_age(&p.name, now.saturating_sub(at));
                }
            }
            let mut r = text(StatusCode::OK, &admin.metrics.render());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8".parse().unwrap(),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/denials" => json(&serde_json::json!({
            "capacity": admin.observer.denials().capacity(),
            "denials": admin.observer.denials().list(),
        })),
        "/statusz" => json(&status_json(admin)),
        "/readyz" => {
            let policy = admin.state.snapshot();
            let missing = policy.providers_without_keys();
            if admin.state.is_draining() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: shutting down\n",
                )
            } else if missing.is_empty() && policy.denylist_pending() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no revocation denylist yet from its URL\n",
                )
            } else if missing.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "not ready: no keys yet for provider(s) {}\n",
                        missing.join(", ")
                    ),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz, /statusz, /denials\n",
        ),
    }
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::OK, &value.to_string());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    r
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().unwrap(),
    );
    r
}

/// The policy in force and its keys: generation, last reload error, key ages.
fn status_json(admin: &Admin) -> serde_json::Value {
    let policy = admin.state.snapshot();
    let now = admin.state.clock().unix();
    let providers: Vec<_> = policy
        .providers
        .iter()
        .zip(&policy.stores.keys)
        .map(|(p, cell)| {
            let keys = cell.load();
            let at = cell.confirmed_at();
            serde_json::json!({
                "name": p.name,
                "issuer": p.issuer,
                "keys": keys.as_ref().map_or(0, |k| k.len()),
                "kids": keys.as_ref().map(|k| k.kids().map(str::to_owned).collect::<Vec<_>>()).unwrap_or_default(),
                "confirmed_at": at,
                "age_seconds": if at > 0 { Some(now.saturating_sub(at)) } else { None },
            })
        })
        .collect();
    serde_json::json!({
        "policy": *admin.state.reload_status(),
        "routes": policy.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        "providers": providers,
        "revocation": policy.stores.revocation.as_ref().map(|r| r.status(now)),
        "store": policy.stores.shared.as_ref().map(|s| s.status()),
        "ready": admin.state.is_ready(),
        "draining": admin.state.is_draining(),
    })
}
