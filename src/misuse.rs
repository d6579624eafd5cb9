//! Token misuse signals (the OAuth guide's M6/M10): a verified token presented
//! from more source addresses than `misuse.max_addresses_per_token` within its
//! lifetime (a stolen bearer token replayed from elsewhere), and a client
//! denied more than `misuse.client_denials_per_minute` in a minute (a client
//! gone wrong, or someone probing with its tokens). Each is counted in
//! `valet_misuse_signals_total{provider, signal}` and logged once, naming the
//! token by its SHA-256, never the token.
//!
//! Bounded state ([`BoundedCache`]s, deadlines in the Check's Unix seconds):
//! per token, an entry keyed by the token's SHA-256 that lives until the
//! token's `exp` (at most `misuse.tracked_tokens` entries, least recently used
//! out first), holding at most one address more than `max_addresses_per_token`;
//! per client, an entry of three counters that lives two idle minutes (at most
//! 10,000 clients).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;

use crate::audit::Facts;
use crate::bounded_cache::BoundedCache;
use crate::decision::Decision;
use crate::policy::observe::Misuse;
use crate::policy::{Access, Policy};
use crate::request::Request;
use crate::telemetry;

const MAX_CLIENTS: u64 = 10_000;
/// Seconds a client's window outlives its last denial.
const CLIENT_IDLE: u64 = 120;

type TokenHash = [u8; 32];

pub struct Watch {
    tokens: BoundedCache<TokenHash, Arc<Seen>, u64>,
    clients: BoundedCache<Box<str>, Arc<Window>, u64>,
}

/// The addresses one token came from.
#[derive(Default)]
struct Seen {
    addresses: Mutex<Vec<IpAddr>>,
}

/// A client's denials in the current minute.
#[derive(Default)]
struct Window {
    minute: AtomicU64,
    count: AtomicU32,
    reported: AtomicU64,
}

impl Watch {
    pub fn new(settings: &Misuse) -> Watch {
        Watch {
            tokens: BoundedCache::new(settings.tracked_tokens, settings.tracked_tokens),
            clients: BoundedCache::new(MAX_CLIENTS, MAX_CLIENTS),
        }
    }

    /// One Check decided: its token's addresses, its client's denials.
    pub fn observe(
        &self,
        settings: &Misuse,
        policy: &Policy,
        decision: &Decision,
        req: Option<&CheckRequest>,
        facts: &Facts<'_>,
        now: u64,
    ) {
        match decision {
            Decision::Allow(a) if a.claims.is_some() && !a.dry_run => {
                if let Some(req) = req {
                    self.token_seen(settings, policy, req, facts, now);
                }
            }
            Decision::Allow(_) => {}
            Decision::Deny(_) if settings.client_denials_per_minute > 0 => {
                self.client_denied(settings, facts, now);
            }
            Decision::Deny(_) => {}
        }
    }

    fn token_seen(
        &self,
        settings: &Misuse,
        policy: &Policy,
        req: &CheckRequest,
        facts: &Facts<'_>,
        now: u64,
    ) {
        let Ok(address) = facts.source.parse::<IpAddr>() else {
            return;
        };
        let Some(exp) = facts
            .claims
            .and_then(|c| c.get("exp"))
            .and_then(serde_json::Value::as_u64)
        else {
            return;
        };
        let Some(hash) = token_hash(policy, req, facts.route) else {
            return;
        };
        let until = exp.max(now + 1);
        let seen = self
            .tokens
            .get_or_insert_with(hash, now, until, false, Default::default);
        let bound = settings.max_addresses_per_token;
        let crossed = {
            let mut addresses = seen.addresses.lock().unwrap_or_else(|e| e.into_inner());
            if addresses.contains(&address) || addresses.len() > bound {
                false
            } else {
                addresses.push(address);
                addresses.len() == bound + 1
            }
        };
        if crossed {
            telemetry::misuse_signal(facts.provider, "token_addresses");
            tracing::warn!(
                signal = "token_addresses",
                provider = facts.provider,
                client_id = %crate::audit::field(facts.client_id().unwrap_or(""), 256),
                token_sha256 = %hex(&hash),
                addresses = bound + 1,
                "a verified token was presented from more source addresses than misuse.max_addresses_per_token"
            );
        }
    }

    fn client_denied(&self, settings: &Misuse, facts: &Facts<'_>, now: u64) {
        // The verified client when the token verified, else the address it came from.
        let (kind, client) = match facts.client_id() {
            Some(id) => ("client_id", id),
            None if !facts.source.is_empty() => ("source", facts.source),
            None => return,
        };
        let key: Box<str> = format!("{kind}:{client}").into();
        let window =
            self.clients
                .get_or_insert_with(key, now, now + CLIENT_IDLE, true, Default::default);
        let minute = now / 60;
        if window.minute.swap(minute, Ordering::Relaxed) != minute {
            window.count.store(0, Ordering::Relaxed);
        }
        let count = window.count.fetch_add(1, Ordering::Relaxed) + 1;
        if count > settings.client_denials_per_minute
            && window.reported.swap(minute, Ordering::Relaxed) != minute
        {
            let provider = if facts.provider.is_empty() {
                telemetry::NO_ROUTE_LABEL
            } else {
                facts.provider
            };
            telemetry::misuse_signal(provider, "client_denials");
            tracing::warn!(
                signal = "client_denials",
                provider,
                client_kind = kind,
                client = %crate::audit::field(client, 256),
                denials = count,
                reason = facts.reason,
                "a client was denied more than misuse.client_denials_per_minute in a minute"
            );
        }
    }
}

/// SHA-256 of the token the route read (found again the way the Check did).
fn token_hash(policy: &Policy, req: &CheckRequest, route: &str) -> Option<TokenHash> {
    let route = &policy.routes[policy.index.by_name(route)?];
    let Access::Require(requirement) = &route.access else {
        return None;
    };
    let view = Request::from_check(req).ok()?;
    let token =
        crate::check::token::extract(&view, &requirement.sources, policy.max_token_bytes).ok()?;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.value.as_bytes());
    d.as_ref().try_into().ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
