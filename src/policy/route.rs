//! A compiled route and how a request is matched against it.

use regex::Regex;

use super::require::Requirement;
use crate::request::Request;

pub struct Route {
    /// Shared with every decision on this route, with its counter handles.
    pub name: crate::decision::RouteName,
    pub hosts: Vec<HostMatch>,
    /// Upper-case; empty means any method.
    pub methods: Vec<String>,
    pub path: PathMatch,
    /// Equality on Envoy's per-route `context_extensions`.
    pub context: Vec<(String, String)>,
    pub access: Access,
    /// Denials are recorded but the request passes.
    pub dry_run: bool,
}

pub enum Access {
    Anonymous,
    Require(Requirement),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: one or more labels before it.
    Suffix(String),
}

impl HostMatch {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h == host,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}

pub enum PathMatch {
    Any,
    Exact(String),
    /// Segment-aware: `/orders` matches `/orders` and `/orders/7`, not `/ordersx`.
    Prefix(String),
    /// Anchored at both ends, like Envoy's `safe_regex`.
    Regex(Regex),
    /// `/orders/{id}`: `{name}` is one non-empty segment.
    Template(Vec<TemplateSegment>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSegment {
    Literal(String),
    Variable(String),
}

/// The template as written: `/orders/{id}`.
pub fn template_text(segments: &[TemplateSegment]) -> String {
    let mut out = String::new();
    for s in segments {
        out.push('/');
        match s {
            TemplateSegment::Literal(l) => out.push_str(l),
            TemplateSegment::Variable(v) => {
                out.push('{');
                out.push_str(v);
                out.push('}');
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => {
                p == "/"
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::Regex(re) => re.is_match(path),
            PathMatch::Template(segments) => {
                let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
                let all = segments.iter().all(|seg| match (seg, parts.next()) {
                    (TemplateSegment::Literal(l), Some(p)) => l == p,
                    (TemplateSegment::Variable(_), Some(p)) => !p.is_empty(),
                    (_, None) => false,
                });
                all && parts.next().is_none()
            }
        }
    }
}

/// Why a route did not match: the first field that failed, in match order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    Context,
    Host,
    Method,
    Path,
}

impl Route {
    pub fn mismatch(&self, req: &Request) -> Option<Mismatch> {
        if !self
            .context
            .iter()
            .all(|(k, v)| req.context.get(k).is_some_and(|got| got == v))
        {
            return Some(Mismatch::Context);
        }
        if !self.hosts.is_empty() && !self.hosts.iter().any(|h| h.matches(&req.host)) {
            return Some(Mismatch::Host);
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == req.method) {
            return Some(Mismatch::Method);
        }
        if !self.path.matches(&req.path) {
            return Some(Mismatch::Path);
        }
        None
    }

    pub fn matches(&self, req: &Request) -> bool {
        self.mismatch(req).is_none()
    }

    pub fn is_anonymous(&self) -> bool {
        matches!(self.access, Access::Anonymous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(s: &str) -> PathMatch {
        PathMatch::Template(
            s.trim_start_matches('/')
                .split('/')
                .map(
                    |p| match p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                        Some(v) => TemplateSegment::Variable(v.into()),
                        None => TemplateSegment::Literal(p.into()),
                    },
                )
                .collect(),
        )
    }

    #[test]
    fn prefixes_respect_segments() {
        let p = PathMatch::Prefix("/orders".into());
        assert!(p.matches("/orders"));
        assert!(p.matches("/orders/"));
        assert!(p.matches("/orders/7"));
        assert!(!p.matches("/ordersx"));
        assert!(!p.matches("/order"));
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
    }

    #[test]
    fn templates_match_whole_segments() {
        let t = template("/orders/{id}/items/{item}");
        assert!(t.matches("/orders/7/items/9"));
        assert!(!t.matches("/orders/7/items"));
        assert!(!t.matches("/orders/7/items/9/x"));
        assert!(!t.matches("/orders//items/9"));
        assert!(!t.matches("/orders/7/things/9"));
        assert!(template("/").matches("/"));
    }

    #[test]
    fn regexes_are_anchored_and_exact_is_exact() {
        let r = PathMatch::Regex(Regex::new("^(?:/v[0-9]+/orders)$").unwrap());
        assert!(r.matches("/v2/orders"));
        assert!(!r.matches("/v2/orders/7"));
        assert!(PathMatch::Exact("/healthz".into()).matches("/healthz"));
        assert!(!PathMatch::Exact("/healthz".into()).matches("/healthz/"));
    }

    #[test]
    fn host_wildcards_need_a_label() {
        let h = HostMatch::Suffix(".example.com".into());
        assert!(h.matches("api.example.com"));
        assert!(h.matches("a.b.example.com"));
        assert!(!h.matches("example.com"));
        assert!(!h.matches("badexample.com"));
        assert!(HostMatch::Exact("example.com".into()).matches("example.com"));
    }
}
