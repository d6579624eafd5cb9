//! `valet envoy-config`: the proxy side, generated from the route policy.
//!
//! `--format bootstrap` (the default): a whole Envoy bootstrap (listener, HTTP
//! connection manager, ext_authz filter, clusters) whose routes mirror Valet's, in
//! the same order:
//! - on anonymous routes the ext_authz filter is not even created (the generic
//!   per-route `FilterConfig { disabled: true }`), and Envoy removes the identity
//!   headers Valet would have removed;
//! - every other route names its Valet route in `context_extensions`, so Valet
//!   does not match it again;
//! - `allowed_headers` is limited to what the policy reads (the token sources);
//! - the connection manager normalises paths as Valet does, so a route Envoy skips
//!   cannot be reached with `/healthz/../admin`.
//!
//! `--format istio`: for Istio's sidecar, which builds its own ext_authz filter from
//! an `AuthorizationPolicy` of `action: CUSTOM`: that policy, with the paths of
//! anonymous routes Istio can name exactly left out of the Check, and an
//! `EnvoyFilter` merging into Istio's filter what the policy implies (see
//! [`istio`]).
//!
//! What cannot be derived from the policy (addresses, names, labels, timeout) are
//! flags.

use std::net::SocketAddr;

use serde_json::{Map, Value, json};

use crate::policy::route::{HostMatch, PathMatch, Route, TemplateSegment, template_text};
use crate::policy::{Access, DefaultAction, Policy, index::ROUTE_CONTEXT_KEY};
use crate::provider::TokenSource;

