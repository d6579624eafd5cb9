//! The outcome of one Check, and the reasons it can give. A reason's label is
//! public API: it is the `reason` of `valet_check_total`, of logs and of the body.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Anonymous,
    Verified,
    NoRoute,
    MissingToken,
    MalformedToken,
    MalformedRequest,
    UnsupportedAlgorithm,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    IssuerNotAllowed,
    AudienceNotAllowed,
    InsufficientScope,
    ClaimMismatch,
    KeysUnavailable,
    Overloaded,
    Revoked,
    BindingMismatch,
    UnboundToken,
    InvalidDpopProof,
    InactiveToken,
    IntrospectionUnavailable,
    RequestTooLarge,
    DpopReplayFull,
    /// Allowed on the caller's workload identity alone (`require.principals`).
    Principal,
    PrincipalNotAllowed,
    UnknownApiKey,
    /// The shared store could not spend a DPoP proof and `dpop.on_store_error: refuse`.
    DpopStoreUnavailable,
}

impl Reason {
    pub const ALL: [Reason; 29] = [
        Reason::Anonymous,
        Reason::Verified,
        Reason::NoRoute,
        Reason::MissingToken,
        Reason::MalformedToken,
        Reason::MalformedRequest,
        Reason::UnsupportedAlgorithm,
        Reason::UnknownKey,
        Reason::BadSignature,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::IssuerNotAllowed,
        Reason::AudienceNotAllowed,
        Reason::InsufficientScope,
        Reason::ClaimMismatch,
        Reason::KeysUnavailable,
        Reason::Overloaded,
        Reason::Revoked,
        Reason::BindingMismatch,
        Reason::UnboundToken,
        Reason::InvalidDpopProof,
        Reason::InactiveToken,
        Reason::IntrospectionUnavailable,
        Reason::RequestTooLarge,
        Reason::DpopReplayFull,
        Reason::Principal,
        Reason::PrincipalNotAllowed,
        Reason::UnknownApiKey,
        Reason::DpopStoreUnavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Anonymous => "anonymous",
            Reason::Verified => "verified",
            Reason::NoRoute => "no_route",
            Reason::MissingToken => "missing_token",
            Reason::MalformedToken => "malformed_token",
            Reason::MalformedRequest => "malformed_request",
            Reason::UnsupportedAlgorithm => "unsupported_algorithm",
            Reason::UnknownKey => "unknown_key",
            Reason::BadSignature => "bad_signature",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::IssuerNotAllowed => "issuer_not_allowed",
            Reason::AudienceNotAllowed => "audience_not_allowed",
            Reason::InsufficientScope => "insufficient_scope",
            Reason::ClaimMismatch => "claim_mismatch",
            Reason::KeysUnavailable => "keys_unavailable",
            Reason::Overloaded => "overloaded",
            Reason::Revoked => "revoked",
            Reason::BindingMismatch => "binding_mismatch",
            Reason::UnboundToken => "unbound_token",
            Reason::InvalidDpopProof => "invalid_dpop_proof",
            Reason::InactiveToken => "inactive_token",
            Reason::IntrospectionUnavailable => "introspection_unavailable",
            Reason::RequestTooLarge => "request_too_large",
            Reason::DpopReplayFull => "dpop_replay_full",
            Reason::Principal => "principal",
            Reason::PrincipalNotAllowed => "principal_not_allowed",
            Reason::UnknownApiKey => "unknown_api_key",
            Reason::DpopStoreUnavailable => "dpop_store_unavailable",
        }
    }
}

/// How a denial is answered: the HTTP status Envoy sends back, and the challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyKind {
    /// 401, `WWW-Authenticate: Bearer realm=…` without `error`.
    NoToken,
    /// 401, `error="invalid_token"`.
    InvalidToken,
    /// 401, `DPoP error="invalid_dpop_proof"` (RFC 9449 §7.1).
    InvalidDpopProof,
    /// 403, `error="insufficient_scope"` with the required scopes.
    InsufficientScope,
    /// 403 without a challenge: the token is fine, the route says no.
    Forbidden,
    /// 400: Valet could not read the request safely.
    BadRequest,
    /// 413: the CheckRequest is larger than Valet reads (`--max-message-bytes`).
    TooLarge,
    /// 503: Valet cannot verify anything yet (no keys).
    Unavailable,
}

impl DenyKind {
    pub fn http_status(self) -> u16 {
        match self {
            DenyKind::NoToken | DenyKind::InvalidToken | DenyKind::InvalidDpopProof => 401,
            DenyKind::InsufficientScope | DenyKind::Forbidden => 403,
            DenyKind::BadRequest => 400,
            DenyKind::TooLarge => 413,
            DenyKind::Unavailable => 503,
        }
    }
}

/// A route's name as decisions carry it: shared, never copied per Check, with
/// the route's `valet_check_total` handles beside it (filled on first use by
/// telemetry, so that counting a Check takes no lock and no lookup).
#[derive(Clone)]
pub struct RouteName(Arc<RouteLabel>);

struct RouteLabel {
    name: Box<str>,
    counters: CheckCounters,
}

/// One counter handle per reason × allow/deny × dry-run, made once each.
pub struct CheckCounters(Box<[OnceLock<metrics::Counter>]>);

impl Default for CheckCounters {
    fn default() -> Self {
        CheckCounters(
            (0..Reason::ALL.len() * 4)
                .map(|_| OnceLock::new())
                .collect(),
        )
    }
}

impl CheckCounters {
    pub fn cell(&self, slot: usize) -> &OnceLock<metrics::Counter> {
        &self.0[slot]
    }
}

