//! The store a fleet shares, on Redis (`store.redis`): spent DPoP proofs and
//! introspection answers, keyed by hashes only (never a token, never a proof).
//!
//! Client: the `redis` crate (redis-rs, the maintained reference client for
//! Rust) with its tokio `ConnectionManager`: one multiplexed connection per
//! replica that reconnects by itself after a drop, so an outage needs no
//! restart; `rediss://` through tokio-rustls on the process's aws-lc-rs
//! provider (no second crypto stack), certificates checked against the system
//! roots. Writing RESP and reconnection by hand would be more code to trust
//! than the few commands used here (SET NX PX, GET, PING).
//!
//! Every call is bounded by `timeout` and by what the Check has left. A Check
//! never waits for a connect: the health task connects (and pings every
//! second); until it has, calls fail at once (`unavailable`). After that the
//! manager reconnects a dropped connection by itself (at most a second apart),
//! and a call meanwhile fails within `timeout`: an outage costs a Check at most
//! `timeout` and then its use's fallback.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use crate::policy::store::StoreSettings;
use crate::telemetry;

/// The longest wait between reconnection attempts of a dropped connection.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
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
    client: Option<redis::Client>,
    conn: ArcSwapOption<ConnectionManager>,
    /// Notified on every message of `<prefix>denylist`: the denylist URL's task
    /// fetches at once instead of at its next interval.
    pub denylist_changed: std::sync::Arc<tokio::sync::Notify>,
    /// The RESP3 connection subscribed to that channel (resubscribed by the
    /// manager after a reconnect); apart from `conn`, so a Redis without RESP3
    /// only loses the push.
    subscriber: ArcSwapOption<ConnectionManager>,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
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
        let client = redis::Client::open(settings.url.as_str())
            .and_then(|c| {
                let info = c.get_connection_info().clone();
                match &settings.password {
                    Some(pw) => {
                        let redis = info.redis_settings().clone().set_password(pw);
                        redis::Client::open(info.set_redis_settings(redis))
                    }
                    None => Ok(c),
                }
            })
            .inspect_err(|e| tracing::error!(url = %settings.url, "store unusable: {e}"))
            .ok();
        SharedStore {
            settings,
            client,
            conn: ArcSwapOption::empty(),
            denylist_changed: std::sync::Arc::default(),
            subscriber: ArcSwapOption::empty(),
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
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let set: Option<String> = self.run(Op::Spend, cmd, left).await?;
        Ok(set.is_some())
    }

    pub async fn get(
        &self,
        key: &str,
        left: Option<Duration>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.run(Op::Get, cmd, left).await
    }

    pub async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let _: Option<String> = self.run(Op::Set, cmd, None).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.run(Op::Ping, redis::cmd("PING"), None).await?;
        Ok(())
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        op: Op,
        cmd: redis::Cmd,
        left: Option<Duration>,
    ) -> Result<T, StoreError> {
        let bound = left.map_or(self.settings.timeout, |l| l.min(self.settings.timeout));
        let started = Instant::now();
        let result = match tokio::time::timeout(bound, async {
            let mut conn = self.connection()?;
            cmd.query_async::<T>(&mut conn).await.map_err(|e| {
                if e.is_timeout() {
                    StoreError::Timeout
                } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
                {
                    StoreError::Unavailable
                } else {
                    StoreError::Error
                }
            })
        })
        .await
        {
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
    /// for a connect: until then its calls fail at once).
    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        self.conn
            .load_full()
            .map(|c| (*c).clone())
            .ok_or(StoreError::Unavailable)
    }

    /// Connects if not connected (the manager reconnects by itself after that),
    /// within `CONNECT_TIMEOUT`: for the health task only.
    async fn connect(&self) {
        if self.conn.load().is_some() {
            return;
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(self.settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(RECONNECT_EVERY);
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        {
            Ok(Ok(c)) => self.conn.store(Some(std::sync::Arc::new(c))),
            Ok(Err(e)) => self.connect_failed(format!("connect: {:?}", e.kind())),
            Err(_) => self.connect_failed("connect: timed out".into()),
        }
    }

    /// The channel an operator publishes to after changing the denylist URL's list.
    pub fn denylist_channel(&self) -> String {
        format!("{}denylist", self.settings.key_prefix)
    }

    /// Subscribes to the denylist channel once connected (for the health task).
    async fn subscribe(&self) {
        if self.subscriber.load().is_some() || self.conn.load().is_none() {
            return;
        }
        let Some(client) = self.client.as_ref() else {
            return;
        };
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let Ok(client) = redis::Client::open(info.set_redis_settings(resp3)) else {
            return;
        };
        let wake = self.denylist_changed.clone();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_max_delay(RECONNECT_EVERY)
            .set_automatic_resubscription()
            .set_push_sender(move |push: redis::PushInfo| {
                if push.kind == redis::PushKind::Message {
                    wake.notify_one();
                }
                Ok::<(), std::convert::Infallible>(())
            });
        let channel = self.denylist_channel();
        let subscribed = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut c = ConnectionManager::new_with_config(client, config).await?;
            c.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(c)
        })
        .await;
        match subscribed {
            Ok(Ok(c)) => {
                tracing::info!(channel = %channel, "listening for denylist changes");
                self.subscriber.store(Some(std::sync::Arc::new(c)));
            }
            Ok(Err(e)) => tracing::warn!(
                channel = %channel,
                "no denylist push (the URL is still polled): {:?}",
                e.kind()
            ),
            Err(_) => {}
        }
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
pub async fn watch(current: impl Fn() -> Option<std::sync::Arc<SharedStore>>) {
    loop {
        if let Some(s) = current() {
            s.connect().await;
            if s.conn.load().is_some() {
                let _ = s.ping().await;
                s.subscribe().await;
            }
        }
        tokio::time::sleep(PING_EVERY).await;
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
