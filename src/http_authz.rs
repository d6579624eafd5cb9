//! HTTP mode: the same decisions over plain HTTP, for proxies that speak the HTTP
//! flavour of external auth: Envoy's `http_service`, nginx `auth_request`, Traefik
//! `forwardAuth`. 200 with the identity headers on allow; 401/403 with the
//! challenge and a JSON body on deny.
//!
//! Which proxy calls this port is configured (`listen.http_proxy`), and only the
//! headers that proxy writes itself are read for the original method, URI and
//! host: nginx `X-Original-*` (set with `proxy_set_header`, which keeps a client's
//! own copy out), Traefik `X-Forwarded-*` (which forwardAuth overwrites), Envoy
//! none (the subrequest carries the original request line and Host). Every other
//! family is ignored, present or not: a client can send any header through nginx.
//! A trusted header missing or sent twice is a 400, never a fallback.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    self, HttpRequest, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub use crate::config::HttpProxy;
use crate::conn::Gate;
use crate::decision::{Decision, Deny, DenyKind, Reason};
use crate::observe::Observer;
use crate::policy::resource_metadata::WELL_KNOWN;
use crate::response::challenge;
use crate::service::decide;
use crate::state::State;

/// The headers a proxy writes about the original request.
struct Family {
    method: &'static str,
    uri: &'static str,
    host: &'static str,
    /// Optional: the scheme the client used.
    proto: Option<&'static str>,
}

const NGINX: Family = Family {
    method: "x-original-method",
    uri: "x-original-uri",
    host: "x-original-host",
    proto: None,
};

const TRAEFIK: Family = Family {
    method: "x-forwarded-method",
    uri: "x-forwarded-uri",
    host: "x-forwarded-host",
    proto: Some("x-forwarded-proto"),
};

impl HttpProxy {
    fn family(self) -> Option<&'static Family> {
        match self {
            HttpProxy::Nginx => Some(&NGINX),
            HttpProxy::Traefik => Some(&TRAEFIK),
            HttpProxy::Envoy => None,
        }
    }
}

/// Serves within `gate`: at most its cap of connections at once.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    observer: Arc<Observer>,
    proxy: HttpProxy,
    xfcc: bool,
    gate: Gate,
) {
    tracing::info!(
        http_proxy = proxy.name(),
        "HTTP mode reads the original request as {} sends it",
        proxy.name()
    );
    loop {
        let (stream, slot) = crate::conn::accept(&listener, &gate).await;
        let state = state.clone();
        let observer = observer.clone();
        crate::telemetry::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let (state, observer) = (state.clone(), observer.clone());
                async move { Ok::<_, Infallible>(answer(&state, &observer, proxy, xfcc, req).await) }
            });
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    state: &State,
    observer: &Observer,
    proxy: HttpProxy,
    xfcc: bool,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = std::time::Instant::now();
    let check = to_check(proxy, req.method(), req.uri(), req.headers()).and_then(|mut c| {
        if xfcc {
            with_principal(&mut c, req.headers())?;
        }
        Ok(c)
    });
    let check = match check {
        Ok(check) => check,
        Err(why) => {
            // Counted like any other Check; never decided on a guess.
            let deny = Deny::new(Reason::MalformedRequest, DenyKind::BadRequest, why);
            let decision = Decision::Deny(deny);
            state.telemetry().check(&decision, started.elapsed());
            let Decision::Deny(deny) = decision else {
                unreachable!()
            };
            return deny_response(&deny, &state.snapshot().realm);
        }
    };
    if let Some(doc) = metadata_document(state, &check) {
        return doc;
    }
    let (decision, policy) = decide(state, observer, &check, None).await;
    match decision {
        Decision::Allow(a) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            for (k, v) in a.headers_set() {
                if let (Ok(k), Ok(v)) = (k.parse::<hyper::header::HeaderName>(), v.parse()) {
                    r.headers_mut().insert(k, v);
                }
            }
            // Envoy removes these from the upstream request (the identity headers
            // Valet did not set, the token): a client's own x-user-id never passes.
            let removed = a.removed_headers().collect::<Vec<_>>();
            if proxy == HttpProxy::Envoy
                && !removed.is_empty()
                && let Ok(v) = HeaderValue::from_str(&removed.join(","))
            {
                r.headers_mut().insert("x-envoy-auth-headers-to-remove", v);
            }
            if let Some(reason) = a.reason {
                r.headers_mut()
                    .insert("x-valet-reason", HeaderValue::from_static(reason.label()));
            }
            r
        }
        Decision::Deny(d) => deny_response(&d, &policy.realm),
    }
}

