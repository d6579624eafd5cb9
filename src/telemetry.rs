//! Logs and metrics for each event, emitted together from one function each.
//! Never a token, never a claim value: route, reason, provider and kid only.
//!
//! Each Valet has its own [`Telemetry`]: its own Prometheus recorder, so that
//! several Valets in one process (the test suite) keep separate metrics. The hot
//! path (a Check's counter and histogram) goes to handles resolved once and
//! takes no lock. Every other event is emitted through the `metrics` macros
//! while the Valet's futures are polled under [`Telemetry::scope`], which makes
//! its recorder the thread's; tasks a Valet starts inherit it via [`spawn`].

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::{Counter, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::decision::{CheckCounters, Decision, Reason};

pub const CHECK_TOTAL: &str = "valet_check_total";
pub const CHECK_DURATION: &str = "valet_check_duration_seconds";
pub const BUILD_INFO: &str = "valet_build_info";
pub const JWKS_REFRESH_TOTAL: &str = "valet_jwks_refresh_total";
pub const JWKS_KEYS: &str = "valet_jwks_keys";
pub const JWKS_LAST_SUCCESS: &str = "valet_jwks_last_success_timestamp_seconds";
pub const JWKS_AGE: &str = "valet_jwks_age_seconds";
pub const JWKS_KEYSET_CHANGES: &str = "valet_jwks_keyset_changes_total";
pub const POLICY_RELOAD_TOTAL: &str = "valet_policy_reload_total";
pub const POLICY_LAST_SUCCESS: &str = "valet_policy_last_reload_success_timestamp_seconds";
pub const POLICY_GENERATION: &str = "valet_policy_generation";
pub const INTROSPECTION_REQUESTS: &str = "valet_introspection_requests_total";
pub const INTROSPECTION_DURATION: &str = "valet_introspection_duration_seconds";
pub const INTROSPECTION_CACHE: &str = "valet_introspection_cache_total";
pub const INTROSPECTION_CIRCUIT_OPEN: &str = "valet_introspection_circuit_open";
pub const INTROSPECTION_SHED: &str = "valet_introspection_shed_total";
pub const INTROSPECTION_BACKOFF: &str = "valet_introspection_backoff_total";
pub const DPOP_REPLAY_EVICTIONS: &str = "valet_dpop_replay_evictions_total";
pub const DPOP_REPLAY_FULL: &str = "valet_dpop_replay_full_total";
pub const DPOP_REPLAY_ENTRIES: &str = "valet_dpop_replay_entries";
pub const JWKS_UNKNOWN_KID_WAITERS_FULL: &str = "valet_jwks_unknown_kid_waiters_full_total";
pub const REVOCATION_ENTRIES: &str = "valet_revocation_entries";
pub const API_KEYS_ENTRIES: &str = "valet_api_keys_entries";
pub const API_KEYS_RELOAD_TOTAL: &str = "valet_api_keys_reload_total";
pub const API_KEYS_LAST_SUCCESSFUL: &str = "valet_api_keys_last_reload_successful";
pub const REVOCATION_RELOAD_TOTAL: &str = "valet_revocation_reload_total";
pub const REVOCATION_LAST_SUCCESSFUL: &str = "valet_revocation_last_reload_successful";
pub const REVOCATION_UNCONFIRMED_SECONDS: &str = "valet_revocation_unconfirmed_seconds";
pub const REVOCATION_STALE: &str = "valet_revocation_stale";
pub const STORE_UP: &str = "valet_store_up";
pub const STORE_ERRORS: &str = "valet_store_errors_total";
pub const STORE_DURATION: &str = "valet_store_duration_seconds";
pub const STORE_FALLBACK: &str = "valet_store_fallback_total";
pub const CONNECTIONS_OPEN: &str = "valet_connections_open";
pub const CONNECTIONS_REFUSED: &str = "valet_connections_refused_total";
pub const CONNECTIONS_CLOSED: &str = "valet_connections_closed_total";
pub const SIGNATURE_VERIFICATIONS: &str = "valet_signature_verifications_total";

/// From 10 µs (a cached Check) to 1 s (far past Envoy's budget).
const CHECK_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
];

/// From 250 µs (a local IdP) to 10 s (past any sane timeout).
const INTROSPECTION_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One Valet's metrics: a recorder of its own and the handles of the hot path.
#[derive(Clone)]
pub struct Telemetry(Arc<Inner>);

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    check_duration: metrics::Histogram,
    /// `valet_check_total` handles for Checks no route matched.
    no_route: CheckCounters,
    deny_log: DenyLog,
}

