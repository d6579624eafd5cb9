//! The data path of one Check, top to bottom: request view, route, token,
//! verification, requirement, decision. No protobuf out, no metrics, no I/O.

pub mod binding;
pub use crate::stores::cache;
pub mod token;
pub mod verify;

use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use serde_json::{Map, Value};

use crate::decision::{Allow, Decision, Deny, DenyKind, Reason};
use crate::policy::require::audience_contains;
use crate::policy::store::OnStoreError;
use crate::policy::{Access, DefaultAction, RequireError, Route};
use crate::provider::TokenSource;
use crate::request::Request;
use crate::stores::Snapshot;
use crate::stores::replay::ProofId;
use binding::{Binding, BindingError, Scheme};
use token::{Token, TokenError};
use verify::{Verified, VerifyError};

/// How the identity behind a request is established.
pub enum Identity {
    /// Find the token in the request and verify it: what every Envoy Check gets.
    /// `now` is Unix seconds.
    Token { now: u64 },
    /// Take these claims as verified, for policy tests and `explain --claims`:
    /// the route logic alone, no token, no keys, no clock.
    Claims(Map<String, Value>),
}

/// Where deciding got to: an answer, or what it needs first.
pub enum Step<'r> {
    Done(Decision),
    Need(Pending<'r>),
}

/// What the core needs before it can go on; the driver gets it and resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Keys of `provider` that hold `kid` (a rotation not seen yet, perhaps).
    Keys { provider: usize, kid: Arc<str> },
    /// The introspection answer for the token, from `provider`'s endpoint.
    Introspection { provider: usize },
    /// The fleet's store to spend this DPoP proof (spent here already): the
    /// Check is decided but for a replay at another replica.
    Spend { proof: ProofId },
}

/// A Check stopped at verification: its route and token are kept, so resuming
/// does not build the request view, pick the route or read the token again.
pub struct Pending<'r> {
    pub need: Need,
    route: usize,
    token: Token<'r>,
    now: u64,
    /// The answer if the need cannot be met (`unknown_key`,
    /// `introspection_unavailable`), dry run applied.
    pub fallback: Decision,
    /// For `Spend`: the decision once the store says the proof is fresh.
    then: Option<Box<Decision>>,
}

impl Pending<'_> {
    /// The token to introspect; never logged.
    pub fn token(&self) -> &str {
        self.token.value
    }
}

/// Decides one Check against one snapshot with no I/O: a need is answered with
/// its fallback. (The driver meets needs; this is for benches and tests.)
pub fn check(snap: &Snapshot, check: &CheckRequest, now: u64) -> Decision {
    let req = match view(snap, check) {
        Ok(r) => r,
        Err(d) => return d,
    };
    match start(snap, &req, Identity::Token { now }) {
        Step::Done(d) => d,
        Step::Need(p) => p.fallback,
    }
}

/// The request view, built once per Check; a request that cannot be read, or
/// that carries another spelling of an identity header, is answered here.
// A denial is an answer, not an exception: it moves by value rather than through a Box.
#[allow(clippy::result_large_err)]
pub fn view<'c>(snap: &Snapshot, check: &'c CheckRequest) -> Result<Request<'c>, Decision> {
    let req = match Request::from_check(check) {
        Ok(r) => r,
        Err(e) => {
            let deny = Deny::new(
                Reason::MalformedRequest,
                DenyKind::BadRequest,
                e.to_string(),
            );
            return Err(dry_run(snap, None, Decision::Deny(deny)));
        }
    };
    // `x_user_id` reaches CGI, WSGI, PHP and Rack upstreams as `x-user-id`: a
    // request carrying another spelling of a header Valet sets is refused.
    if let Some(twin) = identity_twin(snap, &req) {
        let deny = Deny::new(
            Reason::MalformedRequest,
            DenyKind::BadRequest,
            format!("header {twin:?} is another spelling of an identity header"),
        );
        return Err(dry_run(snap, None, Decision::Deny(deny)));
    }
    Ok(req)
}