/// The denial as the client will see it: status, challenge, JSON body.
fn deny_response(d: &Deny, realm: &str) -> Response<Full<Bytes>> {
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
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    h.insert("x-valet-reason", HeaderValue::from_static(d.reason.label()));
    if let Some(c) = challenge(d, realm)
        && let Ok(v) = c.parse()
    {
        h.insert(hyper::header::WWW_AUTHENTICATE, v);
    }
    r
}

/// The CheckRequest Envoy would have sent for the original request, read from
/// the one header family `proxy` writes; `Err` (a fixed description) when that
/// cannot be done safely.
fn to_check(
    proxy: HttpProxy,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<CheckRequest, &'static str> {
    let (method, path, host, scheme) = match proxy.family() {
        None => {
            // Envoy sends the original request line (origin-form) and Host.
            if uri.scheme().is_some() || uri.authority().is_some() {
                return Err("the request target is not a path");
            }
            let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
            let host = only_one(headers, "host")?.ok_or("no Host header")?;
            (method.as_str().to_string(), path, host, String::new())
        }
        Some(f) => {
            let method = only_one(headers, f.method)?.ok_or("the proxy sent no method header")?;
            if method.is_empty() || !method.bytes().all(is_tchar) {
                return Err("the proxy's method header is not a method");
            }
            let path = only_one(headers, f.uri)?.ok_or("the proxy sent no URI header")?;
            if !path.starts_with('/') {
                return Err("the proxy's URI header is not a path");
            }
            let host = only_one(headers, f.host)?.ok_or("the proxy sent no host header")?;
            let scheme = match f.proto {
                Some(name) => only_one(headers, name)?.unwrap_or_default(),
                None => String::new(),
            };
            (method, path, host, scheme)
        }
    };
    let mut map: HashMap<String, String> = HashMap::new();
    for (name, value) in headers {
        if name == hyper::header::HOST {
            continue;
        }
        // Kept, not skipped: a header that vanished could change which token
        // source is read (or turn a token into "no token"). Invalid bytes become
        // U+FFFD, which no token, proof or cookie value can contain.
        let v = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_string())
            .and_modify(|old| {
                old.push(',');
                old.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    map.insert("host".into(), host.clone());
    Ok(CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method,
                    path,
                    host,
                    headers: map,
                    scheme,
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    })
}

/// The principal of the certificate Envoy verified, from its one
/// `x-forwarded-client-cert`, as Envoy's gRPC Check carries it (`source.principal`).
fn with_principal(check: &mut CheckRequest, headers: &HeaderMap) -> Result<(), &'static str> {
    let Some(header) = only_one(headers, "x-forwarded-client-cert")? else {
        return Ok(());
    };
    if let Some(uri) = crate::request::xfcc::uri(&header)?
        && let Some(attributes) = check.attributes.as_mut()
    {
        attributes.source = Some(attribute_context::Peer {
            principal: uri,
            ..Default::default()
        });
    }
    Ok(())
}

/// The value of a header that must not be repeated: `Ok(None)` when absent, `Err`
/// when sent more than once or not UTF-8 (the request line is not guessed at).
fn only_one(headers: &HeaderMap, name: &str) -> Result<Option<String>, &'static str> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("a header describing the original request was sent more than once");
    }
    match first.to_str() {
        Ok(v) => Ok(Some(v.trim().to_string())),
        Err(_) => Err("a header describing the original request is not text"),
    }
}

