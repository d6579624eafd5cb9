//! `valet explain`: one request against the policy, told step by step — which
//! route matched and why the earlier ones did not, what it requires, and the
//! decision with its reason and HTTP status. Uses the same code as a Check.

use std::collections::HashMap;
use std::fmt::Write;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use serde_json::{Map, Value};

use crate::check::Identity;
use crate::decision::{Decision, DenyKind};
use crate::driver;
use crate::policy::route::{HostMatch, PathMatch, template_text};
use crate::policy::{Access, Mismatch, Policy, Route};
use crate::request::Request;
use crate::response;
use crate::stores::Snapshot;

/// A request as a person types it.
#[derive(Debug, Clone, Default)]
pub struct RequestSpec {
    pub method: String,
    pub path: String,
    pub host: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
    pub context: HashMap<String, String>,
    /// The peer's workload identity (`source.principal`); empty for none.
    pub principal: String,
}

impl RequestSpec {
    /// The CheckRequest Envoy would send for it.
    pub fn to_check(&self) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        method: self.method.clone(),
                        path: self.path.clone(),
                        host: self.host.clone(),
                        headers: self.headers.clone(),
                        protocol: "HTTP/1.1".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: self.context.clone(),
                source: (!self.principal.is_empty()).then(|| Peer {
                    principal: self.principal.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }
}

/// How the request is decided: with its token verified, or with claims taken as given.
pub enum Mode {
    Token { now: u64 },
    Claims(Map<String, Value>),
}

pub fn explain(policy: &Snapshot, spec: &RequestSpec, mode: Mode) -> String {
    let mut out = String::new();
    let check_req = spec.to_check();
    let host = if spec.host.is_empty() {
        "(no host)"
    } else {
        &spec.host
    };
    let _ = writeln!(out, "request:  {} {} {}", spec.method, host, spec.path);
    if !spec.principal.is_empty() {
        let _ = writeln!(out, "          from workload {}", spec.principal);
    }
    let req = match Request::from_check(&check_req) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "          cannot be read safely: {e}");
            return finish(
                out,
                policy,
                driver::decide_blocking(policy, &check_req, identity(mode)),
            );
        }
    };
    if req.path != spec.path.split('?').next().unwrap_or("") {
        let _ = writeln!(out, "          matched as {} (canonical form)", req.path);
    }
    if !spec.host.is_empty() && req.host != spec.host {
        let _ = writeln!(
            out,
            "          host matched as {} (canonical form)",
            req.host
        );
    }
    let _ = writeln!(out, "routes:   first match wins");
    let width = policy
        .routes
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0);
    // The route the core picks (`route_for`, `valet_route` included): the MATCH
    // line is the decision's route, never one found another way.
    let chosen = policy.route_index_for(&req);
    let mut matched = None;
    for (i, route) in policy.routes.iter().enumerate() {
        match route.mismatch(&req) {
            _ if chosen == Some(i) => {
                let _ = writeln!(
                    out,
                    "  [{i}] {:width$}  MATCH  ({})",
                    route.name,
                    describe_match(route)
                );
                matched = Some(route);
                break;
            }
            Some(m) => {
                let _ = writeln!(
                    out,
                    "  [{i}] {:width$}  no: {}",
                    route.name,
                    why_not(route, m, &req)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  [{i}] {:width$}  no: not the route picked",
                    route.name
                );
            }
        }
    }
    match matched {
        None => {
            let _ = writeln!(
                out,
                "  no route matches: the default ({:?}) applies",
                policy.default
            );
        }
        Some(route) => {
            let _ = writeln!(out, "requires: {}", describe_access(policy, route));
            if route.dry_run || policy.dry_run {
                let _ = writeln!(
                    out,
                    "          (dry run: a denial is recorded, the request passes)"
                );
            }
        }
    }
    if let Mode::Claims(_) = mode {
        let _ = writeln!(out, "identity: claims taken as given (no token verified)");
    }
    finish(
        out,
        policy,
        driver::decide_blocking(policy, &check_req, identity(mode)),
    )
}

fn identity(mode: Mode) -> Identity {
    match mode {
        Mode::Token { now } => Identity::Token { now },
        Mode::Claims(c) => Identity::Claims(c),
    }
}

