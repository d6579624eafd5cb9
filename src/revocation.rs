//! Emergency revocation: a denylist of token ids, subjects and "everything an
//! issuer issued before T", checked after a token is verified (cached or not,
//! JWT or introspected). A file is polled every second, a URL every
//! `refresh_interval` (conditional on its ETag, so every replica of a fleet
//! sees a change within one interval and one fetch); the list is swapped whole.
//! A broken file or answer keeps the list in force and says what is wrong,
//! where; a URL's list that goes unconfirmed for `max_stale` is reported stale.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::{Map, Value};
use std::io::{BufRead, Read};
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, ScanError, TScalarStyle};

use crate::clock::Clock;
use crate::config::position::Position;
use crate::config::{self, ConfigError, LoadError};
use crate::policy::denylist::{DenylistSource, RemoteDenylist};
use crate::telemetry;

/// How often the file is looked at: propagation is at most this plus a read.
pub const POLL: Duration = Duration::from_secs(1);
/// A denylist is for emergencies, not for every token ever issued.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The live list for one source, shared by successive policies that name the same one.
pub struct Revocation {
    pub source: DenylistSource,
    list: ArcSwap<Denylist>,
    /// What the file looked like when last read, valid or not.
    seen: Mutex<Option<Stamp>>,
    /// A URL's conditional-request state.
    remote: Mutex<RemoteState>,
    /// A list has been read (a URL's list is fetched after the policy loads).
    loaded: AtomicBool,
    /// Unix seconds when the source last confirmed the list in force (a URL's
    /// 200 or 304); until then, when this `Revocation` was made.
    confirmed_at: AtomicU64,
    confirmed_ever: AtomicBool,
    /// The last failure, for /statusz; None after a success.
    last_error: Mutex<Option<String>>,
}

#[derive(Default)]
struct RemoteState {
    etag: Option<String>,
    /// SHA-256 of the last body applied: the same body again is a confirmation.
    body: Option<[u8; 32]>,
}

/// What /statusz shows of the denylist.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub source: String,
    pub entries: usize,
    pub loaded: bool,
    /// Unix seconds of the last confirmation by a URL; None before the first.
    pub confirmed_at: Option<u64>,
    pub unconfirmed_seconds: Option<u64>,
    pub stale: bool,
    pub last_error: Option<String>,
}

