//! Key sets: how they are held, loaded, fetched and refreshed. The hot path only
//! ever calls [`KeyCell::load`]; loaders build a whole new [`KeySet`] and swap it in.

mod fetch;
mod keyset;
mod refresh;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::{Notify, watch};

pub use fetch::{FetchError, Fetched, Fetcher};
pub use keyset::{Key, KeyKind, KeySet, KeySetError};
pub use refresh::{Supervisor, load_once};

/// Kids remembered as unknown (per provider) before new ones are simply not
/// remembered: a flood of random kids must not grow memory without bound.
const MAX_REMEMBERED_UNKNOWN: usize = 4096;

pub use crate::provider::DEFAULT_UNKNOWN_KID_WAITERS;

/// The current key set of one provider (`None` until keys first load), when it
/// was last confirmed, and the coordination of refetches on an unknown `kid`.
#[derive(Default)]
pub struct KeyCell {
    set: ArcSwapOption<KeySet>,
    /// Unix seconds of the last successful load or 304; 0 = never.
    confirmed_at: AtomicU64,
    refetch: Option<Refetch>,
    /// `valet_signature_verifications_total` (valid, invalid) for this
    /// provider, made on first use under the Valet's recorder: no lookup per Check.
    signature_counters: OnceLock<[metrics::Counter; 2]>,
}

/// Singleflight, rate-limited refetching for one remote provider.
struct Refetch {
    wake: Notify,
    /// Bumped after every fetch attempt, success or not: waiters watch it.
    done: watch::Sender<u64>,
    state: Mutex<RefetchState>,
    min_refresh: Duration,
    wait: Duration,
    /// An unknown-kid refetch starts after a random delay in [0, spread], so a
    /// fleet that meets a rotated key together does not refetch together;
    /// waiting Checks wait `spread + wait`.
    spread: Duration,
    /// Checks waiting now, and how many may.
    waiters: AtomicUsize,
    max_waiters: usize,
    provider: String,
}

/// One waiting Check, for as long as it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct RefetchState {
    last_started: Option<Instant>,
    in_flight: bool,
    /// Kids a fresh set still lacked, with when: not refetched for min_refresh.
    unknown: HashMap<String, Instant>,
}

impl KeyCell {
    /// Counts one signature check of `provider`'s tokens by this cell's keys.
    pub fn count_signature(&self, provider: &str, valid: bool) {
        let [valid_count, invalid_count] = self
            .signature_counters
            .get_or_init(|| crate::telemetry::signature_counters(provider));
        if valid { valid_count } else { invalid_count }.increment(1);
    }

    /// A cell whose keys are fetched over HTTP and can be refetched on demand.
    pub fn remote(provider: &str, min_refresh: Duration, wait: Duration, waiters: usize) -> Self {
        KeyCell {
            refetch: Some(Refetch {
                wake: Notify::new(),
                done: watch::channel(0).0,
                state: Mutex::new(RefetchState::default()),
                min_refresh,
                wait,
                spread: Duration::ZERO,
                waiters: AtomicUsize::new(0),
                max_waiters: waiters.max(1),
                provider: provider.to_owned(),
            }),
            ..Default::default()
        }
    }

    /// Spreads unknown-kid refetches over [0, `spread`] (`jwks.unknown_kid_spread`).
    pub fn with_spread(mut self, spread: Duration) -> Self {
        if let Some(r) = &mut self.refetch {
            r.spread = spread;
        }
        self
    }

    pub fn load(&self) -> Option<Arc<KeySet>> {
        self.set.load_full()
    }

    pub fn has_keys(&self) -> bool {
        self.set.load().as_ref().is_some_and(|s| !s.is_empty())
    }

    /// Publishes a new set; returns true when its kids differ from the old set's.
    pub fn publish(&self, set: KeySet, confirmed_at: u64) -> bool {
        let changed = match self.set.load().as_ref() {
            Some(old) => !old.kids().eq(set.kids()),
            None => true,
        };
        self.set.store(Some(Arc::new(set)));
        self.confirmed_at.store(confirmed_at, Ordering::Relaxed);
        changed
    }

    /// The IdP said the set is unchanged (304).
    pub fn confirm(&self, now: u64) {
        self.confirmed_at.store(now, Ordering::Relaxed);
    }

    pub fn confirmed_at(&self) -> u64 {
        self.confirmed_at.load(Ordering::Relaxed)
    }