fn finish(mut out: String, policy: &Snapshot, decision: Decision) -> String {
    match decision {
        Decision::Allow(a) if a.dry_run => {
            let reason = a.reason.map_or("", |r| r.label());
            let _ = writeln!(out, "decision: ALLOW (dry run; would deny: {reason})");
        }
        Decision::Allow(a) => {
            let reason = a.reason.map_or("verified", |r| r.label());
            let _ = writeln!(out, "decision: ALLOW 200 ({reason})");
            if let Some(k) = a.alternative {
                let _ = writeln!(out, "          alternative ({k}) held");
            }
            if let Some(p) = &a.provider {
                let kid = a
                    .kid
                    .as_deref()
                    .map(|k| format!(", kid {k}"))
                    .unwrap_or_default();
                let _ = writeln!(out, "          verified by provider {p}{kid}");
            }
            for (k, v) in a.headers_set() {
                let _ = writeln!(out, "          upstream gets {k}: {v}");
            }
            for k in a.removed_headers() {
                let _ = writeln!(out, "          removed before the upstream: {k}");
            }
            for k in &a.remove_query {
                let _ = writeln!(out, "          query parameter removed: {k}");
            }
        }
        Decision::Deny(d) => {
            let _ = writeln!(
                out,
                "decision: DENY {} {}: {}",
                d.kind.http_status(),
                d.reason.label(),
                d.description
            );
            for (k, (reason, why)) in d.alternatives.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "          alternative ({k}) failed: {}: {why}",
                    reason.label()
                );
            }
            if let Some(c) = response::challenge(&d, &policy.realm) {
                let _ = writeln!(out, "          WWW-Authenticate: {c}");
            }
            if d.kind == DenyKind::Unavailable {
                let _ = writeln!(out, "          (no keys loaded for the provider)");
            }
        }
    }
    out
}

pub fn describe_match(route: &Route) -> String {
    let mut parts = Vec::new();
    if !route.context.is_empty() {
        let ctx: Vec<String> = route
            .context
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.push(format!("context {}", ctx.join(",")));
    }
    if !route.hosts.is_empty() {
        parts.push(format!("host {}", hosts(&route.hosts)));
    }
    if !route.methods.is_empty() {
        parts.push(route.methods.join(","));
    }
    parts.push(path(&route.path));
    parts.join(" ")
}

fn hosts(h: &[HostMatch]) -> String {
    h.iter()
        .map(|h| match h {
            HostMatch::Exact(e) => e.clone(),
            HostMatch::Suffix(s) => format!("*{s}"),
        })
        .collect::<Vec<_>>()
        .join("|")
}

fn path(p: &PathMatch) -> String {
    match p {
        PathMatch::Any => "any path".into(),
        PathMatch::Exact(e) => format!("path {e}"),
        PathMatch::Prefix(p) => format!("path {p} and below"),
        PathMatch::Regex(r) => format!("path ~ {}", r.as_str()),
        PathMatch::Template(segs) => format!("path {}", template_text(segs)),
    }
}

fn why_not(route: &Route, m: Mismatch, req: &Request) -> String {
    match m {
        Mismatch::Context => {
            let want: Vec<String> = route
                .context
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("needs context_extensions {}", want.join(","))
        }
        Mismatch::Host => format!("host {:?} is not {}", req.host, hosts(&route.hosts)),
        Mismatch::Method => format!("method {} is not {}", req.method, route.methods.join(",")),
        Mismatch::Path => format!("{} does not match {}", req.path, path(&route.path)),
    }
}

fn describe_access(policy: &Policy, route: &Route) -> String {
    let req = match &route.access {
        Access::Anonymous => return "nothing (anonymous)".into(),
        Access::Require(r) => r,
    };
    if req.any_of.is_empty() {
        return describe_requirement(policy, req);
    }
    let mut out = String::from("any one of (the first that holds allows):");
    for (k, alt) in req.any_of.iter().enumerate() {
        let _ = write!(
            out,
            "\n          ({k}) {}",
            describe_requirement(policy, alt)
        );
    }
    out
}

fn describe_requirement(policy: &Policy, req: &crate::policy::Requirement) -> String {
    let principals = || {
        req.principals
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !req.needs_token {
        return format!("a workload identity one of [{}] (no token)", principals());
    }
    let providers: Vec<&str> = if req.providers.is_empty() {
        policy.providers.iter().map(|p| &*p.name).collect()
    } else {
        req.providers
            .iter()
            .map(|i| &*policy.providers[*i].name)
            .collect()
    };
    let mut parts = vec![format!("a valid token from {}", providers.join(" or "))];
    if !req.scopes.is_empty() {
        parts.push(format!("scopes all of [{}]", req.scopes.join(", ")));
    }
    if !req.any_scopes.is_empty() {
        parts.push(format!("scopes one of [{}]", req.any_scopes.join(", ")));
    }
    if !req.audiences.is_empty() {
        parts.push(format!("aud one of [{}]", req.audiences.join(", ")));
    }
    for c in &req.claims {
        let values: Vec<String> = c.values.iter().map(Value::to_string).collect();
        parts.push(format!("claim {} = {}", c.path, values.join(" or ")));
    }
    if let Some(b) = req.binding {
        parts.push(format!("bound ({b:?})").to_lowercase());
    }
    if !req.principals.is_empty() {
        parts.push(format!("workload one of [{}]", principals()));
    }
    parts.join("; ")
}
