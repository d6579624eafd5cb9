//! One background task per provider keeps its key set current: a file is re-read
//! when it changes; a remote set is refreshed on an interval (Cache-Control within
//! bounds, jittered), early on an unknown kid, with backoff on failure. Every
//! failure keeps the last good set. Nothing here is awaited by a Check except the
//! bounded wait in [`KeyCell::refetch_for`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::task::JoinHandle;

use super::{Fetched, Fetcher, KeyCell, KeySet, read_file};
use crate::clock::Clock;
use crate::provider::{JwksSource, Provider, RemoteJwks, RemoteLocation};
use crate::telemetry;

/// How often a JWKS file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(1);
/// Backoff after a failed fetch: doubling from the first, up to the cap.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// The running key tasks, by provider name. Owned by whoever publishes policies.
#[derive(Default)]
pub struct Supervisor {
    tasks: HashMap<Arc<str>, Task>,
    fetcher: Fetcher,
    clock: Clock,
}

struct Task {
    /// What the task was started for; a provider that changes any of it gets a new task.
    identity: (String, JwksSource),
    cell: Arc<KeyCell>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Key ages and stale-cache limits measured on `clock` (tests move time).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The key cell of every provider of a freshly compiled policy, in order: the
    /// cell of an unchanged provider (same name, issuer and `jwks`) is kept (keys
    /// survive a reload), new providers get a task and their first keys (file, or
    /// on-disk cache), removed ones are stopped. Call before the policy is published.
    pub fn adopt(&mut self, providers: &[Arc<Provider>]) -> Vec<Arc<KeyCell>> {
        let mut kept = HashMap::new();
        let mut cells = Vec::with_capacity(providers.len());
        for provider in providers {
            let identity = (provider.issuer.clone(), provider.jwks.clone());
            let task = match self.tasks.remove(&provider.name) {
                Some(t) if t.identity == identity => t,
                _ => self.start(provider),
            };
            cells.push(task.cell.clone());
            kept.insert(provider.name.clone(), task);
        }
        for (name, _) in self.tasks.drain() {
            tracing::info!(provider = %name, "provider removed: its key task stops");
        }
        self.tasks = kept;
        cells
    }

    fn start(&self, provider: &Provider) -> Task {
        let name = provider.name.clone();
        let identity = (provider.issuer.clone(), provider.jwks.clone());
        telemetry::jwks_provider_started(&name);
        match &provider.jwks {
            JwksSource::File(path) => {
                let cell = Arc::new(KeyCell::default());
                let stamp = file_stamp(path);
                load_file(&name, path, &cell, "startup", self.clock.unix());
                let handle = crate::telemetry::spawn(watch_file(
                    name.to_string(),
                    path.clone(),
                    cell.clone(),
                    stamp,
                    self.clock.clone(),
                ));
                Task {
                    identity,
                    cell,
                    handle: Some(handle),
                }
            }
            JwksSource::None => Task {
                identity,
                cell: Arc::new(KeyCell::default()),
                handle: None,
            },
            JwksSource::Remote(cfg) => {
                let cell = Arc::new(
                    KeyCell::remote(
                        &name,
                        cfg.min_refresh,
                        cfg.unknown_kid_wait,
                        cfg.unknown_kid_waiters,
                    )
                    .with_spread(cfg.unknown_kid_spread),
                );
                if let Some(dir) = &cfg.cache_dir {
                    let now = self.clock.unix();
                    load_cache(&name, &provider.issuer, dir, cfg.max_stale, &cell, now);
                }
                let handle = crate::telemetry::spawn(refresh_remote(
                    name.to_string(),
                    provider.issuer.clone(),
                    cfg.clone(),
                    cell.clone(),
                    self.fetcher.clone(),
                    self.clock.clone(),
                ));
                Task {
                    identity,
                    cell,
                    handle: Some(handle),
                }
            }
        }
    }
}

fn publish(name: &str, cell: &KeyCell, set: KeySet, trigger: &'static str, confirmed_at: u64) {
    for skipped in &set.skipped {
        tracing::warn!(provider = name, key = %skipped, "jwks key skipped");
    }
    let keys = set.len();
    let kids: Vec<String> = set.kids().map(str::to_owned).collect();
    if cell.publish(set, confirmed_at) {
        telemetry::jwks_kids_changed(name, &kids.iter().map(String::as_str).collect::<Vec<_>>());
    }
    telemetry::jwks_loaded(name, trigger, "success", keys, confirmed_at);
}

