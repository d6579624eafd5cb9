//! RFC 7662 token introspection for tokens Valet cannot verify itself (opaque
//! tokens, or every token of a provider that asks for it). The Check path only
//! reads the cache; on a miss the service awaits [`Introspector::introspect`]
//! (one request per token however many Checks wait for it, bounded by a timeout
//! and a circuit breaker) and decides again. Which misses may ask the IdP at
//! all, when a flood of random tokens competes with real ones, is [`gate`]'s call.

mod gate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};
use tokio::sync::watch;

pub use gate::Client;
use gate::{Gate, Lane, Outcome, Shed};

use crate::bounded_cache::BoundedCache;
use crate::shared_store::SharedStore;
use crate::telemetry;

/// Introspection answers are small; anything larger is refused.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

pub use crate::provider::IntrospectionSettings as Settings;

#[derive(Clone)]
pub enum Answer {
    /// The token's claims as the IdP describes them, and until when to trust them.
    Active(Arc<Map<String, Value>>),
    Inactive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IntrospectError {
    #[error("the introspection endpoint did not answer in time")]
    Timeout,
    #[error("the introspection endpoint could not be reached")]
    Unreachable,
    #[error("the introspection endpoint answered with an error status")]
    Status,
    #[error("the introspection endpoint's answer is not an introspection response")]
    BadResponse,
    #[error("introspection is paused after repeated failures (circuit open)")]
    CircuitOpen,
    #[error("too many introspection requests in flight")]
    Busy,
    #[error("too many introspection requests in flight for this client")]
    ClientBusy,
    #[error("too many recent tokens of this client were not active: try again later")]
    ClientBudget,
    #[error(
        "the introspection endpoint asked to slow down, and recent tokens of this client were not active"
    )]
    Backoff,
    #[error("the introspection endpoint asked to slow down (429)")]
    Throttled,
    #[error("the token could not be introspected before the Check's deadline")]
    Deadline,
}

impl IntrospectError {
    pub fn label(self) -> &'static str {
        match self {
            IntrospectError::Timeout => "timeout",
            IntrospectError::Unreachable => "unreachable",
            IntrospectError::Status => "status",
            IntrospectError::BadResponse => "bad_response",
            IntrospectError::CircuitOpen => "circuit_open",
            IntrospectError::Busy => "busy",
            IntrospectError::ClientBusy => "client_busy",
            IntrospectError::ClientBudget => "client_budget",
            IntrospectError::Backoff => "backoff",
            IntrospectError::Throttled => "throttled",
            IntrospectError::Deadline => "deadline",
        }
    }
}

impl From<Shed> for IntrospectError {
    fn from(s: Shed) -> Self {
        match s {
            Shed::Busy => IntrospectError::Busy,
            Shed::ClientBusy => IntrospectError::ClientBusy,
            Shed::ClientBudget => IntrospectError::ClientBudget,
            Shed::Backoff => IntrospectError::Backoff,
        }
    }
}

type Key = [u8; 32];
/// One request's outcome, awaited by every Check of the same token.
type Flight = watch::Receiver<Option<Result<Answer, IntrospectError>>>;

pub struct Introspector {
    pub provider: String,
    pub issuer: String,
    pub settings: Settings,
    /// Active answers, and apart from them inactive ones: a flood of random tokens
    /// fills only the negative cache. Each lives as long as its answer says.
    cache: BoundedCache<Key, Answer, Instant>,
    negative: BoundedCache<Key, Answer, Instant>,
    /// Tokens answered active, until their `exp`: a re-validation after `cache_ttl`
    /// is no stranger (its request may use the reserved slots).
    known: BoundedCache<Key, (), Instant>,
    in_flight: Mutex<HashMap<Key, Flight>>,
    /// Bounds concurrent requests, and shares them so that random tokens cost
    /// their senders (see [`gate`]).
    gate: Arc<Gate>,
    breaker: Mutex<Breaker>,
    client: reqwest::Client,
    /// Cache hit and miss counters, registered on first use (after the recorder is).
    counters: std::sync::OnceLock<[metrics::Counter; 2]>,
    /// Shed counters by [`Shed`], likewise.
    shed: std::sync::OnceLock<[metrics::Counter; 4]>,
    /// The fleet's store: answers are shared there, keyed by the token's hash.
    shared: arc_swap::ArcSwapOption<SharedStore>,
}

