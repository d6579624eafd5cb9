//! What a route asks of a token's binding, and the DPoP proof settings: data
//! only; checking a binding is the core's (`check::binding`).

use std::time::Duration;

use jsonwebtoken::Algorithm;

use crate::provider::{algorithm_name, default_algorithms, is_hmac};

/// What a route asks of the token's binding (`require.binding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// Bound to a certificate or a DPoP key, either.
    Any,
    Mtls,
    Dpop,
}

/// DPoP settings (`dpop:` in the policy). The replay cache of accepted proofs
/// lives in the stores (`stores::replay`), sized by `replay_window`/`replay_entries`.
pub struct Dpop {
    /// How old a proof's `iat` may be.
    pub max_age: Duration,
    /// How far in the future a proof's `iat` may be (clocks differ).
    pub skew: Duration,
    pub algorithms: Vec<Algorithm>,
    /// Accepted proofs remembered at most (`dpop.replay_cache_entries`).
    pub replay_entries: u64,
}

pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);
pub const DEFAULT_SKEW: Duration = Duration::from_secs(5);
pub const DEFAULT_REPLAY_ENTRIES: u64 = 100_000;

impl Dpop {
    pub fn new(
        max_age: Duration,
        skew: Duration,
        algorithms: Vec<Algorithm>,
        entries: u64,
    ) -> Self {
        Dpop {
            max_age,
            skew,
            algorithms,
            replay_entries: entries,
        }
    }

    /// How long an accepted proof is remembered: one accepted now with `iat` up
    /// to `skew` ahead stays acceptable for max_age + 2 × skew; +1s: `now` is
    /// whole seconds.
    pub fn replay_window(&self) -> Duration {
        self.max_age + self.skew + self.skew + Duration::from_secs(1)
    }

    /// The algorithms, space-separated, for the `algs` of a DPoP challenge.
    pub fn algs(&self) -> String {
        self.algorithms
            .iter()
            .map(|a| algorithm_name(*a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Default for Dpop {
    fn default() -> Self {
        let algs = default_algorithms()
            .into_iter()
            .filter(|a| !is_hmac(*a))
            .collect();
        Dpop::new(DEFAULT_MAX_AGE, DEFAULT_SKEW, algs, DEFAULT_REPLAY_ENTRIES)
    }
}
