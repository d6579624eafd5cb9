//! `valet envoy-config`: the Envoy side, generated from the route policy. A whole
//! bootstrap (listener, HTTP connection manager, ext_authz filter, clusters) whose
//! routes mirror Valet's, in the same order:
//! - anonymous routes turn ext_authz off (no call at all) and have Envoy remove
//!   the identity headers Valet would have removed;
//! - every other route names its Valet route in `context_extensions`, so Valet
//!   does not match it again;
//! - `allowed_headers` is limited to what the policy reads (the token sources);
//! - the connection manager normalises paths as Valet does, so a route Envoy skips
//!   cannot be reached with `/healthz/../admin`.
//!
//! What cannot be derived from the policy (addresses, cluster names, timeout) are
//! flags.

use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::policy::route::{HostMatch, PathMatch, template_text};
use crate::policy::{Access, DefaultAction, Policy, index::ROUTE_CONTEXT_KEY};
use crate::provider::TokenSource;

#[derive(Debug, Clone)]
pub struct Options {
    /// Where Envoy listens for clients.
    pub listen: SocketAddr,
    /// The application behind Envoy.
    pub upstream: SocketAddr,
    /// Valet's Check port.
    pub valet: SocketAddr,
    pub admin: SocketAddr,
    /// ext_authz timeout in milliseconds.
    pub timeout_ms: u64,
}

pub fn bootstrap(policy: &Policy, o: &Options) -> Value {
    let mut routes: Vec<Value> = Vec::new();
    for r in &policy.routes {
        if !r.context.is_empty() {
            // Matched by context_extensions an operator wrote: nothing to mirror.
            continue;
        }
        let mut m = path_match(&r.path);
        let mut headers = Vec::new();
        if !r.methods.is_empty() {
            headers.push(json!({
                "name": ":method",
                "string_match": { "safe_regex": { "regex": format!("^({})$", r.methods.join("|")) } }
            }));
        }
        if !r.hosts.is_empty() {
            let alts: Vec<String> = r
                .hosts
                .iter()
                .map(|h| match h {
                    HostMatch::Exact(e) => regex::escape(e),
                    HostMatch::Suffix(s) => format!("[^.:]+(\\.[^.:]+)*{}", regex::escape(s)),
                })
                .collect();
            headers.push(json!({
                "name": ":authority",
                "string_match": { "safe_regex": { "regex": format!("(?i)^({})(:[0-9]+)?$", alts.join("|")) } }
            }));
        }
        if !headers.is_empty() {
            m["headers"] = Value::Array(headers);
        }
        let per_route = match &r.access {
            Access::Anonymous if !policy.dry_run && !r.dry_run => json!({
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "disabled": true
            }),
            _ => json!({
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": { "context_extensions": { ROUTE_CONTEXT_KEY: r.name } }
            }),
        };
        let mut route = json!({
            "name": r.name,
            "match": m,
            "route": { "cluster": "app" },
            "typed_per_filter_config": { "envoy.filters.http.ext_authz": per_route }
        });
        if r.is_anonymous() && !policy.identity_headers.is_empty() {
            route["request_headers_to_remove"] = json!(policy.identity_headers);
        }
        routes.push(route);
    }
    // Everything else: Valet decides (the default action, or a context route).
    let mut fallback = json!({ "name": "valet-default", "match": { "prefix": "/" }, "route": { "cluster": "app" } });
    if policy.default == DefaultAction::Allow && !policy.identity_headers.is_empty() {
        fallback["request_headers_to_remove"] = json!(policy.identity_headers);
    }
    routes.push(fallback);

    let mut allowed: Vec<String> = Vec::new();
    let mut add = |h: &str| {
        if !allowed.iter().any(|a| a == h) {
            allowed.push(h.to_string());
        }
    };
    for p in &policy.providers {
        for s in &p.sources {
            match s {
                TokenSource::Header { name, .. } => add(name),
                TokenSource::Cookie(_) => add("cookie"),
                TokenSource::Query(_) => {} // in :path, always sent
            }
        }
    }
    let patterns: Vec<Value> = allowed.iter().map(|h| json!({ "exact": h })).collect();

    let addr = |a: &SocketAddr| json!({ "socket_address": { "address": a.ip().to_string(), "port_value": a.port() } });
    let timeout = format!("{}s", o.timeout_ms as f64 / 1000.0);
    json!({
        "admin": { "address": addr(&o.admin) },
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": addr(&o.listen),
                "filter_chains": [{ "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress_http",
                        "codec_type": "AUTO",
                        // Match routes on the path Valet would match: a route where
                        // ext_authz is off must not be reachable with dot segments.
                        "normalize_path": true,
                        "merge_slashes": true,
                        "path_with_escaped_slashes_action": "REJECT_REQUEST",
                        "route_config": {
                            "name": "valet_routes",
                            "virtual_hosts": [{ "name": "app", "domains": ["*"], "routes": routes }]
                        },
                        "http_filters": [
                            {
                                "name": "envoy.filters.http.ext_authz",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                                    "transport_api_version": "V3",
                                    "grpc_service": { "envoy_grpc": { "cluster_name": "valet" }, "timeout": timeout },
                                    "failure_mode_allow": false,
                                    "include_peer_certificate": true,
                                    "allowed_headers": { "patterns": patterns }
                                }
                            },
                            {
                                "name": "envoy.filters.http.router",
                                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
                            }
                        ]
                    }
                }]}]
            }],
            "clusters": [
                {
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": { "cluster_name": "app", "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": addr(&o.upstream) } }] }] }
                },
                {
                    "name": "valet",
                    "type": "STATIC",
                    "connect_timeout": "0.25s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": { "http2_protocol_options": {} }
                        }
                    },
                    "load_assignment": { "cluster_name": "valet", "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": addr(&o.valet) } }] }] }
                }
            ]
        }
    })
}

fn path_match(p: &PathMatch) -> Value {
    match p {
        PathMatch::Any => json!({ "prefix": "/" }),
        PathMatch::Exact(e) => json!({ "path": e }),
        // Segment-aware, as Valet's: /orders matches /orders and /orders/7, not /ordersx.
        PathMatch::Prefix(p) if p == "/" => json!({ "prefix": "/" }),
        PathMatch::Prefix(p) => json!({ "path_separated_prefix": p }),
        PathMatch::Regex(r) => json!({ "safe_regex": { "regex": r.as_str() } }),
        PathMatch::Template(segs) => {
            json!({
                "path_match_policy": {
                    "name": "envoy.path.match.uri_template.uri_template_matcher",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                        "path_template": template_text(segs)
                    }
                }
            })
        }
    }
}

/// The bootstrap as YAML, with a header saying where it came from.
pub fn to_yaml(policy_path: &str, v: &Value) -> String {
    let body = serde_yaml::to_string(v).unwrap_or_default();
    format!(
        "# Generated by `valet envoy-config --config {policy_path}`: Envoy's side of the policy.\n# Regenerate when routes change; Valet falls back to matching for unknown route names.\n{body}"
    )
}