/// RFC 9110 token characters (a method).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9728: a GET for a protected resource's metadata is answered with the
/// document itself (public by definition), not with a decision.
fn metadata_document(state: &State, check: &CheckRequest) -> Option<Response<Full<Bytes>>> {
    let http = check.attributes.as_ref()?.request.as_ref()?.http.as_ref()?;
    let path = http.path.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with(WELL_KNOWN) || !matches!(http.method.as_str(), "GET" | "HEAD") {
        return None;
    }
    let policy = state.snapshot();
    let resource = policy
        .protected_resources
        .iter()
        .find(|r| r.well_known_path == path)?;
    let mut r = Response::new(Full::new(Bytes::from(resource.document.clone())));
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert("cache-control", HeaderValue::from_static("max-age=300"));
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    fn http(check: &CheckRequest) -> &HttpRequest {
        check
            .attributes
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .http
            .as_ref()
            .unwrap()
    }

    /// Every family at once, each naming a different request.
    fn all_families() -> Vec<(&'static str, &'static [u8])> {
        vec![
            ("host", b"127.0.0.1:9002"),
            ("x-original-method", b"DELETE"),
            ("x-original-uri", b"/nginx?q=1"),
            ("x-original-host", b"nginx.example.com"),
            ("x-forwarded-method", b"PUT"),
            ("x-forwarded-uri", b"/traefik?q=2"),
            ("x-forwarded-host", b"traefik.example.com"),
            ("x-forwarded-proto", b"https"),
            ("authorization", b"Bearer t"),
        ]
    }

    fn read(
        proxy: HttpProxy,
        method: &str,
        uri: &str,
        h: &[(&str, &[u8])],
    ) -> Result<CheckRequest, &'static str> {
        to_check(
            proxy,
            &method.parse().unwrap(),
            &uri.parse().unwrap(),
            &headers(h),
        )
    }

    #[test]
    fn each_proxy_reads_only_its_own_family() {
        let h = all_families();
        let c = read(HttpProxy::Nginx, "GET", "/_valet", &h).unwrap();
        let r = http(&c);
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.host.as_str()),
            ("DELETE", "/nginx?q=1", "nginx.example.com")
        );
        assert_eq!(r.headers["host"], "nginx.example.com");
        assert_eq!(r.scheme, "");

        let c = read(HttpProxy::Traefik, "GET", "/", &h).unwrap();
        let r = http(&c);
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.host.as_str()),
            ("PUT", "/traefik?q=2", "traefik.example.com")
        );
        assert_eq!(r.scheme, "https");

        let c = read(HttpProxy::Envoy, "POST", "/envoy?q=3", &h).unwrap();
        let r = http(&c);
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.host.as_str()),
            ("POST", "/envoy?q=3", "127.0.0.1:9002")
        );
        // All other headers reach the Check as they came.
        assert_eq!(r.headers["authorization"], "Bearer t");
        assert_eq!(r.headers["x-forwarded-uri"], "/traefik?q=2");
    }

    #[test]
    fn a_missing_trusted_header_is_never_filled_from_another_family() {
        for (proxy, own) in [
            (
                HttpProxy::Nginx,
                ["x-original-method", "x-original-uri", "x-original-host"],
            ),
            (
                HttpProxy::Traefik,
                ["x-forwarded-method", "x-forwarded-uri", "x-forwarded-host"],
            ),
        ] {
            for missing in own {
                let h: Vec<_> = all_families()
                    .into_iter()
                    .filter(|(k, _)| *k != missing)
                    .collect();
                let e = read(proxy, "GET", "/orders/1", &h).unwrap_err();
                assert!(e.contains("sent no"), "{proxy:?} without {missing}: {e}");
            }
        }
        // Envoy: no Host at all.
        assert_eq!(
            read(HttpProxy::Envoy, "GET", "/", &[]).unwrap_err(),
            "no Host header"
        );
    }

    #[test]
    fn a_trusted_header_sent_twice_is_refused() {
        for (proxy, name) in [
            (HttpProxy::Nginx, "x-original-uri"),
            (HttpProxy::Nginx, "x-original-method"),
            (HttpProxy::Nginx, "x-original-host"),
            (HttpProxy::Traefik, "x-forwarded-uri"),
            (HttpProxy::Traefik, "x-forwarded-method"),
            (HttpProxy::Traefik, "x-forwarded-host"),
            (HttpProxy::Traefik, "x-forwarded-proto"),
            (HttpProxy::Envoy, "host"),
        ] {
            let mut h = all_families();
            h.push((name, b"/healthz"));
            let e = read(proxy, "GET", "/orders/1", &h).unwrap_err();
            assert!(e.contains("more than once"), "{proxy:?} {name}: {e}");
        }
    }

    #[test]
    fn trusted_values_are_checked() {
        let mut h = all_families();
        h.retain(|(k, _)| *k != "x-original-uri");
        h.push(("x-original-uri", b"http://other.example.com/admin"));
        assert!(read(HttpProxy::Nginx, "GET", "/", &h).is_err());
        let mut h = all_families();
        h.retain(|(k, _)| *k != "x-forwarded-method");
        h.push(("x-forwarded-method", b"GET /x"));
        assert!(read(HttpProxy::Traefik, "GET", "/", &h).is_err());
        let mut h = all_families();
        h.retain(|(k, _)| *k != "x-original-host");
        h.push(("x-original-host", b"caf\xe9.example.com"));
        assert!(
            read(HttpProxy::Nginx, "GET", "/", &h)
                .unwrap_err()
                .contains("not text")
        );
        // Envoy: an absolute-form target is not what Envoy sends.
        assert!(read(HttpProxy::Envoy, "GET", "http://a.example.com/x", &h).is_err());
    }

    #[test]
    fn headers_that_are_not_utf8_are_kept_not_dropped() {
        let c = read(
            HttpProxy::Envoy,
            "GET",
            "/",
            &[
                ("host", b"a.example.com"),
                ("authorization", b"Bearer \xff\xfe"),
                ("x-token", b"\xe9"),
            ],
        )
        .unwrap();
        let r = http(&c);
        assert_eq!(r.headers["authorization"], "Bearer \u{fffd}\u{fffd}");
        assert_eq!(r.headers["x-token"], "\u{fffd}");
    }

    #[test]
    fn repeated_headers_are_joined_like_envoy_does() {
        let c = read(
            HttpProxy::Envoy,
            "GET",
            "/",
            &[
                ("host", b"a.example.com"),
                ("cookie", b"a=1"),
                ("cookie", b"b=2"),
            ],
        )
        .unwrap();
        assert_eq!(http(&c).headers["cookie"], "a=1,b=2");
    }

    #[test]
    fn the_setting_is_checked_with_its_position() {
        let path = std::path::Path::new("valet.yaml");
        let load = |yaml: &str| crate::load::parse(yaml, path);
        let base = "providers: []\nroutes:\n  - name: h\n    match: { path: /healthz }\n    anonymous: true\n";
        let c = load(&format!(
            "listen:\n  http: 127.0.0.1:0\n  http_proxy: nginx\n{base}"
        ))
        .unwrap();
        assert_eq!(c.listen.http_proxy, HttpProxy::Nginx);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = load(&format!(
            "listen:\n  http: 127.0.0.1:0\n  http_proxy: traefik\n{base}"
        ))
        .unwrap();
        assert_eq!(c.listen.http_proxy, HttpProxy::Traefik);

        // Absent: envoy, with a warning placed at listen.http.
        let c = load(&format!("listen:\n  http: 127.0.0.1:0\n{base}")).unwrap();
        assert_eq!(c.listen.http_proxy, HttpProxy::Envoy);
        let w = c
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            w.contains("valet.yaml:2:9: listen.http: listen.http_proxy is not set"),
            "{w}"
        );
        // No HTTP mode: nothing to warn about.
        let c = load(&format!("listen:\n  grpc: 127.0.0.1:0\n{base}")).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);

        let Err(crate::config::LoadError::Invalid(errors)) = load(&format!(
            "listen:\n  http: 127.0.0.1:0\n  http_proxy: haproxy\n{base}"
        )) else {
            panic!("haproxy accepted")
        };
        assert_eq!(
            errors[0].to_string(),
            "valet.yaml:3:15: listen.http_proxy: must be nginx, traefik or envoy, not \"haproxy\""
        );
        let c = load(&format!(
            "listen:\n  grpc: 127.0.0.1:0\n  http_proxy: envoy\n{base}"
        ))
        .unwrap();
        assert!(
            c.warnings[0]
                .to_string()
                .contains("has no effect without listen.http")
        );
    }
}