/// A `known` entry without `exp` is remembered this long.
const KNOWN_FOR: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    /// After the open period, one request tries; the others still fail fast.
    trial: bool,
}

pub fn key(token: &str) -> Key {
    digest(&SHA256, token.as_bytes())
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

impl Introspector {
    pub fn new(provider: &str, issuer: &str, settings: Settings) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("valet/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(settings.timeout.min(Duration::from_secs(2)))
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        // LRU: a fresh answer is always admitted (TinyLFU could drop it at once
        // when the cache is full, and the Check would find nothing).
        let lru = |entries| BoundedCache::new(entries, entries);
        let gate = Gate::new(gate::Limits {
            slots: settings.max_in_flight,
            revalidation_reserve: settings.revalidation_reserve,
            per_client: settings.max_in_flight_per_client,
            inactive_budget: f64::from(settings.inactive_budget),
            inactive_per_second: f64::from(settings.inactive_per_second),
            max_backoff: settings.max_backoff,
        });
        Ok(Introspector {
            provider: provider.to_string(),
            issuer: issuer.to_string(),
            cache: lru(settings.cache_entries),
            negative: lru(settings.negative_cache_entries),
            known: BoundedCache::new(settings.cache_entries, settings.cache_entries),
            gate,
            settings,
            in_flight: Mutex::new(HashMap::new()),
            breaker: Mutex::new(Breaker::default()),
            client,
            counters: std::sync::OnceLock::new(),
            shed: std::sync::OnceLock::new(),
            shared: arc_swap::ArcSwapOption::empty(),
        })
    }

    /// The cached answer for this token, if any: all a Check does without awaiting.
    pub fn cached(&self, token: &str) -> Option<Answer> {
        let hit = self.lookup(&key(token));
        let [hits, misses] = self
            .counters
            .get_or_init(|| telemetry::introspection_cache_counters(&self.provider));
        if hit.is_some() { hits } else { misses }.increment(1);
        hit
    }

    fn lookup(&self, k: &Key) -> Option<Answer> {
        let now = Instant::now();
        self.cache.get(k, now).or_else(|| self.negative.get(k, now))
    }

    /// Asks the IdP about `token` (once for all concurrent callers) and caches the
    /// answer. The request runs in its own task: a Check that gives up (Envoy's
    /// deadline) neither cancels it nor loses its answer for the next Check, and
    /// the circuit breaker always hears how it ended. `now` is Unix seconds;
    /// `client` is who sent the token (Envoy's `source.address`), if known.
    pub async fn introspect(
        self: &Arc<Self>,
        token: &str,
        now: u64,
        client: Option<Client>,
    ) -> Result<Answer, IntrospectError> {
        let k = key(token);
        if let Some(a) = self.lookup(&k) {
            return Ok(a);
        }
        let mut flight = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&k) {
                Some(f) => f.clone(),
                None => {
                    let lane = if self.known.contains(&k, Instant::now()) {
                        Lane::Known
                    } else {
                        Lane::New(client)
                    };
                    let mut slot = match self.gate.acquire(lane, Instant::now()) {
                        Ok(slot) => slot,
                        Err(shed) => {
                            self.count_shed(shed);
                            return Err(shed.into());
                        }
                    };
                    let (tx, rx) = watch::channel(None);
                    map.insert(k, rx.clone());
                    let this = self.clone();
                    let token = token.to_string();
                    crate::telemetry::spawn(async move {
                        // The fleet may have asked already; else ask, and tell the
                        // fleet before answering (one store round trip on top of the
                        // IdP's: a replica asked next finds it, deterministically).
                        let shared = this.shared.load_full();
                        let (r, ttl) = match this.shared_answer(shared.as_deref(), &k, now).await {
                            Some((answer, ttl)) => (Ok(answer), ttl),
                            None => {
                                let r = this.request(&token, now, slot.suspect()).await;
                                if let (Ok(answer), Some(store)) = (&r, &shared) {
                                    this.tell_shared(store, &k, answer, now).await;
                                }
                                let ttl = r.as_ref().map_or(Duration::ZERO, |a| this.ttl(a, now));
                                (r, ttl)
                            }
                        };
                        slot.set_outcome(match &r {
                            Ok(Answer::Active(_)) => Outcome::Active,
                            Ok(Answer::Inactive) | Err(IntrospectError::Throttled) => {
                                Outcome::Charged
                            }
                            Err(_) => Outcome::Neutral,
                        });
                        if let Ok(answer) = &r {
                            this.remember(k, answer, ttl, now);
                        }
                        // Cached first, then out of the flights: a later Check finds one or the other.
                        this.in_flight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&k);
                        drop(slot);
                        let _ = tx.send(Some(r));
                    });
                    rx
                }
            }
        };
        match flight.wait_for(Option::is_some).await {
            Ok(done) => done.clone().unwrap_or(Err(IntrospectError::Unreachable)),
            // The task ended without an answer (it panicked): nothing to wait for.
            Err(_) => Err(IntrospectError::Unreachable),
        }
    }

    /// Uses `store` for this introspector's answers from now on (None: none).
    pub fn share(&self, store: Option<Arc<SharedStore>>) {
        self.shared.store(store);
    }

    /// Caches `answer` for `ttl` (and remembers an active token until its `exp`).
    fn remember(&self, k: Key, answer: &Answer, ttl: Duration, now: u64) {
        let at = Instant::now();
        let until = at + ttl;
        match answer {
            Answer::Active(claims) => {
                self.cache.insert(k, answer.clone(), 1, until, at);
                let known = claims
                    .get("exp")
                    .and_then(Value::as_u64)
                    .map_or(KNOWN_FOR, |exp| {
                        Duration::from_secs(exp.saturating_sub(now))
                    });
                let until = at + known.min(KNOWN_FOR * 24);
                self.known.insert(k, (), 1, until, at);
            }
            Answer::Inactive => {
                self.negative.insert(k, answer.clone(), 1, until, at);
            }
        }
    }

    /// The store's key for a token's answers: the provider's name and the
    /// token's SHA-256, nothing of the token itself.
    fn shared_key(&self, store: &SharedStore, k: &Key) -> String {
        store.key(&format!("intro:{}", self.provider), k)
    }

    /// An answer another replica got, cached here until the time it was cached
    /// there (never longer: a fleet does not stretch `cache_ttl`). A store that
    /// fails is skipped (counted): the IdP is asked, as without a store.
    async fn shared_answer(
        &self,
        store: Option<&SharedStore>,
        k: &Key,
        now: u64,
    ) -> Option<(Answer, Duration)> {
        let store = store?;
        let raw = match store.get(&self.shared_key(store, k), None).await {
            Ok(raw) => raw?,
            Err(_) => {
                telemetry::store_fallback("introspection");
                return None;
            }
        };
        let v: Value = serde_json::from_slice(&raw).ok()?;
        let until = v.get("until")?.as_u64()?;
        if until <= now {
            return None;
        }
        let answer = match v.get("claims") {
            Some(Value::Object(claims)) => Answer::Active(Arc::new(claims.clone())),
            _ => Answer::Inactive,
        };
        Some((answer, Duration::from_secs(until - now)))
    }

    async fn tell_shared(&self, store: &SharedStore, k: &Key, answer: &Answer, now: u64) {
        let ttl = self.ttl(answer, now);
        let claims = match answer {
            Answer::Active(claims) => Value::Object((**claims).clone()),
            Answer::Inactive => Value::Null,
        };
        let value = serde_json::json!({"until": now + ttl.as_secs(), "claims": claims});
        let _ = store
            .set(
                &self.shared_key(store, k),
                value.to_string().as_bytes(),
                ttl,
            )
            .await;
    }

    fn count_shed(&self, shed: Shed) {
        let [busy, client_busy, client_budget, backoff] = self
            .shed
            .get_or_init(|| telemetry::introspection_shed_counters(&self.provider));
        match shed {
            Shed::Busy => {
                // Counted as a request result too, as it always was.
                telemetry::introspection_request(&self.provider, "busy", None);
                busy
            }
            Shed::ClientBusy => client_busy,
            Shed::ClientBudget => client_budget,
            Shed::Backoff => backoff,
        }
        .increment(1);
    }

    fn ttl(&self, answer: &Answer, now: u64) -> Duration {
        match answer {
            Answer::Inactive => self.settings.negative_cache_ttl,
            Answer::Active(claims) => {
                let until_exp = claims
                    .get("exp")
                    .and_then(Value::as_u64)
                    .map_or(self.settings.cache_ttl, |exp| {
                        Duration::from_secs(exp.saturating_sub(now))
                    });
                until_exp
                    .min(self.settings.cache_ttl)
                    .max(Duration::from_secs(1))
            }
        }
    }

    /// `suspect`: sent for a client in debt, whose failures (an IdP slowed down on
    /// its random tokens, say) must not open the circuit for everyone.
    async fn request(
        &self,
        token: &str,
        now: u64,
        suspect: bool,
    ) -> Result<Answer, IntrospectError> {
        if !self.admit() {
            telemetry::introspection_request(&self.provider, "circuit_open", None);
            return Err(IntrospectError::CircuitOpen);
        }
        let started = Instant::now();
        let result = self.call(token, now).await;
        let label = match &result {
            Ok(Answer::Active(_)) => "active",
            Ok(Answer::Inactive) => "inactive",
            Err(e) => e.label(),
        };
        telemetry::introspection_request(&self.provider, label, Some(started.elapsed()));
        // A 429 is the endpoint asking for less, not failing: it neither opens nor
        // closes the circuit (the gate backs off the clients that caused it).
        match &result {
            Err(IntrospectError::Throttled) => {}
            Err(_) if suspect => {}
            r => self.record(r.is_ok()),
        }
        result
    }

    async fn call(&self, token: &str, now: u64) -> Result<Answer, IntrospectError> {
        // RFC 6749 §2.3.1: client_secret_basic, each part form-urlencoded first.
        let credentials = format!(
            "{}:{}",
            form_encode(&self.settings.client_id),
            form_encode(&self.settings.client_secret)
        );
        let body = format!("token={}&token_type_hint=access_token", form_encode(token));
        let response = self
            .client
            .post(&self.settings.endpoint)
            .header(
                "authorization",
                format!("Basic {}", STANDARD.encode(credentials)),
            )
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    IntrospectError::Timeout
                } else {
                    IntrospectError::Unreachable
                }
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || (status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                && response.headers().contains_key("retry-after"))
        {
            if self.gate.back_off(retry_after, Instant::now()) {
                tracing::warn!(provider = %self.provider, status = status.as_u16(), retry_after = ?retry_after, "introspection endpoint asks to slow down: pausing clients whose recent tokens were not active");
                telemetry::introspection_backoff(&self.provider);
            }
            return Err(IntrospectError::Throttled);
        }
        if !status.is_success() {
            tracing::warn!(provider = %self.provider, status = response.status().as_u16(), "introspection endpoint answered an error");
            return Err(IntrospectError::Status);
        }
        if response
            .content_length()
            .is_some_and(|l| l > MAX_RESPONSE_BYTES as u64)
        {
            return Err(IntrospectError::BadResponse);
        }
        let mut response = response;
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            if e.is_timeout() {
                IntrospectError::Timeout
            } else {
                IntrospectError::Unreachable
            }
        })? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_RESPONSE_BYTES {
                return Err(IntrospectError::BadResponse);
            }
        }
        let Ok(Value::Object(mut claims)) = serde_json::from_slice::<Value>(&bytes) else {
            return Err(IntrospectError::BadResponse);
        };
        match claims.get("active") {
            Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => return Ok(Answer::Inactive),
            _ => return Err(IntrospectError::BadResponse),
        }
        // Only access tokens: a refresh token introspects `active` too (RFC 7662
        // §2.2 makes token_type optional; when present it must be an access token).
        if let Some(t) = claims.get("token_type") {
            let ok = t.as_str().is_some_and(|t| {
                ["access_token", "bearer", "dpop"]
                    .iter()
                    .any(|a| t.eq_ignore_ascii_case(a))
            });
            if !ok {
                return Ok(Answer::Inactive);
            }
        }
        // Keycloak says what a token is in `typ`: refresh and ID tokens are not access tokens.
        if claims.get("typ").and_then(Value::as_str).is_some_and(|t| {
            ["refresh", "offline", "id"]
                .iter()
                .any(|n| t.eq_ignore_ascii_case(n))
        }) {
            return Ok(Answer::Inactive);
        }
        // An active token past its exp is inactive whatever the IdP's clock says.
        if claims
            .get("exp")
            .and_then(Value::as_u64)
            .is_some_and(|exp| exp <= now)
        {
            return Ok(Answer::Inactive);
        }
        // Identity and revocation by issuer need `iss`; the endpoint speaks for ours.
        claims
            .entry("iss")
            .or_insert_with(|| Value::String(self.issuer.clone()));
        Ok(Answer::Active(Arc::new(claims)))
    }

    fn admit(&self) -> bool {
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        match b.open_until {
            None => true,
            Some(until) if Instant::now() < until => false,
            Some(_) if b.trial => false,
            Some(_) => {
                b.trial = true;
                true
            }
        }
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            if b.open_until.is_some() {
                tracing::info!(provider = %self.provider, "introspection endpoint answers again: circuit closed");
                telemetry::introspection_circuit(&self.provider, false);
            }
            *b = Breaker::default();
            return;
        }
        b.failures += 1;
        if b.trial || b.failures >= self.settings.failure_threshold {
            if b.open_until.is_none() {
                tracing::warn!(provider = %self.provider, failures = b.failures, open_for = ?self.settings.open_for, "introspection endpoint failing: circuit open");
                telemetry::introspection_circuit(&self.provider, true);
            }
            b.open_until = Some(Instant::now() + self.settings.open_for);
            b.trial = false;
        }
    }
}

