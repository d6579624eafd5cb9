//! The tonic service Envoy calls. Every answer is `Ok(CheckResponse)`: a gRPC error
//! could meet `failure_mode_allow: true` and fail open.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use tonic::{Request, Response};

use crate::check;
use crate::decision::{Decision, Deny, DenyKind, Reason};
use crate::introspection::IntrospectError;
use crate::policy::Policy;
use crate::provider::Provider;
use crate::response::Answer;
use crate::state::State;

pub mod message;
mod server;
pub use server::{CheckServer, ConnBudget, Incoming};

pub struct CheckService {
    state: Arc<State>,
}

impl CheckService {
    pub fn new(state: Arc<State>) -> Self {
        CheckService { state }
    }

    /// The answer to one Check, a denial included; a request that could not be
    /// decoded is a 400 `malformed_request` like any unreadable request, one
    /// over the size cap a 413 `request_too_large`.
    pub async fn answer(&self, request: Request<Incoming>) -> Response<Answer> {
        let budget = grpc_timeout(request.metadata());
        let (decision, policy) = match request.get_ref() {
            Incoming::Check(check) => decide(&self.state, check, budget).await,
            Incoming::Undecodable(e) => {
                let policy = self.state.policy();
                let decision = check::undecodable(&policy, e);
                self.state.telemetry().check(&decision, Duration::ZERO);
                (decision, policy)
            }
            Incoming::Unread(unread) => {
                let policy = self.state.policy();
                let decision = match unread.deny() {
                    (deny, true) => check::unread(&policy, deny),
                    (deny, false) => Decision::Deny(deny),
                };
                self.state.telemetry().check(&decision, Duration::ZERO);
                (decision, policy)
            }
        };
        Response::new(Answer::of(decision, &policy.realm))
    }
}

/// One Check, for either listener: decide against one policy snapshot, record it.
/// `budget` is how long the caller waits (Envoy's `grpc-timeout`): an awaited
/// introspection gives up in time for Valet, not Envoy, to answer.
pub async fn decide(
    state: &State,
    req: &CheckRequest,
    budget: Option<Duration>,
) -> (Decision, Arc<Policy>) {
    let started = Instant::now();
    let policy = state.policy();
    let Some(mut permit) = state.admit() else {
        return overloaded(state, policy, started);
    };
    let mut decision = check::check(&policy, req, unix_now());
    // A kid we do not know may be a rotation we have not seen yet: the one
    // await on this path, bounded and rate-limited by the provider's key cell.
    // Waiting costs no CPU, so it holds no admission slot (the key cell bounds
    // how many wait); deciding again takes one.
    if let Some((provider, kid)) = unknown_kid(&decision, &policy) {
        drop(permit);
        if !provider.keys.refetch_for(kid).await {
            state.telemetry().check(&decision, started.elapsed());
            return (decision, policy);
        }
        let Some(again) = state.admit() else {
            return overloaded(state, policy, started);
        };
        permit = again;
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
        let client = crate::introspection::Client::of(req);
        let asked = introspector.introspect(&token, unix_now(), client);
        // Keep a margin to encode the answer before the caller's deadline.
        let left = budget.map(|b| b.saturating_sub(started.elapsed()).mul_f64(0.9));
        let result = match left {
            Some(left) => tokio::time::timeout(left, asked)
                .await
                .unwrap_or(Err(IntrospectError::Deadline)),
            None => asked.await,
        };
        decision = match result {
            Ok(answer) => check::check_introspected(&policy, req, unix_now(), answer),
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
    drop(permit);
    state.telemetry().check(&decision, started.elapsed());
    (decision, policy)
}

/// Shed load with a clear answer rather than queue past Envoy's timeout.
fn overloaded(state: &State, policy: Arc<Policy>, started: Instant) -> (Decision, Arc<Policy>) {
    let deny = Deny::new(
        Reason::Overloaded,
        DenyKind::Unavailable,
        "too many Checks in flight",
    );
    let decision = Decision::Deny(deny);
    state.telemetry().check(&decision, started.elapsed());
    (decision, policy)
}

fn introspection_for<'a>(
    decision: &'a Decision,
    policy: &'a Policy,
) -> Option<(&'a Arc<crate::introspection::Introspector>, &'a str)> {
    let provider = match decision {
        Decision::Deny(d) => d.provider.as_deref(),
        Decision::Allow(a) => a.provider.as_deref(),
    }?;
    let introspector = policy.provider(provider)?.introspection.as_ref()?;
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

/// gRPC's `grpc-timeout` header: an integer and a unit (H, M, S, m, u, n).
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        for (text, want) in [
            ("250m", Duration::from_millis(250)),
            ("2S", Duration::from_secs(2)),
            ("100000u", Duration::from_millis(100)),
        ] {
            m.insert("grpc-timeout", text.parse().unwrap());
            assert_eq!(grpc_timeout(&m), Some(want), "{text}");
        }
        m.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}
