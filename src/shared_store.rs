//! The store a fleet shares, on Redis (`store.redis`): spent DPoP proofs and
//! introspection answers, keyed by hashes only (never a token, never a proof).
//!
//! Client: our own, RESP2 by hand (`resp`: encoding and a bounded incremental
//! parser; `client`: URL, TCP/TLS, AUTH, SELECT, one multiplexed connection).
//! Valet sends five commands (SET NX PX, GET, SET PX, PING, SUBSCRIBE); the
//! `redis` crate and what only it pulled (combine, arcstr, xxhash-rust...)
//! were 13 units and ~30 core-seconds of every cold test build (redis alone
//! the 5th most expensive unit) for them: README "The Redis client".
//! `rediss://` goes through tokio-rustls on the process's aws-lc-rs provider
//! (no second crypto stack; the crates were already there for reqwest),
//! certificates checked against the system roots.
//!
//! Every call is bounded by `timeout` and by what the Check has left. A Check
//! never waits for a connect: the health task connects (and pings every
//! second); until it has, calls fail at once (`unavailable`). A dropped
//! connection fails its calls in flight at once; the next call starts a
//! reconnect in the background (at most every `RECONNECT_SPACING`) and fails,
//! and the health task's tick reconnects too: an outage costs a Check at most
//! `timeout` and then its use's fallback.

mod client;
pub mod resp;

pub use client::{Conn, Target};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use crate::policy::store::StoreSettings;
use crate::telemetry;

/// The wait between two connects of the subscriber after a drop.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// The least time between two reconnects a call starts.
const RECONNECT_SPACING: Duration = Duration::from_millis(100);
/// Connecting (TCP, TLS, handshake) may take longer than one call's `timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The health task's PING period (also what brings an idle replica back).
pub const PING_EVERY: Duration = Duration::from_secs(1);

/// Why a store call did not answer; the `kind` label of `valet_store_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the store did not answer in time")]
    Timeout,
    #[error("the store cannot be reached")]
    Unavailable,
    #[error("the store answered an error")]
    Error,
}

impl StoreError {
    pub fn label(self) -> &'static str {
        match self {
            StoreError::Timeout => "timeout",
            StoreError::Unavailable => "unavailable",
            StoreError::Error => "error",
        }
    }
}

/// The operations, for the `op` label.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Spend,
    Get,
    Set,
    Ping,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Op::Spend => "spend",
            Op::Get => "get",
            Op::Set => "set",
            Op::Ping => "ping",
        }
    }
}

pub struct SharedStore {
    pub settings: StoreSettings,
    link: Arc<Link>,
    /// Notified on every message of `<prefix>denylist`: the denylist URL's task
    /// fetches at once instead of at its next interval.
    pub denylist_changed: Arc<tokio::sync::Notify>,
    /// The task subscribed to that channel on a connection of its own
    /// (resubscribing after a reconnect); started once `link` has connected.
    subscriber: Mutex<Option<tokio::task::AbortHandle>>,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Drop for SharedStore {
    fn drop(&mut self) {
        if let Some(s) = self
            .subscriber
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            s.abort();
        }
    }
}

/// The connection, and what (re)opens it.
struct Link {
    target: Option<Target>,
    conn: ArcSwapOption<Conn>,
    connecting: AtomicBool,
    last_try: Mutex<Option<Instant>>,
}

impl Link {
    /// Opens a connection unless one is alive or being opened; `Some` error if
    /// this attempt failed.
    async fn reconnect(&self) -> Option<String> {
        let target = self.target.as_ref()?;
        if self.conn.load().as_ref().is_some_and(|c| !c.is_dead())
            || self.connecting.swap(true, Ordering::AcqRel)
        {
            return None;
        }
        /// Clears `connecting` however the attempt ends (even cancelled).
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _done = Done(&self.connecting);
        *self.last_try.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        match tokio::time::timeout(CONNECT_TIMEOUT, Conn::connect(target)).await {
            Ok(Ok(c)) => {
                self.conn.store(Some(Arc::new(c)));
                None
            }
            Ok(Err(e)) => Some(format!("connect: {e}")),
            Err(_) => Some("connect: timed out".into()),
        }
    }

    /// After a call found the connection dead: a reconnect in the background
    /// (the call does not wait for it), at most every `RECONNECT_SPACING`.
    fn reconnect_soon(self: &Arc<Self>) {
        let recent = self
            .last_try
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < RECONNECT_SPACING);
        if recent || self.connecting.load(Ordering::Acquire) {
            return;
        }
        let link = self.clone();
        tokio::spawn(async move { link.reconnect().await });
    }
}

/// What /statusz shows of the store.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub url: String,
    pub up: bool,
    pub last_error: Option<String>,
}

