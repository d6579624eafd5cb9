//! Compiled `audit:`, `tracing:` and `misuse:` settings: plain data checked
//! once, read by the audit trail, the tracer and the misuse signals.

use std::time::Duration;

use crate::config::Problems;
use crate::config::observe::{AuditFile, MisuseFile, TracingFile};

/// `audit:` — which decisions get an audit line, and how many are kept for `/denials`.
#[derive(Debug, Clone, PartialEq)]
pub struct Audit {
    pub allow: bool,
    pub deny: bool,
    pub sample: f64,
    pub max_per_second: u32,
    pub recent_denials: usize,
}

impl Audit {
    pub const DEFAULT_MAX_PER_SECOND: u32 = 1000;
    pub const DEFAULT_RECENT_DENIALS: usize = 50;

    /// Whether any decision is written.
    pub fn on(&self) -> bool {
        (self.allow || self.deny) && self.sample > 0.0
    }
}

impl Default for Audit {
    /// No audit lines (deny logs stay as they are); the last 50 denials kept.
    fn default() -> Self {
        Audit {
            allow: false,
            deny: false,
            sample: 1.0,
            max_per_second: Self::DEFAULT_MAX_PER_SECOND,
            recent_denials: Self::DEFAULT_RECENT_DENIALS,
        }
    }
}

/// `tracing:` — a span per Check, exported over OTLP/gRPC. Read at start.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    pub endpoint: String,
    pub timeout: Duration,
    pub headers: Vec<(String, String)>,
    pub queue: usize,
    pub sample_ratio: f64,
    pub service_name: String,
}

impl Tracing {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_QUEUE: usize = 2048;
}

/// `misuse:` — signals of a token or client used as it should not be.
#[derive(Debug, Clone, PartialEq)]
pub struct Misuse {
    pub max_addresses_per_token: usize,
    pub tracked_tokens: u64,
    pub client_denials_per_minute: u32,
}

impl Misuse {
    /// At most this many addresses are remembered per token: the bound itself
    /// is at most this minus one, so that passing it is always seen.
    pub const MAX_ADDRESS_BOUND: usize = 15;
    pub const DEFAULT_TRACKED_TOKENS: u64 = 100_000;
}

pub fn audit(file: Option<AuditFile>, p: &mut Problems) -> Audit {
    let Some(f) = file else {
        return Audit::default();
    };
    let d = Audit::default();
    let audit = Audit {
        allow: f.allow.unwrap_or(false),
        deny: f.deny.unwrap_or(true),
        sample: f.sample.unwrap_or(1.0),
        max_per_second: f.max_per_second.unwrap_or(d.max_per_second),
        recent_denials: f.recent_denials.unwrap_or(d.recent_denials),
    };
    if !(0.0..=1.0).contains(&audit.sample) {
        p.error("audit.sample", "must be between 0 and 1");
    }
    if audit.max_per_second == 0 {
        p.error("audit.max_per_second", "at least 1");
    }
    if audit.recent_denials > 10_000 {
        p.error("audit.recent_denials", "at most 10000");
    }
    audit
}

pub fn tracing(file: Option<TracingFile>, p: &mut Problems) -> Option<Tracing> {
    let f = file?;
    let Some(otlp) = f.otlp else {
        p.error(
            "tracing.otlp",
            "where to send spans: otlp: { endpoint: http://collector:4317 }",
        );
        return None;
    };
    if !(otlp.endpoint.starts_with("http://") || otlp.endpoint.starts_with("https://")) {
        p.error(
            "tracing.otlp.endpoint",
            "an http:// or https:// URL of an OTLP/gRPC collector",
        );
    }
    let timeout = match otlp.timeout.as_deref() {
        None => Tracing::DEFAULT_TIMEOUT,
        Some(t) => crate::config::parse_duration(t).unwrap_or_else(|e| {
            p.error("tracing.otlp.timeout", e);
            Tracing::DEFAULT_TIMEOUT
        }),
    };
    for name in otlp.headers.keys() {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            p.error(
                format!("tracing.otlp.headers.{name}"),
                "a gRPC metadata name: lower-case letters, digits, - and _",
            );
        }
    }
    let sample_ratio = f.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        p.error("tracing.sample_ratio", "must be between 0 and 1");
    }
    let queue = otlp.queue.unwrap_or(Tracing::DEFAULT_QUEUE);
    if queue == 0 {
        p.error("tracing.otlp.queue", "at least 1");
    }
    Some(Tracing {
        endpoint: otlp.endpoint,
        timeout,
        headers: otlp.headers.into_iter().collect(),
        queue,
        sample_ratio,
        service_name: f.service_name.unwrap_or_else(|| "valet".into()),
    })
}

pub fn misuse(file: Option<MisuseFile>, p: &mut Problems) -> Option<Misuse> {
    let f = file?;
    let misuse = Misuse {
        max_addresses_per_token: f.max_addresses_per_token.unwrap_or(4),
        tracked_tokens: f.tracked_tokens.unwrap_or(Misuse::DEFAULT_TRACKED_TOKENS),
        client_denials_per_minute: f.client_denials_per_minute.unwrap_or(0),
    };
    if !(1..Misuse::MAX_ADDRESS_BOUND).contains(&misuse.max_addresses_per_token) {
        p.error(
            "misuse.max_addresses_per_token",
            format!("between 1 and {}", Misuse::MAX_ADDRESS_BOUND - 1),
        );
    }
    if misuse.tracked_tokens == 0 {
        p.error("misuse.tracked_tokens", "at least 1");
    }
    Some(misuse)
}

/// The settings read only at start that differ between `old` and `new`: a
/// reload warns that they wait for a restart.
pub fn start_only_changes(old: &super::Policy, new: &super::Policy) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.tracing != new.tracing {
        changed.push("tracing");
    }
    if old.audit.recent_denials != new.audit.recent_denials {
        changed.push("audit.recent_denials");
    }
    if old.misuse.is_some() != new.misuse.is_some()
        || old.misuse.as_ref().map(|m| m.tracked_tokens)
            != new.misuse.as_ref().map(|m| m.tracked_tokens)
    {
        changed.push("misuse (on/off, tracked_tokens)");
    }
    changed
}