impl Telemetry {
    /// A recorder with every metric described and the counters that must exist
    /// from zero. Histograms buffer samples until rendered, so upkeep must run
    /// even when nobody scrapes: the caller spawns [`upkeep`].
    #[allow(clippy::new_without_default)]
    pub fn new() -> Telemetry {
        // Only empty bucket lists are refused, and these are constants.
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(CHECK_DURATION.into()), CHECK_BUCKETS)
            .expect("fixed buckets")
            .set_buckets_for_metric(
                Matcher::Full(INTROSPECTION_DURATION.into()),
                INTROSPECTION_BUCKETS,
            )
            .expect("fixed buckets")
            .set_buckets_for_metric(Matcher::Full(STORE_DURATION.into()), INTROSPECTION_BUCKETS)
            .expect("fixed buckets")
            .build_recorder();
        let handle = recorder.handle();
        let check_duration =
            recorder.register_histogram(&Key::from_static_name(CHECK_DURATION), &META);
        let telemetry = Telemetry(Arc::new(Inner {
            recorder,
            handle,
            check_duration,
            no_route: CheckCounters::default(),
            deny_log: DenyLog::default(),
        }));
        telemetry.with(|| {
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            // Counters exist from zero, so that the first failure is an increase alerts can see.
            for listener in ["grpc", "http", "admin"] {
                metrics::counter!(CONNECTIONS_REFUSED, "listener" => listener).increment(0);
            }
            for result in ["success", "error"] {
                metrics::counter!(POLICY_RELOAD_TOTAL, "result" => result).increment(0);
                metrics::counter!(REVOCATION_RELOAD_TOTAL, "result" => result).increment(0);
            }
            metrics::counter!(DPOP_REPLAY_FULL).increment(0);
            metrics::counter!(DPOP_REPLAY_EVICTIONS).increment(0);
        });
        telemetry
    }

    /// The Prometheus text of this Valet's metrics.
    pub fn handle(&self) -> &PrometheusHandle {
        &self.0.handle
    }

    /// Runs `f` with this Valet's recorder as the thread's.
    pub fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.0.recorder, f)
    }

    /// `future`, polled with this Valet's recorder as the thread's: the events
    /// it emits, and those of the tasks it [`spawn`]s, are this Valet's.
    pub fn scope<F: Future>(&self, future: F) -> Scoped<F> {
        Scoped {
            telemetry: self.clone(),
            future,
        }
    }

    /// The Valet whose future is being polled on this thread, if any.
    pub fn current() -> Option<Telemetry> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Makes this recorder the process's default too, for events emitted outside
    /// any scope (none are known); the first Valet of a process wins.
    pub fn install_global(&self) {
        let _ = metrics::set_global_recorder(Global(self.clone()));
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Telemetry>> = const { RefCell::new(None) };
}

pin_project_lite::pin_project! {
    /// A future polled under a [`Telemetry`]'s recorder.
    pub struct Scoped<F> {
        telemetry: Telemetry,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let telemetry: &Telemetry = this.telemetry;
        let future = this.future;
        let previous = CURRENT.with(|c| c.replace(Some(telemetry.clone())));
        let out = metrics::with_local_recorder(&telemetry.0.recorder, || future.poll(cx));
        CURRENT.with(|c| c.replace(previous));
        out
    }
}

/// `tokio::task::spawn_blocking`, keeping the caller's telemetry.
pub fn spawn_blocking<F, T>(f: F) -> tokio::task::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let telemetry = Telemetry::current();
    tokio::task::spawn_blocking(move || match telemetry {
        Some(t) => t.with(f),
        None => f(),
    })
}

/// hyper's executor for HTTP/2 streams: [`spawn`], so that each stream's task
/// (a Check) keeps its connection's telemetry.
#[derive(Clone, Copy, Default)]
pub struct Executor;

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        // Unboxed: one task per Check, and a few stream types.
        match Telemetry::current() {
            Some(t) => tokio::spawn(t.scope(future)),
            None => tokio::spawn(future),
        };
    }
}

