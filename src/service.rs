//! The tonic service Envoy calls. Every answer is `Ok(CheckResponse)`: a gRPC error
//! could meet `failure_mode_allow: true` and fail open.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};

use crate::decision::{Decision, Deny, DenyKind, Reason};
use crate::policy::Policy;
use crate::provider::Provider;
use crate::state::State;
use crate::{check, response, telemetry};

pub struct CheckService {
    state: Arc<State>,
}

impl CheckService {
    pub fn new(state: Arc<State>) -> Self {
        CheckService { state }
    }
}

#[tonic::async_trait]
impl Authorization for CheckService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let (decision, policy) = decide(&self.state, request.get_ref()).await;
        Ok(Response::new(response::to_check_response(
            decision,
            &policy.realm,
        )))
    }
}

/// One Check, for either listener: decide against one policy snapshot, record it.
pub async fn decide(state: &State, req: &CheckRequest) -> (Decision, Arc<Policy>) {
    let started = Instant::now();
    let policy = state.policy();
    // Shed load with a clear answer rather than queue past Envoy's timeout.
    let Some(_permit) = state.admit() else {
        let deny = Deny::new(
            Reason::Overloaded,
            DenyKind::Unavailable,
            "too many Checks in flight",
        );
        let decision = Decision::Deny(deny);
        telemetry::check(&decision, started.elapsed());
        return (decision, policy);
    };
    let mut decision = check::check(&policy, req, unix_now());
    // A kid we do not know may be a rotation we have not seen yet: the one
    // await on this path, bounded and rate-limited by the provider's key cell.
    if let Some((provider, kid)) = unknown_kid(&decision, &policy)
        && provider.keys.refetch_for(kid).await
    {
        let again = check::check(&policy, req, unix_now());
        if again.reason() == Reason::UnknownKey {
            provider.keys.remember_unknown(kid);
        }
        decision = again;
    }
    // An opaque token not in the introspection cache: ask the IdP (one request
    // for all Checks of that token, bounded by its timeout and circuit), then
    // decide again from the cache.
    if decision.reason() == Reason::IntrospectionUnavailable
        && let Some((introspector, route)) = introspection_for(&decision, &policy)
        && let Some(token) = check::token_of(&policy, req, route)
    {
        decision = match introspector.introspect(&token, unix_now()).await {
            Ok(_) => check::check(&policy, req, unix_now()),
            Err(e) => match decision {
                Decision::Deny(mut d) => {
                    d.description = e.to_string().into();
                    d.detail = Some(e.label());
                    Decision::Deny(d)
                }
                other => other,
            },
        };
    }
    telemetry::check(&decision, started.elapsed());
    (decision, policy)
}

fn introspection_for<'a>(
    decision: &'a Decision,
    policy: &'a Policy,
) -> Option<(&'a crate::introspection::Introspector, &'a str)> {
    let provider = match decision {
        Decision::Deny(d) => d.provider.as_deref(),
        Decision::Allow(a) => a.provider.as_deref(),
    }?;
    let introspector = policy.provider(provider)?.introspection.as_deref()?;
    Some((introspector, decision.route()?))
}

fn unknown_kid<'a>(decision: &'a Decision, policy: &'a Policy) -> Option<(&'a Provider, &'a str)> {
    let Decision::Deny(d) = decision else {
        return None;
    };
    if d.reason != Reason::UnknownKey {
        return None;
    }
    let provider = policy.provider(d.provider.as_deref()?)?;
    Some((provider, d.kid.as_deref()?))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
