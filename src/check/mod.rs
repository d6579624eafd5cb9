//! The data path of one Check, top to bottom: request view, route, token,
//! verification, requirement, decision. No protobuf out, no metrics, no I/O.

pub mod binding;
pub mod cache;
pub mod replay;
pub mod token;
pub mod verify;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use serde_json::{Map, Value};

use crate::decision::{Allow, Decision, Deny, DenyKind, Reason};
use crate::policy::require::audience_contains;
use crate::policy::{Access, DefaultAction, Policy, RequireError, Route};
use crate::provider::TokenSource;
use crate::request::Request;
use binding::{Binding, BindingError, Scheme};
use token::{Token, TokenError};
use verify::{Verified, VerifyError};

/// How the identity behind a request is established.
pub enum Identity {
    /// Find the token in the request and verify it: what every Envoy Check gets.
    /// `now` is Unix seconds.
    Token { now: u64 },
    /// Like `Token`, with the introspection answer for the request's opaque token
    /// already in hand (the service's second pass after asking the IdP).
    Introspected {
        now: u64,
        answer: crate::introspection::Answer,
    },
    /// Take these claims as verified, for policy tests and `explain --claims`:
    /// the route logic alone, no token, no keys, no clock.
    Claims(Map<String, Value>),
}

/// Decides one Check against one policy snapshot. `now` is Unix seconds.
pub fn check(policy: &Policy, check: &CheckRequest, now: u64) -> Decision {
    decide(policy, check, Identity::Token { now })
}

/// Decides again with the introspection answer the service just got for this
/// request's token (not read back from the cache, which may already have let it go).
pub fn check_introspected(
    policy: &Policy,
    check: &CheckRequest,
    now: u64,
    answer: crate::introspection::Answer,
) -> Decision {
    decide(policy, check, Identity::Introspected { now, answer })
}

pub fn decide(policy: &Policy, check: &CheckRequest, identity: Identity) -> Decision {
    let req = match Request::from_check(check) {
        Ok(r) => r,
        Err(e) => {
            let deny = Deny::new(
                Reason::MalformedRequest,
                DenyKind::BadRequest,
                e.to_string(),
            );
            return dry_run(policy, None, Decision::Deny(deny));
        }
    };
    // `x_user_id` reaches CGI, WSGI, PHP and Rack upstreams as `x-user-id`: a
    // request carrying another spelling of a header Valet sets is refused.
    if let Some(twin) = identity_twin(policy, &req) {
        let deny = Deny::new(
            Reason::MalformedRequest,
            DenyKind::BadRequest,
            format!("header {twin:?} is another spelling of an identity header"),
        );
        return dry_run(policy, None, Decision::Deny(deny));
    }
    let route = policy.route_for(&req);
    let decision = match route {
        None => no_route(policy),
        Some(route) => match decide_route(policy, &req, route, identity) {
            Ok(allow) => Decision::Allow(allow),
            Err(mut deny) => {
                deny.route = Some(route.name.clone());
                if wants_dpop_challenge(&req, route, &deny) {
                    deny.dpop_algs = Some(policy.dpop.algs());
                }
                deny.resource_metadata =
                    policy.resource_metadata_url(&route.name).map(str::to_owned);
                Decision::Deny(deny)
            }
        },
    };
    dry_run(policy, route, decision)
}

/// The answer to a CheckRequest that could not be decoded (a header value that
/// is not UTF-8, a truncated field): a 400 like any unreadable request.
pub fn undecodable(policy: &Policy, e: &prost::DecodeError) -> Decision {
    let deny = Deny::new(
        Reason::MalformedRequest,
        DenyKind::BadRequest,
        format!("CheckRequest could not be decoded: {e}"),
    );
    dry_run(policy, None, Decision::Deny(deny))
}

/// A request Valet would not read to the end (too large, incomplete): denied
/// like an undecodable one, dry-run included.
pub fn unread(policy: &Policy, deny: Deny) -> Decision {
    dry_run(policy, None, Decision::Deny(deny))
}

/// A header whose name is an identity header's with `_` for some `-`.
fn identity_twin<'a>(policy: &Policy, req: &Request<'a>) -> Option<&'a str> {
    if policy.identity_headers.is_empty() {
        return None;
    }
    req.find_header_name(|name| {
        name.contains('_')
            && policy.identity_headers.iter().any(|h| {
                h.len() == name.len()
                    && h.bytes()
                        .zip(name.bytes())
                        .all(|(a, b)| a == b.to_ascii_lowercase() || (a == b'-' && b == b'_'))
            })
    })
}

