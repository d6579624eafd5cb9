//! Logs and metrics for each event, emitted together from one function each.
//! Never a token, never a claim value: route, reason, provider and kid only.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use crate::decision::{Decision, Reason};

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
pub const REVOCATION_RELOAD_TOTAL: &str = "valet_revocation_reload_total";
pub const REVOCATION_LAST_SUCCESSFUL: &str = "valet_revocation_last_reload_successful";
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

/// Installs the Prometheus recorder for this process and describes every metric.
/// Histograms buffer samples until rendered, so upkeep must run even when nobody
/// scrapes: the caller spawns [`upkeep`]. The recorder is process-wide: a second
/// Valet in the same process (a test) gets the first one's handle and shares its
/// metrics.
pub fn install() -> Result<PrometheusHandle, String> {
    static INSTALLED: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _once = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = INSTALLED.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(CHECK_DURATION.into()), CHECK_BUCKETS)
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full(INTROSPECTION_DURATION.into()),
            INTROSPECTION_BUCKETS,
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
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
    Ok(INSTALLED.get_or_init(|| handle).clone())
}

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
}

pub fn check(decision: &Decision, elapsed: Duration) {
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
        Decision::Deny(d) if deny_log_allowed() => {
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
    check_counter(decision, route).increment(1);
    CHECK_HISTOGRAM.record(elapsed.as_secs_f64());
}

static CHECK_HISTOGRAM: LazyLock<metrics::Histogram> =
    LazyLock::new(|| metrics::histogram!(CHECK_DURATION));

/// Slots per route: every reason, allow or deny, dry-run or not.
const SLOTS: usize = Reason::ALL.len() * 4;

/// Counter handles by route name, registered on first use and kept: building the
/// labelled key and looking it up in the registry on every Check cost more than
/// the Check's policy logic. Bounded by the route names policies ever had.
static CHECK_COUNTERS: LazyLock<Mutex<HashMap<String, Vec<Option<metrics::Counter>>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn check_counter(decision: &Decision, route: &str) -> metrics::Counter {
    let reason = decision.reason();
    let allow = decision.is_allow();
    let dry_run = matches!(decision, Decision::Allow(a) if a.dry_run);
    let slot = reason as usize * 4 + usize::from(allow) * 2 + usize::from(dry_run);
    let mut map = CHECK_COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    if !map.contains_key(route) {
        map.insert(route.to_owned(), vec![None; SLOTS]);
    }
    let slots = map.get_mut(route).expect("inserted above");
    slots[slot]
        .get_or_insert_with(|| {
            let decision_label = if allow { "allow" } else { "deny" };
            let route = route.to_owned();
            if dry_run {
                // Allowed, so not part of the rejection rate; the reason says what would have been.
                metrics::counter!(CHECK_TOTAL, "decision" => decision_label, "reason" => reason.label(), "route" => route, "dry_run" => "true")
            } else {
                metrics::counter!(CHECK_TOTAL, "decision" => decision_label, "reason" => reason.label(), "route" => route)
            }
        })
        .clone()
}

/// Deny lines per second before the rest are only counted: the traffic Valet
/// rejects (a scanner, a broken client) must not be the most expensive to serve.
const DENY_LOGS_PER_SEC: u32 = 100;

static DENY_LOG: Mutex<(u64, u32, u64)> = Mutex::new((0, 0, 0));

fn deny_log_allowed() -> bool {
    let now = crate::service::unix_now();
    let mut state = DENY_LOG.lock().unwrap_or_else(|e| e.into_inner());
    let (second, _, suppressed) = &mut *state;
    if *second != now {
        if *suppressed > 0 {
            tracing::info!(
                suppressed = *suppressed,
                "deny log lines suppressed (over {DENY_LOGS_PER_SEC}/s); valet_check_total counts them all"
            );
        }
        *state = (now, 0, 0);
    }
    let (_, count, suppressed) = &mut *state;
    if *count < DENY_LOGS_PER_SEC {
        *count += 1;
        true
    } else {
        *suppressed += 1;
        false
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

/// On every Check with a token: handles registered once, like the Check counters.
static VERIFY_CACHE_HIT: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!(VERIFY_CACHE_TOTAL, "result" => "hit"));
static VERIFY_CACHE_MISS: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!(VERIFY_CACHE_TOTAL, "result" => "miss"));

pub fn verify_cache(hit: bool) {
    let counter = if hit {
        &VERIFY_CACHE_HIT
    } else {
        &VERIFY_CACHE_MISS
    };
    counter.increment(1);
}

/// One signature verification run (a cache hit, or a token refused before the
/// crypto, runs none).
pub fn signature_verified(provider: &str, valid: bool) {
    let result = if valid { "valid" } else { "invalid" };
    metrics::counter!(SIGNATURE_VERIFICATIONS, "provider" => provider.to_owned(), "result" => result)
        .increment(1);
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

/// The denylist at start (from the policy load) or after a change of its file.
pub fn revocation_loaded(path: &std::path::Path, entries: usize) {
    tracing::info!(file = %path.display(), entries, "revocation denylist loaded");
    metrics::counter!(REVOCATION_RELOAD_TOTAL, "result" => "success").increment(1);
    metrics::gauge!(REVOCATION_ENTRIES).set(entries as f64);
    metrics::gauge!(REVOCATION_LAST_SUCCESSFUL).set(1.0);
}

pub fn revocation_failed(path: &std::path::Path, error: &dyn std::fmt::Display) {
    for line in error.to_string().lines() {
        tracing::error!(file = %path.display(), "revocation denylist not reloaded, keeping the list in force: {line}");
    }
    metrics::counter!(REVOCATION_RELOAD_TOTAL, "result" => "error").increment(1);
    metrics::gauge!(REVOCATION_LAST_SUCCESSFUL).set(0.0);
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

static DPOP_REPLAY_FULL_COUNTER: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!(DPOP_REPLAY_FULL));

/// A good DPoP proof refused: the replay cache is full of ids inside their window.
pub fn dpop_replay_full() {
    DPOP_REPLAY_FULL_COUNTER.increment(1);
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
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::service::unix_now();
    if LAST.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
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
