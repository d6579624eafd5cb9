//! The audit trail and the on-call view of denials: what one Check decided,
//! for whom, on which request, in which trace. Never the token: only the
//! verified claims an auditor needs (subject, client id, granted scopes), the
//! request line without its query, and the trace id.
//!
//! Audit lines are tracing events with target `audit` (JSON under
//! `--log-format json`), rate-limited like deny logs with the rest counted in
//! `valet_audit_dropped_total`. The last denials are kept in a ring of fixed
//! slots that a Check fills without a lock (`/denials` on the admin port).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use envoy_types::pb::envoy::config::core::v3::address;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use serde_json::{Map, Value};

use crate::decision::Decision;
use crate::policy::observe::Audit;
use crate::telemetry::{self, LineBudget, NO_ROUTE_LABEL};
use crate::trace_context::{Parent, TraceId};

/// What the audit trail, the denial ring and the span say about one Check:
/// read from the decision and the request, borrowed, built only when one of
/// them is on.
pub struct Facts<'a> {
    pub route: &'a str,
    pub allow: bool,
    pub dry_run: bool,
    pub reason: &'static str,
    pub status: u16,
    pub provider: &'a str,
    pub kid: &'a str,
    /// Verified claims only (an allow, or a denial after verification).
    pub claims: Option<&'a Map<String, Value>>,
    pub source: &'a str,
    pub method: &'a str,
    /// As sent, without the query (which may carry a token or personal data).
    pub path: &'a str,
    pub parent: Option<Parent<'a>>,
}

impl<'a> Facts<'a> {
    /// `caller`: the span of the gRPC call, if it named one; else the request's.
    pub fn of(
        decision: &'a Decision,
        req: Option<&'a CheckRequest>,
        caller: Option<Parent<'a>>,
    ) -> Facts<'a> {
        let (provider, kid, claims, status, dry_run) = match decision {
            Decision::Allow(a) => (&a.provider, &a.kid, a.claims.as_deref(), 200, a.dry_run),
            Decision::Deny(d) => (
                &d.provider,
                &d.kid,
                d.claims.as_deref(),
                d.kind.http_status(),
                false,
            ),
        };
        let http = req
            .and_then(|r| r.attributes.as_ref())
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let header = |name: &str| req.and_then(|r| crate::request::header_of(r, name));
        let raw_path = http
            .map(|h| h.path.as_str())
            .filter(|p| !p.is_empty())
            .or_else(|| header(":path"))
            .unwrap_or("");
        let method = http
            .map(|h| h.method.as_str())
            .filter(|m| !m.is_empty())
            .or_else(|| header(":method"))
            .unwrap_or("");
        Facts {
            route: decision.route().unwrap_or(NO_ROUTE_LABEL),
            allow: decision.is_allow(),
            dry_run,
            reason: decision.reason().label(),
            status,
            provider: provider.as_deref().unwrap_or(""),
            kid: kid.as_deref().unwrap_or(""),
            claims,
            source: req.map_or("", source_address),
            method,
            path: raw_path.split(['?', '#']).next().unwrap_or(""),
            parent: caller.or_else(|| Parent::extract(header)),
        }
    }

    pub fn decision(&self) -> &'static str {
        if self.allow { "allow" } else { "deny" }
    }

    /// `sub` of the verified token.
    pub fn subject(&self) -> Option<&'a str> {
        self.claim_str("sub")
    }

    /// The OAuth client: `azp` (OIDC), `client_id` (RFC 9068) or `cid` (Okta).
    pub fn client_id(&self) -> Option<&'a str> {
        ["azp", "client_id", "cid"]
            .iter()
            .find_map(|c| self.claim_str(c))
    }

    /// The scopes the token grants (`scope`, or `scp` as a string or list).
    pub fn scopes(&self) -> Option<Cow<'a, str>> {
        let claims = self.claims?;
        match claims.get("scope").or_else(|| claims.get("scp"))? {
            Value::String(s) => Some(Cow::Borrowed(s.as_str())),
            Value::Array(list) => Some(Cow::Owned(
                list.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" "),
            )),
            _ => None,
        }
    }

    pub fn trace_id(&self) -> Option<TraceId> {
        self.parent.map(|p| p.trace_id_hex())
    }

    fn claim_str(&self, name: &str) -> Option<&'a str> {
        self.claims?.get(name)?.as_str()
    }
}

/// `attributes.source.address` as Envoy sends it (an IP), else empty.
fn source_address(req: &CheckRequest) -> &str {
    let address = req
        .attributes
        .as_ref()
        .and_then(|a| a.source.as_ref())
        .and_then(|s| s.address.as_ref())
        .and_then(|a| a.address.as_ref());
    match address {
        Some(address::Address::SocketAddress(s)) => &s.address,
        _ => "",
    }
}

/// A value from the token or the request, fit for one log field: at most
/// `max` bytes, control characters replaced (a text log line stays one line).
pub fn field(v: &str, max: usize) -> Cow<'_, str> {
    let cut = if v.len() > max {
        let mut end = max;
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        &v[..end]
    } else {
        v
    };
    if cut.len() == v.len() && !cut.chars().any(char::is_control) {
        return Cow::Borrowed(v);
    }
    let mut out: String = cut
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if cut.len() < v.len() {
        out.push('…');
    }
    Cow::Owned(out)
}