    /// A Check met an unknown `kid`: ask for a refetch and wait for it, within
    /// `unknown_kid_spread` + `unknown_kid_wait` (the refetch starts within the
    /// spread, and has `unknown_kid_wait` to complete). At most one fetch per `min_refresh`, shared by every
    /// waiting Check; kids a fresh set still lacked are not asked for again
    /// until `min_refresh` has passed. At most `unknown_kid_waiters` Checks wait at
    /// once: the others (a flood of random kids) are answered at once, while the
    /// fetch they may have started still runs. Returns true if a fetch completed
    /// in time (the caller then looks again).
    pub async fn refetch_for(&self, kid: &str) -> bool {
        let Some(r) = &self.refetch else { return false };
        let mut rx = r.done.subscribe();
        let seen = *rx.borrow_and_update();
        {
            let mut st = r.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if let Some(at) = st.unknown.get(kid) {
                if now.duration_since(*at) < r.min_refresh {
                    return false;
                }
                st.unknown.remove(kid);
            }
            if !st.in_flight {
                if st
                    .last_started
                    .is_some_and(|l| now.duration_since(l) < r.min_refresh)
                {
                    remember(&mut st, kid, now, r.min_refresh);
                    return false;
                }
                st.last_started = Some(now);
                st.in_flight = true;
                r.wake.notify_one();
            }
        }
        if r.waiters.fetch_add(1, Ordering::Relaxed) >= r.max_waiters {
            r.waiters.fetch_sub(1, Ordering::Relaxed);
            crate::telemetry::unknown_kid_waiters_full(&r.provider);
            return false;
        }
        let _waiting = Waiting(&r.waiters);
        matches!(
            tokio::time::timeout(r.wait + r.spread, rx.wait_for(|g| *g > seen)).await,
            Ok(Ok(_))
        )
    }

    /// The kid is still unknown after a fresh fetch.
    pub fn remember_unknown(&self, kid: &str) {
        if let Some(r) = &self.refetch {
            let mut st = r.state.lock().unwrap_or_else(|e| e.into_inner());
            remember(&mut st, kid, Instant::now(), r.min_refresh);
        }
    }

    // --- for the refresher task ---

    /// How long the refresher waits, once woken by an unknown kid, before it
    /// fetches: uniform in [0, spread].
    fn unknown_kid_delay(&self) -> Duration {
        use rand::Rng;
        match &self.refetch {
            Some(r) if !r.spread.is_zero() => r.spread.mul_f64(rand::rng().random_range(0.0..=1.0)),
            _ => Duration::ZERO,
        }
    }