/// Route, token, verification, revocation, binding, requirement: a decision,
/// or the need verification met first.
#[allow(clippy::result_large_err)]
pub fn start<'r>(policy: &'r Snapshot, req: &Request<'r>, identity: Identity) -> Step<'r> {
    let Some(ri) = policy.route_index_for(req) else {
        return Step::Done(dry_run(policy, None, no_route(policy)));
    };
    let route = &policy.routes[ri];
    let requirement = match &route.access {
        Access::Anonymous => {
            return Step::Done(routed(policy, req, ri, Ok(anonymous(policy, route))));
        }
        Access::Require(r) => r,
    };
    // Alternatives that need no token, ahead of the first that does, hold or
    // fail without one: a workload caller's token is not even read.
    if let Some(k) = requirement
        .alternatives()
        .iter()
        .take_while(|a| !a.needs_token)
        .position(|a| a.principal_allowed(req.principal))
    {
        let allow = by_principal(policy, route, requirement, k);
        return Step::Done(routed(policy, req, ri, Ok(allow)));
    }
    if !requirement.needs_token {
        let none = Err(Deny::new(
            Reason::MissingToken,
            DenyKind::NoToken,
            "no token",
        ));
        let result = after_verify(policy, req, route, None, None, none).map(|(a, _)| a);
        return Step::Done(routed(policy, req, ri, result));
    }
    match identity {
        Identity::Token { now } => {
            let token = match token::extract(req, &requirement.sources, policy.max_token_bytes) {
                Ok(t) => t,
                Err(e) => {
                    let deny = match e {
                        TokenError::Missing => {
                            Deny::new(Reason::MissingToken, DenyKind::NoToken, "no token")
                        }
                        TokenError::Malformed(why) => {
                            Deny::new(Reason::MalformedToken, DenyKind::InvalidToken, why)
                        }
                    };
                    let result =
                        after_verify(policy, req, route, None, None, Err(deny)).map(|(a, _)| a);
                    return Step::Done(routed(policy, req, ri, result));
                }
            };
            verify_step(policy, req, ri, token, now, None)
        }
        Identity::Claims(claims) => {
            let verified = trusted(policy, &requirement.providers, claims);
            let result = after_verify(policy, req, route, None, None, verified).map(|(a, _)| a);
            Step::Done(routed(policy, req, ri, result))
        }
    }
}

/// Goes on from where `pending` stopped, once its need is met: keys refetched
/// (`answer` None: the key cell has them now, or not), or the token introspected.
pub fn resume<'r>(
    policy: &'r Snapshot,
    req: &Request<'r>,
    pending: Pending<'r>,
    answer: Option<crate::introspection::Answer>,
) -> Step<'r> {
    let Pending {
        route, token, now, ..
    } = pending;
    verify_step(policy, req, route, token, now, answer.as_ref())
}

/// The store answered a `Spend`: `Ok(true)` fresh, `Ok(false)` spent at another
/// replica (a replay), `Err` unanswered (down, slow, past the deadline): then
/// `dpop.on_store_error` decides, refuse or this replica's spend alone (counted).
pub fn spent(
    policy: &Snapshot,
    req: &Request,
    pending: Pending,
    fresh: Result<bool, ()>,
) -> Decision {
    let Pending {
        then,
        fallback,
        route,
        ..
    } = pending;
    let Some(then) = then else {
        return fallback;
    };
    let then = *then;
    match fresh {
        Ok(true) => then,
        Ok(false) => {
            let d = Deny::new(
                Reason::InvalidDpopProof,
                DenyKind::InvalidDpopProof,
                "the DPoP proof was already used",
            );
            routed(policy, req, route, Err(d))
        }
        Err(()) => match policy.store.as_ref().map(|s| s.on_dpop_error) {
            Some(OnStoreError::Local) => {
                crate::telemetry::store_fallback("dpop");
                then
            }
            _ => fallback,
        },
    }
}

