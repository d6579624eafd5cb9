//! The metric contract: every metric Valet exports, its type, its labels (with
//! their values where the code bounds them) and its help text. `valet metrics`
//! prints it as JSON; scripts/check_observability.py checks the alerts, the
//! dashboard and README's metric table against that output, never a copy. The
//! tests below hold it to what the recorder renders and to the name constants in
//! telemetry.rs, so a metric cannot be added there without being listed here.

use serde_json::{Value, json};

use crate::decision::Reason;
use crate::telemetry as t;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Exposed as `<name>_bucket{le}`, `<name>_sum` and `<name>_count`.
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Where a label's values come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Values {
    /// Only these, fixed in the code.
    Bounded(Vec<&'static str>),
    /// Names from the policy (routes, providers) or the build (version): bounded
    /// by the configuration, never by a request.
    Configured(&'static str),
}

#[derive(Debug, Clone)]
pub struct Label {
    pub name: &'static str,
    pub values: Values,
    /// Present on some series only (`dry_run="true"` on dry-run passes).
    pub optional: bool,
}

#[derive(Debug, Clone)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: Vec<Label>,
    pub help: &'static str,
}

fn bounded(name: &'static str, values: &[&'static str]) -> Label {
    Label {
        name,
        values: Values::Bounded(values.to_vec()),
        optional: false,
    }
}

fn configured(name: &'static str, from: &'static str) -> Label {
    Label {
        name,
        values: Values::Configured(from),
        optional: false,
    }
}

fn provider() -> Label {
    configured("provider", "provider names of the policy")
}

const SUCCESS_ERROR: &[&str] = &["success", "error"];
const HIT_MISS: &[&str] = &["hit", "miss"];
const LISTENERS: &[&str] = &["grpc", "http", "admin"];
const STORE_OPS: &[&str] = &["spend", "get", "set", "ping", "connect"];