/// Loads every provider's keys once, for the CLI (`explain --token`, `test`):
/// files are read, remote sets fetched once. Failures are returned, not fatal:
/// a provider without keys then decides `keys_unavailable`, which is the truth.
pub async fn load_once(
    providers: &[Arc<Provider>],
    cells: &[Arc<KeyCell>],
    clock: &Clock,
) -> Vec<String> {
    let fetcher = Fetcher::new();
    let mut problems = Vec::new();
    for (p, cell) in providers.iter().zip(cells) {
        let result: Result<KeySet, String> = match &p.jwks {
            JwksSource::None => continue,
            JwksSource::File(path) => read_file(path).map_err(|e| e.to_string()),
            JwksSource::Remote(cfg) => {
                let uri = match &cfg.location {
                    RemoteLocation::Uri(u) => Ok(u.clone()),
                    RemoteLocation::Discovery => fetcher
                        .discover(&p.issuer, cfg.timeout)
                        .await
                        .map_err(|e| e.to_string()),
                };
                match uri {
                    Ok(u) => match fetcher.jwks(&u, None, cfg.timeout).await {
                        Ok(Fetched::New { set, .. }) => Ok(set),
                        Ok(Fetched::NotModified { .. }) => Err("unexpected 304".into()),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(set) => {
                cell.publish(set, clock.unix());
            }
            Err(e) => problems.push(format!("provider {}: {e}", p.name)),
        }
    }
    problems
}

// === File ===

/// (modified, length, inode): a ConfigMap update swaps a symlink, which changes all three.
type Stamp = Option<(SystemTime, u64, u64)>;

fn file_stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn load_file(name: &str, path: &Path, cell: &KeyCell, trigger: &'static str, now: u64) {
    match read_file(path) {
        Ok(set) => publish(name, cell, set, trigger, now),
        Err(e) => telemetry::jwks_failed(name, trigger, &e),
    }
}

async fn watch_file(
    name: String,
    path: PathBuf,
    cell: Arc<KeyCell>,
    mut stamp: Stamp,
    clock: Clock,
) {
    let mut tick = tokio::time::interval(FILE_POLL);
    loop {
        tick.tick().await;
        let now = file_stamp(&path);
        if now != stamp {
            stamp = now;
            // A file caught mid-write fails validation and is retried on the next change.
            load_file(&name, &path, &cell, "file_change", clock.unix());
        } else if now.is_some() && cell.has_keys() {
            // Unchanged and still readable: the keys in force are current, not stale.
            cell.confirm(clock.unix());
        }
    }
}

// === Remote ===

async fn refresh_remote(
    name: String,
    issuer: String,
    cfg: RemoteJwks,
    cell: Arc<KeyCell>,
    fetcher: Fetcher,
    clock: Clock,
) {
    let mut jwks_uri = match &cfg.location {
        RemoteLocation::Uri(u) => Some(u.clone()),
        RemoteLocation::Discovery => None,
    };
    let mut etag: Option<String> = None;
    let mut failures: u32 = 0;
    let mut trigger = "startup";
    loop {
        cell.fetch_started();
        let result = async {
            let uri = match &jwks_uri {
                Some(u) => u.clone(),
                None => {
                    let u = fetcher.discover(&issuer, cfg.timeout).await?;
                    tracing::info!(provider = %name, jwks_uri = %u, "discovered");
                    jwks_uri = Some(u.clone());
                    u
                }
            };
            fetcher.jwks(&uri, etag.as_deref(), cfg.timeout).await
        }
        .await;
        let delay = match result {
            Ok(Fetched::New {
                set,
                raw,
                etag: tag,
                max_age,
            }) => {
                etag = tag;
                failures = 0;
                let now = clock.unix();
                publish(&name, &cell, set, trigger, now);
                if let Some(dir) = &cfg.cache_dir {
                    save_cache(&name, &issuer, dir, &raw, now);
                }
                next_refresh(&cfg, max_age)
            }
            Ok(Fetched::NotModified { max_age }) => {
                failures = 0;
                let now = clock.unix();
                cell.confirm(now);
                let keys = cell.load().map_or(0, |s| s.len());
                telemetry::jwks_loaded(&name, trigger, "not_modified", keys, now);
                next_refresh(&cfg, max_age)
            }
            Err(e) => {
                telemetry::jwks_failed(&name, trigger, &e);
                if matches!(cfg.location, RemoteLocation::Discovery) {
                    // The jwks_uri may have moved: discover again next time.
                    jwks_uri = None;
                }
                failures += 1;
                backoff(failures, &cfg)
            }
        };
        cell.fetch_finished();

        trigger = tokio::select! {
            _ = tokio::time::sleep(delay) => "interval",
            _ = cell.woken() => "unknown_kid",
        };
        if trigger == "unknown_kid" {
            // Spread a fleet's refetches for one rotation (`unknown_kid_spread`);
            // Checks meanwhile wait for this fetch, as it is marked in flight.
            tokio::time::sleep(cell.unknown_kid_delay()).await;
        }
    }
}

/// Cache-Control's max-age within [min_refresh, max_refresh], less up to 10%
/// jitter so a fleet started together does not refresh together.
fn next_refresh(cfg: &RemoteJwks, max_age: Option<Duration>) -> Duration {
    let base = max_age
        .unwrap_or(cfg.refresh_interval)
        .clamp(cfg.min_refresh, cfg.max_refresh);
    jitter(base)
}

fn backoff(failures: u32, cfg: &RemoteJwks) -> Duration {
    let exp = BACKOFF_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16));
    jitter(
        exp.min(BACKOFF_CAP)
            .min(cfg.refresh_interval.max(BACKOFF_FIRST)),
    )
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..=1.0))
}

