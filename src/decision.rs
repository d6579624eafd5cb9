//! The outcome of one Check, and the reasons it can give. A reason's label is
//! public API: it is the `reason` of `valet_check_total`, of logs and of the body.

use std::borrow::Cow;

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
}

impl Reason {
    pub const ALL: [Reason; 25] = [
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

#[derive(Debug)]
pub enum Decision {
    Allow(Allow),
    Deny(Deny),
}

#[derive(Debug, Default)]
pub struct Allow {
    pub route: Option<String>,
    /// `anonymous`, `verified`, or `no_route` under `default: allow`.
    pub reason: Option<Reason>,
    pub provider: Option<String>,
    pub kid: Option<String>,
    /// Set on the upstream request, overwriting what the client sent.
    pub set_headers: Vec<(String, String)>,
    pub remove_headers: Vec<String>,
    pub remove_query: Vec<String>,
    /// Verified claims, for Envoy's dynamic metadata.
    pub claims: Option<std::sync::Arc<Map<String, Value>>>,
    /// A denial let through by `dry_run`: `reason` is what it would have been.
    pub dry_run: bool,
}

#[derive(Debug)]
pub struct Deny {
    pub route: Option<String>,
    pub reason: Reason,
    pub kind: DenyKind,
    /// Short, fixed text: never includes the token or a claim value.
    pub description: Cow<'static, str>,
    /// For `insufficient_scope`: the scopes the route asks for.
    pub scope: Option<String>,
    pub provider: Option<String>,
    pub kid: Option<String>,
    /// A fixed word for logs that narrows the reason (which denylist rule, which
    /// DPoP check): never a value from the request.
    pub detail: Option<&'static str>,
    /// When set, challenges use the DPoP scheme with these `algs` (the token came
    /// with DPoP, or the route needs DPoP-bound tokens).
    pub dpop_algs: Option<String>,
    /// RFC 9728: where the route's protected resource metadata is, for challenges.
    pub resource_metadata: Option<String>,
}

impl Decision {
    pub fn reason(&self) -> Reason {
        match self {
            Decision::Allow(a) => a.reason.unwrap_or(Reason::Verified),
            Decision::Deny(d) => d.reason,
        }
    }

    pub fn route(&self) -> Option<&str> {
        match self {
            Decision::Allow(a) => a.route.as_deref(),
            Decision::Deny(d) => d.route.as_deref(),
        }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
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