impl SharedStore {
    pub fn new(settings: StoreSettings) -> Self {
        let target = Target::parse(&settings.url, settings.password.as_deref())
            .inspect_err(|e| tracing::error!(url = %settings.url, "store unusable: {e}"))
            .ok();
        SharedStore {
            settings,
            link: Arc::new(Link {
                target,
                conn: ArcSwapOption::empty(),
                connecting: AtomicBool::new(false),
                last_try: Mutex::new(None),
            }),
            denylist_changed: Arc::default(),
            subscriber: Mutex::new(None),
            up: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    /// `prefix` + what the key is for + the hex of a digest: nothing else.
    pub fn key(&self, kind: &str, digest: &[u8]) -> String {
        let mut k = String::with_capacity(self.settings.key_prefix.len() + kind.len() + 1 + 64);
        k.push_str(&self.settings.key_prefix);
        k.push_str(kind);
        k.push(':');
        for b in digest {
            k.push_str(&format!("{b:02x}"));
        }
        k
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Status {
        Status {
            url: self.settings.url.clone(),
            up: self.is_up(),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Spends `key` for `ttl` across the fleet: true if it was not spent yet.
    pub async fn spend(
        &self,
        key: &str,
        ttl: Duration,
        left: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let ms = ttl.as_millis().max(1).to_string();
        let cmd: &[&[u8]] = &[b"SET", key.as_bytes(), b"1", b"NX", b"PX", ms.as_bytes()];
        // OK if set; nil if the key was there.
        Ok(self.run(Op::Spend, cmd, left).await? != resp::Value::Nil)
    }

    pub async fn get(
        &self,
        key: &str,
        left: Option<Duration>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self.run(Op::Get, &[b"GET", key.as_bytes()], left).await? {
            resp::Value::Bulk(v) => Ok(Some(v)),
            resp::Value::Nil => Ok(None),
            _ => Err(self.unexpected(Op::Get)),
        }
    }

    pub async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let ms = ttl.as_millis().max(1).to_string();
        let cmd: &[&[u8]] = &[b"SET", key.as_bytes(), value, b"PX", ms.as_bytes()];
        self.run(Op::Set, cmd, None).await.map(drop)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(Op::Ping, &[b"PING"], None).await.map(drop)
    }

    /// A reply of the wrong type: counted as an error answer.
    fn unexpected(&self, op: Op) -> StoreError {
        telemetry::store_error(op.label(), StoreError::Error.label());
        self.set_up(false, Some("the store answered an unexpected type".into()));
        StoreError::Error
    }

    async fn run(
        &self,
        op: Op,
        cmd: &[&[u8]],
        left: Option<Duration>,
    ) -> Result<resp::Value, StoreError> {
        let bound = left.map_or(self.settings.timeout, |l| l.min(self.settings.timeout));
        let started = Instant::now();
        let result =
            match tokio::time::timeout(bound, async { self.connection()?.call(cmd).await }).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout),
            };
        telemetry::store_call(op.label(), started.elapsed());
        match &result {
            Ok(_) => self.set_up(true, None),
            Err(e) => {
                telemetry::store_error(op.label(), e.label());
                self.set_up(false, Some(e.to_string()));
            }
        }
        result
    }

    fn set_up(&self, up: bool, error: Option<String>) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!(url = %self.settings.url, "store reachable");
            } else {
                tracing::warn!(url = %self.settings.url, "store unreachable: falling back (see dpop.on_store_error)");
            }
        }
        telemetry::store_up(up);
        if error.is_some() || up {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
        }
    }

    /// The connection, once the health task has made it (a Check never waits
    /// for a connect: until then its calls fail at once). A dead one starts a
    /// reconnect in the background.
    fn connection(&self) -> Result<Arc<Conn>, StoreError> {
        let conn = self.link.conn.load_full().ok_or(StoreError::Unavailable)?;
        if conn.is_dead() {
            self.link.reconnect_soon();
            return Err(StoreError::Unavailable);
        }
        Ok(conn)
    }

    fn connected(&self) -> bool {
        self.link.conn.load().as_ref().is_some_and(|c| !c.is_dead())
    }

    /// Connects if not connected, within `CONNECT_TIMEOUT`: for the health task.
    async fn connect(&self) {
        if let Some(why) = self.link.reconnect().await {
            self.connect_failed(why);
        }
    }

    /// The channel an operator publishes to after changing the denylist URL's list.
    pub fn denylist_channel(&self) -> String {
        format!("{}denylist", self.settings.key_prefix)
    }

    /// Starts the subscriber once connected (for the health task).
    fn subscribe(&self) {
        let mut running = self.subscriber.lock().unwrap_or_else(|e| e.into_inner());
        let Some(target) = self.link.target.clone() else {
            return;
        };
        if running.is_some() {
            return;
        }
        let task = tokio::spawn(listen(
            target,
            self.denylist_channel(),
            self.denylist_changed.clone(),
        ));
        *running = Some(task.abort_handle());
    }

    fn connect_failed(&self, why: String) {
        telemetry::store_error("connect", StoreError::Unavailable.label());
        telemetry::store_up(false);
        self.up.store(false, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }
}