const EXT_AUTHZ: &str = "envoy.filters.http.ext_authz";
const EXT_AUTHZ_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
const HCM: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

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
    // RFC 9728: each protected resource's metadata, answered by Envoy itself (the
    // document is public; no Check, no upstream). First, so no route shadows it.
    for (i, r) in policy.protected_resources.iter().enumerate() {
        routes.push(json!({
            "name": format!("valet-resource-metadata-{i}"),
            "match": { "path": r.well_known_path, "headers": [{
                "name": ":method",
                "string_match": { "safe_regex": { "regex": "^(GET|HEAD)$" } }
            }] },
            "direct_response": { "status": 200, "body": { "inline_string": r.document } },
            "response_headers_to_add": [
                { "header": { "key": "content-type", "value": "application/json" }, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD" },
                { "header": { "key": "cache-control", "value": "max-age=300" }, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD" }
            ],
            "typed_per_filter_config": { EXT_AUTHZ: {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                "disabled": true
            } }
        }));
    }
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
            // Every spelling Valet reads as one of these hosts: any case, one
            // trailing dot, a port (even an empty one).
            headers.push(json!({
                "name": ":authority",
                "string_match": { "safe_regex": { "regex": format!("(?i)^({})\\.?(:[0-9]*)?$", alts.join("|")) } }
            }));
        }
        let skip = r.is_anonymous() && !policy.dry_run && !r.dry_run;
        if skip {
            // Skip the Check only on spellings where Envoy's matching provably
            // equals Valet's; anything else falls through to a checked route.
            headers.extend(plain_request_gate());
        }
        if !headers.is_empty() {
            m["headers"] = Value::Array(headers);
        }
        let per_route = match &r.access {
            // The generic per-route switch, not ExtAuthzPerRoute { disabled }: with it
            // Envoy does not create the ext_authz filter for the request at all
            // (ExtAuthzPerRoute only makes the created filter return at once).
            Access::Anonymous if skip => json!({
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
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
            "typed_per_filter_config": { EXT_AUTHZ: per_route }
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

    let patterns: Vec<Value> = token_headers(policy)
        .iter()
        .map(|h| json!({ "exact": h }))
        .collect();

    let addr = |a: &SocketAddr| json!({ "socket_address": { "address": a.ip().to_string(), "port_value": a.port() } });
    json!({
        "admin": { "address": addr(&o.admin) },
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": addr(&o.listen),
                "filter_chains": [{ "filters": [{
                    "name": HCM,
                    "typed_config": {
                        "@type": HCM_TYPE,
                        "stat_prefix": "ingress_http",
                        "codec_type": "AUTO",
                        // Match routes on the path Valet would match: a route where
                        // ext_authz is off must not be reachable with dot segments.
                        "normalize_path": true,
                        "merge_slashes": true,
                        "path_with_escaped_slashes_action": "REJECT_REQUEST",
                        // `x_user_id` would reach CGI, WSGI, PHP and Rack upstreams as
                        // `x-user-id`, past the removal of identity headers. Rejected
                        // (400) rather than dropped: Valet refuses such a twin of an
                        // identity header too, and a dropped header silently changes
                        // the request the app sees.
                        "common_http_protocol_options": { "headers_with_underscores_action": "REJECT_REQUEST" },
                        "route_config": {
                            "name": "valet_routes",
                            "virtual_hosts": [{ "name": "app", "domains": ["*"], "routes": routes }]
                        },
                        "http_filters": [
                            {
                                "name": EXT_AUTHZ,
                                "typed_config": {
                                    "@type": EXT_AUTHZ_TYPE,
                                    "transport_api_version": "V3",
                                    "grpc_service": { "envoy_grpc": { "cluster_name": "valet" }, "timeout": seconds(o.timeout_ms) },
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

/// Characters of a path after Envoy's normalisation (which decodes escaped
/// unreserved characters and resolves dot segments) that Envoy's route matchers
/// and Valet compare alike: unreserved, sub-delims but `*` (Envoy's
/// `uri_template` does not take it in a variable), `:` and `@`. No `%`: Envoy
/// keeps other escapes as sent (either hex case, `%3A` undecoded, control
/// characters) where Valet decodes, re-encodes or refuses them.
pub const PLAIN_PATH: &str = r"/[A-Za-z0-9._~!$&'()+,;=:@/-]*(\?[^#]*)?";
/// A host Envoy and Valet read alike: lower-case labels, no trailing dot, an
/// optional port. IPv6 literals, upper case and trailing dots go to Valet.
pub const PLAIN_AUTHORITY: &str = r"([a-z0-9-]+\.)*[a-z0-9-]+(:[0-9]{1,5})?";

/// Header matchers a request must pass before Envoy skips the Check: only where
/// Envoy and Valet provably read the request alike (see [`PLAIN_PATH`]).
fn plain_request_gate() -> [Value; 2] {
    [
        json!({ "name": ":path", "string_match": { "safe_regex": { "regex": PLAIN_PATH } } }),
        json!({ "name": ":authority", "string_match": { "safe_regex": { "regex": PLAIN_AUTHORITY } } }),
    ]
}

/// The request headers Valet reads a token from (query tokens ride in `:path`,
/// which Envoy always sends), and the `DPoP` proof wherever a bearer token may
/// come as `DPoP <token>`: what `allowed_headers` lets through to Valet.
fn token_headers(policy: &Policy) -> Vec<String> {
    let mut allowed: Vec<String> = Vec::new();
    let mut add = |h: &str| {
        if !allowed.iter().any(|a| a == h) {
            allowed.push(h.to_string());
        }
    };
    let mut dpop = false;
    for p in &policy.providers {
        for s in &p.sources {
            match s {
                TokenSource::Header { name, prefix } => {
                    add(name);
                    dpop |= prefix.eq_ignore_ascii_case("bearer ");
                }
                TokenSource::Cookie(_) => add("cookie"),
                TokenSource::Query(_) => {}
            }
        }
    }
    if dpop {
        add("dpop");
    }
    allowed
}

/// A protobuf Duration in YAML/JSON form: `0.25s`.
fn seconds(ms: u64) -> String {
    format!("{}s", ms as f64 / 1000.0)
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

// === Istio ===

/// What `--format istio` needs beyond the policy.
#[derive(Debug, Clone)]
pub struct IstioOptions {
    /// `metadata.name` of the AuthorizationPolicy and of the EnvoyFilter.
    pub name: String,
    /// `metadata.namespace`; none: whatever `kubectl apply -n` names.
    pub namespace: Option<String>,
    /// The extension provider: `meshConfig.extensionProviders[].name`.
    pub provider: String,
    /// Pod labels of the workload (with Valet in its pods); both objects select it.
    pub selector: Vec<(String, String)>,
    /// Where the sidecar reaches Valet: a ServiceEntry host or a Service's name.
    pub valet_service: String,
    pub valet_port: u16,
    /// ext_authz timeout in milliseconds.
    pub timeout_ms: u64,
}

/// A set of request paths in the syntax of an AuthorizationPolicy's `paths`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IstioPaths {
    /// `/p`: that path only.
    Exact(String),
    /// `/p/*`: every path below `/p/` (for `/`: `/*`, every path).
    Below(String),
}

impl IstioPaths {
    pub fn pattern(&self) -> String {
        match self {
            IstioPaths::Exact(p) => p.clone(),
            IstioPaths::Below(p) if p == "/" => "/*".into(),
            IstioPaths::Below(p) => format!("{p}/*"),
        }
    }
}

/// Which requests Istio need not send to Valet, and which anonymous routes are
/// still left to Valet, with why.
#[derive(Debug, Default)]
pub struct IstioPlan {
    /// (route, paths), in policy order: Istio sends no Check for these paths.
    pub skipped: Vec<(String, IstioPaths)>,
    /// (route, what, why): anonymous, but still checked (Valet answers it).
    pub left: Vec<(String, String, String)>,
}

/// Where Istio may skip the Check: paths of anonymous routes that Istio's path
/// syntax names exactly (an exact path; a prefix as `/p` + `/p/*`), on routes with
/// no other condition, and that no earlier non-anonymous route can match, whatever
/// that route's hosts, methods or context (Valet's routes are first-match).
/// Earlier anonymous routes do not matter: they allow too. Anything in doubt is
/// left to Valet.
pub fn istio_plan(policy: &Policy) -> IstioPlan {
    let mut plan = IstioPlan::default();
    for (i, r) in policy.routes.iter().enumerate() {
        if !r.is_anonymous() {
            continue;
        }
        let sets = match istio_candidates(policy, r) {
            Ok(sets) => sets,
            Err(why) => {
                plan.left
                    .push((r.name.to_string(), path_text(&r.path), why.to_string()));
                continue;
            }
        };
        for set in sets {
            let pattern = set.pattern();
            let (IstioPaths::Exact(p) | IstioPaths::Below(p)) = &set;
            if !istio_safe(p) {
                plan.left.push((
                    r.name.to_string(),
                    pattern,
                    "characters other than A-Z a-z 0-9 / - . _ ~ (Envoy may escape them \
                     before Istio compares)"
                        .into(),
                ));
                continue;
            }
            let earlier = policy.routes[..i]
                .iter()
                .find(|e| !e.is_anonymous() && may_match(&e.path, &set));
            if let Some(e) = earlier {
                plan.left.push((
                    r.name.to_string(),
                    pattern,
                    format!(
                        "earlier route {} ({}) may match there, and the first route that \
                         matches decides",
                        e.name,
                        path_text(&e.path)
                    ),
                ));
                continue;
            }
            if !plan.skipped.iter().any(|(_, s)| *s == set) {
                plan.skipped.push((r.name.to_string(), set));
            }
        }
    }
    plan
}

/// The path sets an anonymous route covers, if Istio can name them exactly.
fn istio_candidates(policy: &Policy, r: &Route) -> Result<Vec<IstioPaths>, &'static str> {
    if policy.dry_run {
        return Err("the policy is in dry_run: Valet records every request");
    }
    if r.dry_run {
        return Err("dry_run: Valet records the route's requests");
    }
    if !r.context.is_empty() {
        return Err("matched on context_extensions, which Istio's ext_authz does not send");
    }
    if !r.hosts.is_empty() {
        return Err("limited to hosts, and skipping its paths would skip them for every host");
    }
    if !r.methods.is_empty() {
        return Err("limited to methods, and skipping its paths would skip them for every method");
    }
    match &r.path {
        PathMatch::Any => Ok(vec![IstioPaths::Below("/".into())]),
        PathMatch::Prefix(p) if p == "/" => Ok(vec![IstioPaths::Below("/".into())]),
        PathMatch::Prefix(p) => Ok(vec![
            IstioPaths::Exact(p.clone()),
            IstioPaths::Below(p.clone()),
        ]),
        PathMatch::Exact(e) => Ok(vec![IstioPaths::Exact(e.clone())]),
        PathMatch::Regex(_) => Err("a regex: Istio's path syntax has no equivalent"),
        PathMatch::Template(_) => Err("a template: not translated to Istio's path templates"),
    }
}

/// Characters that Envoy's path normalisation leaves as they are and that Istio's
/// path syntax does not treat specially (`*`, `{`, `}`).
fn istio_safe(path: &str) -> bool {
    path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b))
}

/// Could a route matching `earlier` match some path of `set`? True when unsure.
fn may_match(earlier: &PathMatch, set: &IstioPaths) -> bool {
    match (earlier, set) {
        (PathMatch::Any, _) => true,
        (PathMatch::Exact(e), IstioPaths::Exact(x)) => e == x,
        (PathMatch::Exact(e), IstioPaths::Below(p)) => below(p, e),
        (PathMatch::Prefix(q), IstioPaths::Exact(x)) => at_or_below(q, x),
        // {q, q/...} meets {p/...} when one of q and p is at or below the other.
        (PathMatch::Prefix(q), IstioPaths::Below(p)) => at_or_below(q, p) || below(p, q),
        // Valet's regexes are anchored and matched against the normalised path.
        (PathMatch::Regex(re), IstioPaths::Exact(x)) => re.is_match(x),
        (PathMatch::Regex(_), IstioPaths::Below(_)) => true,
        (PathMatch::Template(segs), IstioPaths::Exact(x)) => {
            let parts: Vec<&str> = x.trim_start_matches('/').split('/').collect();
            segs.len() == parts.len() && literals_agree(segs, &parts)
        }
        (PathMatch::Template(segs), IstioPaths::Below(p)) => {
            // Below /p a path has more segments than /p, its first ones those of /p.
            let parts: Vec<&str> = if p == "/" {
                Vec::new()
            } else {
                p.trim_start_matches('/').split('/').collect()
            };
            segs.is_empty() || (segs.len() > parts.len() && literals_agree(segs, &parts))
        }
    }
}

/// Every literal segment of the template equals the path's segment there
/// (variables taken as matching anything, even an empty segment).
fn literals_agree(segs: &[TemplateSegment], parts: &[&str]) -> bool {
    segs.iter().zip(parts).all(|(s, p)| match s {
        TemplateSegment::Literal(l) => l == p,
        TemplateSegment::Variable(_) => true,
    })
}

/// `path` is strictly below the prefix `p` (`/p/...`); everything is below `/`.
fn below(p: &str, path: &str) -> bool {
    p == "/"
        || path
            .strip_prefix(p)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Valet's segment-aware prefix match: `q` itself or below it.
fn at_or_below(q: &str, path: &str) -> bool {
    q == path || below(q, path)
}

/// The route's path match as written in the policy.
fn path_text(p: &PathMatch) -> String {
    match p {
        PathMatch::Any => "any path".into(),
        PathMatch::Exact(e) => format!("path {e}"),
        PathMatch::Prefix(p) => format!("path_prefix {p}"),
        PathMatch::Regex(r) => {
            // Shown as written: without the anchors compile added.
            let s = r.as_str();
            let s = s
                .strip_prefix("^(?:")
                .and_then(|s| s.strip_suffix(")$"))
                .unwrap_or(s);
            format!("path_regex {s}")
        }
        PathMatch::Template(segs) => format!("path_template {}", template_text(segs)),
    }
}

/// The Istio objects for one workload.
#[derive(Debug)]
pub struct Istio {
    pub plan: IstioPlan,
    pub authorization_policy: Value,
    pub envoy_filter: Value,
}

/// The `AuthorizationPolicy` (`action: CUSTOM`, provider `o.provider`) that sends
/// the workload's requests to Valet except on the paths of [`istio_plan`], and the
/// `EnvoyFilter` that merges into the ext_authz filter Istio builds from it what
/// the policy implies: `allowed_headers` limited to the token sources,
/// `include_peer_certificate`, the timeout. When paths are skipped it also
/// - removes the identity headers from every inbound request before ext_authz
///   (Valet removes them on the requests it sees, and sets them on allow; a skipped
///   request would otherwise reach the app with a client's own `x-user-id`), with
///   Envoy's header_mutation filter (in Istio's proxy since 1.19);
/// - has the connection manager normalise paths as Valet does (dot segments,
///   repeated slashes, `%2F`/`%5C` rejected) whatever the mesh's
///   `pathNormalization`, so `/healthz/../admin` never matches a skipped path.
pub fn istio(policy: &Policy, o: &IstioOptions) -> Istio {
    let plan = istio_plan(policy);
    let mut metadata = json!({ "name": o.name });
    if let Some(ns) = &o.namespace {
        metadata["namespace"] = json!(ns);
    }
    let labels: Map<String, Value> = o
        .selector
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();

    let rule = if plan.skipped.is_empty() {
        json!({})
    } else {
        let not_paths: Vec<String> = plan.skipped.iter().map(|(_, s)| s.pattern()).collect();
        json!({ "to": [{ "operation": { "notPaths": not_paths } }] })
    };
    let authorization_policy = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": {
            "selector": { "matchLabels": labels },
            "action": "CUSTOM",
            "provider": { "name": o.provider },
            "rules": [rule]
        }
    });

    let inbound_hcm = json!({ "context": "SIDECAR_INBOUND", "listener": { "filterChain": { "filter": { "name": HCM } } } });
    let mut ext_authz_match = inbound_hcm.clone();
    ext_authz_match["listener"]["filterChain"]["filter"]["subFilter"] =
        json!({ "name": EXT_AUTHZ });

    let mut merged = json!({
        "@type": EXT_AUTHZ_TYPE,
        "include_peer_certificate": true,
        "grpc_service": { "timeout": seconds(o.timeout_ms) }
    });
    let headers = token_headers(policy);
    if !headers.is_empty() {
        let patterns: Vec<Value> = headers.iter().map(|h| json!({ "exact": h })).collect();
        merged["allowed_headers"] = json!({ "patterns": patterns });
    }
    let mut patches = vec![json!({
        "applyTo": "HTTP_FILTER",
        "match": ext_authz_match,
        "patch": { "operation": "MERGE", "value": { "typed_config": merged } }
    })];
    if !plan.skipped.is_empty() && !policy.identity_headers.is_empty() {
        let removals: Vec<Value> = policy
            .identity_headers
            .iter()
            .map(|h| json!({ "remove": h }))
            .collect();
        patches.push(json!({
            "applyTo": "HTTP_FILTER",
            "match": ext_authz_match,
            "patch": {
                "operation": "INSERT_BEFORE",
                "value": {
                    "name": "valet.strip_identity_headers",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                        "mutations": { "request_mutations": removals }
                    }
                }
            }
        }));
    }
    // Underscore twins of identity headers are refused whether or not paths are
    // skipped: Valet sees only allowed_headers, so it cannot refuse them itself.
    let mut hcm = json!({
        "@type": HCM_TYPE,
        "common_http_protocol_options": { "headers_with_underscores_action": "REJECT_REQUEST" }
    });
    if !plan.skipped.is_empty() {
        hcm["normalize_path"] = json!(true);
        hcm["merge_slashes"] = json!(true);
        hcm["path_with_escaped_slashes_action"] = json!("REJECT_REQUEST");
    }
    patches.push(json!({
        "applyTo": "NETWORK_FILTER",
        "match": inbound_hcm,
        "patch": { "operation": "MERGE", "value": { "typed_config": hcm } }
    }));
    let envoy_filter = json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": metadata,
        "spec": {
            "workloadSelector": { "labels": labels },
            "configPatches": patches
        }
    });
    Istio {
        plan,
        authorization_policy,
        envoy_filter,
    }
}

/// The Istio objects as a multi-document YAML stream, preceded by comments: the
/// meshConfig provider to register (once per mesh), which paths skip Valet and
/// which anonymous routes are left to it, and why.
pub fn istio_yaml(policy_path: &str, istio: &Istio, o: &IstioOptions) -> String {
    let mut out = String::new();
    let mut line = |s: &str| {
        out.push('#');
        if !s.is_empty() {
            out.push(' ');
            out.push_str(s);
        }
        out.push('\n');
    };
    line(&format!(
        "Generated by `valet envoy-config --format istio --config {policy_path}`: Istio's side of the policy."
    ));
    line("Regenerate and re-apply whenever the routes change: Valet reloads its policy by");
    line("itself, these objects do not, and Istio never shows Valet a path skipped below.");
    line("");
    line("1. Valet as an ext_authz provider of the mesh (once per mesh; the IstioOperator");
    line("   form is in k8s/istio/mesh-config.yaml):");
    line("");
    line("  meshConfig:");
    line("    extensionProviders:");
    line(&format!("      - name: {}", o.provider));
    line("        envoyExtAuthzGrpc:");
    line(&format!("          service: {}", o.valet_service));
    line(&format!("          port: {}", o.valet_port));
    line(&format!("          timeout: {}", seconds(o.timeout_ms)));
    line("          failOpen: false       # Valet unreachable or slow: 403, never unchecked");
    line("");
    if istio.plan.skipped.is_empty() {
        line("2. The AuthorizationPolicy sends every request of the workload to Valet");
        line("   (no path can be skipped safely).");
    } else {
        line("2. The AuthorizationPolicy sends every request of the workload to Valet except");
        line("   on these paths: their routes are anonymous (Valet would allow them without a");
        line("   token) and no earlier route that needs a token can match them.");
        let width = istio
            .plan
            .skipped
            .iter()
            .map(|(_, s)| s.pattern().len())
            .max()
            .unwrap_or(0);
        for (route, set) in &istio.plan.skipped {
            line(&format!(
                "     {:<width$}  route {route}",
                set.pattern(),
                width = width
            ));
        }
    }
    if !istio.plan.left.is_empty() {
        line("   Anonymous, but left to Valet (still checked; Valet allows them):");
        for (route, what, why) in &istio.plan.left {
            line(&format!("     route {route} ({what}): {why}"));
        }
    }
    line("");
    line("3. The EnvoyFilter merges into the ext_authz filter Istio builds: allowed_headers");
    line("   limited to the token sources, include_peer_certificate, the timeout.");
    if !istio.plan.skipped.is_empty() {
        line("   As paths are skipped, it also removes the identity headers from every inbound");
        line("   request before ext_authz (Valet sets them on allow; a skipped request must not");
        line("   carry a client's own), with Envoy's header_mutation filter (Istio 1.19 or");
        line("   later), and has the inbound connection manager normalise paths as Valet does");
        line("   (merge slashes, reject %2F and %5C) so that no dot segment or escaped slash");
        line("   reaches a protected route through a skipped path.");
    }
    line("   The inbound connection manager rejects (400) headers with underscores: `x_user_id`");
    line("   would reach CGI, WSGI, PHP and Rack apps as `x-user-id`.");
    for doc in [&istio.authorization_policy, &istio.envoy_filter] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc).unwrap_or_default());
    }
    out
}

/// A `--selector` label: `KEY=VALUE`, both non-empty.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
            Ok((k.trim().to_string(), v.trim().to_string()))
        }
        _ => Err(format!("{text:?} is not a label KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy(routes: &str) -> Policy {
        let src = format!(
            "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [api]\n    \
             jwks: {{ file: jwks.json }}\n    claims_to_headers: {{ sub: x-user-id }}\n\
             routes:\n{routes}default: deny\n"
        );
        match crate::load::parse(&src, Path::new("/nonexistent/valet.yaml")) {
            Ok(c) => c.policy,
            Err(e) => panic!("{e}\n{src}"),
        }
    }

    fn skipped(p: &Policy) -> Vec<String> {
        istio_plan(p)
            .skipped
            .iter()
            .map(|(_, s)| s.pattern())
            .collect()
    }

    fn left(p: &Policy) -> Vec<(String, String)> {
        istio_plan(p)
            .left
            .into_iter()
            .map(|(r, what, _)| (r, what))
            .collect()
    }

    #[test]
    fn an_earlier_protected_route_keeps_its_paths_checked() {
        let p = policy(
            "  - { name: admin, match: { path_prefix: /public/admin }, require: { scopes: [admin] } }\n\
             \x20 - { name: public, match: { path_prefix: /public }, anonymous: true }\n\
             \x20 - { name: health, match: { path: /healthz }, anonymous: true }\n",
        );
        // /public itself is safe; nothing below /public/ is: /public/admin is there.
        assert_eq!(skipped(&p), ["/public", "/healthz"]);
        let plan = istio_plan(&p);
        assert_eq!(plan.left.len(), 1, "{:?}", plan.left);
        let (route, what, why) = &plan.left[0];
        assert_eq!((route.as_str(), what.as_str()), ("public", "/public/*"));
        assert!(why.contains("admin (path_prefix /public/admin)"), "{why}");
    }

    #[test]
    fn later_protected_routes_do_not_matter_but_any_earlier_overlap_does() {
        let p = policy(
            "  - { name: public, match: { path_prefix: /public }, anonymous: true }\n\
             \x20 - { name: admin, match: { path_prefix: /public/admin }, require: { scopes: [admin] } }\n",
        );
        assert_eq!(skipped(&p), ["/public", "/public/*"]);

        // Each kind of earlier route, and what it blocks of /docs + /docs/*.
        let cases: &[(&str, &[&str])] = &[
            ("path: /docs", &["/docs/*"]),
            ("path: /docs/x", &["/docs"]),
            ("path: /docsx", &["/docs", "/docs/*"]),
            ("path_prefix: /", &[]),
            ("path_prefix: /do", &["/docs", "/docs/*"]),
            ("path_prefix: /docs/a/b", &["/docs"]),
            ("path_regex: '/docs'", &[]),
            ("path_regex: '/v[0-9]+'", &["/docs"]),
            ("path_template: '/{a}'", &["/docs/*"]),
            ("path_template: '/docs/{a}'", &["/docs"]),
            ("path_template: '/other/{a}'", &["/docs", "/docs/*"]),
            ("methods: [POST]", &[]),
            ("hosts: [a.example]", &[]),
            ("context: { route: x }", &[]),
        ];
        for (m, want) in cases {
            let p = policy(&format!(
                "  - {{ name: first, match: {{ {m} }}, require: {{ scopes: [x] }} }}\n\
                 \x20 - {{ name: docs, match: {{ path_prefix: /docs }}, anonymous: true }}\n"
            ));
            assert_eq!(skipped(&p), *want, "earlier route matching {m}");
        }
    }

    #[test]
    fn only_what_istio_can_name_exactly_is_skipped() {
        let p = policy(
            "  - { name: get-only, match: { methods: [GET], path: /a }, anonymous: true }\n\
             \x20 - { name: host-only, match: { hosts: [a.example], path: /b }, anonymous: true }\n\
             \x20 - { name: ctx, match: { context: { k: v }, path: /c }, anonymous: true }\n\
             \x20 - { name: re, match: { path_regex: '/d[0-9]' }, anonymous: true }\n\
             \x20 - { name: tpl, match: { path_template: '/e/{x}' }, anonymous: true }\n\
             \x20 - { name: star, match: { path: '/f*' }, anonymous: true }\n\
             \x20 - { name: trying, match: { path: /g }, anonymous: true, dry_run: true }\n\
             \x20 - { name: ok, match: { path: /h/ }, anonymous: true }\n\
             \x20 - { name: dup, match: { path: /h/ }, anonymous: true }\n",
        );
        assert_eq!(skipped(&p), ["/h/"]);
        let routes: Vec<String> = left(&p).into_iter().map(|(r, _)| r).collect();
        assert_eq!(
            routes,
            [
                "get-only",
                "host-only",
                "ctx",
                "re",
                "tpl",
                "star",
                "trying"
            ]
        );
    }

    #[test]
    fn a_catch_all_anonymous_route_skips_everything_only_when_nothing_precedes_it() {
        let p = policy("  - { name: all, anonymous: true }\n");
        assert_eq!(skipped(&p), ["/*"]);
        let p = policy(
            "  - { name: admin, match: { path: /admin }, require: { scopes: [x] } }\n\
             \x20 - { name: all, match: { path_prefix: / }, anonymous: true }\n",
        );
        assert_eq!(skipped(&p), Vec::<String>::new());
    }

    #[test]
    fn istio_objects_carry_the_plan_and_the_policy() {
        let p = policy(
            "  - { name: health, match: { path: /healthz }, anonymous: true }\n\
             \x20 - { name: orders, match: { path_prefix: /orders }, require: { scopes: [x] } }\n",
        );
        let o = IstioOptions {
            name: "orders-valet".into(),
            namespace: Some("orders".into()),
            provider: "valet".into(),
            selector: vec![("app".into(), "orders".into())],
            valet_service: "valet.local".into(),
            valet_port: 9001,
            timeout_ms: 250,
        };
        let i = istio(&p, &o);
        let ap = &i.authorization_policy;
        assert_eq!(ap["spec"]["action"], "CUSTOM");
        assert_eq!(ap["spec"]["provider"]["name"], "valet");
        assert_eq!(ap["metadata"]["namespace"], "orders");
        assert_eq!(
            ap["spec"]["selector"]["matchLabels"],
            json!({ "app": "orders" })
        );
        assert_eq!(
            ap["spec"]["rules"],
            json!([{ "to": [{ "operation": { "notPaths": ["/healthz"] } }] }])
        );
        let patches = i.envoy_filter["spec"]["configPatches"].as_array().unwrap();
        let merged = &patches[0]["patch"]["value"]["typed_config"];
        assert_eq!(
            merged["allowed_headers"],
            json!({ "patterns": [{ "exact": "authorization" }, { "exact": "dpop" }] })
        );
        assert_eq!(merged["include_peer_certificate"], true);
        assert_eq!(merged["grpc_service"]["timeout"], "0.25s");
        let strip = &patches[1]["patch"]["value"]["typed_config"]["mutations"]["request_mutations"];
        assert_eq!(*strip, json!([{ "remove": "x-user-id" }]));
        assert_eq!(patches[2]["applyTo"], "NETWORK_FILTER");
        assert_eq!(
            i.envoy_filter["spec"]["workloadSelector"]["labels"],
            json!({ "app": "orders" })
        );

        assert_eq!(
            patches[2]["patch"]["value"]["typed_config"]["common_http_protocol_options"],
            json!({ "headers_with_underscores_action": "REJECT_REQUEST" })
        );

        // Nothing skipped: one empty rule (everything checked), no identity-header
        // removal, no path normalisation; underscores still refused.
        let p = policy(
            "  - { name: orders, match: { path_prefix: /orders }, require: { scopes: [x] } }\n",
        );
        let i = istio(&p, &o);
        assert_eq!(i.authorization_policy["spec"]["rules"], json!([{}]));
        assert_eq!(
            i.envoy_filter["spec"]["configPatches"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let yaml = istio_yaml("valet.yaml", &i, &o);
        assert!(yaml.contains("(no path can be skipped safely)"), "{yaml}");
    }

    fn opts() -> Options {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Options {
            listen: a,
            upstream: a,
            valet: a,
            admin: a,
            timeout_ms: 250,
        }
    }

    #[test]
    fn anonymous_routes_skip_the_check_only_for_plain_spellings() {
        let p = policy(
            "  - { name: admin, match: { hosts: [admin.test], path_prefix: /men%C3%BC }, require: { scopes: [x] } }\n\
             \x20 - { name: all, match: { path_prefix: / }, anonymous: true }\n",
        );
        let b = bootstrap(&p, &opts());
        let hcm = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(
            hcm["common_http_protocol_options"]["headers_with_underscores_action"],
            "REJECT_REQUEST"
        );
        let routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
            .as_array()
            .unwrap();
        let host = routes[0]["match"]["headers"][0]["string_match"]["safe_regex"]["regex"]
            .as_str()
            .unwrap();
        let host = regex::Regex::new(host).unwrap();
        for h in [
            "admin.test",
            "ADMIN.test.",
            "admin.test.:8443",
            "admin.test:",
        ] {
            assert!(host.is_match(h), "{h}");
        }
        assert!(!host.is_match("admin.test.evil"));
        let gate = routes[1]["match"]["headers"].as_array().unwrap();
        let re = |i: usize| {
            let r = gate[i]["string_match"]["safe_regex"]["regex"]
                .as_str()
                .unwrap();
            regex::Regex::new(&format!("^(?:{r})$")).unwrap()
        };
        let (path, authority) = (re(0), re(1));
        assert_eq!(gate[0]["name"], ":path");
        for plain in ["/", "/a/b:c@d/", "/x?y=%41&z", "/a;b=c,d"] {
            assert!(path.is_match(plain), "{plain}");
        }
        for other in [
            "/men%c3%bc/x",
            "/v2/users%3asearch",
            "/admin%09",
            "/a*b",
            "/a[b]",
            "/x#f",
        ] {
            assert!(!path.is_match(other), "{other}");
        }
        for plain in ["a.test", "a-b.c:8080", "localhost"] {
            assert!(authority.is_match(plain), "{plain}");
        }
        for other in ["admin.test.", "Admin.test", "[::1]:80", "a..b", "a.test:"] {
            assert!(!authority.is_match(other), "{other}");
        }
        assert_eq!(
            routes[1]["typed_per_filter_config"][EXT_AUTHZ]["disabled"],
            true
        );
        // A checked route has no gate: Valet decides every spelling itself.
        assert_eq!(routes[0]["match"]["headers"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn labels_need_a_key_and_a_value() {
        assert_eq!(
            parse_label("app=orders"),
            Ok(("app".into(), "orders".into()))
        );
        assert!(parse_label("app").is_err());
        assert!(parse_label("=x").is_err());
        assert!(parse_label("app=").is_err());
    }
}