// A denial is an answer, not an exception: it moves by value rather than through a Box.
#[allow(clippy::result_large_err)]
fn decide_route(
    policy: &Policy,
    req: &Request,
    route: &Route,
    identity: Identity,
) -> Result<Allow, Deny> {
    let requirement = match &route.access {
        Access::Anonymous => return Ok(anonymous(policy, route)),
        Access::Require(r) => r,
    };
    let given = match &identity {
        Identity::Introspected { answer, .. } => Some(answer.clone()),
        _ => None,
    };
    // Bindings are checked for tokens (claims taken as given have no proof to check).
    let token_now = match &identity {
        Identity::Token { now } | Identity::Introspected { now, .. } => Some(*now),
        Identity::Claims(_) => None,
    };
    let (token, verified) =
        match identity {
            Identity::Token { now } | Identity::Introspected { now, .. } => {
                let token = token::extract(req, &requirement.sources, policy.max_token_bytes)
                    .map_err(|e| match e {
                        TokenError::Missing => {
                            Deny::new(Reason::MissingToken, DenyKind::NoToken, "no token")
                        }
                        TokenError::Malformed(why) => {
                            Deny::new(Reason::MalformedToken, DenyKind::InvalidToken, why)
                        }
                    })?;
                let verified = verify::verify(
                    token.value,
                    policy,
                    &requirement.providers,
                    now,
                    given.as_ref(),
                )
                .map_err(|failed| {
                    let kind = match failed.error {
                        VerifyError::KeysUnavailable | VerifyError::IntrospectionPending => {
                            DenyKind::Unavailable
                        }
                        _ => DenyKind::InvalidToken,
                    };
                    let mut d = Deny::new(failed.error.reason(), kind, describe(failed.error));
                    d.provider = failed.provider.map(|i| policy.providers[i].name.clone());
                    d.kid = failed.kid;
                    d
                })?;
                (Some(token), verified)
            }
            Identity::Claims(claims) => (None, trusted(policy, &requirement.providers, claims)?),
        };

    // After verification, so a forged token cannot probe the list; before the
    // route's requirements, so a revoked token is 401 whatever the route wants.
    if let Some(revocation) = &policy.revocation
        && let Some(rule) = revocation.current().revoked(&verified.claims)
    {
        let mut d = Deny::new(
            Reason::Revoked,
            DenyKind::InvalidToken,
            "the token has been revoked",
        );
        d.provider = Some(policy.providers[verified.provider].name.clone());
        d.kid = verified.kid;
        d.detail = Some(rule.label());
        return Err(d);
    }
    if let Some(token) = &token
        && let Some(now) = token_now
        && let Err(e) = binding::check(
            req,
            token.value,
            token.scheme,
            &verified.claims,
            requirement.binding,
            &policy.dpop,
            now,
        )
    {
        let kind = match e {
            BindingError::InvalidProof(_) => DenyKind::InvalidDpopProof,
            BindingError::ReplayFull(_) => DenyKind::Unavailable,
            _ => DenyKind::InvalidToken,
        };
        let mut d = Deny::new(e.reason(), kind, e.description());
        d.provider = Some(policy.providers[verified.provider].name.clone());
        d.kid = verified.kid;
        return Err(d);
    }
    if let Err(e) = requirement.check(&verified.claims) {
        let (reason, kind, description, scope) = match e {
            RequireError::InsufficientScope { required } => (
                Reason::InsufficientScope,
                DenyKind::InsufficientScope,
                "the token lacks a required scope",
                Some(required),
            ),
            RequireError::AudienceNotAllowed => (
                Reason::AudienceNotAllowed,
                DenyKind::Forbidden,
                "the token's audience is not allowed on this route",
                None,
            ),
            RequireError::ClaimMismatch { .. } => (
                Reason::ClaimMismatch,
                DenyKind::Forbidden,
                "a required claim does not match",
                None,
            ),
        };
        let mut d = Deny::new(reason, kind, description);
        d.scope = scope;
        d.provider = Some(policy.providers[verified.provider].name.clone());
        d.kid = verified.kid;
        return Err(d);
    }
    Ok(allow(policy, route, req, token, verified))
}