/// `tokio::spawn`, keeping the spawning Valet's telemetry for the new task.
///
/// The future is boxed: tokio's task code (~1.7k lines of LLVM IR) is then compiled
/// once per output type rather than twice per call site, in the lib and in every
/// build that instantiates it. These tasks are background loops, connections and
/// introspection requests (an IdP round trip each), not Checks: the one allocation
/// is nothing beside them.
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let boxed: std::pin::Pin<Box<dyn Future<Output = F::Output> + Send>> =
        match Telemetry::current() {
            Some(t) => Box::pin(t.scope(future)),
            None => Box::pin(future),
        };
    tokio::spawn(boxed)
}

struct Global(Telemetry);

impl Recorder for Global {
    fn describe_counter(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.0.0.recorder.describe_counter(k, u, d)
    }
    fn describe_gauge(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.0.0.recorder.describe_gauge(k, u, d)
    }
    fn describe_histogram(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.0.0.recorder.describe_histogram(k, u, d)
    }
    fn register_counter(&self, k: &Key, m: &Metadata<'_>) -> Counter {
        self.0.0.recorder.register_counter(k, m)
    }
    fn register_gauge(&self, k: &Key, m: &Metadata<'_>) -> metrics::Gauge {
        self.0.0.recorder.register_gauge(k, m)
    }
    fn register_histogram(&self, k: &Key, m: &Metadata<'_>) -> metrics::Histogram {
        self.0.0.recorder.register_histogram(k, m)
    }
}

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// The `route` label when no route matched (route names cannot start with `_`).
pub const NO_ROUTE_LABEL: &str = "_none";

