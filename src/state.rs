//! The one place that holds swapped state: the current policy snapshot.
//! (Each provider's key set lives in its own cell, see `jwks::KeyCell`.)

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::policy::Policy;

pub struct State {
    policy: ArcSwap<Policy>,
}

impl State {
    pub fn new(policy: Policy) -> Self {
        State {
            policy: ArcSwap::from_pointee(policy),
        }
    }

    /// One snapshot per Check: load once at the top, pass the reference down.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    pub fn store_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }
}
