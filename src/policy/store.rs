//! `store:` compiled: the Redis a fleet shares (spent DPoP proofs, introspection
//! answers), and what a Check does when it cannot be reached. Data only; the
//! connection lives in the stores (`stores::shared`).

use std::path::Path;
use std::time::Duration;

use crate::config::file::StoreFile;
use crate::config::{Problems, parse_duration};

use super::Inputs;

/// What a DPoP proof gets when the store cannot spend it (`dpop.on_store_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// 503 `dpop_store_unavailable`: no proof passes unless the fleet has spent it.
    Refuse,
    /// Spent in this replica's cache only (a replay to another replica would
    /// pass while the store is down); counted in `valet_store_fallback_total`.
    Local,
}

#[derive(Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// `redis://` or `rediss://` (TLS, certificate verified against the system roots).
    pub url: String,
    /// Put before every key, so that several fleets (or policies) can share one Redis.
    pub key_prefix: String,
    /// Bound of every store call (and of connecting); a Check's deadline bounds it too.
    pub timeout: Duration,
    /// From `password_file`; never logged.
    pub password: Option<String>,
    pub on_dpop_error: OnStoreError,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &self.url)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("on_dpop_error", &self.on_dpop_error)
            .finish()
    }
}

pub const DEFAULT_PREFIX: &str = "valet:";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

pub fn compile(
    file: Option<StoreFile>,
    on_dpop_error: Option<&str>,
    inputs: &Inputs,
    base: &Path,
    p: &mut Problems,
) -> Option<StoreSettings> {
    let on_dpop_error = match on_dpop_error {
        None | Some("local") => OnStoreError::Local,
        Some("refuse") => OnStoreError::Refuse,
        Some(other) => {
            p.error(
                "dpop.on_store_error",
                format!("{other:?}: expected refuse or local"),
            );
            OnStoreError::Local
        }
    };
    let r = file?.redis;
    let at = "store.redis";
    match reqwest::Url::parse(&r.url) {
        Ok(u) if matches!(u.scheme(), "redis" | "rediss") => {
            if u.password().is_some() {
                p.error(
                    format!("{at}.url"),
                    "no password in the URL (it would sit in a ConfigMap): use password_file",
                );
            }
        }
        Ok(u) => p.error(
            format!("{at}.url"),
            format!("scheme {:?}: redis:// or rediss://", u.scheme()),
        ),
        Err(e) => p.error(format!("{at}.url"), format!("not a URL: {e}")),
    }
    let timeout = match &r.timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => parse_duration(t).unwrap_or_else(|e| {
            p.error(format!("{at}.timeout"), e);
            DEFAULT_TIMEOUT
        }),
    };
    if timeout.is_zero() || timeout > Duration::from_secs(5) {
        p.error(
            format!("{at}.timeout"),
            "between 1ms and 5s (a Check waits for it)",
        );
    }
    let password = r.password_file.as_ref().and_then(|f| {
        let path = base.join(f);
        match inputs.secrets.get(&path) {
            Some(Ok(s)) if !s.trim().is_empty() => Some(s.trim_end_matches(['\n', '\r']).into()),
            Some(Ok(_)) => {
                p.error(format!("{at}.password_file"), "the file is empty");
                None
            }
            Some(Err(e)) => {
                p.error(
                    format!("{at}.password_file"),
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
            None => {
                p.error(
                    format!("{at}.password_file"),
                    format!("{} was not read", path.display()),
                );
                None
            }
        }
    });
    Some(StoreSettings {
        url: r.url,
        key_prefix: r.key_prefix.unwrap_or_else(|| DEFAULT_PREFIX.into()),
        timeout,
        password,
        on_dpop_error,
    })
}
