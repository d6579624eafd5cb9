//! The tonic service Envoy calls. Every answer is `Ok(CheckResponse)`: a gRPC error
//! could meet `failure_mode_allow: true` and fail open.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};

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
        let started = Instant::now();
        let policy = self.state.policy();
        let decision = check::check(&policy, request.get_ref(), unix_now());
        telemetry::check(&decision, started.elapsed());
        Ok(Response::new(response::to_check_response(
            decision,
            &policy.realm,
        )))
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