impl RouteName {
    pub fn as_str(&self) -> &str {
        &self.0.name
    }

    pub fn counters(&self) -> &CheckCounters {
        &self.0.counters
    }
}

impl From<String> for RouteName {
    fn from(name: String) -> Self {
        RouteName(Arc::new(RouteLabel {
            name: name.into(),
            counters: CheckCounters::default(),
        }))
    }
}

impl From<&str> for RouteName {
    fn from(name: &str) -> Self {
        RouteName::from(name.to_owned())
    }
}

impl std::ops::Deref for RouteName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for RouteName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for RouteName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for RouteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for RouteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Width and alignment apply, as for a str (`valet explain` aligns names).
        f.pad(self.as_str())
    }
}

impl PartialEq for RouteName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RouteName {}

impl PartialEq<str> for RouteName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for RouteName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl serde::Serialize for RouteName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Debug)]
pub enum Decision {
    Allow(Allow),
    Deny(Deny),
}

#[derive(Debug, Default)]
pub struct Allow {
    pub route: Option<RouteName>,
    /// `anonymous`, `verified`, or `no_route` under `default: allow`.
    pub reason: Option<Reason>,
    pub provider: Option<Arc<str>>,
    pub kid: Option<Arc<str>>,
    /// The provider's `claims_to_headers` for the verified token, computed once
    /// per verified token: set on the upstream request, overwriting what the client sent.
    pub claim_headers: Arc<[(String, String)]>,
    /// Set besides `claim_headers` (the `cookie` header without the token).
    pub set_headers: Vec<(String, String)>,
    /// The policy's identity headers, shared: removed from the upstream request
    /// unless `set_headers` sets them (see [`Allow::removed_headers`]).
    pub identity_headers: Arc<[String]>,
    /// Removed besides the identity headers (the token's header, `dpop`, `cookie`).
    pub remove_headers: Vec<String>,
    pub remove_query: Vec<String>,
    /// Verified claims, for Envoy's dynamic metadata.
    pub claims: Option<Arc<Map<String, Value>>>,
    /// The provider's `metadata_claims` of `claims`, encoded once per verified
    /// token as the protobuf `Struct` of dynamic metadata's `claims` field.
    pub claims_metadata: Option<prost::bytes::Bytes>,
    /// A denial let through by `dry_run`: `reason` is what it would have been.
    pub dry_run: bool,
    /// On a `require.any_of` route: which alternative held (0-based).
    pub alternative: Option<usize>,
}

#[derive(Debug)]
pub struct Deny {
    pub route: Option<RouteName>,
    pub reason: Reason,
    pub kind: DenyKind,
    /// Short, fixed text: never includes the token or a claim value.
    pub description: Cow<'static, str>,
    /// For `insufficient_scope`: the scopes the route asks for.
    pub scope: Option<String>,
    pub provider: Option<Arc<str>>,
    pub kid: Option<Arc<str>>,
    /// A fixed word for logs that narrows the reason (which denylist rule, which
    /// DPoP check): never a value from the request.
    pub detail: Option<&'static str>,
    /// When set, challenges use the DPoP scheme with these `algs` (the token came
    /// with DPoP, or the route needs DPoP-bound tokens).
    pub dpop_algs: Option<String>,
    /// RFC 9728: where the route's protected resource metadata is, for challenges.
    pub resource_metadata: Option<String>,
    /// On a `require.any_of` route: why each alternative failed, in order (for
    /// `valet explain`; fixed text, never a value from the request).
    pub alternatives: Vec<(Reason, Cow<'static, str>)>,
    /// The verified claims, when the token verified and the route still said no
    /// (revoked, binding, requirement): the audit trail names the client.
    pub claims: Option<Arc<Map<String, Value>>>,
}

impl Decision {
    pub fn reason(&self) -> Reason {
        match self {
            Decision::Allow(a) => a.reason.unwrap_or(Reason::Verified),
            Decision::Deny(d) => d.reason,
        }
    }

    pub fn route(&self) -> Option<&str> {
        self.route_name().map(RouteName::as_str)
    }

    pub fn route_name(&self) -> Option<&RouteName> {
        match self {
            Decision::Allow(a) => a.route.as_ref(),
            Decision::Deny(d) => d.route.as_ref(),
        }
    }

    /// The route's `valet_check_total` handles; None when no route matched.
    pub fn route_counters(&self) -> Option<&CheckCounters> {
        self.route_name().map(RouteName::counters)
    }

    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

impl Allow {
    /// Every header removed from the upstream request: the identity headers not
    /// set by this answer (Envoy applies removals after sets), then the rest.
    pub fn removed_headers(&self) -> impl Iterator<Item = &str> {
        self.identity_headers
            .iter()
            .filter(|h| !self.headers_set().any(|(s, _)| s == h.as_str()))
            .chain(&self.remove_headers)
            .map(String::as_str)
    }

    /// Every header set on the upstream request, overwriting what the client sent.
    pub fn headers_set(&self) -> impl Iterator<Item = (&str, &str)> {
        self.claim_headers
            .iter()
            .chain(&self.set_headers)
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl Deny {
    pub fn new(reason: Reason, kind: DenyKind, description: impl Into<Cow<'static, str>>) -> Self {
        Deny {
            route: None,
            reason,
            kind,
            description: description.into(),
            scope: None,
            provider: None,
            kid: None,
            detail: None,
            dpop_algs: None,
            resource_metadata: None,
            alternatives: Vec::new(),
            claims: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_snake_case() {
        let labels: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        assert!(
            labels
                .iter()
                .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
    }
}
