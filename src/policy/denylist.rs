//! `revocation:` compiled: where the denylist comes from (a file, or a URL that
//! every replica of a fleet polls) and, for a URL, how often and how stale it
//! may get. Data only; the list itself lives in the stores (`revocation`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::file::RevocationFile;
use crate::config::{LoadError, Problems, parse_duration};

/// Where the denylist in force comes from; a reload keeps the list while this is equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenylistSource {
    File(PathBuf),
    Uri(RemoteDenylist),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDenylist {
    pub uri: String,
    /// How often the URL is asked (with `If-None-Match`).
    pub refresh_interval: Duration,
    /// Whole-request timeout of one fetch.
    pub timeout: Duration,
    /// A list not confirmed (200 or 304) for longer than this is "unconfirmed".
    pub max_stale: Duration,
}

impl RemoteDenylist {
    pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(60);
    /// Faster than this is a load on the server, not a tighter bound.
    pub const MIN_REFRESH: Duration = Duration::from_millis(100);
}

impl std::fmt::Display for DenylistSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DenylistSource::File(p) => write!(f, "{}", p.display()),
            DenylistSource::Uri(r) => f.write_str(&r.uri),
        }
    }
}

/// The file's `revocation:`; `read` is what the loader found when it read the
/// file (None for a URL, which is fetched by its task, not by the loader).
pub fn compile(
    r: RevocationFile,
    read: Option<&Result<(), LoadError>>,
    base: &Path,
    p: &mut Problems,
) -> Option<DenylistSource> {
    let at = "revocation";
    match (&r.file, &r.uri) {
        (Some(file), None) => {
            for (name, set) in [
                ("refresh_interval", r.refresh_interval.is_some()),
                ("timeout", r.timeout.is_some()),
                ("max_stale", r.max_stale.is_some()),
            ] {
                if set {
                    p.error(
                        format!("{at}.{name}"),
                        "applies to uri only; a file is looked at every second",
                    );
                }
            }
            match read {
                Some(Ok(())) => Some(DenylistSource::File(base.join(file))),
                Some(Err(LoadError::Invalid(errors))) => {
                    p.errors.extend(errors.iter().cloned());
                    None
                }
                Some(Err(e)) => {
                    p.error("revocation.file", e.to_string());
                    None
                }
                None => {
                    p.error("revocation.file", "the denylist was not read");
                    None
                }
            }
        }
        (None, Some(uri)) => {
            match reqwest::Url::parse(uri) {
                Ok(u) if matches!(u.scheme(), "https" | "http") => {}
                Ok(u) => p.error(
                    "revocation.uri",
                    format!("scheme {:?}: only http and https are fetched", u.scheme()),
                ),
                Err(e) => p.error("revocation.uri", format!("{uri:?} is not a URL: {e}")),
            }
            let mut duration = |v: &Option<String>, name: &str, default: Duration| match v {
                None => default,
                Some(t) => parse_duration(t).unwrap_or_else(|e| {
                    p.error(format!("{at}.{name}"), e);
                    default
                }),
            };
            let refresh_interval = duration(
                &r.refresh_interval,
                "refresh_interval",
                RemoteDenylist::DEFAULT_REFRESH,
            );
            let timeout = duration(&r.timeout, "timeout", RemoteDenylist::DEFAULT_TIMEOUT);
            let max_stale = duration(&r.max_stale, "max_stale", RemoteDenylist::DEFAULT_MAX_STALE);
            if refresh_interval < RemoteDenylist::MIN_REFRESH {
                p.error(format!("{at}.refresh_interval"), "at least 100ms");
            }
            if timeout.is_zero() {
                p.error(format!("{at}.timeout"), "must be positive");
            }
            if max_stale < refresh_interval {
                p.error(
                    format!("{at}.max_stale"),
                    "at least refresh_interval (a list is confirmed once per interval)",
                );
            }
            Some(DenylistSource::Uri(RemoteDenylist {
                uri: uri.clone(),
                refresh_interval,
                timeout,
                max_stale,
            }))
        }
        _ => {
            p.error(at, "set exactly one of file, uri");
            None
        }
    }
}