    async fn woken(&self) {
        match &self.refetch {
            Some(r) => r.wake.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Interval fetches mark themselves in flight (so an unknown kid meanwhile waits
    /// for them) but do not count against `min_refresh`, which limits refetches
    /// asked for by unknown kids only: a rotation just after a refresh is still
    /// followed at once.
    fn fetch_started(&self) {
        if let Some(r) = &self.refetch {
            r.state.lock().unwrap_or_else(|e| e.into_inner()).in_flight = true;
        }
    }

    fn fetch_finished(&self) {
        if let Some(r) = &self.refetch {
            r.state.lock().unwrap_or_else(|e| e.into_inner()).in_flight = false;
            r.done.send_modify(|g| *g += 1);
        }
    }
}

fn remember(st: &mut RefetchState, kid: &str, now: Instant, ttl: Duration) {
    if st.unknown.len() >= MAX_REMEMBERED_UNKNOWN {
        st.unknown.retain(|_, at| now.duration_since(*at) < ttl);
    }
    if st.unknown.len() < MAX_REMEMBERED_UNKNOWN && kid.len() <= 256 {
        st.unknown.insert(kid.to_owned(), now);
    }
}

/// Upper bound on a JWKS document; a larger one is refused, not parsed.
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path}: {source}")]
    Invalid { path: String, source: KeySetError },
}

/// Reads and validates a JWKS file; the caller decides whether to publish it.
pub fn read_file(path: &Path) -> Result<KeySet, LoadError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| LoadError::Read {
        path: shown.clone(),
        source,
    })?;
    if meta.len() > MAX_JWKS_BYTES {
        return Err(LoadError::TooLarge { path: shown });
    }
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: shown.clone(),
        source,
    })?;
    KeySet::parse(&bytes).map_err(|source| LoadError::Invalid {
        path: shown,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell() -> Arc<KeyCell> {
        Arc::new(KeyCell::remote(
            "p",
            Duration::from_secs(30),
            Duration::from_millis(200),
            DEFAULT_UNKNOWN_KID_WAITERS,
        ))
    }

    #[tokio::test]
    async fn one_fetch_serves_every_waiter_and_min_refresh_limits_the_rest() {
        let cell = cell();
        let fetches = Arc::new(AtomicU64::new(0));
        // A stand-in refresher: each wake is one fetch.
        let (c, f) = (cell.clone(), fetches.clone());
        tokio::spawn(async move {
            loop {
                c.woken().await;
                c.fetch_started();
                f.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
                c.fetch_finished();
            }
        });
        let waiters: Vec<_> = (0..50)
            .map(|i| {
                let c = cell.clone();
                tokio::spawn(async move { c.refetch_for(&format!("kid-{i}")).await })
            })
            .collect();
        let mut completed = 0;
        for w in waiters {
            if w.await.unwrap() {
                completed += 1;
            }
        }
        assert_eq!(fetches.load(Ordering::Relaxed), 1, "singleflight");
        assert_eq!(completed, 50, "every waiter saw the fetch complete");
        // Within min_refresh: no more fetches, and no waiting.
        let started = Instant::now();
        assert!(!cell.refetch_for("kid-new").await);
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(fetches.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn waiters_past_the_bound_are_answered_at_once() {
        let cell = Arc::new(KeyCell::remote(
            "p",
            Duration::from_secs(30),
            Duration::from_secs(5),
            5,
        ));
        let release = Arc::new(Notify::new());
        let (c, r) = (cell.clone(), release.clone());
        tokio::spawn(async move {
            c.woken().await;
            c.fetch_started();
            r.notified().await;
            c.fetch_finished();
        });
        let waiters: Vec<_> = (0..20)
            .map(|i| {
                let c = cell.clone();
                tokio::spawn(async move { c.refetch_for(&format!("kid-{i}")).await })
            })
            .collect();
        // The five that wait are still waiting; the fifteen others have their answer.
        while cell
            .refetch
            .as_ref()
            .unwrap()
            .waiters
            .load(Ordering::Relaxed)
            < 5
            || waiters.iter().filter(|w| w.is_finished()).count() < 15
        {
            tokio::task::yield_now().await;
        }
        release.notify_one();
        let mut completed = 0;
        for w in waiters {
            if w.await.unwrap() {
                completed += 1;
            }
        }
        assert_eq!(completed, 5);
        assert_eq!(
            cell.refetch
                .as_ref()
                .unwrap()
                .waiters
                .load(Ordering::Relaxed),
            0
        );
    }

    #[tokio::test]
    async fn unknown_kids_are_remembered_boundedly() {
        let cell = cell();
        for i in 0..(MAX_REMEMBERED_UNKNOWN + 100) {
            cell.remember_unknown(&format!("k{i}"));
        }
        let r = cell.refetch.as_ref().unwrap();
        assert_eq!(
            r.state.lock().unwrap().unknown.len(),
            MAX_REMEMBERED_UNKNOWN
        );
        assert!(
            !cell.refetch_for("k1").await,
            "remembered kids are not refetched"
        );
    }

    /// A fleet of 200 replicas meets the first token of a rotated key at the same
    /// instant: their refetches are spread over [0, spread], not one instant, and
    /// every first Check still sees the new key within spread + one fetch, inside
    /// the stated bound (spread + unknown_kid_wait). Paused time: no sleeping.
    #[tokio::test(start_paused = true)]
    async fn a_fleet_spreads_its_unknown_kid_refetches_within_the_bound() {
        let spread = Duration::from_millis(400);
        let wait = Duration::from_millis(100);
        let fetch = Duration::from_millis(30);
        // tokio's Instant: paused time moves it.
        let start = tokio::time::Instant::now();
        let mut replicas = Vec::new();
        for _ in 0..200 {
            let cell = Arc::new(
                KeyCell::remote("p", Duration::from_secs(30), wait, 8).with_spread(spread),
            );
            let fetched_at = Arc::new(Mutex::new(None));
            // The refresher's unknown-kid path: woken, delayed, one fetch.
            let (c, at) = (cell.clone(), fetched_at.clone());
            tokio::spawn(async move {
                c.woken().await;
                tokio::time::sleep(c.unknown_kid_delay()).await;
                c.fetch_started();
                *at.lock().unwrap() = Some(start.elapsed());
                tokio::time::sleep(fetch).await;
                c.fetch_finished();
            });
            let c = cell.clone();
            let check = tokio::spawn(async move {
                let ok = c.refetch_for("rotated").await;
                (ok, start.elapsed())
            });
            replicas.push((check, fetched_at));
        }
        let mut starts = Vec::new();
        for (check, fetched_at) in replicas {
            let (ok, waited) = check.await.unwrap();
            assert!(ok, "the first rotated token sees its refetch");
            assert!(waited <= spread + wait, "waited {waited:?}");
            starts.push(fetched_at.lock().unwrap().unwrap());
        }
        starts.sort();
        let (first, last) = (starts[0], starts[starts.len() - 1]);
        assert!(last <= spread, "{last:?}");
        // Uniform over 400ms: 200 fetches land in most of the 8 slots of 50ms.
        let slots: std::collections::HashSet<_> =
            starts.iter().map(|d| d.as_millis() / 50).collect();
        assert!(slots.len() >= 6, "spread over {slots:?}");
        assert!(last - first >= spread / 2, "{first:?}..{last:?}");
    }

    #[tokio::test]
    async fn file_cells_never_refetch() {
        assert!(!KeyCell::default().refetch_for("x").await);
    }
}