fn describe() {
    metrics::describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which Valet runs"
    );
    metrics::describe_counter!(
        JWKS_REFRESH_TOTAL,
        "Key set loads, by provider, result (success/not_modified/error) and trigger"
    );
    metrics::describe_gauge!(JWKS_KEYS, "Usable keys in the provider's current key set");
    metrics::describe_gauge!(
        JWKS_LAST_SUCCESS,
        metrics::Unit::Seconds,
        "Unix time the provider's key set was last loaded or confirmed"
    );
    metrics::describe_gauge!(
        JWKS_AGE,
        metrics::Unit::Seconds,
        "Seconds since the provider's key set was last loaded or confirmed"
    );
    metrics::describe_counter!(
        JWKS_KEYSET_CHANGES,
        "Times the set of kids of a provider changed (a rotation)"
    );
    metrics::describe_counter!(
        POLICY_RELOAD_TOTAL,
        "Policy reloads, by result (success/error)"
    );
    metrics::describe_gauge!(
        POLICY_LAST_SUCCESS,
        metrics::Unit::Seconds,
        "Unix time the policy in force was loaded"
    );
    metrics::describe_gauge!(
        POLICY_LAST_SUCCESSFUL,
        "1 if the last policy load succeeded, 0 while the file on disk is invalid"
    );
    metrics::describe_gauge!(
        POLICY_GENERATION,
        "Generation of the policy in force, from 1"
    );
    metrics::describe_counter!(
        VERIFY_CACHE_TOTAL,
        "Verified-token cache lookups, by result (hit/miss)"
    );
    metrics::describe_counter!(
        VERIFY_CACHE_EVICTIONS,
        "Verified tokens evicted from the cache for room (not expiry)"
    );
    metrics::describe_gauge!(VERIFY_CACHE_ENTRIES, "Verified tokens in the cache");
    metrics::describe_counter!(
        INTROSPECTION_REQUESTS,
        "Introspection requests, by provider and result (active/inactive/timeout/unreachable/status/bad_response/throttled/circuit_open/busy)"
    );
    metrics::describe_counter!(
        INTROSPECTION_SHED,
        "Checks of a new token answered 503 without asking the IdP, by provider and reason (busy/client_busy/client_budget/backoff)"
    );
    metrics::describe_counter!(
        INTROSPECTION_BACKOFF,
        "Times the introspection endpoint asked to slow down (429, or 503 with Retry-After) and suspect clients were paused"
    );
    metrics::describe_histogram!(
        INTROSPECTION_DURATION,
        metrics::Unit::Seconds,
        "Time of one introspection request to the provider's endpoint"
    );
    metrics::describe_counter!(
        INTROSPECTION_CACHE,
        "Introspection cache lookups by Checks, by provider and result (hit/miss)"
    );
    metrics::describe_gauge!(
        INTROSPECTION_CIRCUIT_OPEN,
        "1 while introspection for the provider is paused after repeated failures"
    );
    metrics::describe_counter!(
        DPOP_REPLAY_EVICTIONS,
        "DPoP proof ids dropped from the replay cache before their window ended: always 0, a full cache refuses new proofs instead (valet_dpop_replay_full_total)"
    );
    metrics::describe_counter!(
        DPOP_REPLAY_FULL,
        "DPoP proofs refused (503 dpop_replay_full) because the replay cache was full of ids inside their window (raise dpop.replay_cache_entries)"
    );
    metrics::describe_gauge!(
        DPOP_REPLAY_ENTRIES,
        "Spent DPoP proof ids held by the replay cache (at most dpop.replay_cache_entries)"
    );
    metrics::describe_counter!(
        JWKS_UNKNOWN_KID_WAITERS_FULL,
        "Checks with an unknown kid answered at once, without waiting for the refetch, because jwks.unknown_kid_waiters were already waiting"
    );
    metrics::describe_gauge!(
        REVOCATION_ENTRIES,
        "Entries of the revocation denylist in force"
    );
    metrics::describe_counter!(
        REVOCATION_RELOAD_TOTAL,
        "Revocation denylist reads after a change, by result (success/error)"
    );
    metrics::describe_gauge!(
        REVOCATION_LAST_SUCCESSFUL,
        "1 if the last read of the revocation denylist succeeded, 0 if the list in force is older than the file"
    );
    metrics::describe_gauge!(API_KEYS_ENTRIES, "API keys in force, by provider");
    metrics::describe_counter!(
        API_KEYS_RELOAD_TOTAL,
        "API key file reads after a change, by provider and result (success/error)"
    );
    metrics::describe_gauge!(
        API_KEYS_LAST_SUCCESSFUL,
        "1 if the last read of the provider's API key file succeeded, 0 if the keys in force are older than the file"
    );
    metrics::describe_gauge!(
        REVOCATION_UNCONFIRMED_SECONDS,
        "Seconds since the denylist URL last confirmed the list in force (200 or 304); revocation.uri only"
    );
    metrics::describe_gauge!(STORE_UP, STORE_UP_HELP);
    metrics::describe_counter!(STORE_ERRORS, STORE_ERRORS_HELP);
    metrics::describe_histogram!(STORE_DURATION, STORE_DURATION_HELP);
    metrics::describe_counter!(STORE_FALLBACK, STORE_FALLBACK_HELP);
    metrics::describe_gauge!(
        REVOCATION_STALE,
        "1 while the denylist URL has not confirmed the list in force for longer than revocation.max_stale"
    );
    metrics::describe_gauge!(
        CONNECTIONS_OPEN,
        "Connections open, by listener (grpc/http/admin)"
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed on accept because the listener was at its cap (--max-connections), by listener"
    );
    metrics::describe_counter!(
        CONNECTIONS_CLOSED,
        "Check-port connections closed by Valet, by listener and cause (handshake_timeout/idle_timeout/max_age)"
    );
    metrics::describe_counter!(
        SIGNATURE_VERIFICATIONS,
        "JWT signatures checked with the crypto (at most one per token), by provider and result (valid/invalid)"
    );
    metrics::describe_counter!(
        CHECK_TOTAL,
        "Checks answered, by decision (allow/deny), reason and configured route name"
    );
    metrics::describe_histogram!(
        CHECK_DURATION,
        metrics::Unit::Seconds,
        "Time spent deciding one Check, from request to response"
    );
    describe_observe();
}

impl Telemetry {
    /// One Check answered: its counter, its duration, and (rate-limited for
    /// denials) its log line. No lock, no allocation once the handles exist.
    pub fn check(&self, decision: &Decision, elapsed: Duration) {
        let route = decision.route().unwrap_or(NO_ROUTE_LABEL);
        let reason = decision.reason().label();
        match decision {
            Decision::Allow(a) if a.dry_run => {
                tracing::info!(
                    route.name = route,
                    deny.reason = reason,
                    provider = a.provider.as_deref().unwrap_or(""),
                    kid = a.kid.as_deref().map(loggable_kid).unwrap_or(""),
                    "dry-run: would deny, allowed"
                );
            }
            Decision::Allow(a) => {
                tracing::debug!(
                    route.name = route,
                    reason,
                    provider = a.provider.as_deref().unwrap_or(""),
                    kid = a.kid.as_deref().unwrap_or(""),
                    "allow"
                );
            }
            Decision::Deny(d) if self.0.deny_log.allowed() => {
                tracing::info!(
                    route.name = route,
                    deny.reason = reason,
                    http.status = d.kind.http_status(),
                    provider = d.provider.as_deref().unwrap_or(""),
                    kid = d.kid.as_deref().map(loggable_kid).unwrap_or(""),
                    detail = d.detail.unwrap_or(""),
                    "deny"
                );
            }
            Decision::Deny(_) => {}
        }
        self.check_counter(decision, route).increment(1);
        self.0.check_duration.record(elapsed.as_secs_f64());
    }

