//! Policy hot reload. Watches the config file's directory (Kubernetes updates a
//! ConfigMap by swapping the `..data` symlink, which a watch on the file itself
//! misses), listens for SIGHUP, and polls slowly as a last resort. A change is
//! debounced, the whole file parsed, validated and compiled, and only a valid
//! policy is swapped in; otherwise the old one keeps serving and the errors are
//! logged, counted and shown on /statusz. Never called from a Check.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::LoadError;
use crate::jwks::Supervisor;
use crate::load;
use crate::policy::Listen;
use crate::state::{ReloadStatus, State};
use crate::stores::{Snapshot, Stores};
use crate::telemetry;

/// Editors and ConfigMap updates write in bursts: wait for quiet before reading.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// The fallback for filesystems without change events.
const POLL: Duration = Duration::from_secs(10);

pub struct Reloader {
    path: PathBuf,
    listen: Listen,
    state: Arc<State>,
    keys: Supervisor,
    /// The bytes of the file last read, valid or not: unchanged bytes are not re-read.
    last_source: Option<Vec<u8>>,
    /// File events and SIGHUP, armed in `new`: before Valet reports ready, so a
    /// change written right after start is never missed.
    events: mpsc::Receiver<&'static str>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Reloader {
    /// Arms the file watcher and the SIGHUP handler at once (call it inside the
    /// runtime); [`Reloader::run`] then acts on what they report.
    pub fn new(path: PathBuf, listen: Listen, state: Arc<State>, keys: Supervisor) -> Self {
        let last_source = std::fs::read(&path).ok();
        let (tx, events) = mpsc::channel::<&'static str>(16);
        let watcher = watch_dir(&path, tx.clone());
        spawn_sighup(tx);
        Reloader {
            path,
            listen,
            state,
            keys,
            last_source,
            events,
            _watcher: watcher,
        }
    }

    pub async fn run(mut self) {
        let mut poll = tokio::time::interval(POLL);
        poll.tick().await;
        loop {
            let trigger = tokio::select! {
                Some(t) = self.events.recv() => t,
                _ = poll.tick() => "poll",
            };
            // Debounce: swallow the rest of the burst.
            tokio::time::sleep(DEBOUNCE).await;
            let mut trigger = trigger;
            while let Ok(t) = self.events.try_recv() {
                if t == "sighup" {
                    trigger = t;
                }
            }
            self.reload(trigger).await;
        }
    }

    /// Reads, validates and, if valid, publishes the policy. SIGHUP always reloads;
    /// other triggers only when the bytes changed.
    pub async fn reload(&mut self, trigger: &'static str) {
        let bytes = std::fs::read(&self.path).ok();
        if trigger != "sighup" && bytes.is_some() && bytes == self.last_source {
            return;
        }
        self.last_source = bytes;
        let mut status = (*self.state.reload_status()).clone();
        status.last_attempt_at = self.state.clock().unix();
        // Compiling a large policy takes milliseconds (1,000 routes: ~130 ms): off the
        // runtime that answers Checks.
        let path = self.path.clone();
        let loaded = crate::telemetry::spawn_blocking(move || load::load(&path))
            .await
            .unwrap_or_else(|e| {
                Err(LoadError::Read {
                    path: self.path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        match loaded {
            Ok(cfg) => {
                if cfg.listen != self.listen {
                    tracing::warn!(
                        "listen addresses changed in {}: they take effect only after a restart",
                        self.path.display()
                    );
                }
                for w in &cfg.warnings {
                    tracing::warn!("{w}");
                }
                let cells = self.keys.adopt(&cfg.policy.providers);
                let old = self.state.snapshot();
                for what in crate::policy::observe::start_only_changes(&old, &cfg.policy) {
                    tracing::warn!(
                        "{what} changed in {}: it takes effect only after a restart",
                        self.path.display()
                    );
                }
                let stores = Stores::carry(&cfg.policy, cells, cfg.revocation, Some(&old))
                    .with_api_keys(&cfg.policy, cfg.api_keys, Some(&old));
                for k in stores.api_key_files() {
                    if !old
                        .stores
                        .api_key_files()
                        .iter()
                        .any(|o| Arc::ptr_eq(o, &k))
                    {
                        telemetry::api_keys_loaded(&k.provider, &k.path, k.current().len());
                    }
                }
                if let Some(r) = &stores.revocation
                    && old
                        .stores
                        .revocation
                        .as_ref()
                        .is_none_or(|old| !Arc::ptr_eq(old, r))
                    && r.is_loaded()
                {
                    telemetry::revocation_loaded(&r.source, r.current().entries);
                }
                let summary = (cfg.policy.routes.len(), cfg.policy.providers.len());
                self.state.store_snapshot(Snapshot::new(cfg.policy, stores));
                status.generation += 1;
                status.loaded_at = status.last_attempt_at;
                status.last_error = None;
                telemetry::policy_reloaded(
                    trigger,
                    status.generation,
                    summary.0,
                    summary.1,
                    status.loaded_at,
                );
            }
            Err(e) => {
                let text = e.to_string();
                for line in text.lines() {
                    tracing::error!(
                        trigger,
                        "policy reload failed, keeping the policy in force: {line}"
                    );
                }
                if let LoadError::Read { .. } = e {
                    // Deleted or unreadable: a ConfigMap mid-swap, or a mistake. Look again soon.
                    self.last_source = None;
                }
                status.last_error = Some(text);
                telemetry::policy_reload_failed();
            }
        }
        self.state.store_reload_status(status);
    }
}

/// Watches the directory, not the file: a symlink swap replaces the file's inode.
fn watch_dir(path: &Path, tx: mpsc::Sender<&'static str>) -> Option<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    // Only the policy file itself (written in place or renamed over) and Kubernetes'
    // `..data` swap entries: other files in the directory (logs, editors' swap
    // files) must not make Valet re-read its policy on every write.
    let relevant = move |p: &Path| {
        p.file_name()
            .is_some_and(|f| f == name.as_os_str() || f.to_string_lossy().starts_with(".."))
    };
    let handler = move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && !event.kind.is_access()
            && event.paths.iter().any(|p| relevant(p))
        {
            let _ = tx.try_send("watch");
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config directory; SIGHUP and a {}s poll remain", POLL.as_secs());
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory");
        return None;
    }
    Some(watcher)
}

fn spawn_sighup(tx: mpsc::Sender<&'static str>) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let _ = tx.send("sighup").await;
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
    }
}

/// The status of the policy loaded at start, `now` unix seconds.
pub fn initial_status(path: &Path, now: u64) -> ReloadStatus {
    ReloadStatus {
        config: path.display().to_string(),
        generation: 1,
        loaded_at: now,
        last_attempt_at: now,
        last_error: None,
    }
}