// === On-disk cache of the last good set ===

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheFile {
    issuer: String,
    fetched_at: u64,
    jwks: serde_json::Value,
}

fn cache_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.jwks.json"))
}

/// Written to a temporary file and renamed: a crash never leaves half a file.
fn save_cache(name: &str, issuer: &str, dir: &Path, raw: &[u8], now: u64) {
    let result = (|| -> std::io::Result<()> {
        let jwks: serde_json::Value = serde_json::from_slice(raw).map_err(std::io::Error::other)?;
        let doc = CacheFile {
            issuer: issuer.into(),
            fetched_at: now,
            jwks,
        };
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{name}.jwks.json.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_vec(&doc).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, cache_path(dir, name))
    })();
    if let Err(e) = result {
        tracing::warn!(provider = name, dir = %dir.display(), error = %e, "cannot write the jwks cache");
    }
}

fn load_cache(name: &str, issuer: &str, dir: &Path, max_stale: Duration, cell: &KeyCell, now: u64) {
    let path = cache_path(dir, name);
    let Ok(bytes) = std::fs::read(&path) else {
        return;
    };
    let why = match serde_json::from_slice::<CacheFile>(&bytes) {
        Err(e) => format!("unreadable: {e}"),
        Ok(c) if c.issuer != issuer => "written for another issuer".into(),
        Ok(c) if now.saturating_sub(c.fetched_at) > max_stale.as_secs() => {
            format!("older than max_stale ({}s)", max_stale.as_secs())
        }
        Ok(c) => match KeySet::parse(c.jwks.to_string().as_bytes()) {
            Ok(set) => {
                tracing::info!(
                    provider = name,
                    age_secs = now.saturating_sub(c.fetched_at),
                    "jwks loaded from cache until the IdP answers"
                );
                publish(name, cell, set, "cache", c.fetched_at);
                return;
            }
            Err(e) => format!("invalid: {e}"),
        },
    };
    tracing::warn!(provider = name, path = %path.display(), "jwks cache not used: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RemoteJwks {
        RemoteJwks {
            location: RemoteLocation::Discovery,
            refresh_interval: Duration::from_secs(300),
            min_refresh: Duration::from_secs(30),
            max_refresh: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
            unknown_kid_wait: Duration::from_millis(100),
            unknown_kid_spread: Duration::ZERO,
            unknown_kid_waiters: crate::jwks::DEFAULT_UNKNOWN_KID_WAITERS,
            cache_dir: None,
            max_stale: Duration::from_secs(86400),
        }
    }

    #[test]
    fn refresh_follows_cache_control_within_bounds() {
        let c = cfg();
        let within = |d: Duration, lo: u64, hi: u64| {
            d >= Duration::from_secs(lo) && d <= Duration::from_secs(hi)
        };
        assert!(within(next_refresh(&c, None), 270, 300));
        assert!(within(
            next_refresh(&c, Some(Duration::from_secs(600))),
            540,
            600
        ));
        assert!(within(
            next_refresh(&c, Some(Duration::from_secs(5))),
            27,
            30
        ));
        assert!(within(
            next_refresh(&c, Some(Duration::from_secs(999_999))),
            3240,
            3600
        ));
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let c = cfg();
        assert!(backoff(1, &c) <= Duration::from_secs(1));
        assert!(
            backoff(3, &c) <= Duration::from_secs(4)
                && backoff(3, &c) >= Duration::from_millis(3600)
        );
        assert!(backoff(30, &c) <= BACKOFF_CAP);
    }

    #[test]
    fn the_cache_round_trips_and_refuses_stale_or_foreign_sets() {
        let dir = crate::tempdir::tempdir().unwrap();
        let raw = br#"{"keys":[{"kty":"oct","kid":"a","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}]}"#;
        save_cache(
            "corp",
            "https://idp/",
            dir.path(),
            raw,
            crate::clock::system_unix(),
        );
        let cell = KeyCell::default();
        load_cache(
            "corp",
            "https://other/",
            dir.path(),
            Duration::from_secs(60),
            &cell,
            crate::clock::system_unix(),
        );
        assert!(!cell.has_keys(), "another issuer's cache is ignored");
        load_cache(
            "corp",
            "https://idp/",
            dir.path(),
            Duration::from_secs(60),
            &cell,
            crate::clock::system_unix(),
        );
        assert!(cell.has_keys());
        save_cache(
            "old",
            "https://idp/",
            dir.path(),
            raw,
            crate::clock::system_unix() - 3600,
        );
        let cell = KeyCell::default();
        load_cache(
            "old",
            "https://idp/",
            dir.path(),
            Duration::from_secs(60),
            &cell,
            crate::clock::system_unix(),
        );
        assert!(!cell.has_keys(), "older than max_stale");
    }
}