    /// The handle for this decision's route × reason × allow × dry-run, from the
    /// route's cells (made with the compiled policy, filled on first use).
    fn check_counter<'a>(&'a self, decision: &'a Decision, route: &str) -> &'a Counter {
        let reason = decision.reason();
        let allow = decision.is_allow();
        let dry_run = matches!(decision, Decision::Allow(a) if a.dry_run);
        let slot = reason as usize * 4 + usize::from(allow) * 2 + usize::from(dry_run);
        let cells = decision.route_counters().unwrap_or(&self.0.no_route);
        cells.cell(slot).get_or_init(|| {
            let decision_label = if allow { "allow" } else { "deny" };
            let mut labels = vec![
                Label::new("decision", decision_label),
                Label::new("reason", reason.label()),
                Label::new("route", route.to_owned()),
            ];
            if dry_run {
                // Allowed, so not part of the rejection rate; the reason says what would have been.
                labels.push(Label::new("dry_run", "true"));
            }
            self.0
                .recorder
                .register_counter(&Key::from_parts(CHECK_TOTAL, labels), &META)
        })
    }
}

/// Slots per route: every reason, allow or deny, dry-run or not.
pub const CHECK_SLOTS: usize = Reason::ALL.len() * 4;

/// Deny lines per second before the rest are only counted: the traffic Valet
/// rejects (a scanner, a broken client) must not be the most expensive to serve.
const DENY_LOGS_PER_SEC: u32 = 100;

/// A per-second budget of deny lines, without a lock: at a second's turn a few
/// lines more or less may pass, which is all a log budget needs.
#[derive(Default)]
struct DenyLog(LineBudget);

impl DenyLog {
    fn allowed(&self) -> bool {
        match self.0.take(DENY_LOGS_PER_SEC) {
            Some(suppressed) => {
                if suppressed > 0 {
                    tracing::info!(
                        suppressed,
                        "deny log lines suppressed (over {DENY_LOGS_PER_SEC}/s); valet_check_total counts them all"
                    );
                }
                true
            }
            None => false,
        }
    }
}

/// A per-second budget of log lines, without a lock (deny logs, audit lines).
#[derive(Default)]
pub struct LineBudget {
    second: AtomicU64,
    count: AtomicU32,
    suppressed: AtomicU64,
}

