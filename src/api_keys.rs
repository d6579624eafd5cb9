//! API keys as a provider (`providers[].api_keys: { file }`): machine clients
//! outside the mesh present a key; the file holds only each key's SHA-256 and
//! the claims it stands for, so it holds no usable key. Watched like the
//! denylist: looked at every second, swapped whole, a broken file keeps the
//! table in force and says what is wrong at file:line:column.
//!
//! **No timing leak.** A presented key is hashed with SHA-256 (constant time in
//! its length), then its digest is looked up in a hash map. The lookup's timing
//! depends on the digest only, never on how much of a stored key a guess shares:
//! to make a digest land near a stored one an attacker would need SHA-256
//! preimages, and the map's SipHash keys are random per process, so even the
//! bucket a digest falls in is unknown to them. What it can tell is "no such key",
//! which the answer says anyway.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use aws_lc_rs::digest::{SHA256, digest};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::position::Positions;
use crate::config::{self, LoadError, Problems};
use crate::revocation::{POLL, Stamp, stamp};
use crate::telemetry;

/// A key file is a list of partners, not of users.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
pub const MAX_KEYS: usize = 10_000;

type Digest = [u8; 32];

/// The live table of one provider's key file.
pub struct ApiKeys {
    pub path: PathBuf,
    pub provider: Arc<str>,
    /// Filled in as every key's `iss` (so the denylist's issuer rules apply).
    pub issuer: String,
    table: ArcSwap<KeyTable>,
    seen: Mutex<Option<Stamp>>,
}

#[derive(Debug, Default)]
pub struct KeyTable {
    by_digest: HashMap<Digest, Arc<Map<String, Value>>>,
}

