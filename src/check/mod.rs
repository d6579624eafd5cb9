//! The data path of one Check, top to bottom: request view, route, token,
//! verification, requirement, decision. No protobuf out, no metrics, no I/O.

pub mod token;
pub mod verify;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use serde_json::Value;

use crate::decision::{Allow, Decision, Deny, DenyKind, Reason};
use crate::policy::{Access, DefaultAction, Policy, RequireError, Route};
use crate::provider::TokenSource;
use crate::request::Request;
use token::{Token, TokenError};
use verify::{Verified, VerifyError};

/// Decides one Check against one policy snapshot. `now` is Unix seconds.
pub fn check(policy: &Policy, check: &CheckRequest, now: u64) -> Decision {
    let req = match Request::from_check(check) {
        Ok(r) => r,
        Err(e) => {
            return Decision::Deny(Deny::new(
                Reason::MalformedRequest,
                DenyKind::BadRequest,
                e.to_string(),
            ));
        }
    };
    let Some(route) = policy.route_for(&req) else {
        return no_route(policy);
    };
    let requirement = match &route.access {
        Access::Anonymous => return anonymous(policy, route),
        Access::Require(r) => r,
    };
    let deny = |reason, kind, description: &'static str| {
        let mut d = Deny::new(reason, kind, description);
        d.route = Some(route.name.clone());
        d
    };

    let token = match token::extract(&req, &requirement.sources) {
        Ok(t) => t,
        Err(TokenError::Missing) => {
            return Decision::Deny(deny(Reason::MissingToken, DenyKind::NoToken, "no token"));
        }
        Err(TokenError::Malformed(why)) => {
            return Decision::Deny(deny(Reason::MalformedToken, DenyKind::InvalidToken, why));
        }
    };

    let verified = match verify::verify(token.value, policy, &requirement.providers, now) {
        Ok(v) => v,
        Err(failed) => {
            let kind = match failed.error {
                VerifyError::KeysUnavailable => DenyKind::Unavailable,
                _ => DenyKind::InvalidToken,
            };
            let mut d = deny(failed.error.reason(), kind, describe(failed.error));
            d.provider = failed.provider.map(|i| policy.providers[i].name.clone());
            d.kid = failed.kid;
            return Decision::Deny(d);
        }
    };

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
        let mut d = deny(reason, kind, description);
        d.scope = scope;
        d.provider = Some(policy.providers[verified.provider].name.clone());
        d.kid = verified.kid;
        return Decision::Deny(d);
    }

    allow(policy, route, &req, token, verified)
}

/// Fixed text for `error_description`: never a claim value, never the token.
fn describe(e: VerifyError) -> &'static str {
    match e {
        VerifyError::Malformed(why) | VerifyError::UnsupportedAlgorithm(why) => why,
        VerifyError::IssuerNotAllowed => "the token's issuer is not accepted here",
        VerifyError::UnknownKey => "the token is signed with an unknown key",
        VerifyError::BadSignature => "the token's signature is invalid",
        VerifyError::Expired => "the token has expired",
        VerifyError::NotYetValid => "the token is not valid yet",
        VerifyError::AudienceNotAllowed => "the token is not meant for this service",
        VerifyError::KeysUnavailable => "signing keys are not available yet",
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
            remove_headers: policy.identity_headers.clone(),
            ..Default::default()
        }),
    }
}

fn anonymous(policy: &Policy, route: &Route) -> Decision {
    Decision::Allow(Allow {
        route: Some(route.name.clone()),
        reason: Some(Reason::Anonymous),
        remove_headers: policy.identity_headers.clone(),
        ..Default::default()
    })
}

fn allow(
    policy: &Policy,
    route: &Route,
    req: &Request,
    token: Token,
    verified: Verified,
) -> Decision {
    let provider = &policy.providers[verified.provider];
    let mut set_headers = Vec::with_capacity(provider.claims_to_headers.len());
    for (claim, header) in &provider.claims_to_headers {
        if let Some(value) = claim.lookup(&verified.claims).and_then(header_value) {
            set_headers.push((header.clone(), value));
        }
    }
    // Envoy applies removals after sets, so never remove what we set.
    let mut remove_headers: Vec<String> = policy
        .identity_headers
        .iter()
        .filter(|h| !set_headers.iter().any(|(s, _)| s == *h))
        .cloned()
        .collect();
    let mut remove_query = Vec::new();
    if !provider.forward_token {
        match token.source {
            TokenSource::Header { name, .. } => remove_headers.push(name.clone()),
            TokenSource::Query(name) => remove_query.push(name.clone()),
            TokenSource::Cookie(name) => {
                // Keep the other cookies: rewrite the header without this one.
                let rest: Vec<&str> = req
                    .header("cookie")
                    .unwrap_or("")
                    .split([';', ','])
                    .map(str::trim)
                    .filter(|c| !c.is_empty() && c.split_once('=').is_none_or(|(k, _)| k != name))
                    .collect();
                if rest.is_empty() {
                    remove_headers.push("cookie".into());
                } else {
                    set_headers.push(("cookie".into(), rest.join("; ")));
                }
            }
        }
    }
    Decision::Allow(Allow {
        route: Some(route.name.clone()),
        reason: Some(Reason::Verified),
        provider: Some(provider.name.clone()),
        kid: verified.kid,
        set_headers,
        remove_headers,
        remove_query,
        claims: Some(verified.claims),
    })
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