/// The audit trail of one Valet: its line budget and its sampling.
pub struct Trail {
    budget: LineBudget,
}

impl Trail {
    pub fn new() -> Trail {
        Trail {
            budget: LineBudget::default(),
        }
    }

    /// Writes the audit line of one Check if `settings` ask for it.
    pub fn record(&self, settings: &Audit, facts: &Facts<'_>) {
        let wanted = if facts.allow {
            settings.allow
        } else {
            settings.deny
        };
        if !wanted || (settings.sample < 1.0 && rand::random::<f64>() >= settings.sample) {
            return;
        }
        match self.budget.take(settings.max_per_second) {
            Some(suppressed) if suppressed > 0 => tracing::info!(
                target: "audit",
                suppressed,
                "audit lines dropped (over audit.max_per_second); valet_audit_dropped_total counts them"
            ),
            Some(_) => {}
            None => {
                telemetry::audit_dropped();
                return;
            }
        }
        let trace_id = facts.trace_id().map(|t| t.to_string());
        let scopes = if facts.allow { facts.scopes() } else { None };
        tracing::info!(
            target: "audit",
            time = %now_rfc3339(),
            trace_id = trace_id.as_deref().unwrap_or(""),
            route = facts.route,
            decision = facts.decision(),
            dry_run = facts.dry_run,
            reason = facts.reason,
            status = facts.status,
            provider = facts.provider,
            subject = %field(facts.subject().unwrap_or(""), 256),
            client_id = %field(facts.client_id().unwrap_or(""), 256),
            scopes = %field(scopes.as_deref().unwrap_or(""), 1024),
            source = %field(facts.source, 64),
            method = %field(facts.method, 32),
            path = %field(facts.path, 1024),
            "audit"
        );
    }
}

impl Default for Trail {
    fn default() -> Self {
        Trail::new()
    }
}

/// Now, as RFC 3339 UTC with milliseconds (`2026-11-29T22:41:42.123Z`).
pub fn now_rfc3339() -> String {
    let ms = now_millis();
    rfc3339(ms / 1000, (ms % 1000) as u32)
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rfc3339(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One denial as `/denials` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Denial {
    #[serde(skip)]
    seq: u64,
    /// RFC 3339, made when listed: a denial only notes the milliseconds.
    pub time: String,
    #[serde(skip)]
    millis: u64,
    pub route: String,
    pub reason: &'static str,
    pub status: u16,
    pub provider: String,
    pub client_id: String,
    pub trace_id: String,
}

/// The last denials, in fixed slots a Check fills in turn: one atomic add and
/// one pointer swap, no lock; a reader may miss a denial being written.
pub struct RecentDenials {
    slots: Box<[ArcSwapOption<Denial>]>,
    next: AtomicU64,
}

impl RecentDenials {
    pub fn new(capacity: usize) -> RecentDenials {
        RecentDenials {
            slots: (0..capacity).map(|_| ArcSwapOption::empty()).collect(),
            next: AtomicU64::new(0),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn push(&self, facts: &Facts<'_>) {
        if self.slots.is_empty() || facts.allow {
            return;
        }
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let denial = Denial {
            seq,
            time: String::new(),
            millis: now_millis(),
            route: facts.route.to_owned(),
            reason: facts.reason,
            status: facts.status,
            provider: facts.provider.to_owned(),
            client_id: field(facts.client_id().unwrap_or(""), 256).into_owned(),
            trace_id: facts.trace_id().map(|t| t.to_string()).unwrap_or_default(),
        };
        let slot = (seq % self.slots.len() as u64) as usize;
        self.slots[slot].store(Some(Arc::new(denial)));
    }

    /// The denials held, newest first.
    pub fn list(&self) -> Vec<Denial> {
        let mut all: Vec<Denial> = self
            .slots
            .iter()
            .filter_map(|s| s.load_full().map(|d| (*d).clone()))
            .map(|mut d| {
                d.time = rfc3339(d.millis / 1000, (d.millis % 1000) as u32);
                d
            })
            .collect();
        all.sort_by_key(|d| std::cmp::Reverse(d.seq));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_709_210_096, 7), "2024-02-29T12:34:56.007Z");
        assert_eq!(rfc3339(1_795_992_102, 123), "2026-11-29T22:41:42.123Z");
    }

    #[test]
    fn fields_stay_one_line_and_bounded() {
        assert_eq!(field("alice", 10), "alice");
        assert_eq!(field("a\nb", 10), "a?b");
        assert_eq!(field("ééé", 3), "é…");
    }

    #[test]
    fn the_ring_keeps_the_last_denials_newest_first() {
        let ring = RecentDenials::new(3);
        let deny = Decision::Deny(crate::decision::Deny::new(
            crate::decision::Reason::Expired,
            crate::decision::DenyKind::InvalidToken,
            "expired",
        ));
        for _ in 0..5 {
            ring.push(&Facts::of(&deny, None, None));
        }
        let list = ring.list();
        assert_eq!(list.len(), 3);
        assert_eq!(list.iter().map(|d| d.seq).collect::<Vec<_>>(), [4, 3, 2]);
        assert_eq!(list[0].reason, "expired");
        assert_eq!(list[0].route, NO_ROUTE_LABEL);
    }
}