/// application/x-www-form-urlencoded for one value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'*') {
            out.push(b as char);
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b:c/d+é"), "a+b%3Ac%2Fd%2B%C3%A9");
    }

    #[test]
    fn settings_never_show_the_secret() {
        let s = Settings {
            endpoint: "http://x".into(),
            client_id: "valet".into(),
            client_secret: "hunter2".into(),
            timeout: Duration::from_secs(1),
            cache_ttl: Duration::from_secs(60),
            negative_cache_ttl: Duration::from_secs(10),
            cache_entries: 10,
            jwts: false,
            failure_threshold: 5,
            open_for: Duration::from_secs(10),
            max_in_flight: 8,
            negative_cache_entries: 10,
            max_in_flight_per_client: 2,
            revalidation_reserve: 1,
            inactive_budget: 20,
            inactive_per_second: 2,
            max_backoff: Duration::from_secs(30),
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn breaker_opens_after_the_threshold_and_lets_one_trial_through() {
        let mut s = Settings {
            endpoint: "http://x".into(),
            client_id: "v".into(),
            client_secret: "s".into(),
            timeout: Duration::from_secs(1),
            cache_ttl: Duration::from_secs(60),
            negative_cache_ttl: Duration::from_secs(10),
            cache_entries: 10,
            jwts: false,
            failure_threshold: 3,
            open_for: Duration::from_millis(50),
            max_in_flight: 8,
            negative_cache_entries: 10,
            max_in_flight_per_client: 2,
            revalidation_reserve: 1,
            inactive_budget: 20,
            inactive_per_second: 2,
            max_backoff: Duration::from_secs(30),
        };
        s.failure_threshold = 3;
        let i = Introspector::new("p", "https://i", s).unwrap();
        for _ in 0..2 {
            assert!(i.admit());
            i.record(false);
        }
        assert!(i.admit());
        i.record(false);
        assert!(!i.admit(), "open after 3 failures");
        std::thread::sleep(Duration::from_millis(60));
        assert!(i.admit(), "one trial after the open period");
        assert!(!i.admit(), "only one");
        i.record(false);
        assert!(!i.admit(), "a failed trial opens again");
        std::thread::sleep(Duration::from_millis(60));
        assert!(i.admit());
        i.record(true);
        assert!(i.admit() && i.admit(), "closed after a success");
    }
}
