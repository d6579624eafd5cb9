//! Emergency revocation: a denylist file of token ids, subjects and "everything an
//! issuer issued before T", checked after a token is verified (cached or not,
//! JWT or introspected). The file is polled every second and swapped whole; a
//! broken file keeps the list in force and says what is wrong, where.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::position::Positions;
use crate::config::{self, LoadError, Problems};
use crate::state::State;
use crate::telemetry;

/// How often the file is looked at: propagation is at most this plus a read.
pub const POLL: Duration = Duration::from_secs(1);
/// A denylist is for emergencies, not for every token ever issued.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The live list for one file, shared by successive policies that name the same file.
pub struct Revocation {
    pub path: PathBuf,
    list: ArcSwap<Denylist>,
    /// What the file looked like when last read, valid or not.
    seen: Mutex<Option<Stamp>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

/// Which rule revoked a token: for logs, never a value from the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Jti,
    Sub,
    IssuedBefore,
}

impl Rule {
    pub fn label(self) -> &'static str {
        match self {
            Rule::Jti => "jti",
            Rule::Sub => "sub",
            Rule::IssuedBefore => "issued_before",
        }
    }
}

#[derive(Debug, Default)]
pub struct Denylist {
    /// `jti` of any issuer, and (issuer, jti) pairs.
    jti: HashSet<String>,
    jti_of: HashSet<(String, String)>,
    sub: HashSet<String>,
    sub_of: HashSet<(String, String)>,
    /// Tokens of this issuer with `iat` before this Unix time (or without `iat`).
    issued_before: HashMap<String, u64>,
    pub entries: usize,
}

