//! Logs and metrics for each event, emitted together from one function each.
//! Never a token, never a claim value: route, reason, provider and kid only.

use std::time::Duration;

use crate::decision::Decision;

pub const CHECK_TOTAL: &str = "valet_check_total";
pub const CHECK_DURATION: &str = "valet_check_duration_seconds";

/// The `route` label when no route matched (route names cannot start with `_`).
pub const NO_ROUTE_LABEL: &str = "_none";

pub fn describe() {
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
        Decision::Allow(a) => {
            tracing::debug!(
                route.name = route,
                reason,
                provider = a.provider.as_deref().unwrap_or(""),
                kid = a.kid.as_deref().unwrap_or(""),
                "allow"
            );
        }
        Decision::Deny(d) => {
            tracing::info!(
                route.name = route,
                deny.reason = reason,
                http.status = d.kind.http_status(),
                provider = d.provider.as_deref().unwrap_or(""),
                kid = d.kid.as_deref().map(loggable_kid).unwrap_or(""),
                "deny"
            );
        }
    }
    let decision_label = if decision.is_allow() { "allow" } else { "deny" };
    metrics::counter!(CHECK_TOTAL, "decision" => decision_label, "reason" => reason, "route" => route.to_owned())
        .increment(1);
    metrics::histogram!(CHECK_DURATION).record(elapsed.as_secs_f64());
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
