//! The tonic service Envoy calls. Every answer is `Ok(CheckResponse)`: a gRPC error
//! could meet `failure_mode_allow: true` and fail open.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response};

use crate::decision::Decision;
use crate::observe::Observer;
use crate::response::Answer;
use crate::state::State;
use crate::stores::Snapshot;
use crate::{check, driver};

pub mod message;
mod server;
pub use server::{CheckServer, ConnBudget, Incoming};

pub struct CheckService {
    state: Arc<State>,
    observer: Arc<Observer>,
}

impl CheckService {
    pub fn new(state: Arc<State>, observer: Arc<Observer>) -> Self {
        CheckService { state, observer }
    }

    /// The answer to one Check, a denial included; a request that could not be
    /// decoded is a 400 `malformed_request` like any unreadable request, one
    /// over the size cap a 413 `request_too_large`.
    pub async fn answer(&self, request: Request<Incoming>) -> Response<Answer> {
        let budget = grpc_timeout(request.metadata());
        // Envoy's gRPC client sends its ext_authz span in the call's metadata
        // (read only if something reports the Check).
        let caller = Some(request.metadata());
        let (decision, policy) = match request.get_ref() {
            Incoming::Check(check) => {
                decide_in(&self.state, &self.observer, check, budget, caller).await
            }
            Incoming::Undecodable(e) => {
                let policy = self.state.snapshot();
                let decision = check::undecodable(&policy, e);
                self.state.telemetry().check(&decision, Duration::ZERO);
                self.observer
                    .decided(&policy, &decision, None, caller, None);
                (decision, policy)
            }
            Incoming::Unread(unread) => {
                let policy = self.state.snapshot();
                let decision = match unread.deny() {
                    (deny, true) => check::unread(&policy, deny),
                    (deny, false) => Decision::Deny(deny),
                };
                self.state.telemetry().check(&decision, Duration::ZERO);
                self.observer
                    .decided(&policy, &decision, None, caller, None);
                (decision, policy)
            }
        };
        Response::new(Answer::of(decision, &policy.realm))
    }
}

/// One Check, for either listener: decide against one snapshot (through the
/// driver), record it. `budget` is how long the caller waits (Envoy's
/// `grpc-timeout`).
pub async fn decide(
    state: &State,
    observer: &Observer,
    req: &CheckRequest,
    budget: Option<Duration>,
) -> (Decision, Arc<Snapshot>) {
    decide_in(state, observer, req, budget, None).await
}

/// [`decide`] within the span `caller` names (the gRPC call's metadata:
/// Envoy's ext_authz span), else the one the request's headers name.
pub async fn decide_in(
    state: &State,
    observer: &Observer,
    req: &CheckRequest,
    budget: Option<Duration>,
    caller: Option<&MetadataMap>,
) -> (Decision, Arc<Snapshot>) {
    let started = Instant::now();
    let snap = state.snapshot();
    let span = observer.span(req, caller);
    let decision = driver::decide(
        &snap,
        req,
        state.clock().unix(),
        budget,
        started,
        || state.admit(),
        span.as_ref(),
    )
    .await;
    state.telemetry().check(&decision, started.elapsed());
    observer.decided(&snap, &decision, Some(req), caller, span);
    (decision, snap)
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