impl LineBudget {
    /// While under `per_sec`, Some with how many lines the last second refused
    /// (once, at the first line of a new second, else 0); None past it.
    pub fn take(&self, per_sec: u32) -> Option<u64> {
        let now = crate::clock::system_unix();
        let second = self.second.load(Ordering::Relaxed);
        let mut suppressed = 0;
        if second != now
            && self
                .second
                .compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < per_sec {
            Some(suppressed)
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A `kid` comes from the (unverified) token: log it only if it looks like one.
fn loggable_kid(kid: &str) -> &str {
    if kid.len() <= 64
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'='))
    {
        kid
    } else {
        "<unprintable>"
    }
}

/// A key set was loaded (or confirmed unchanged) for `provider`.
pub fn jwks_loaded(
    provider: &str,
    trigger: &'static str,
    result: &'static str,
    keys: usize,
    now: u64,
) {
    if result == "success" {
        tracing::info!(provider, trigger, keys, "jwks loaded");
    } else {
        tracing::debug!(provider, trigger, keys, result, "jwks confirmed");
    }
    metrics::counter!(JWKS_REFRESH_TOTAL, "provider" => provider.to_owned(), "result" => result, "trigger" => trigger)
        .increment(1);
    metrics::gauge!(JWKS_KEYS, "provider" => provider.to_owned()).set(keys as f64);
    metrics::gauge!(JWKS_LAST_SUCCESS, "provider" => provider.to_owned()).set(now as f64);
}

/// A provider's key task started: its counters exist from zero.
pub fn jwks_provider_started(provider: &str) {
    metrics::counter!(JWKS_UNKNOWN_KID_WAITERS_FULL, "provider" => provider.to_owned())
        .increment(0);
    for result in ["success", "error"] {
        metrics::counter!(JWKS_REFRESH_TOTAL, "provider" => provider.to_owned(), "result" => result, "trigger" => "interval")
            .increment(0);
    }
}

/// A key set load failed; the last good set, if any, stays in force.
pub fn jwks_failed(provider: &str, trigger: &'static str, error: &dyn std::fmt::Display) {
    tracing::warn!(provider, trigger, error = %error, "jwks load failed; keeping the last good key set");
    metrics::counter!(JWKS_REFRESH_TOTAL, "provider" => provider.to_owned(), "result" => "error", "trigger" => trigger)
        .increment(1);
}

pub fn jwks_kids_changed(provider: &str, kids: &[&str]) {
    tracing::info!(provider, kids = ?kids, "jwks key set changed");
    metrics::counter!(JWKS_KEYSET_CHANGES, "provider" => provider.to_owned()).increment(1);
}

pub fn jwks_age(provider: &str, age_secs: u64) {
    metrics::gauge!(JWKS_AGE, "provider" => provider.to_owned()).set(age_secs as f64);
}

pub const VERIFY_CACHE_TOTAL: &str = "valet_verify_cache_total";
pub const VERIFY_CACHE_EVICTIONS: &str = "valet_verify_cache_evictions_total";
pub const VERIFY_CACHE_ENTRIES: &str = "valet_verify_cache_entries";

/// Hit and miss handles for one verified-token cache, registered on the
/// recorder in scope at first use (the cache belongs to one Valet's policy).
pub fn verify_cache_counters() -> [Counter; 2] {
    [
        metrics::counter!(VERIFY_CACHE_TOTAL, "result" => "hit"),
        metrics::counter!(VERIFY_CACHE_TOTAL, "result" => "miss"),
    ]
}

/// Valid and invalid handles of one provider's signature checks (a cache hit,
/// or a token refused before the crypto, runs none).
pub fn signature_counters(provider: &str) -> [Counter; 2] {
    ["valid", "invalid"].map(|result| {
        metrics::counter!(SIGNATURE_VERIFICATIONS, "provider" => provider.to_owned(), "result" => result)
    })
}

pub fn verify_cache_evicted() {
    metrics::counter!(VERIFY_CACHE_EVICTIONS).increment(1);
}

pub fn verify_cache_entries(n: u64) {
    metrics::gauge!(VERIFY_CACHE_ENTRIES).set(n as f64);
}

pub const POLICY_LAST_SUCCESSFUL: &str = "valet_policy_last_reload_successful";

pub fn policy_loaded(generation: u64, at: u64) {
    metrics::gauge!(POLICY_GENERATION).set(generation as f64);
    metrics::gauge!(POLICY_LAST_SUCCESS).set(at as f64);
    metrics::gauge!(POLICY_LAST_SUCCESSFUL).set(1.0);
}

pub fn policy_reloaded(
    trigger: &'static str,
    generation: u64,
    routes: usize,
    providers: usize,
    at: u64,
) {
    tracing::info!(trigger, generation, routes, providers, "policy reloaded");
    metrics::counter!(POLICY_RELOAD_TOTAL, "result" => "success").increment(1);
    policy_loaded(generation, at);
}

pub fn policy_reload_failed() {
    metrics::counter!(POLICY_RELOAD_TOTAL, "result" => "error").increment(1);
    metrics::gauge!(POLICY_LAST_SUCCESSFUL).set(0.0);
}

/// The denylist at start (from the policy load) or after a change of its file
/// or URL's answer.
pub fn revocation_loaded(source: &dyn std::fmt::Display, entries: usize) {
    tracing::info!(denylist = %source, entries, "revocation denylist loaded");
    metrics::counter!(REVOCATION_RELOAD_TOTAL, "result" => "success").increment(1);
    metrics::gauge!(REVOCATION_ENTRIES).set(entries as f64);
    metrics::gauge!(REVOCATION_LAST_SUCCESSFUL).set(1.0);
}

pub fn revocation_failed(source: &dyn std::fmt::Display, error: &dyn std::fmt::Display) {
    for line in error.to_string().lines() {
        tracing::error!(denylist = %source, "revocation denylist not reloaded, keeping the list in force: {line}");
    }
    metrics::counter!(REVOCATION_RELOAD_TOTAL, "result" => "error").increment(1);
    metrics::gauge!(REVOCATION_LAST_SUCCESSFUL).set(0.0);
}

/// A provider's API key file at start (from the policy load) or after a change.
/// Never a key: the file holds digests, and only the count is logged.
pub fn api_keys_loaded(provider: &str, path: &std::path::Path, entries: usize) {
    tracing::info!(provider, file = %path.display(), entries, "API keys loaded");
    metrics::counter!(API_KEYS_RELOAD_TOTAL, "provider" => provider.to_owned(), "result" => "success")
        .increment(1);
    metrics::gauge!(API_KEYS_ENTRIES, "provider" => provider.to_owned()).set(entries as f64);
    metrics::gauge!(API_KEYS_LAST_SUCCESSFUL, "provider" => provider.to_owned()).set(1.0);
}

pub fn api_keys_failed(provider: &str, path: &std::path::Path, error: &dyn std::fmt::Display) {
    for line in error.to_string().lines() {
        tracing::error!(provider, file = %path.display(), "API keys not reloaded, keeping the keys in force: {line}");
    }
    metrics::counter!(API_KEYS_RELOAD_TOTAL, "provider" => provider.to_owned(), "result" => "error")
        .increment(1);
    metrics::gauge!(API_KEYS_LAST_SUCCESSFUL, "provider" => provider.to_owned()).set(0.0);
}

/// A denylist URL confirmed the list in force (304, or the same body).
pub fn revocation_confirmed() {
    metrics::gauge!(REVOCATION_LAST_SUCCESSFUL).set(1.0);
}

/// A denylist URL's list: seconds since its last confirmation, and whether past `max_stale`.
pub fn revocation_staleness(age_secs: u64, stale: bool) {
    metrics::gauge!(REVOCATION_UNCONFIRMED_SECONDS).set(age_secs as f64);
    metrics::gauge!(REVOCATION_STALE).set(if stale { 1.0 } else { 0.0 });
}

pub const STORE_UP_HELP: &str =
    "1 while the shared store (store.redis) answers, 0 while its calls fail";
pub const STORE_ERRORS_HELP: &str = "Shared store calls that failed, by op (spend/get/set/ping/connect) and kind (timeout/unavailable/error)";
pub const STORE_DURATION_HELP: &str = "Time of one shared store call, by op";
pub const STORE_FALLBACK_HELP: &str = "Decisions taken without the shared store because it failed, by use (dpop: spent in this replica only; introspection: local cache and the IdP)";

pub fn store_up(up: bool) {
    metrics::gauge!(STORE_UP).set(if up { 1.0 } else { 0.0 });
}

pub fn store_error(op: &'static str, kind: &'static str) {
    metrics::counter!(STORE_ERRORS, "op" => op, "kind" => kind).increment(1);
}

pub fn store_call(op: &'static str, took: Duration) {
    metrics::histogram!(STORE_DURATION, "op" => op).record(took.as_secs_f64());
}

pub fn store_fallback(what: &'static str) {
    metrics::counter!(STORE_FALLBACK, "use" => what).increment(1);
}

pub fn introspection_cache_counters(provider: &str) -> [metrics::Counter; 2] {
    [
        metrics::counter!(INTROSPECTION_CACHE, "provider" => provider.to_owned(), "result" => "hit"),
        metrics::counter!(INTROSPECTION_CACHE, "provider" => provider.to_owned(), "result" => "miss"),
    ]
}

pub fn introspection_request(provider: &str, result: &'static str, took: Option<Duration>) {
    metrics::counter!(INTROSPECTION_REQUESTS, "provider" => provider.to_owned(), "result" => result)
        .increment(1);
    if let Some(t) = took {
        metrics::histogram!(INTROSPECTION_DURATION, "provider" => provider.to_owned())
            .record(t.as_secs_f64());
    }
}

/// In the order of `gate::Shed`: busy, client_busy, client_budget, backoff.
pub fn introspection_shed_counters(provider: &str) -> [metrics::Counter; 4] {
    ["busy", "client_busy", "client_budget", "backoff"].map(|reason| {
        metrics::counter!(INTROSPECTION_SHED, "provider" => provider.to_owned(), "reason" => reason)
    })
}

pub fn introspection_backoff(provider: &str) {
    metrics::counter!(INTROSPECTION_BACKOFF, "provider" => provider.to_owned()).increment(1);
}

pub fn introspection_circuit(provider: &str, open: bool) {
    metrics::gauge!(INTROSPECTION_CIRCUIT_OPEN, "provider" => provider.to_owned()).set(if open {
        1.0
    } else {
        0.0
    });
}

/// A good DPoP proof refused: the replay cache is full of ids inside their window.
pub fn dpop_replay_full() {
    metrics::counter!(DPOP_REPLAY_FULL).increment(1);
}

pub fn dpop_replay_entries(n: usize) {
    metrics::gauge!(DPOP_REPLAY_ENTRIES).set(n as f64);
}

/// An unknown kid answered without waiting: enough Checks already wait for the refetch.
pub fn unknown_kid_waiters_full(provider: &str) {
    metrics::counter!(JWKS_UNKNOWN_KID_WAITERS_FULL, "provider" => provider.to_owned())
        .increment(1);
}

/// Connections open on a listener, after one opened or closed.
pub fn connections_open(listener: &'static str, open: usize) {
    metrics::gauge!(CONNECTIONS_OPEN, "listener" => listener).set(open as f64);
}

/// A connection closed on accept: the listener is at its cap. Logged at most
/// once a second per process: a flood must not become a log flood.
pub fn connection_refused(listener: &'static str, cap: usize) {
    metrics::counter!(CONNECTIONS_REFUSED, "listener" => listener).increment(1);
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::clock::system_unix();
    if LAST.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(
            listener,
            cap,
            "connection refused: listener at its connection cap"
        );
    }
}