/// The token a route reads from this request, for the service to introspect
/// after a Check came back `introspection_unavailable`.
pub fn token_of(policy: &Policy, check: &CheckRequest, route: &str) -> Option<String> {
    let req = Request::from_check(check).ok()?;
    let route = &policy.routes[policy.index.by_name(route)?];
    let Access::Require(r) = &route.access else {
        return None;
    };
    token::extract(&req, &r.sources, policy.max_token_bytes)
        .ok()
        .map(|t| t.value.to_string())
}

/// A 401 answers with the DPoP scheme when the client used it, or when the
/// route only takes DPoP-bound tokens (RFC 9449 §7.1).
fn wants_dpop_challenge(req: &Request, route: &Route, deny: &Deny) -> bool {
    let challenged = matches!(
        deny.kind,
        DenyKind::NoToken
            | DenyKind::InvalidToken
            | DenyKind::InvalidDpopProof
            | DenyKind::InsufficientScope
    );
    let used_dpop = req.header("authorization").is_some_and(|a| {
        a.as_bytes()
            .get(..5)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"dpop "))
    });
    let route_wants =
        matches!(&route.access, Access::Require(r) if r.binding == Some(Binding::Dpop));
    challenged && (used_dpop || route_wants || deny.kind == DenyKind::InvalidDpopProof)
}

/// Claims taken as verified: the provider is the allowed one whose issuer is `iss`
/// (or the first allowed one when there is no `iss`), and its audiences apply.
#[allow(clippy::result_large_err)]
fn trusted(
    policy: &Policy,
    allowed: &[usize],
    claims: Map<String, Value>,
) -> Result<Verified, Deny> {
    let candidates = || {
        policy
            .providers
            .iter()
            .enumerate()
            .filter(|(i, _)| allowed.is_empty() || allowed.contains(i))
    };
    let found = match claims.get("iss").and_then(Value::as_str) {
        Some(iss) => candidates().find(|(_, p)| p.issuer == iss),
        None => candidates().next(),
    };
    let Some((index, provider)) = found else {
        return Err(Deny::new(
            Reason::IssuerNotAllowed,
            DenyKind::InvalidToken,
            describe(VerifyError::IssuerNotAllowed),
        ));
    };
    if !provider.audiences.is_empty() && !audience_contains(&claims, &provider.audiences) {
        let mut d = Deny::new(
            Reason::AudienceNotAllowed,
            DenyKind::InvalidToken,
            describe(VerifyError::AudienceNotAllowed),
        );
        d.provider = Some(provider.name.clone());
        return Err(d);
    }
    let metadata = crate::response::claims_metadata(&claims, &provider.metadata_claims);
    let headers = claim_headers(provider, &claims);
    Ok(Verified {
        provider: index,
        kid: None,
        claims: std::sync::Arc::new(claims),
        metadata,
        headers,
    })
}

/// On a dry-run route (or with the global switch), a denial is recorded as what it
/// would have been but the request passes, without identity.
fn dry_run(policy: &Policy, route: Option<&Route>, decision: Decision) -> Decision {
    let on = policy.dry_run || route.is_some_and(|r| r.dry_run);
    match decision {
        Decision::Deny(d) if on => Decision::Allow(Allow {
            route: d.route,
            reason: Some(d.reason),
            dry_run: true,
            provider: d.provider,
            kid: d.kid,
            identity_headers: policy.identity_headers.clone(),
            ..Default::default()
        }),
        other => other,
    }
}

/// Fixed text for `error_description`: never a claim value, never the token.
fn describe(e: VerifyError) -> &'static str {
    match e {
        VerifyError::Malformed(why) | VerifyError::UnsupportedAlgorithm(why) => why,
        VerifyError::IssuerNotAllowed => "the token's issuer is not accepted here",
        VerifyError::UnknownKey => "the token is signed with an unknown key",
        VerifyError::AmbiguousKey => "the token has no kid and several keys fit its algorithm",
        VerifyError::BadSignature => "the token's signature is invalid",
        VerifyError::Expired => "the token has expired",
        VerifyError::NotYetValid => "the token is not valid yet",
        VerifyError::AudienceNotAllowed => "the token is not meant for this service",
        VerifyError::KeysUnavailable => "signing keys are not available yet",
        VerifyError::Inactive => "the token is not active",
        VerifyError::IntrospectionPending => "the token could not be introspected",
    }
}

