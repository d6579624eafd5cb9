//! What a Valet reports about each decision besides metrics: the audit trail,
//! the last denials (`/denials`), the Check's span and the misuse signals.
//! Made at start (the ring's size and the tracer are read then); the audit
//! and misuse settings of the policy in force are read per Check. With all of
//! them off, a Check costs one branch here.

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;

use crate::audit::{Facts, RecentDenials, Trail};
use crate::decision::Decision;
use crate::policy::Policy;

pub struct Observer {
    trail: Trail,
    denials: RecentDenials,
}

impl Observer {
    pub fn new(policy: &Policy) -> Observer {
        if policy.audit.on() {
            crate::telemetry::observe_started();
        }
        Observer {
            trail: Trail::new(),
            denials: RecentDenials::new(policy.audit.recent_denials),
        }
    }

    /// Nothing observed: no trail, no ring, no span.
    pub fn off() -> Observer {
        Observer {
            trail: Trail::new(),
            denials: RecentDenials::new(0),
        }
    }

    /// One Check decided under `policy`.
    pub fn decided(&self, policy: &Policy, decision: &Decision, req: Option<&CheckRequest>) {
        let audit = &policy.audit;
        let wanted = if decision.is_allow() {
            audit.allow && audit.sample > 0.0
        } else {
            (audit.deny && audit.sample > 0.0) || self.denials.capacity() > 0
        };
        if !wanted {
            return;
        }
        let facts = Facts::of(decision, req);
        self.trail.record(audit, &facts);
        self.denials.push(&facts);
    }

    pub fn denials(&self) -> &RecentDenials {
        &self.denials
    }
}