/// A connection Valet closed: silent past the handshake timeout, idle, or old.
pub fn connection_closed(listener: &'static str, cause: &'static str) {
    metrics::counter!(CONNECTIONS_CLOSED, "listener" => listener, "cause" => cause).increment(1);
    tracing::debug!(listener, cause, "connection closed");
}

pub const AUDIT_DROPPED: &str = "valet_audit_dropped_total";
pub const TRACE_SPANS_DROPPED: &str = "valet_trace_spans_dropped_total";
pub const MISUSE_SIGNALS: &str = "valet_misuse_signals_total";

/// An audit line not written: over `audit.max_per_second`.
pub fn audit_dropped() {
    metrics::counter!(AUDIT_DROPPED).increment(1);
}

/// Spans not exported, by why: `queue_full` (the collector is slower than
/// Checks) or `export_failed` (it refused, timed out or is absent).
pub fn trace_spans_dropped(reason: &'static str, n: u64) {
    metrics::counter!(TRACE_SPANS_DROPPED, "reason" => reason).increment(n);
}

/// The drop counters of traces and audit lines exist from zero once either is on.
pub fn observe_started() {
    metrics::counter!(AUDIT_DROPPED).increment(0);
    for reason in ["queue_full", "export_failed"] {
        metrics::counter!(TRACE_SPANS_DROPPED, "reason" => reason).increment(0);
    }
}