impl Denylist {
    pub fn revoked(&self, claims: &Map<String, Value>) -> Option<Rule> {
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let hit = |set: &HashSet<String>, of: &HashSet<(String, String)>, claim: &str| {
            claims.get(claim).and_then(Value::as_str).is_some_and(|v| {
                set.contains(v)
                    || (!of.is_empty() && of.contains(&(iss.to_string(), v.to_string())))
            })
        };
        if hit(&self.jti, &self.jti_of, "jti") {
            return Some(Rule::Jti);
        }
        if hit(&self.sub, &self.sub_of, "sub") {
            return Some(Rule::Sub);
        }
        if let Some(before) = self.issued_before.get(iss) {
            // Without `iat` the token cannot prove it is newer than the cut.
            let iat = claims.get("iat").and_then(Value::as_f64);
            if iat.is_none_or(|t| t < *before as f64) {
                return Some(Rule::IssuedBefore);
            }
        }
        None
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileList {
    #[serde(default)]
    revoked: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    jti: Option<String>,
    sub: Option<String>,
    issuer: Option<String>,
    issued_before: Option<serde_yaml::Value>,
    /// Free text for the people who read the file (ticket, incident); never used.
    #[allow(dead_code)]
    note: Option<String>,
}

impl Revocation {
    /// Reads the file now: a policy naming a denylist that cannot be read is invalid.
    pub fn load(path: PathBuf) -> Result<Self, LoadError> {
        let stamp = stamp(&path);
        let list = read(&path)?;
        Ok(Revocation {
            path,
            list: ArcSwap::from_pointee(list),
            seen: Mutex::new(stamp),
        })
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<Denylist>> {
        self.list.load()
    }

    /// Re-reads the file if it changed since last looked at. Returns true when a
    /// new list was published.
    pub fn refresh(&self) -> bool {
        let now = stamp(&self.path);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match read(&self.path) {
            Ok(list) => {
                telemetry::revocation_loaded(&self.path, list.entries);
                self.list.store(Arc::new(list));
                true
            }
            Err(e) => {
                if let LoadError::Read { .. } = e {
                    // Mid-swap or deleted: look again next tick.
                    *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                telemetry::revocation_failed(&self.path, &e);
                false
            }
        }
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// Polls the denylist of whichever policy is in force.
pub async fn watch(state: Arc<State>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(r) = state.policy().revocation.clone() {
            // A stat per second; reading and parsing only on change, off the runtime.
            let _ = tokio::task::spawn_blocking(move || r.refresh()).await;
        }
    }
}

fn read(path: &Path) -> Result<Denylist, LoadError> {
    parse(&config::read_text(path, MAX_FILE_BYTES)?, path)
}

/// Parses a denylist; every problem is reported with its line and column.
pub fn parse(source: &str, path: &Path) -> Result<Denylist, LoadError> {
    // An empty file is a truncated write, not "revoke nothing": say so and keep
    // the list in force. (An empty list is written `revoked: []`.)
    if config::is_empty_yaml(source) {
        return Err(config::whole_file(
            path,
            "the file is empty (write `revoked: []` for none)",
        ));
    }
    let file: FileList = serde_yaml::from_str(source)
        .map_err(|e| LoadError::Invalid(vec![config::serde_error(&e, path)]))?;
    let positions = Positions::index(source);
    let mut p = Problems::new(path, &positions);
    let mut list = Denylist::default();
    for (i, e) in file.revoked.into_iter().enumerate() {
        let at = format!("revoked[{i}]");
        let kinds = [e.jti.is_some(), e.sub.is_some(), e.issued_before.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            p.error(
                &at,
                "each entry names exactly one of jti, sub or issued_before (with an optional issuer)",
            );
            continue;
        }
        if let Some(iss) = &e.issuer
            && iss.is_empty()
        {
            p.error(format!("{at}.issuer"), "empty issuer");
            continue;
        }
        let pair = |v: String| (e.issuer.clone().unwrap_or_default(), v);
        match (e.jti, e.sub, e.issued_before) {
            (Some(jti), _, _) if jti.is_empty() => p.error(format!("{at}.jti"), "empty jti"),
            (Some(jti), _, _) => match &e.issuer {
                None => _ = list.jti.insert(jti),
                Some(_) => _ = list.jti_of.insert(pair(jti)),
            },
            (_, Some(sub), _) if sub.is_empty() => p.error(format!("{at}.sub"), "empty sub"),
            (_, Some(sub), _) => match &e.issuer {
                None => _ = list.sub.insert(sub),
                Some(_) => _ = list.sub_of.insert(pair(sub)),
            },
            (_, _, Some(when)) => {
                let Some(iss) = e.issuer.clone() else {
                    p.error(&at, "issued_before needs the issuer it applies to");
                    continue;
                };
                match time(&when) {
                    Ok(t) => {
                        let cut = list.issued_before.entry(iss).or_insert(t);
                        *cut = (*cut).max(t);
                    }
                    Err(why) => p.error(format!("{at}.issued_before"), why),
                }
            }
            _ => unreachable!("exactly one kind was checked above"),
        }
        list.entries += 1;
    }
    if !p.errors.is_empty() {
        return Err(LoadError::Invalid(p.errors));
    }
    Ok(list)
}

/// RFC 3339 (`2026-11-27T12:00:00Z`, `…+02:00`, fractions ignored) or Unix seconds.
fn time(v: &serde_yaml::Value) -> Result<u64, String> {
    match v {
        serde_yaml::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| "Unix seconds must be a whole, non-negative number".into()),
        serde_yaml::Value::String(s) => rfc3339(s).ok_or_else(|| {
            format!("{s:?} is not a time like 2026-11-27T12:00:00Z (RFC 3339) or Unix seconds")
        }),
        _ => Err("a time like 2026-11-27T12:00:00Z (RFC 3339) or Unix seconds".into()),
    }
}

fn rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days_in_month = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || !(1..=days_in_month[(mo - 1) as usize]).contains(&d)
        || h > 23
        || mi > 59
        || sec > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let digits = |r: &str| r.len() == 2 && r.bytes().all(|c| c.is_ascii_digit());
            if rest.len() != 6
                || rest.as_bytes()[3] != b':'
                || !digits(&rest[1..3])
                || !digits(&rest[4..6])
            {
                return None;
            }
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    u64::try_from(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn list(src: &str) -> Denylist {
        parse(src, Path::new("deny.yaml")).unwrap()
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339("2026-11-27T12:00:00Z"), Some(1_795_780_800));
        assert_eq!(
            rfc3339("2026-11-27T14:00:00.123+02:00"),
            Some(1_795_780_800)
        );
        assert_eq!(rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(rfc3339("2026-11-27"), None);
        assert_eq!(rfc3339("2026-13-27T12:00:00Z"), None);
        assert_eq!(rfc3339("2026-11-27T12:00:00"), None);
        assert_eq!(rfc3339("2026-02-29T00:00:00Z"), None);
        assert_eq!(rfc3339("2026-04-31T00:00:00Z"), None);
        assert_eq!(rfc3339("2026-11-27T12:00:00+99:00"), None);
        assert_eq!(rfc3339("2026-11-27T12:00:00+-1:00"), None);
    }

    #[test]
    fn each_rule_revokes_what_it_names_and_nothing_else() {
        let l = list(
            "revoked:\n\
             - jti: j1\n\
             - jti: j2\n  issuer: https://a\n\
             - sub: mallory\n  note: INC-42\n\
             - issuer: https://b\n  issued_before: 2026-11-27T12:00:00Z\n",
        );
        assert_eq!(l.entries, 4);
        let t = 1_795_780_800u64;
        let r = |v| l.revoked(&claims(v));
        assert_eq!(r(json!({"iss": "https://x", "jti": "j1"})), Some(Rule::Jti));
        assert_eq!(r(json!({"iss": "https://a", "jti": "j2"})), Some(Rule::Jti));
        assert_eq!(r(json!({"iss": "https://x", "jti": "j2"})), None);
        assert_eq!(
            r(json!({"iss": "https://x", "sub": "mallory"})),
            Some(Rule::Sub)
        );
        assert_eq!(r(json!({"iss": "https://x", "sub": "alice"})), None);
        assert_eq!(
            r(json!({"iss": "https://b", "iat": t - 1})),
            Some(Rule::IssuedBefore)
        );
        assert_eq!(r(json!({"iss": "https://b"})), Some(Rule::IssuedBefore));
        assert_eq!(r(json!({"iss": "https://b", "iat": t})), None);
        assert_eq!(r(json!({"iss": "https://a", "iat": 0})), None);
    }

    #[test]
    fn problems_have_positions() {
        let err = parse(
            "revoked:\n  - jti: a\n    sub: b\n  - issued_before: 2026-01-01T00:00:00Z\n  - issuer: x\n    issued_before: yesterday\n",
            Path::new("deny.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("deny.yaml:2:8: revoked[0]: each entry names exactly one"),
            "{err}"
        );
        assert!(
            err.contains("deny.yaml:4:18: revoked[1]: issued_before needs the issuer"),
            "{err}"
        );
        assert!(
            err.contains("deny.yaml:6:20: revoked[2].issued_before: \"yesterday\""),
            "{err}"
        );
        let err = parse("revoked:\n  - jit: a\n", Path::new("d.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("d.yaml:2:5:") && err.contains("unknown field `jit`"),
            "{err}"
        );
        assert!(
            parse("", Path::new("d.yaml"))
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        assert_eq!(list("revoked: []\n").entries, 0);
    }
}