/// Connects the store in force, and pings it every second: the `up` gauge
/// follows it, and an idle replica notices an outage (and its end) before a
/// Check does.
pub async fn watch(current: impl Fn() -> Option<Arc<SharedStore>>) {
    loop {
        if let Some(s) = current() {
            s.connect().await;
            if s.connected() {
                let _ = s.ping().await;
                s.subscribe();
            }
        }
        tokio::time::sleep(PING_EVERY).await;
    }
}

/// The subscriber: a connection of its own subscribed to `channel` (RESP2:
/// nothing else is sent on it), waking `wake` on each message; reconnects
/// and resubscribes after a drop, `RECONNECT_EVERY` apart.
async fn listen(target: Target, channel: String, wake: Arc<tokio::sync::Notify>) {
    let mut failing = false;
    loop {
        let subscribed = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut io = target.open().await?;
            let mut buf = Vec::new();
            match client::command(&mut io, &mut buf, &[b"SUBSCRIBE", channel.as_bytes()]).await? {
                resp::Value::Array(a)
                    if a.first() == Some(&resp::Value::Bulk(b"subscribe".to_vec())) =>
                {
                    Ok((io, buf))
                }
                other => Err(format!("SUBSCRIBE answered {other:?}")),
            }
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        let why = match subscribed {
            Ok((mut io, mut buf)) => {
                tracing::info!(channel = %channel, "listening for denylist changes");
                failing = false;
                loop {
                    match client::read_reply(&mut io, &mut buf).await {
                        Ok(resp::Value::Array(a))
                            if a.first() == Some(&resp::Value::Bulk(b"message".to_vec())) =>
                        {
                            wake.notify_one()
                        }
                        Ok(_) => {}
                        Err(e) => break e,
                    }
                }
            }
            Err(e) => e,
        };
        if !failing {
            tracing::warn!(channel = %channel, "no denylist push until reconnected (the URL is still polled): {why}");
            failing = true;
        }
        tokio::time::sleep(RECONNECT_EVERY).await;
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::store::OnStoreError;

    fn settings(password: Option<&str>) -> StoreSettings {
        StoreSettings {
            url: "redis://127.0.0.1:1/".into(),
            key_prefix: "fleet:".into(),
            timeout: Duration::from_millis(20),
            password: password.map(str::to_owned),
            on_dpop_error: OnStoreError::Local,
        }
    }

    #[test]
    fn keys_are_the_prefix_a_kind_and_a_digest_in_hex() {
        let s = SharedStore::new(settings(None));
        assert_eq!(s.key("dpop", &[0x00, 0xab, 0x7f]), "fleet:dpop:00ab7f");
    }

    #[test]
    fn the_password_is_never_printed() {
        let text = format!("{:?}", settings(Some("hunter2")));
        assert!(
            !text.contains("hunter2") && text.contains("redacted"),
            "{text}"
        );
    }

    /// A stand-in Redis on 127.0.0.1 (a unit's mock: the fleet tests use the
    /// real one): answers each command with `answer(connection number, command
    /// number, the command's arguments joined by spaces)`, `None` closing the
    /// connection without a reply.
    async fn fake_redis(
        answer: impl Fn(usize, usize, &[u8]) -> Option<&'static [u8]> + Send + Sync + 'static,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/", listener.local_addr().unwrap());
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            for conn in 0.. {
                let (mut sock, _) = listener.accept().await.unwrap();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let (mut buf, mut n) = (Vec::new(), 0);
                    loop {
                        while let Ok(Some((cmd, used))) = resp::parse(&buf) {
                            buf.drain(..used);
                            let resp::Value::Array(args) = cmd else {
                                return;
                            };
                            let args: Vec<&[u8]> = args
                                .iter()
                                .map(|a| match a {
                                    resp::Value::Bulk(b) => b.as_slice(),
                                    _ => b"?",
                                })
                                .collect();
                            let Some(reply) = answer(conn, n, &args.join(&b' ')) else {
                                return;
                            };
                            n += 1;
                            sock.write_all(reply).await.unwrap();
                        }
                        if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                });
            }
        });
        url
    }

    fn settings_at(url: String, timeout: Duration) -> StoreSettings {
        StoreSettings {
            url,
            timeout,
            ..settings(None)
        }
    }

    /// A connection closed under a call fails it at once (`unavailable`, not
    /// after the 5s `timeout`); the next call starts a reconnect and the store
    /// comes back without the health task.
    #[tokio::test]
    async fn a_dropped_connection_fails_its_calls_and_is_reopened_by_the_next() {
        // The first connection closes at its first GET.
        let url = fake_redis(|conn, _, cmd| match (conn, cmd) {
            (_, b"PING") => Some(b"+PONG\r\n"),
            (0, _) => None,
            _ => Some(b"$2\r\nhi\r\n"),
        })
        .await;
        let s = SharedStore::new(settings_at(url, Duration::from_secs(5)));
        s.connect().await;
        assert_eq!(s.ping().await, Ok(()));
        assert!(s.is_up());
        assert_eq!(s.get("k", None).await, Err(StoreError::Unavailable));
        assert!(!s.is_up());
        let mut calls = 0;
        let value = loop {
            calls += 1;
            match s.get("k", None).await {
                Ok(v) => break v,
                Err(e) => assert_eq!(e, StoreError::Unavailable),
            }
            assert!(calls < 500, "never reconnected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(value, Some(b"hi".to_vec()));
        assert!(s.is_up() && s.status().last_error.is_none());
    }

    /// Replies come back in order: a call that gave up (timeout) does not
    /// shift the next call's answer onto the wrong caller.
    #[tokio::test]
    async fn a_late_reply_goes_to_the_call_that_asked_for_it() {
        // The first command is answered only with the second's.
        let url = fake_redis(|_, n, _| match n {
            0 => Some(b"+PONG\r\n"),
            1 => Some(b""),
            _ => Some(b"$5\r\nfirst\r\n$6\r\nsecond\r\n"),
        })
        .await;
        let s = SharedStore::new(settings_at(url, Duration::from_millis(50)));
        s.connect().await;
        assert_eq!(s.get("a", None).await, Err(StoreError::Timeout));
        assert_eq!(
            s.get("b", Some(Duration::from_secs(5))).await,
            Ok(Some(b"second".to_vec()))
        );
    }

    /// Connecting logs in (`AUTH user password`, the URL's user and
    /// `password_file`) and selects the URL's database; a refused AUTH is
    /// reported by its code, never with the password.
    #[tokio::test]
    async fn a_connect_logs_in_and_selects_the_database() {
        let url = fake_redis(|conn, _, cmd| match (conn, cmd) {
            (0, b"AUTH valet hunter2") | (0, b"SELECT 2") => Some(b"+OK\r\n"),
            (_, b"PING") => Some(b"+PONG\r\n"),
            (_, b"AUTH valet wrong") => Some(b"-WRONGPASS invalid username-password pair\r\n"),
            _ => Some(b"-ERR unexpected\r\n"),
        })
        .await;
        let url = url.replace("redis://", "redis://valet@") + "2";
        let mut ok = settings_at(url.clone(), Duration::from_secs(5));
        ok.password = Some("hunter2".into());
        let s = SharedStore::new(ok);
        s.connect().await;
        assert_eq!(s.status().last_error, None);
        assert_eq!(s.ping().await, Ok(()));

        let mut wrong = settings_at(url, Duration::from_secs(5));
        wrong.password = Some("wrong".into());
        let s = SharedStore::new(wrong);
        s.connect().await;
        let error = s.status().last_error.unwrap();
        assert_eq!(error, "connect: AUTH refused: WRONGPASS");
        assert_eq!(s.ping().await, Err(StoreError::Unavailable));
    }

    /// A reply over the caps closes the connection: the call fails, nothing is
    /// allocated for it.
    #[tokio::test]
    async fn an_oversized_reply_closes_the_connection() {
        let url = fake_redis(|_, n, _| match n {
            0 => Some(b"+PONG\r\n"),
            _ => Some(b"$999999999999\r\n"),
        })
        .await;
        let s = SharedStore::new(settings_at(url, Duration::from_secs(5)));
        s.connect().await;
        assert_eq!(s.get("k", None).await, Err(StoreError::Unavailable));
    }

    /// Paused time: any wait for a timeout would move the clock.
    #[tokio::test(start_paused = true)]
    async fn unconnected_calls_fail_at_once_and_are_counted_as_down() {
        let s = SharedStore::new(settings(None));
        let started = Instant::now();
        assert_eq!(
            s.spend("fleet:dpop:00", Duration::from_secs(1), None).await,
            Err(StoreError::Unavailable)
        );
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no Check waits for a connect"
        );
        assert!(!s.is_up());
        // Nothing listens on port 1: the health task's connect fails and says so.
        s.connect().await;
        assert!(s.status().last_error.unwrap().starts_with("connect"));
    }
}