/// Misuse signals are on: their counters exist from zero for each provider
/// (and `_none`, for clients denied before any provider was known).
pub fn misuse_started<'a>(providers: impl IntoIterator<Item = &'a str>) {
    for provider in providers.into_iter().chain([NO_ROUTE_LABEL]) {
        for signal in ["token_addresses", "client_denials"] {
            metrics::counter!(MISUSE_SIGNALS, "provider" => provider.to_owned(), "signal" => signal)
                .increment(0);
        }
    }
}

/// A misuse signal: `token_addresses` (a verified token from more source
/// addresses than `misuse.max_addresses_per_token`) or `client_denials` (a
/// client denied more than `misuse.client_denials_per_minute` in a minute).
pub fn misuse_signal(provider: &str, signal: &'static str) {
    metrics::counter!(MISUSE_SIGNALS, "provider" => provider.to_owned(), "signal" => signal)
        .increment(1);
}

fn describe_observe() {
    metrics::describe_counter!(
        AUDIT_DROPPED,
        "Audit lines not written because audit.max_per_second was reached"
    );
    metrics::describe_counter!(
        TRACE_SPANS_DROPPED,
        "Check spans not exported, by reason (queue_full: the export queue was full; export_failed: the collector refused, timed out or is absent)"
    );
    metrics::describe_counter!(
        MISUSE_SIGNALS,
        "Token misuse signals, by provider and signal (token_addresses: a verified token from more source addresses than misuse.max_addresses_per_token; client_denials: a client denied more than misuse.client_denials_per_minute in a minute)"
    );
}
