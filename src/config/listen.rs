//! Where Valet listens and which proxy calls HTTP mode: process settings, read
//! once at start (a reload cannot change them).

use std::net::SocketAddr;

use super::Problems;
use super::file::ListenFile;

/// Process settings read once at start; a reload cannot change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Envoy's ext_authz gRPC (and grpc.health.v1); `off` disables it.
    pub grpc: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The same decisions over plain HTTP (Envoy http_service, nginx auth_request,
    /// Traefik forwardAuth); off unless set.
    pub http: Option<SocketAddr>,
    /// Which proxy calls `http` (`listen.http_proxy`): the one header family trusted.
    pub http_proxy: HttpProxy,
    /// HTTP mode reads the caller's principal from `x-forwarded-client-cert`
    /// (`listen.http_client_cert: xfcc`).
    pub http_xfcc: bool,
}

/// Which proxy calls the HTTP port (`listen.http_proxy`), hence which one family of
/// headers describes the original request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpProxy {
    /// nginx `auth_request`: `X-Original-Method`, `X-Original-URI`, `X-Original-Host`.
    Nginx,
    /// Traefik `forwardAuth`: `X-Forwarded-Method`, `-Uri`, `-Host` (and `-Proto`).
    Traefik,
    /// Envoy `http_service`: the subrequest's own method, path and Host.
    #[default]
    Envoy,
}

impl HttpProxy {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "nginx" => Some(HttpProxy::Nginx),
            "traefik" => Some(HttpProxy::Traefik),
            "envoy" => Some(HttpProxy::Envoy),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HttpProxy::Nginx => "nginx",
            HttpProxy::Traefik => "traefik",
            HttpProxy::Envoy => "envoy",
        }
    }
}

/// `listen.http_client_cert`, checked: `xfcc` only when `http_proxy` is set to
/// `envoy`, the one proxy that drops a client's own header
/// (`forward_client_cert_details: SANITIZE_SET`); nginx and Traefik pass it on,
/// so a forged one would count.
pub fn compile_client_cert(listen: &ListenFile, p: &mut Problems) -> bool {
    match listen.http_client_cert.as_deref() {
        None | Some("none") => false,
        Some("xfcc") => {
            if listen.http_proxy.as_deref() != Some("envoy") {
                p.error(
                    "listen.http_client_cert",
                    "xfcc needs listen.http_proxy: envoy (set explicitly): only Envoy \
                     replaces a client's own x-forwarded-client-cert; nginx and Traefik pass it on",
                );
                return false;
            }
            true
        }
        Some(other) => {
            p.error(
                "listen.http_client_cert",
                format!("must be xfcc or none, not {other:?}"),
            );
            false
        }
    }
}

/// `listen.http_proxy`, checked. Absent means `envoy` (no forwarded header is
/// trusted: behind nginx or Traefik every request is then decided on the
/// subrequest's own path and denied or misrouted, never opened), with a warning
/// when HTTP mode is on.
pub fn compile_proxy(listen: &ListenFile, p: &mut Problems) -> HttpProxy {
    let http_on = listen.http.as_deref().is_some_and(|a| a.trim() != "off");
    match listen.http_proxy.as_deref() {
        None => {
            if http_on {
                p.warn(
                    "listen.http",
                    "listen.http_proxy is not set: HTTP mode trusts no forwarded header \
                     and decides on the subrequest's own method, path and Host (envoy); \
                     behind nginx or Traefik set listen.http_proxy: nginx or traefik",
                );
            }
            HttpProxy::Envoy
        }
        Some(name) => match HttpProxy::parse(name) {
            Some(proxy) => {
                if !http_on {
                    p.warn("listen.http_proxy", "has no effect without listen.http");
                }
                proxy
            }
            None => {
                p.error(
                    "listen.http_proxy",
                    format!("must be nginx, traefik or envoy, not {name:?}"),
                );
                HttpProxy::Envoy
            }
        },
    }
}