fn verify_step<'r>(
    policy: &'r Snapshot,
    req: &Request<'r>,
    ri: usize,
    token: Token<'r>,
    now: u64,
    given: Option<&crate::introspection::Answer>,
) -> Step<'r> {
    let route = &policy.routes[ri];
    let Access::Require(requirement) = &route.access else {
        unreachable!("verification is only reached on routes that require a token")
    };
    match verify::verify(token.value, policy, &requirement.providers, now, given) {
        Ok(verified) => {
            let provider = verified.provider;
            match after_verify(policy, req, route, Some(token), Some(now), Ok(verified)) {
                // Spent here; the fleet's store must spend it too (an I/O step).
                Ok((allow, Some(proof))) if policy.stores.shared.is_some() => {
                    let then = routed(policy, req, ri, Ok(allow));
                    let mut d = Deny::new(
                        Reason::DpopStoreUnavailable,
                        DenyKind::Unavailable,
                        "the DPoP proof could not be checked against the fleet's store",
                    );
                    d.provider = Some(policy.providers[provider].name.clone());
                    let fallback = routed(policy, req, ri, Err(d));
                    Step::Need(Pending {
                        need: Need::Spend { proof },
                        route: ri,
                        token,
                        now,
                        fallback,
                        then: Some(Box::new(then)),
                    })
                }
                result => Step::Done(routed(policy, req, ri, result.map(|(allow, _)| allow))),
            }
        }
        Err(failed) => {
            let need = match (failed.error, failed.provider, &failed.kid) {
                (VerifyError::UnknownKey, Some(provider), Some(kid)) => Some(Need::Keys {
                    provider,
                    kid: kid.clone(),
                }),
                (VerifyError::IntrospectionPending, Some(provider), _) => {
                    Some(Need::Introspection { provider })
                }
                _ => None,
            };
            let kind = match failed.error {
                VerifyError::KeysUnavailable | VerifyError::IntrospectionPending => {
                    DenyKind::Unavailable
                }
                _ => DenyKind::InvalidToken,
            };
            let mut d = Deny::new(failed.error.reason(), kind, describe(failed.error));
            d.provider = failed.provider.map(|i| policy.providers[i].name.clone());
            d.kid = failed.kid;
            // An alternative that needs no token may still hold.
            let result = after_verify(policy, req, route, None, None, Err(d)).map(|(a, _)| a);
            let fallback = routed(policy, req, ri, result);
            match need {
                Some(need) => Step::Need(Pending {
                    need,
                    route: ri,
                    token,
                    now,
                    fallback,
                    then: None,
                }),
                None => Step::Done(fallback),
            }
        }
    }
}

/// A route's answer, as the decision: a denial names its route and challenge.
// A denial is an answer, not an exception: it moves by value rather than through a Box.
#[allow(clippy::result_large_err)]
fn routed(policy: &Snapshot, req: &Request, ri: usize, result: Result<Allow, Deny>) -> Decision {
    let route = &policy.routes[ri];
    let decision = match result {
        Ok(allow) => Decision::Allow(allow),
        Err(mut deny) => {
            deny.route = Some(route.name.clone());
            if wants_dpop_challenge(req, route, &deny) {
                deny.dpop_algs = Some(policy.dpop.algs());
            }
            deny.resource_metadata = policy.resource_metadata_url_of(ri).map(str::to_owned);
            Decision::Deny(deny)
        }
    };
    dry_run(policy, Some(route), decision)
}

/// The answer to a CheckRequest that could not be decoded (a header value that
/// is not UTF-8, a truncated field): a 400 like any unreadable request.
pub fn undecodable(policy: &Snapshot, e: &prost::DecodeError) -> Decision {
    let deny = Deny::new(
        Reason::MalformedRequest,
        DenyKind::BadRequest,
        format!("CheckRequest could not be decoded: {e}"),
    );
    dry_run(policy, None, Decision::Deny(deny))
}

/// A request Valet would not read to the end (too large, incomplete): denied
/// like an undecodable one, dry-run included.
pub fn unread(policy: &Snapshot, deny: Deny) -> Decision {
    dry_run(policy, None, Decision::Deny(deny))
}

/// A header whose name is an identity header's with `_` for some `-`.
fn identity_twin<'a>(policy: &Snapshot, req: &Request<'a>) -> Option<&'a str> {
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