fn no_route(policy: &Policy) -> Decision {
    match policy.default {
        DefaultAction::Deny => Decision::Deny(Deny::new(
            Reason::NoRoute,
            DenyKind::Forbidden,
            "no route matches this request",
        )),
        DefaultAction::Allow => Decision::Allow(Allow {
            reason: Some(Reason::NoRoute),
            identity_headers: policy.identity_headers.clone(),
            ..Default::default()
        }),
    }
}

fn anonymous(policy: &Policy, route: &Route) -> Allow {
    Allow {
        route: Some(route.name.clone()),
        reason: Some(Reason::Anonymous),
        identity_headers: policy.identity_headers.clone(),
        ..Default::default()
    }
}

fn allow(
    policy: &Policy,
    route: &Route,
    req: &Request,
    token: Option<Token>,
    verified: Verified,
) -> Allow {
    let provider = &policy.providers[verified.provider];
    let mut set_headers = Vec::new();
    // The identity headers are removed but for those set (see `Allow::removed_headers`).
    let mut remove_headers: Vec<String> = Vec::new();
    let mut remove_query = Vec::new();
    if let Some(token) = token.filter(|_| !provider.forward_token) {
        if token.scheme == Scheme::Dpop {
            remove_headers.push("dpop".into());
        }
        match token.source {
            TokenSource::Header { name, .. } => remove_headers.push(name.clone()),
            TokenSource::Query(name) => remove_query.push(name.clone()),
            TokenSource::Cookie(name) => {
                // Keep every other cookie byte for byte: drop only the pairs of
                // this name, and the separator before each.
                let rest = without_cookie(req.header("cookie").unwrap_or(""), name);
                if rest.is_empty() {
                    remove_headers.push("cookie".into());
                } else {
                    set_headers.push(("cookie".into(), rest));
                }
            }
        }
    }
    Allow {
        route: Some(route.name.clone()),
        reason: Some(Reason::Verified),
        provider: Some(provider.name.clone()),
        kid: verified.kid,
        set_headers,
        remove_headers,
        remove_query,
        claims: Some(verified.claims),
        claims_metadata: verified.metadata,
        claim_headers: verified.headers,
        identity_headers: policy.identity_headers.clone(),
        dry_run: false,
    }
}

/// The provider's `claims_to_headers` of verified claims: computed once per
/// verified token (the verified-token cache keeps them), not per Check.
pub(crate) fn claim_headers(
    provider: &crate::provider::Provider,
    claims: &Map<String, Value>,
) -> std::sync::Arc<[(String, String)]> {
    provider
        .claims_to_headers
        .iter()
        .filter_map(|(claim, header)| {
            let value = claim.lookup(claims).and_then(header_value)?;
            Some((header.clone(), value))
        })
        .collect()
}

/// The `cookie` header without the pairs named `name`; every other byte kept.
fn without_cookie(header: &str, name: &str) -> String {
    let mut out = String::with_capacity(header.len());
    let mut first = true;
    for pair in header.split(';') {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k).trim();
        if key == name {
            continue;
        }
        if first {
            // The first pair kept starts the header: no separator's space before it.
            out.push_str(pair.trim_start());
            first = false;
        } else {
            out.push(';');
            out.push_str(pair);
        }
    }
    if out.trim().is_empty() {
        out.clear();
    }
    out
}

/// A claim as a header value: strings as they are, numbers and booleans printed,
/// arrays of those joined by commas. Objects, and anything with control
/// characters (header injection), are not sent.
fn header_value(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?
            .join(","),
        _ => return None,
    };
    (!s.chars().any(char::is_control)).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::without_cookie;

    #[test]
    fn removing_the_token_cookie_keeps_every_other_byte() {
        let cases = [
            ("session=t.t.t; prefs=a,b", "prefs=a,b"),
            ("a=1; session=t.t.t; b=2", "a=1; b=2"),
            ("a=1;session=t;b=\"x, y\" ; c", "a=1;b=\"x, y\" ; c"),
            ("a=1; b=2; session=t", "a=1; b=2"),
            ("session=t", ""),
            ("session=t; session=u", ""),
            ("sessionx=1; session=t", "sessionx=1"),
            ("a=1;;  b=2; session=t", "a=1;;  b=2"),
        ];
        for (header, want) in cases {
            assert_eq!(without_cookie(header, "session"), want, "{header}");
        }
    }
}
