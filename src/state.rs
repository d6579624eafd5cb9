//! The one place that holds swapped state: the current snapshot (compiled policy
//! and its stores) and the status of the last reload. (Each provider's key set
//! lives in its own cell, see `jwks::KeyCell`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

use crate::clock::Clock;
use crate::stores::Snapshot;
use crate::telemetry::Telemetry;

pub struct State {
    snapshot: ArcSwap<Snapshot>,
    reload: ArcSwap<ReloadStatus>,
    /// Set on SIGTERM: readiness goes false while Checks are still answered.
    draining: AtomicBool,
    /// Checks in flight, bounded: past the bound a Check is answered `overloaded`.
    in_flight: Arc<Semaphore>,
    /// The time every Check, cache and status of this instance reads.
    clock: Clock,
    /// This Valet's metrics.
    telemetry: Telemetry,
}

/// What the admin port reports about the policy in force.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub config: String,
    /// 1 for the policy loaded at start, +1 per successful reload.
    pub generation: u64,
    /// Unix seconds the policy in force was loaded.
    pub loaded_at: u64,
    pub last_attempt_at: u64,
    /// Every problem of the last failed reload, as file:line:column lines; None
    /// once a reload succeeds again.
    pub last_error: Option<String>,
}

impl State {
    pub fn new(snapshot: Snapshot, status: ReloadStatus) -> Self {
        State {
            snapshot: ArcSwap::from_pointee(snapshot),
            reload: ArcSwap::from_pointee(status),
            draining: AtomicBool::new(false),
            in_flight: Arc::new(Semaphore::new(DEFAULT_MAX_IN_FLIGHT)),
            clock: Clock::system(),
            telemetry: Telemetry::new(),
        }
    }

    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = telemetry;
        self
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// One snapshot (policy and stores) per Check: load once at the top, pass
    /// the reference down.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn store_snapshot(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.in_flight = Arc::new(Semaphore::new(max.max(1)));
        self
    }

    /// A permit for one Check, or None when too many are in flight.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().ok()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ready: not draining, and every provider a route uses has keys.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.snapshot().providers_without_keys().is_empty()
    }

    pub fn reload_status(&self) -> Arc<ReloadStatus> {
        self.reload.load_full()
    }

    pub fn store_reload_status(&self, status: ReloadStatus) {
        self.reload.store(Arc::new(status));
    }
}