/// After verification (or its failure, or no token read): revocation and
/// binding of the one token, then each alternative of the route's requirement
/// in turn; the first that holds allows.
#[allow(clippy::result_large_err)]
fn after_verify(
    policy: &Snapshot,
    req: &Request,
    route: &Route,
    token: Option<Token>,
    token_now: Option<u64>,
    verified: Result<Verified, Deny>,
) -> Result<(Allow, Option<ProofId>), Deny> {
    let Access::Require(requirement) = &route.access else {
        unreachable!("verification is only reached on routes that require a token")
    };
    let mut proof = None;
    let verified = verified.and_then(|v| {
        token_checks(policy, req, requirement, &token, token_now, v).map(|(v, spent)| {
            proof = spent;
            v
        })
    });
    let alternatives = requirement.alternatives();
    // Grown only on failure: an allow allocates nothing here.
    let mut failures: Vec<Failed> = Vec::new();
    for (k, alt) in alternatives.iter().enumerate() {
        match alternative(policy, req, alt, !requirement.any_of.is_empty(), &verified) {
            Ok(()) if alt.needs_token => {
                let Ok(v) = verified else {
                    unreachable!("a token alternative holds only with a verified token")
                };
                let mut a = allow(policy, route, req, token, v);
                a.alternative = (!requirement.any_of.is_empty()).then_some(k);
                return Ok((a, proof));
            }
            Ok(()) => return Ok((by_principal(policy, route, requirement, k), None)),
            Err(failed) => failures.push(failed),
        }
    }
    // All failed. The most useful answer: that of the first token alternative
    // for the token's own provider, else of the first token alternative (a 401
    // challenge when no token was sent), else of the first alternative.
    let token_alt = |k: &usize| alternatives[*k].needs_token;
    let chosen = (0..alternatives.len())
        .filter(token_alt)
        .find(|k| !matches!(failures[*k], Failed::OtherProvider(_)))
        .or_else(|| (0..alternatives.len()).find(token_alt))
        .unwrap_or(0);
    let summary: Vec<(Reason, std::borrow::Cow<'static, str>)> = if requirement.any_of.is_empty() {
        Vec::new()
    } else {
        failures
            .iter()
            .map(|f| match (f, &verified) {
                (Failed::Deny(d) | Failed::OtherProvider(d), _) | (Failed::Token, Err(d)) => {
                    (d.reason, d.description.clone())
                }
                (Failed::Token, Ok(_)) => {
                    unreachable!("a verified token fails no alternative by itself")
                }
            })
            .collect()
    };
    let mut deny = match (failures.swap_remove(chosen), verified) {
        (Failed::Deny(d) | Failed::OtherProvider(d), _) | (Failed::Token, Err(d)) => d,
        (Failed::Token, Ok(_)) => unreachable!("a verified token fails no alternative by itself"),
    };
    deny.alternatives = summary;
    Err(deny)
}

/// What the token must pass whatever alternative holds: revocation, then the
/// proof of its binding (a DPoP proof's `jti` is spent once, here; the proof
/// is returned for the fleet's store to spend too).
#[allow(clippy::result_large_err)]
fn token_checks(
    policy: &Snapshot,
    req: &Request,
    requirement: &crate::policy::Requirement,
    token: &Option<Token>,
    token_now: Option<u64>,
    verified: Verified,
) -> Result<(Verified, Option<ProofId>), Deny> {
    // After verification, so a forged token cannot probe the list; before the
    // route's requirements, so a revoked token is 401 whatever the route wants.
    if let Some(revocation) = &policy.stores.revocation
        && let Some(rule) = revocation.current().revoked(&verified.claims)
    {
        let mut d = Deny::new(
            Reason::Revoked,
            DenyKind::InvalidToken,
            "the token has been revoked",
        );
        d.provider = Some(policy.providers[verified.provider].name.clone());
        d.kid = verified.kid;
        d.claims = Some(verified.claims);
        d.detail = Some(rule.label());
        return Err(d);
    }
    let mut proof = None;
    if let Some(token) = token
        && let Some(now) = token_now
    {
        match binding::check(
            req,
            token.value,
            token.scheme,
            &verified.claims,
            // With alternatives, each asks for its own binding (`satisfied`).
            if requirement.any_of.is_empty() {
                requirement.binding
            } else {
                None
            },
            &policy.dpop,
            &policy.stores.replay,
            now,
        ) {
            Ok(spent) => proof = spent,
            Err(e) => return Err(binding_deny(policy, e, &verified)),
        }
    }
    Ok((verified, proof))
}