/// Every metric Valet registers, in README order.
pub fn metrics() -> Vec<Metric> {
    use Kind::{Counter, Gauge, Histogram};
    let m = |name, kind, labels, help| Metric {
        name,
        kind,
        labels,
        help,
    };
    let reasons: Vec<&'static str> = Reason::ALL.iter().map(|r| r.label()).collect();
    vec![
        m(
            t::CHECK_TOTAL,
            Counter,
            vec![
                bounded("decision", &["allow", "deny"]),
                bounded("reason", &reasons),
                configured(
                    "route",
                    "route names of the policy, `_none` when none matched",
                ),
                Label {
                    name: "dry_run",
                    values: Values::Bounded(vec!["true"]),
                    optional: true,
                },
            ],
            "Checks answered, by decision (allow/deny), reason and configured route name",
        ),
        m(
            t::CHECK_DURATION,
            Histogram,
            vec![],
            "Time spent deciding one Check, from request to response",
        ),
        m(
            t::JWKS_REFRESH_TOTAL,
            Counter,
            vec![
                provider(),
                bounded("result", &["success", "not_modified", "error"]),
                bounded(
                    "trigger",
                    &["startup", "cache", "interval", "unknown_kid", "file_change"],
                ),
            ],
            "Key set loads, by provider, result (success/not_modified/error) and trigger",
        ),
        m(
            t::JWKS_KEYS,
            Gauge,
            vec![provider()],
            "Usable keys in the provider's current key set",
        ),
        m(
            t::JWKS_AGE,
            Gauge,
            vec![provider()],
            "Seconds since the provider's key set was last loaded or confirmed",
        ),
        m(
            t::JWKS_LAST_SUCCESS,
            Gauge,
            vec![provider()],
            "Unix time the provider's key set was last loaded or confirmed",
        ),
        m(
            t::JWKS_KEYSET_CHANGES,
            Counter,
            vec![provider()],
            "Times the set of kids of a provider changed (a rotation)",
        ),
        m(
            t::POLICY_RELOAD_TOTAL,
            Counter,
            vec![bounded("result", SUCCESS_ERROR)],
            "Policy reloads, by result (success/error)",
        ),
        m(
            t::POLICY_LAST_SUCCESSFUL,
            Gauge,
            vec![],
            "1 if the last policy load succeeded, 0 while the file on disk is invalid",
        ),
        m(
            t::POLICY_GENERATION,
            Gauge,
            vec![],
            "Generation of the policy in force, from 1",
        ),
        m(
            t::POLICY_LAST_SUCCESS,
            Gauge,
            vec![],
            "Unix time the policy in force was loaded",
        ),
        m(
            t::BUILD_INFO,
            Gauge,
            vec![configured("version", "the Valet version of the build")],
            "Always 1; the version label says which Valet runs",
        ),
        m(
            t::VERIFY_CACHE_TOTAL,
            Counter,
            vec![bounded("result", HIT_MISS)],
            "Verified-token cache lookups, by result (hit/miss)",
        ),
        m(
            t::VERIFY_CACHE_EVICTIONS,
            Counter,
            vec![],
            "Verified tokens evicted from the cache for room (not expiry)",
        ),
        m(
            t::VERIFY_CACHE_ENTRIES,
            Gauge,
            vec![],
            "Verified tokens in the cache",
        ),
        m(
            t::INTROSPECTION_REQUESTS,
            Counter,
            vec![
                provider(),
                bounded(
                    "result",
                    &[
                        "active",
                        "inactive",
                        "timeout",
                        "unreachable",
                        "status",
                        "bad_response",
                        "throttled",
                        "circuit_open",
                        "busy",
                    ],
                ),
            ],
            "Introspection requests, by provider and result (active/inactive/timeout/unreachable/status/bad_response/throttled/circuit_open/busy)",
        ),
        m(
            t::INTROSPECTION_SHED,
            Counter,
            vec![
                provider(),
                bounded(
                    "reason",
                    &["busy", "client_busy", "client_budget", "backoff"],
                ),
            ],
            "Checks of a new token answered 503 without asking the IdP, by provider and reason (busy/client_busy/client_budget/backoff)",
        ),
        m(
            t::INTROSPECTION_BACKOFF,
            Counter,
            vec![provider()],
            "Times the introspection endpoint asked to slow down (429, or 503 with Retry-After) and suspect clients were paused",
        ),
        m(
            t::DPOP_REPLAY_EVICTIONS,
            Counter,
            vec![],
            "DPoP proof ids dropped from the replay cache before their window ended: always 0, a full cache refuses new proofs instead (valet_dpop_replay_full_total)",
        ),
        m(
            t::DPOP_REPLAY_FULL,
            Counter,
            vec![],
            "DPoP proofs refused (503 dpop_replay_full) because the replay cache was full of ids inside their window (raise dpop.replay_cache_entries)",
        ),
        m(
            t::DPOP_REPLAY_ENTRIES,
            Gauge,
            vec![],
            "Spent DPoP proof ids held by the replay cache (at most dpop.replay_cache_entries)",
        ),
        m(
            t::JWKS_UNKNOWN_KID_WAITERS_FULL,
            Counter,
            vec![provider()],
            "Checks with an unknown kid answered at once, without waiting for the refetch, because jwks.unknown_kid_waiters were already waiting",
        ),
        m(
            t::INTROSPECTION_DURATION,
            Histogram,
            vec![provider()],
            "Time of one introspection request to the provider's endpoint",
        ),
        m(
            t::INTROSPECTION_CACHE,
            Counter,
            vec![provider(), bounded("result", HIT_MISS)],
            "Introspection cache lookups by Checks, by provider and result (hit/miss)",
        ),
        m(
            t::INTROSPECTION_CIRCUIT_OPEN,
            Gauge,
            vec![provider()],
            "1 while introspection for the provider is paused after repeated failures",
        ),
        m(
            t::REVOCATION_ENTRIES,
            Gauge,
            vec![],
            "Entries of the revocation denylist in force",
        ),
        m(
            t::REVOCATION_RELOAD_TOTAL,
            Counter,
            vec![bounded("result", SUCCESS_ERROR)],
            "Revocation denylist reads after a change, by result (success/error)",
        ),
        m(
            t::REVOCATION_LAST_SUCCESSFUL,
            Gauge,
            vec![],
            "1 if the last read of the revocation denylist succeeded, 0 if the list in force is older than the file",
        ),
        m(
            t::API_KEYS_ENTRIES,
            Gauge,
            vec![provider()],
            "API keys in force, by provider",
        ),
        m(
            t::API_KEYS_RELOAD_TOTAL,
            Counter,
            vec![provider(), bounded("result", SUCCESS_ERROR)],
            "API key file reads after a change, by provider and result (success/error)",
        ),
        m(
            t::API_KEYS_LAST_SUCCESSFUL,
            Gauge,
            vec![provider()],
            "1 if the last read of the provider's API key file succeeded, 0 if the keys in force are older than the file",
        ),
        m(
            t::REVOCATION_UNCONFIRMED_SECONDS,
            Gauge,
            vec![],
            "Seconds since the denylist URL last confirmed the list in force (200 or 304); revocation.uri only",
        ),
        m(
            t::REVOCATION_STALE,
            Gauge,
            vec![],
            "1 while the denylist URL has not confirmed the list in force for longer than revocation.max_stale",
        ),
        m(t::STORE_UP, Gauge, vec![], t::STORE_UP_HELP),
        m(
            t::STORE_ERRORS,
            Counter,
            vec![
                bounded("op", STORE_OPS),
                bounded("kind", &["timeout", "unavailable", "error"]),
            ],
            t::STORE_ERRORS_HELP,
        ),
        m(
            t::STORE_DURATION,
            Histogram,
            vec![bounded("op", &STORE_OPS[..4])],
            t::STORE_DURATION_HELP,
        ),
        m(
            t::STORE_FALLBACK,
            Counter,
            vec![bounded("use", &["dpop", "introspection"])],
            t::STORE_FALLBACK_HELP,
        ),
        m(
            t::CONNECTIONS_OPEN,
            Gauge,
            vec![bounded("listener", LISTENERS)],
            "Connections open, by listener (grpc/http/admin)",
        ),
        m(
            t::CONNECTIONS_REFUSED,
            Counter,
            vec![bounded("listener", LISTENERS)],
            "Connections closed on accept because the listener was at its cap (--max-connections), by listener",
        ),
        m(
            t::CONNECTIONS_CLOSED,
            Counter,
            vec![
                bounded("listener", LISTENERS),
                bounded("cause", &["handshake_timeout", "idle_timeout", "max_age"]),
            ],
            "Check-port connections closed by Valet, by listener and cause (handshake_timeout/idle_timeout/max_age)",
        ),
        m(
            t::SIGNATURE_VERIFICATIONS,
            Counter,
            vec![provider(), bounded("result", &["valid", "invalid"])],
            "JWT signatures checked with the crypto (at most one per token), by provider and result (valid/invalid)",
        ),
        m(
            t::AUDIT_DROPPED,
            Counter,
            vec![],
            "Audit lines not written because audit.max_per_second was reached",
        ),
        m(
            t::TRACE_SPANS_DROPPED,
            Counter,
            vec![bounded("reason", &["queue_full", "export_failed"])],
            "Check spans not exported, by reason (queue_full: the export queue was full; export_failed: the collector refused, timed out or is absent)",
        ),
        m(
            t::MISUSE_SIGNALS,
            Counter,
            vec![
                provider(),
                bounded("signal", &["token_addresses", "client_denials"]),
            ],
            "Token misuse signals, by provider and signal (token_addresses: a verified token from more source addresses than misuse.max_addresses_per_token; client_denials: a client denied more than misuse.client_denials_per_minute in a minute)",
        ),
    ]
}

/// The contract as `valet metrics` prints it.
pub fn to_json() -> Value {
    let metrics: Vec<Value> = metrics()
        .iter()
        .map(|m| {
            let labels: Vec<Value> = m
                .labels
                .iter()
                .map(|l| match &l.values {
                    Values::Bounded(v) => {
                        json!({"name": l.name, "values": v, "optional": l.optional})
                    }
                    Values::Configured(from) => {
                        json!({"name": l.name, "values": null, "from": from, "optional": l.optional})
                    }
                })
                .collect();
            json!({"name": m.name, "type": m.kind.as_str(), "labels": labels, "help": m.help})
        })
        .collect();
    json!({ "metrics": metrics })
}

#[cfg(test)]
mod tests;