impl KeyTable {
    /// The claims of `key`, if it is one of the table's.
    pub fn lookup(&self, key: &str) -> Option<&Arc<Map<String, Value>>> {
        let d: Digest = digest(&SHA256, key.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        self.by_digest.get(&d)
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

impl ApiKeys {
    /// Reads the file now: a policy naming a key file that cannot be read is invalid.
    pub fn load(path: PathBuf, provider: Arc<str>, issuer: String) -> Result<Self, LoadError> {
        let seen = stamp(&path);
        let table = read(&path, &issuer)?;
        Ok(ApiKeys {
            path,
            provider,
            issuer,
            table: ArcSwap::from_pointee(table),
            seen: Mutex::new(seen),
        })
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<KeyTable>> {
        self.table.load()
    }

    /// Re-reads the file if it changed since last looked at; true when a new
    /// table was published.
    pub fn refresh(&self) -> bool {
        let now = stamp(&self.path);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match read(&self.path, &self.issuer) {
            Ok(table) => {
                telemetry::api_keys_loaded(&self.provider, &self.path, table.len());
                self.table.store(Arc::new(table));
                true
            }
            Err(e) => {
                if let LoadError::Read { .. } = e {
                    // Mid-swap or deleted: look again next tick.
                    *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                telemetry::api_keys_failed(&self.provider, &self.path, &e);
                false
            }
        }
    }
}

/// Polls the key files in force, as `current` says which (those of the
/// snapshot in force).
pub async fn watch(current: impl Fn() -> Vec<Arc<ApiKeys>>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let files = current();
        if !files.is_empty() {
            let _ = crate::telemetry::spawn_blocking(move || {
                for f in files {
                    f.refresh();
                }
            })
            .await;
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// Lower-case hex of the SHA-256 of the key.
    sha256: String,
    #[serde(default)]
    claims: Map<String, Value>,
    /// Free text (whose key, which ticket), never read.
    #[allow(dead_code)]
    note: Option<String>,
}

fn read(path: &Path, issuer: &str) -> Result<KeyTable, LoadError> {
    let source = config::read_text(path, MAX_FILE_BYTES)?;
    parse(&source, path, issuer)
}

/// Parses a key file; every problem is placed at file:line:column.
pub fn parse(source: &str, path: &Path, issuer: &str) -> Result<KeyTable, LoadError> {
    if config::is_empty_yaml(source) {
        return Err(config::whole_file(path, "the file is empty"));
    }
    let file: KeyFile = serde_yaml::from_str(source)
        .map_err(|e| LoadError::Invalid(vec![config::serde_error(&e, path)]))?;
    let positions = Positions::index(source);
    let mut p = Problems::new(path, &positions);
    if file.keys.len() > MAX_KEYS {
        p.error("keys", format!("more than {MAX_KEYS} keys"));
    }
    let mut table = KeyTable::default();
    for (i, entry) in file.keys.into_iter().enumerate() {
        let at = format!("keys[{i}]");
        let hex = entry.sha256.as_str();
        let parsed = (hex.len() == 64
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| {
            let mut d = [0u8; 32];
            for (j, out) in d.iter_mut().enumerate() {
                *out = u8::from_str_radix(&hex[2 * j..2 * j + 2], 16).ok()?;
            }
            Some(d)
        })
        .flatten();
        let Some(d) = parsed else {
            p.error(
                format!("{at}.sha256"),
                "must be the 64 lower-case hex digits of the key's SHA-256 (valet api-key prints it)",
            );
            continue;
        };
        let mut claims = entry.claims;
        match claims.get("iss") {
            Some(Value::String(s)) if s == issuer => {}
            None => {
                claims.insert("iss".into(), Value::String(issuer.to_string()));
            }
            Some(_) => {
                p.error(
                    format!("{at}.claims.iss"),
                    format!("a key's issuer is its provider's ({issuer:?}): leave iss out"),
                );
                continue;
            }
        }
        if table.by_digest.insert(d, Arc::new(claims)).is_some() {
            p.error(format!("{at}.sha256"), "the same key is listed twice");
        }
    }
    if p.errors.is_empty() {
        Ok(table)
    } else {
        Err(LoadError::Invalid(p.errors))
    }
}

/// A new key (32 random bytes, base64url: 43 characters, a valid RFC 6750
/// token) and its file entry's digest.
pub fn generate() -> Result<(String, String), aws_lc_rs::error::Unspecified> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)?;
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    Ok((key.clone(), hex_digest(&key)))
}

/// Lower-case hex of the SHA-256 of `key`: what a file entry's `sha256` holds.
pub fn hex_digest(key: &str) -> String {
    digest(&SHA256, key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(src: &str) -> Result<KeyTable, String> {
        parse(src, Path::new("/k/keys.yaml"), "api-keys:partners").map_err(|e| e.to_string())
    }

    #[test]
    fn a_key_is_found_by_its_digest_only() {
        let (key, hex) = generate().unwrap();
        assert_eq!(key.len(), 43);
        let t = table(&format!(
            "keys:\n  - sha256: {hex}\n    claims: {{ sub: acme, scope: 'invoices:read' }}\n    note: INC-1\n"
        ))
        .unwrap();
        let claims = t.lookup(&key).expect("found");
        assert_eq!(claims["sub"], "acme");
        assert_eq!(claims["iss"], "api-keys:partners", "the provider's issuer");
        assert!(t.lookup(&hex).is_none(), "the digest is no key");
        assert!(t.lookup(&key[1..]).is_none());
        assert_ne!(generate().unwrap().0, key, "random");
    }

    #[test]
    fn problems_have_positions() {
        let (_, hex) = generate().unwrap();
        let e = table(&format!(
            "keys:\n  - sha256: {}\n  - sha256: {hex}\n    claims: {{ iss: other }}\n  - sha256: {hex}\n  - sha256: {hex}\n",
            hex.to_uppercase()
        ))
        .unwrap_err();
        assert!(
            e.contains("/k/keys.yaml:2:13: keys[0].sha256: must be the 64"),
            "{e}"
        );
        assert!(e.contains("/k/keys.yaml:4:20: keys[1].claims.iss:"), "{e}");
        assert!(
            e.contains("/k/keys.yaml:6:13: keys[3].sha256: the same key is listed twice"),
            "{e}"
        );
        let e = table("keys:\n  - sha256: x\n    claim: {}\n").unwrap_err();
        assert!(
            e.contains("/k/keys.yaml:3:5:") && e.contains("unknown field `claim`"),
            "{e}"
        );
        assert!(table("# nothing\n").unwrap_err().contains("empty"));
    }
}