fn binding_deny(policy: &Snapshot, e: BindingError, verified: &Verified) -> Deny {
    let kind = match e {
        BindingError::InvalidProof(_) => DenyKind::InvalidDpopProof,
        BindingError::ReplayFull(_) => DenyKind::Unavailable,
        _ => DenyKind::InvalidToken,
    };
    let mut d = Deny::new(e.reason(), kind, e.description());
    d.provider = Some(policy.providers[verified.provider].name.clone());
    d.kid = verified.kid.clone();
    d.claims = Some(verified.claims.clone());
    d
}

/// Why an alternative failed.
enum Failed {
    /// The token's own failure (missing, invalid, revoked): the denial is
    /// `verified`'s, moved rather than copied when it is the answer.
    Token,
    /// The token is good, but of a provider this alternative does not take.
    OtherProvider(Deny),
    Deny(Deny),
}

/// One alternative over the one token.
// A denial is an answer, not an exception: it moves by value rather than through a Box.
#[allow(clippy::result_large_err)]
fn alternative(
    policy: &Snapshot,
    req: &Request,
    alt: &crate::policy::Requirement,
    one_of_many: bool,
    verified: &Result<Verified, Deny>,
) -> Result<(), Failed> {
    if alt.needs_token {
        let Ok(v) = verified else {
            return Err(Failed::Token);
        };
        let with_token = |mut d: Deny| {
            d.provider = Some(policy.providers[v.provider].name.clone());
            d.kid = v.kid.clone();
            d.claims = Some(v.claims.clone());
            Err(Failed::Deny(d))
        };
        if !alt.providers.is_empty() && !alt.providers.contains(&v.provider) {
            let mut d = Deny::new(
                Reason::IssuerNotAllowed,
                DenyKind::InvalidToken,
                "the token is of a provider this alternative does not take",
            );
            d.provider = Some(policy.providers[v.provider].name.clone());
            return Err(Failed::OtherProvider(d));
        }
        if one_of_many && let Err(e) = binding::satisfied(alt.binding, &v.claims) {
            return with_token(binding_deny(policy, e, v));
        }
        if let Err(e) = alt.check(&v.claims) {
            return with_token(requirement_deny(e));
        }
    }
    if !alt.principal_allowed(req.principal) {
        return Err(Failed::Deny(Deny::new(
            Reason::PrincipalNotAllowed,
            DenyKind::Forbidden,
            if req.principal.is_empty() {
                "this route needs a workload identity (a client certificate) and none was presented"
            } else {
                "the caller's workload identity is not allowed on this route"
            },
        )));
    }
    Ok(())
}

fn requirement_deny(e: RequireError) -> Deny {
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
    d
}

/// Allowed on the caller's workload identity: like an anonymous route, no
/// identity from a token, every identity header removed.
fn by_principal(
    policy: &Snapshot,
    route: &Route,
    requirement: &crate::policy::Requirement,
    k: usize,
) -> Allow {
    Allow {
        route: Some(route.name.clone()),
        reason: Some(Reason::Principal),
        identity_headers: policy.identity_headers.clone(),
        alternative: (!requirement.any_of.is_empty()).then_some(k),
        ..Default::default()
    }
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
    policy: &Snapshot,
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
fn dry_run(policy: &Snapshot, route: Option<&Route>, decision: Decision) -> Decision {
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
        VerifyError::UnknownApiKey => "the API key is not known",
    }
}