/// Why a URL's denylist was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request to {uri} failed: {reason}")]
    Http { uri: String, reason: String },
    #[error("{uri} answered HTTP {status}")]
    Status { uri: String, status: u16 },
    #[error("{uri} sent more than {MAX_FILE_BYTES} bytes")]
    TooLarge { uri: String },
    #[error("{0}")]
    Invalid(LoadError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
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

/// 16 bytes of SHA-256 standing for a value (or an issuer and a value): a list
/// holds no strings, so its size follows its entry count, not what they spell.
type Digest = [u8; 16];

fn digest(issuer: Option<&str>, value: &str) -> Digest {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    if let Some(iss) = issuer {
        // Length-prefixed: no issuer/value split can spell another pair.
        ctx.update(&(iss.len() as u64).to_le_bytes());
        ctx.update(iss.as_bytes());
    }
    ctx.update(value.as_bytes());
    ctx.finish().as_ref()[..16]
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

#[derive(Debug, Default)]
pub struct Denylist {
    /// `jti` of any issuer, and (issuer, jti) pairs.
    jti: HashSet<Digest>,
    jti_of: HashSet<Digest>,
    sub: HashSet<Digest>,
    sub_of: HashSet<Digest>,
    /// Tokens of this issuer with `iat` before this Unix time (or without `iat`).
    issued_before: HashMap<String, u64>,
    pub entries: usize,
}

impl Denylist {
    pub fn revoked(&self, claims: &Map<String, Value>) -> Option<Rule> {
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let hit = |set: &HashSet<Digest>, of: &HashSet<Digest>, claim: &str| {
            claims.get(claim).and_then(Value::as_str).is_some_and(|v| {
                (!set.is_empty() && set.contains(&digest(None, v)))
                    || (!of.is_empty() && of.contains(&digest(Some(iss), v)))
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

impl Revocation {
    fn with(source: DenylistSource, list: Denylist, loaded: bool) -> Self {
        Revocation {
            source,
            list: ArcSwap::from_pointee(list),
            seen: Mutex::new(None),
            remote: Mutex::default(),
            loaded: AtomicBool::new(loaded),
            confirmed_at: AtomicU64::new(0),
            confirmed_ever: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    /// Reads the file now: a policy naming a denylist that cannot be read is invalid.
    pub fn load(path: PathBuf) -> Result<Self, LoadError> {
        let stamp = stamp(&path);
        let list = read(&path)?;
        let r = Self::with(DenylistSource::File(path), list, true);
        *r.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        Ok(r)
    }

    /// A URL's list, empty and not loaded until its task's first fetch
    /// (readiness waits for it); unconfirmed from its task's first look.
    pub fn remote(settings: RemoteDenylist) -> Self {
        Self::with(DenylistSource::Uri(settings), Denylist::default(), false)
    }

    /// A new source takes over the list in force until its own first list
    /// arrives: switching sources never revokes less in between.
    pub fn adopt(&self, old: &Revocation) {
        if !self.loaded.load(Ordering::Relaxed) && old.loaded.load(Ordering::Relaxed) {
            self.list.store(old.list.load_full());
            self.loaded.store(true, Ordering::Relaxed);
        }
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<Denylist>> {
        self.list.load()
    }

    /// False only for a URL whose first list has not arrived yet.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    fn remote_settings(&self) -> Option<&RemoteDenylist> {
        match &self.source {
            DenylistSource::Uri(r) => Some(r),
            DenylistSource::File(_) => None,
        }
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// Seconds since the source last confirmed the list, and whether that is
    /// past `max_stale` (a URL's only; a file is always current or an error).
    pub fn staleness(&self, now: u64) -> Option<(u64, bool)> {
        let r = self.remote_settings()?;
        // Never confirmed: unconfirmed since first asked about, on the caller's clock.
        let _ = self
            .confirmed_at
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        let age = now.saturating_sub(self.confirmed_at.load(Ordering::Relaxed));
        Some((age, age > r.max_stale.as_secs()))
    }

    pub fn status(&self, now: u64) -> Status {
        let staleness = self.staleness(now);
        Status {
            source: self.source.to_string(),
            entries: self.current().entries,
            loaded: self.is_loaded(),
            confirmed_at: self
                .confirmed_ever
                .load(Ordering::Relaxed)
                .then(|| self.confirmed_at.load(Ordering::Relaxed)),
            unconfirmed_seconds: staleness.map(|s| s.0),
            stale: staleness.is_some_and(|s| s.1),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn confirm(&self, now: u64) {
        self.confirmed_at.store(now, Ordering::Relaxed);
        self.confirmed_ever.store(true, Ordering::Relaxed);
        self.set_error(None);
    }

    /// Asks the URL once (`If-None-Match` the list in force): a 304, or the
    /// same body again, confirms the list; a new valid body replaces it; any
    /// failure keeps it. Returns true when a new list was published.
    pub async fn fetch(&self, client: &reqwest::Client, clock: &Clock) -> bool {
        let Some(settings) = self.remote_settings() else {
            return false;
        };
        match self.fetch_list(client, settings).await {
            Ok(None) => {
                self.confirm(clock.unix());
                telemetry::revocation_confirmed();
                false
            }
            Ok(Some((list, etag, body))) => {
                let entries = list.entries;
                self.list.store(Arc::new(list));
                self.loaded.store(true, Ordering::Relaxed);
                let mut st = self.remote.lock().unwrap_or_else(|e| e.into_inner());
                st.etag = etag;
                st.body = Some(body);
                drop(st);
                self.confirm(clock.unix());
                telemetry::revocation_loaded(&self.source, entries);
                true
            }
            Err(e) => {
                telemetry::revocation_failed(&self.source, &e);
                self.set_error(Some(e.to_string()));
                false
            }
        }
    }

    /// Ok(None): unchanged (304, or the same body).
    #[allow(clippy::type_complexity)]
    async fn fetch_list(
        &self,
        client: &reqwest::Client,
        settings: &RemoteDenylist,
    ) -> Result<Option<(Denylist, Option<String>, [u8; 32])>, FetchError> {
        let uri = settings.uri.as_str();
        let (etag, last_body) = {
            let st = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            (st.etag.clone(), st.body)
        };
        let mut req = client.get(uri).timeout(settings.timeout);
        if let Some(tag) = etag.as_deref().filter(|_| self.is_loaded()) {
            req = req.header(reqwest::header::IF_NONE_MATCH, tag);
        }
        let http = |e: reqwest::Error| FetchError::Http {
            uri: uri.into(),
            reason: if e.is_timeout() {
                "timed out".into()
            } else if e.is_connect() {
                "connection failed".into()
            } else {
                e.without_url().to_string()
            },
        };
        let mut resp = req.send().await.map_err(http)?;
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED && etag.is_some() {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                uri: uri.into(),
                status: resp.status().as_u16(),
            });
        }
        let too_large = || FetchError::TooLarge { uri: uri.into() };
        if resp.content_length().is_some_and(|n| n > MAX_FILE_BYTES) {
            return Err(too_large());
        }
        let new_etag = resp
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(http)? {
            if body.len() + chunk.len() > MAX_FILE_BYTES as usize {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let digest: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body)
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        if last_body == Some(digest) && self.is_loaded() {
            // A server without ETags: the same list again is a confirmation.
            self.remote.lock().unwrap_or_else(|e| e.into_inner()).etag = new_etag;
            return Ok(None);
        }
        // Up to 16 MiB of YAML: parsed off the runtime.
        let name = PathBuf::from(uri);
        let list = crate::telemetry::spawn_blocking(move || {
            let text = std::str::from_utf8(&body)
                .map_err(|_| config::whole_file(&name, "not UTF-8 text"))?;
            parse(text, &name)
        })
        .await
        .map_err(|e| FetchError::Http {
            uri: uri.into(),
            reason: e.to_string(),
        })?
        .map_err(FetchError::Invalid)?;
        Ok(Some((list, new_etag, digest)))
    }

    /// Re-reads the file if it changed since last looked at. Returns true when a
    /// new list was published.
    pub fn refresh(&self) -> bool {
        let DenylistSource::File(path) = &self.source else {
            return false;
        };
        let now = stamp(path);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match read(path) {
            Ok(list) => {
                telemetry::revocation_loaded(&self.source, list.entries);
                self.list.store(Arc::new(list));
                self.set_error(None);
                true
            }
            Err(e) => {
                if let LoadError::Read { .. } = e {
                    // Mid-swap or deleted: look again next tick.
                    *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                telemetry::revocation_failed(&self.source, &e);
                self.set_error(Some(e.to_string()));
                false
            }
        }
    }
}

pub(crate) fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// Polls the denylist in force, as `current` says which (the one of the
/// snapshot in force): a file every second, a URL every `refresh_interval`
/// (less up to 10% jitter, so a fleet started together does not ask together),
/// or at once when `changed` (the shared store's denylist channel) says so.
pub async fn watch(
    current: impl Fn() -> Option<Arc<Revocation>>,
    changed: impl Fn() -> Option<Arc<tokio::sync::Notify>>,
    clock: Clock,
) {
    use rand::Rng;
    let client = reqwest::Client::builder()
        .user_agent(concat!("valet/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(2))
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .unwrap_or_default();
    loop {
        let pause = match current() {
            Some(r) => match r.remote_settings() {
                Some(settings) => {
                    let pause = settings.refresh_interval;
                    r.fetch(&client, &clock).await;
                    if let Some((age, stale)) = r.staleness(clock.unix()) {
                        telemetry::revocation_staleness(age, stale);
                    }
                    let pause = pause.mul_f64(rand::rng().random_range(0.9..=1.0));
                    match changed() {
                        Some(pushed) => {
                            tokio::select! {
                                _ = tokio::time::sleep(pause) => {}
                                _ = pushed.notified() => {}
                            }
                            continue;
                        }
                        None => pause,
                    }
                }
                None => {
                    // A stat per second; reading and parsing only on change, off the runtime.
                    let _ = crate::telemetry::spawn_blocking(move || r.refresh()).await;
                    POLL
                }
            },
            None => POLL,
        };
        tokio::time::sleep(pause).await;
    }
}

fn read(path: &Path) -> Result<Denylist, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len > MAX_FILE_BYTES {
        return Err(read_err(std::io::Error::other(format!(
            "larger than {MAX_FILE_BYTES} bytes"
        ))));
    }
    // Streamed: the text is never held whole, only the list being built.
    let mut chars = Utf8Chars::new(std::io::BufReader::new(file).take(MAX_FILE_BYTES));
    let parsed = parse_events(&mut Parser::new(&mut chars), path, MAX_ENTRIES);
    match chars.error.take() {
        Some(Utf8Error::Io(e)) => Err(read_err(e)),
        Some(Utf8Error::Invalid) => Err(config::whole_file(path, "not UTF-8 text")),
        None => parsed,
    }
}

/// Parses a denylist; every problem is reported with its line and column.
pub fn parse(source: &str, path: &Path) -> Result<Denylist, LoadError> {
    parse_events(&mut Parser::new_from_str(source), path, MAX_ENTRIES)
}

/// A larger list is refused: it is for emergencies, and this bounds its memory.
pub const MAX_ENTRIES: usize = 400_000;
/// Problems reported from one file; the rest are only counted.
const MAX_PROBLEMS: usize = 100;

/// One scalar of an entry, with where it starts.
struct Scalar {
    text: String,
    /// A plain (unquoted) scalar: `~`/`null` is no value, digits are a number.
    plain: bool,
    at: Position,
}

impl Scalar {
    fn is_null(&self) -> bool {
        self.plain && matches!(self.text.as_str(), "" | "~" | "null" | "Null" | "NULL")
    }
}

#[derive(Default)]
struct Entry {
    at: Position,
    jti: Option<Scalar>,
    sub: Option<Scalar>,
    issuer: Option<Scalar>,
    issued_before: Option<Scalar>,
}

struct Problems<'a> {
    path: &'a Path,
    errors: Vec<ConfigError>,
    more: usize,
}

impl Problems<'_> {
    fn error(&mut self, at: Position, field: String, message: impl Into<String>) {
        if self.errors.len() < MAX_PROBLEMS {
            self.errors.push(ConfigError {
                file: self.path.to_path_buf(),
                position: at,
                field,
                message: message.into(),
            });
        } else {
            self.more += 1;
        }
    }
}

fn position(mark: &Marker) -> Position {
    Position {
        line: mark.line(),
        column: mark.col() + 1,
    }
}

/// Walks the YAML events once, building the list as entries come: memory is
/// the list, not the document. The schema is `revoked:` and a sequence of
/// mappings of scalars; anything else is an error at its position.
fn parse_events<I: Iterator<Item = char>>(
    parser: &mut Parser<I>,
    path: &Path,
    max_entries: usize,
) -> Result<Denylist, LoadError> {
    let mut p = Problems {
        path,
        errors: Vec::new(),
        more: 0,
    };
    let list = walk(parser, &mut p, max_entries).map_err(|e| {
        LoadError::Invalid(vec![ConfigError {
            file: path.to_path_buf(),
            position: position(e.marker()),
            field: String::new(),
            message: e.info().to_string(),
        }])
    })?;
    if p.more > 0 {
        let last = p.errors.last().map(|e| e.position).unwrap_or_default();
        let more = p.more;
        p.errors.push(ConfigError {
            file: path.to_path_buf(),
            position: last,
            field: String::new(),
            message: format!("and {more} more problems"),
        });
    }
    match list {
        Some(list) if p.errors.is_empty() => Ok(list),
        _ => Err(LoadError::Invalid(p.errors)),
    }
}

fn next<I: Iterator<Item = char>>(parser: &mut Parser<I>) -> Result<(Event, Position), ScanError> {
    parser.next_token().map(|(e, m)| (e, position(&m)))
}

/// Ok(None): the document is not a denylist (already reported in `p`).
fn walk<I: Iterator<Item = char>>(
    parser: &mut Parser<I>,
    p: &mut Problems,
    max_entries: usize,
) -> Result<Option<Denylist>, ScanError> {
    let whole = Position { line: 1, column: 1 };
    let (mut ev, mut at) = next(parser)?;
    if ev == Event::StreamStart {
        (ev, at) = next(parser)?;
    }
    // An empty file is a truncated write, not "revoke nothing": say so and keep
    // the list in force. (An empty list is written `revoked: []`.)
    let empty = "the file is empty (write `revoked: []` for none)";
    match ev {
        Event::StreamEnd => {
            p.error(whole, String::new(), empty);
            return Ok(None);
        }
        Event::DocumentStart => (ev, at) = next(parser)?,
        _ => {}
    }
    if matches!(&ev, Event::Scalar(t, TScalarStyle::Plain, ..) if matches!(t.as_str(), "" | "~" | "null"))
    {
        p.error(whole, String::new(), empty);
        return Ok(None);
    }
    if !matches!(ev, Event::MappingStart(..)) {
        p.error(at, String::new(), "expected a mapping with `revoked:`");
        return Ok(None);
    }
    let mut list = Denylist::default();
    let mut seen_revoked = false;
    loop {
        let (ev, at) = next(parser)?;
        match ev {
            Event::MappingEnd => break,
            Event::Scalar(key, ..) if key == "revoked" && !seen_revoked => {
                seen_revoked = true;
                let (ev, at) = next(parser)?;
                match ev {
                    Event::SequenceStart(..) => {
                        if !entries(parser, p, &mut list, max_entries)? {
                            return Ok(None);
                        }
                    }
                    other => {
                        p.error(
                            at,
                            "revoked".into(),
                            "a list of entries (`revoked: []` for none)",
                        );
                        skip(parser, other)?;
                    }
                }
            }
            Event::Scalar(key, ..) if key == "revoked" => {
                p.error(at, String::new(), "duplicate field `revoked`");
                return Ok(None);
            }
            Event::Scalar(key, ..) => {
                p.error(
                    at,
                    String::new(),
                    format!("unknown field `{key}`, expected `revoked`"),
                );
                return Ok(None);
            }
            _ => {
                p.error(at, String::new(), "expected a mapping with `revoked:`");
                return Ok(None);
            }
        }
    }
    let (ev, at) = next(parser)?;
    if ev == Event::DocumentEnd {
        let (ev, at) = next(parser)?;
        if ev != Event::StreamEnd {
            p.error(at, String::new(), "more than one YAML document");
        }
    } else if ev != Event::StreamEnd {
        p.error(at, String::new(), "more than one YAML document");
    }
    Ok(Some(list))
}

/// The items of `revoked`, up to its SequenceEnd; false when it stopped early
/// (too many entries), the rest of the document unread.
fn entries<I: Iterator<Item = char>>(
    parser: &mut Parser<I>,
    p: &mut Problems,
    list: &mut Denylist,
    max_entries: usize,
) -> Result<bool, ScanError> {
    let mut i = 0;
    loop {
        let (ev, mark) = parser.next_token()?;
        let at = position(&mark);
        match ev {
            Event::SequenceEnd => return Ok(true),
            Event::MappingStart(..) => {
                let field = format!("revoked[{i}]");
                let mut e = Entry {
                    at,
                    ..Entry::default()
                };
                loop {
                    let (ev, mark) = parser.next_token()?;
                    let key_at = position(&mark);
                    let key = match ev {
                        Event::MappingEnd => break,
                        Event::Scalar(k, ..) => k,
                        other => {
                            p.error(key_at, field.clone(), "keys are plain words");
                            skip(parser, other)?;
                            let (value, _) = parser.next_token()?;
                            skip(parser, value)?;
                            continue;
                        }
                    };
                    let (ev, mark) = parser.next_token()?;
                    let value = match ev {
                        Event::Scalar(text, style, ..) => Some(Scalar {
                            text,
                            plain: style == TScalarStyle::Plain,
                            at: position(&mark),
                        }),
                        other => {
                            skip(parser, other)?;
                            None
                        }
                    };
                    let slot = match key.as_str() {
                        "jti" => &mut e.jti,
                        "sub" => &mut e.sub,
                        "issuer" => &mut e.issuer,
                        "issued_before" => &mut e.issued_before,
                        "note" => {
                            if value.is_none() {
                                p.error(key_at, format!("{field}.note"), "free text, a string");
                            }
                            continue;
                        }
                        other => {
                            p.error(
                                key_at,
                                field.clone(),
                                format!("unknown field `{other}`, expected one of `jti`, `sub`, `issuer`, `issued_before`, `note`"),
                            );
                            continue;
                        }
                    };
                    match value {
                        _ if slot.is_some() => {
                            p.error(key_at, field.clone(), format!("duplicate field `{key}`"))
                        }
                        None => p.error(
                            key_at,
                            format!("{field}.{key}"),
                            "a single value, not a list or mapping",
                        ),
                        Some(v) if v.is_null() => {}
                        Some(v) => *slot = Some(v),
                    }
                }
                if i >= max_entries {
                    p.error(
                        at,
                        field,
                        format!("more than {max_entries} entries: a denylist is for emergencies; remove entries of expired tokens"),
                    );
                    return Ok(false);
                }
                add(e, &field, p, list);
            }
            other => {
                p.error(
                    at,
                    format!("revoked[{i}]"),
                    "an entry is a mapping, like `- jti: …`",
                );
                skip(parser, other)?;
            }
        }
        i += 1;
    }
}

fn add(e: Entry, at: &str, p: &mut Problems, list: &mut Denylist) {
    let kinds = [e.jti.is_some(), e.sub.is_some(), e.issued_before.is_some()];
    if kinds.iter().filter(|k| **k).count() != 1 {
        p.error(
            e.at,
            at.into(),
            "each entry names exactly one of jti, sub or issued_before (with an optional issuer)",
        );
        return;
    }
    if let Some(iss) = &e.issuer
        && iss.text.is_empty()
    {
        p.error(iss.at, format!("{at}.issuer"), "empty issuer");
        return;
    }
    let issuer = e.issuer.as_ref().map(|s| s.text.as_str());
    match (&e.jti, &e.sub, &e.issued_before) {
        (Some(jti), _, _) if jti.text.is_empty() => {
            p.error(jti.at, format!("{at}.jti"), "empty jti")
        }
        (Some(jti), _, _) => match issuer {
            None => _ = list.jti.insert(digest(None, &jti.text)),
            Some(_) => _ = list.jti_of.insert(digest(issuer, &jti.text)),
        },
        (_, Some(sub), _) if sub.text.is_empty() => {
            p.error(sub.at, format!("{at}.sub"), "empty sub")
        }
        (_, Some(sub), _) => match issuer {
            None => _ = list.sub.insert(digest(None, &sub.text)),
            Some(_) => _ = list.sub_of.insert(digest(issuer, &sub.text)),
        },
        (_, _, Some(when)) => {
            let Some(iss) = issuer else {
                p.error(
                    e.at,
                    at.into(),
                    "issued_before needs the issuer it applies to",
                );
                return;
            };
            match time(when) {
                Ok(t) => {
                    let cut = list.issued_before.entry(iss.to_owned()).or_insert(t);
                    *cut = (*cut).max(t);
                }
                Err(why) => p.error(when.at, format!("{at}.issued_before"), why),
            }
        }
        _ => unreachable!("exactly one kind was checked above"),
    }
    list.entries += 1;
}

/// Consumes the rest of a node that started with `ev`.
fn skip<I: Iterator<Item = char>>(parser: &mut Parser<I>, ev: Event) -> Result<(), ScanError> {
    let mut depth = match ev {
        Event::MappingStart(..) | Event::SequenceStart(..) => 1,
        _ => 0,
    };
    while depth > 0 {
        match parser.next_token()?.0 {
            Event::MappingStart(..) | Event::SequenceStart(..) => depth += 1,
            Event::MappingEnd | Event::SequenceEnd => depth -= 1,
            Event::StreamEnd => break,
            _ => {}
        }
    }
    Ok(())
}

enum Utf8Error {
    Io(std::io::Error),
    Invalid,
}

/// The chars of a UTF-8 byte stream; stops at the first error and keeps it.
struct Utf8Chars<R> {
    reader: R,
    error: Option<Utf8Error>,
}

impl<R: BufRead> Utf8Chars<R> {
    fn new(reader: R) -> Self {
        Utf8Chars {
            reader,
            error: None,
        }
    }

    fn byte(&mut self) -> Option<u8> {
        match self.reader.fill_buf() {
            Ok([]) => None,
            Ok(buf) => {
                let b = buf[0];
                self.reader.consume(1);
                Some(b)
            }
            Err(e) => {
                self.error = Some(Utf8Error::Io(e));
                None
            }
        }
    }
}

impl<R: BufRead> Iterator for Utf8Chars<R> {
    type Item = char;

    fn next(&mut self) -> Option<char> {
        if self.error.is_some() {
            return None;
        }
        let first = self.byte()?;
        let len = match first {
            0x00..=0x7f => return Some(char::from(first)),
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => 0,
        };
        let mut buf = [first, 0, 0, 0];
        let mut ok = len > 0;
        for slot in buf.iter_mut().take(len).skip(1) {
            match self.byte() {
                Some(b) => *slot = b,
                None => {
                    ok = false;
                    break;
                }
            }
        }
        let decoded = ok
            .then(|| std::str::from_utf8(&buf[..len]).ok()?.chars().next())
            .flatten();
        if decoded.is_none() && self.error.is_none() {
            self.error = Some(Utf8Error::Invalid);
        }
        decoded
    }
}
/// RFC 3339 (`2026-11-27T12:00:00Z`, `…+02:00`, fractions ignored) or Unix
/// seconds (a plain number; a quoted one is text).
fn time(v: &Scalar) -> Result<u64, String> {
    let s = v.text.as_str();
    let number = v.plain && s.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+');
    if number && s.parse::<f64>().is_ok() {
        return s
            .parse::<u64>()
            .map_err(|_| "Unix seconds must be a whole, non-negative number".into());
    }
    rfc3339(s).ok_or_else(|| {
        format!("{s:?} is not a time like 2026-11-27T12:00:00Z (RFC 3339) or Unix seconds")
    })
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
    fn any_yaml_spelling_of_the_schema_reads_and_the_rest_is_placed() {
        let l = list(
            "# incident 42\nrevoked: [{jti: j1}, {jti: 123}, {sub: 'x', note: n},\n  {issuer: https://b, issued_before: 1795780800}]\n",
        );
        assert_eq!(l.entries, 4);
        assert_eq!(
            l.revoked(&claims(json!({"jti": "123"}))),
            Some(Rule::Jti),
            "a plain number is its text"
        );
        assert_eq!(
            l.revoked(&claims(json!({"iss": "https://b", "iat": 1_795_780_799}))),
            Some(Rule::IssuedBefore)
        );
        let err = |src: &str| {
            parse(src, Path::new("d.yaml"))
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string())
        };
        assert!(
            err("# only a comment\n").contains("empty"),
            "{}",
            err("# c\n")
        );
        assert!(err("revoked:\n").contains("revoked: a list of entries"));
        assert!(err("revoked: []\nextra: 1\n").contains("d.yaml:2:1: unknown field `extra`"));
        assert!(err("revoked: []\n---\nrevoked: []\n").contains("more than one YAML document"));
        assert!(
            err("revoked:\n  - issuer: x\n    issued_before: \"1795780800\"\n")
                .contains("is not a time"),
            "quoted digits are text"
        );
        assert!(err("revoked:\n  - jti: [a, b]\n").contains("revoked[0].jti: a single value"));
        assert!(err("revoked:\n  - jti: a\n    jti: b\n").contains("duplicate field `jti`"));
        assert!(
            err("revoked:\n  - jti: 'a\n").contains("d.yaml:"),
            "scanner errors are placed"
        );
        let many: String = (0..150).map(|_| "  - note: x\n").collect();
        let e = err(&format!("revoked:\n{many}"));
        assert_eq!(e.lines().count(), 101, "{e}");
        assert!(e.ends_with("and 50 more problems"), "{e}");
    }

    #[test]
    fn a_file_is_streamed_and_bounded() {
        let text: String = (0..=10).map(|i| format!("- jti: t{i}\n")).collect();
        let text = format!("revoked:\n{text}");
        let at = |max| parse_events(&mut Parser::new_from_str(&text), Path::new("d"), max);
        assert_eq!(at(11).unwrap().entries, 11);
        let e = at(10).unwrap_err().to_string();
        assert!(
            e.lines().count() == 1
                && e.starts_with("d:12:")
                && e.contains("revoked[10]: more than 10 entries"),
            "{e}"
        );
        let dir = crate::tempdir::tempdir().unwrap();
        let path = dir.path().join("d.yaml");
        std::fs::write(&path, b"revoked:\n  - jti: caf\xe9\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("not UTF-8"));
        std::fs::write(&path, "revoked:\n  - jti: café\n").unwrap();
        assert!(
            read(&path)
                .unwrap()
                .revoked(&claims(json!({"jti": "café"})))
                .is_some()
        );
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