fn no_route(policy: &Snapshot) -> Decision {
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

fn anonymous(policy: &Snapshot, route: &Route) -> Allow {
    Allow {
        route: Some(route.name.clone()),
        reason: Some(Reason::Anonymous),
        identity_headers: policy.identity_headers.clone(),
        ..Default::default()
    }
}

fn allow(
    policy: &Snapshot,
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
        alternative: None,
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
    use super::{Identity, Need, Step, resume, start, view};
    use crate::decision::{Decision, Reason};

    const POLICY: &str = "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\n    algorithms: [HS256]\nroutes:\n  - name: orders\n    match: { path_prefix: /orders }\n    require: { scopes: [orders:read] }\n";
    const SECRET: &[u8] = b"secret-secret-secret-secret-secret";

    fn token(kid: &str, now: u64) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(kid.into());
        let claims = serde_json::json!({
            "iss": "https://idp.test/", "aud": "orders-api", "sub": "alice",
            "scope": "orders:read", "exp": now + 600,
        });
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    fn keys(kid: &str) -> crate::jwks::KeySet {
        use base64::Engine;
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
        let doc = format!(r#"{{"keys":[{{"kty":"oct","kid":"{kid}","alg":"HS256","k":"{k}"}}]}}"#);
        crate::jwks::KeySet::parse(doc.as_bytes()).unwrap()
    }

    fn get(path: &str, token: &str) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
        crate::explain::RequestSpec {
            method: "GET".into(),
            path: path.into(),
            host: "api".into(),
            headers: [("authorization".into(), format!("Bearer {token}"))].into(),
            ..Default::default()
        }
        .to_check()
    }

    /// Tests move time rather than sleep: under tokio's paused clock, the
    /// driver's `now` (from `Clock::tokio`) passes a token's `exp`, cached or not.
    #[tokio::test(start_paused = true)]
    async fn moved_time_expires_a_token_through_the_driver() {
        let clock = crate::clock::Clock::tokio();
        let snap = crate::load::parse(POLICY, std::path::Path::new("/x/valet.yaml"))
            .unwrap()
            .into_snapshot();
        snap.stores.keys[0].publish(keys("k"), clock.unix());
        let req = get("/orders/1", &token("k", clock.unix()));
        let decide = || {
            crate::driver::decide(
                &snap,
                &req,
                clock.unix(),
                None,
                std::time::Instant::now(),
                || Some(()),
                None,
            )
        };
        assert_eq!(decide().await.reason(), Reason::Verified);
        assert_eq!(decide().await.reason(), Reason::Verified, "from the cache");
        // Past `exp` and the default 60 s of clock skew.
        tokio::time::advance(std::time::Duration::from_secs(661)).await;
        assert_eq!(decide().await.reason(), Reason::Expired);
    }

    /// An unknown kid stops the core at verification with what it needs; once the
    /// keys are in, it goes on from there, route and token kept.
    #[test]
    fn an_unknown_kid_is_a_need_and_resuming_finishes_the_check() {
        let snap = crate::load::parse(POLICY, std::path::Path::new("/x/valet.yaml"))
            .unwrap()
            .into_snapshot();
        snap.stores.keys[0].publish(keys("old"), 1);
        let now = 1_700_000_000;
        let req = crate::explain::RequestSpec {
            method: "GET".into(),
            path: "/orders/1".into(),
            host: "api".into(),
            headers: [(
                "authorization".into(),
                format!("Bearer {}", token("new", now)),
            )]
            .into(),
            ..Default::default()
        }
        .to_check();
        let v = view(&snap, &req).unwrap();
        let Step::Need(pending) = start(&snap, &v, Identity::Token { now }) else {
            panic!("an unknown kid needs keys");
        };
        assert_eq!(
            pending.need,
            Need::Keys {
                provider: 0,
                kid: "new".into()
            }
        );
        assert_eq!(pending.fallback.reason(), Reason::UnknownKey);
        snap.stores.keys[0].publish(keys("new"), 2);
        match resume(&snap, &v, pending, None) {
            Step::Done(Decision::Allow(a)) => {
                assert_eq!(a.reason, Some(Reason::Verified));
                assert_eq!(a.route.as_deref(), Some("orders"));
            }
            Step::Done(d) => panic!("{:?}", d.reason()),
            Step::Need(p) => panic!("still needs {:?}", p.need),
        }
        // The I/O-free `check` answers a need with its fallback.
        let other = token("newer", now);
        let req = crate::explain::RequestSpec {
            method: "GET".into(),
            path: "/orders/1".into(),
            headers: [("authorization".into(), format!("Bearer {other}"))].into(),
            ..Default::default()
        }
        .to_check();
        assert_eq!(super::check(&snap, &req, now).reason(), Reason::UnknownKey);
    }

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
