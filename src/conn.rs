//! Connections: what one client may hold open. Every listener accepts within a
//! cap kept below the file-descriptor limit (the admin port has its own small
//! one, so probes answer while the Check port is full). On the gRPC Check port,
//! HTTP/2 is served here rather than by tonic's `Server`, for what tonic does not
//! offer: a handshake timeout, an idle timeout, a connection cap, and a maximum
//! age that starts with GOAWAY (tonic's, with a grace, only ever cuts). Envoy
//! keeps a few long-lived, busy connections; none of this touches it.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::codegen::{Service, http};

use crate::service::ConnBudget;
use crate::service::message::Budget;
use crate::telemetry;

/// Per-stream HTTP/2 flow-control window: what a client may send before Valet
/// reads it. A Check is a few KiB; the message cap, not the window, bounds it.
const STREAM_WINDOW: u32 = 64 * 1024;
/// Per-connection window: unread bytes one connection may park in Valet.
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// gRPC metadata (HTTP/2 headers) per request; Envoy sends a few hundred bytes.
/// hyper's default, stated: the CheckRequest carries the client's headers, not this.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/2 PING this often on a quiet connection; no answer within the timeout closes it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// After GOAWAY, how long streams in flight may finish before the connection is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// The client preface (24 bytes) and a SETTINGS frame header (9): read this much
/// and the client speaks HTTP/2.
const HANDSHAKE_BYTES: u64 = 24 + 9;
/// The admin port's own budget: probes and a scraper need a handful.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// Descriptors kept for everything else: policy and key files, IdP and Redis
/// connections, the file watcher, the admin port's budget.
const FD_RESERVE: usize = 256 + ADMIN_MAX_CONNECTIONS;
/// One connection may hold at most this fraction of the message budget.
const CONNECTION_SHARE: usize = 4;

/// The connection and message limits, from the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections per Check listener (before the descriptor limit's bound).
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams (Checks) per connection.
    pub max_streams: u32,
    /// Time for a new connection to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// A connection with no Check in flight for this long gets GOAWAY.
    pub idle_timeout: Duration,
    /// Any connection older than this gets GOAWAY (rebalancing; bounded state).
    pub max_connection_age: Duration,
    /// The largest CheckRequest read (gRPC prefix aside).
    pub max_message_bytes: usize,
    /// CheckRequest bytes held at once, process-wide.
    pub message_budget_bytes: usize,
    /// From a Check's headers to its message's last byte.
    pub message_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_streams: 128,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_connection_age: Duration::from_secs(30 * 60),
            max_message_bytes: 256 * 1024,
            message_budget_bytes: 16 * 1024 * 1024,
            message_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// One connection's share of the message budget, never below one whole message.
    pub fn connection_share(&self) -> usize {
        (self.message_budget_bytes / CONNECTION_SHARE).max(2 * self.max_message_bytes + 64)
    }

    /// The limits in force, on one line at startup.
    pub fn log(&self, grpc_cap: usize, fd_limit: Option<usize>) {
        tracing::info!(
            max_connections = grpc_cap,
            fd_limit = fd_limit.map_or(-1, |n| n as i64),
            max_streams_per_connection = self.max_streams,
            max_message_bytes = self.max_message_bytes,
            message_budget_bytes = self.message_budget_bytes,
            connection_share_bytes = self.connection_share(),
            message_timeout_secs = self.message_timeout.as_secs_f64(),
            handshake_timeout_secs = self.handshake_timeout.as_secs_f64(),
            idle_timeout_secs = self.idle_timeout.as_secs_f64(),
            max_connection_age_secs = self.max_connection_age.as_secs_f64(),
            keepalive_secs = KEEPALIVE_INTERVAL.as_secs(),
            stream_window = STREAM_WINDOW,
            connection_window = CONNECTION_WINDOW,
            admin_max_connections = ADMIN_MAX_CONNECTIONS,
            "connection limits"
        );
    }
}

/// The process's soft limit on open files, from /proc (Linux).
pub fn fd_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The connection cap of each Check listener: what was asked, within what the
/// descriptor limit leaves once the reserve is set aside, split between them.
pub fn connection_cap(wanted: usize, check_listeners: usize, fd_limit: Option<usize>) -> usize {
    match fd_limit {
        Some(fds) => {
            let room = fds.saturating_sub(FD_RESERVE) / check_listeners.max(1);
            wanted.min(room).max(1)
        }
        None => wanted.max(1),
    }
}

// === impl Gate ===

/// Slots for one listener's connections: taken on accept, given back on close.
#[derive(Clone)]
pub struct Gate(Arc<GateInner>);

struct GateInner {
    listener: &'static str,
    cap: usize,
    open: AtomicUsize,
}

/// One connection's place under its listener's cap.
pub struct Slot(Gate);

impl Gate {
    pub fn new(listener: &'static str, cap: usize) -> Self {
        telemetry::connections_open(listener, 0);
        Gate(Arc::new(GateInner {
            listener,
            cap,
            open: AtomicUsize::new(0),
        }))
    }

    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::Acquire)
    }

    fn enter(&self) -> Option<Slot> {
        let g = &self.0;
        let taken = g
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < g.cap).then_some(n + 1)
            })
            .ok()?;
        telemetry::connections_open(g.listener, taken + 1);
        Some(Slot(self.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let g = &(self.0).0;
        let open = g.open.fetch_sub(1, Ordering::AcqRel) - 1;
        telemetry::connections_open(g.listener, open);
    }
}

/// The next connection with a slot under `gate`. One over the cap is closed at
/// once: its client learns now, rather than waiting in the kernel's backlog,
/// and the descriptor is back before the next accept.
pub async fn accept(listener: &TcpListener, gate: &Gate) -> (TcpStream, Slot) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => match gate.enter() {
                Some(slot) => {
                    let _ = tcp.set_nodelay(true);
                    return (tcp, slot);
                }
                None => {
                    telemetry::connection_refused(gate.0.listener, gate.0.cap);
                    drop(tcp);
                }
            },
            Err(e) => {
                // EMFILE and friends: the cap should prevent it; do not spin.
                tracing::warn!(listener = gate.0.listener, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

// === gRPC Check port ===

/// Serves HTTP/2 (gRPC) on `listener` until `stop`, then lets open connections
/// finish (GOAWAY) and returns once all are closed.
pub async fn serve_grpc<S>(
    listener: TcpListener,
    routes: S,
    limits: Limits,
    gate: Gate,
    stop: watch::Receiver<bool>,
) where
    S: Service<GrpcRequest, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut h2 = hyper::server::conn::http2::Builder::new(crate::telemetry::Executor);
    h2.timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let limits = Arc::new(limits);
    let mut accepting = stop.clone();
    loop {
        tokio::select! {
            (tcp, slot) = accept(&listener, &gate) => {
                let conn = Connection {
                    h2: h2.clone(),
                    routes: routes.clone(),
                    limits: limits.clone(),
                    stop: stop.clone(),
                };
                telemetry::spawn(conn.serve(tcp, slot));
            }
            _ = accepting.wait_for(|s| *s) => break,
        }
    }
    // Stop accepting at once: new clients are refused, not left in the backlog.
    drop(listener);
    while gate.open() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type GrpcRequest = http::Request<tonic::body::Body>;

struct Connection<S> {
    h2: hyper::server::conn::http2::Builder<crate::telemetry::Executor>,
    routes: S,
    limits: Arc<Limits>,
    stop: watch::Receiver<bool>,
}

impl<S> Connection<S>
where
    S: Service<GrpcRequest, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    async fn serve(mut self, tcp: TcpStream, slot: Slot) {
        let born = Instant::now();
        let read = Arc::new(AtomicU64::new(0));
        let activity = Arc::new(Activity::new(born));
        let io = TokioIo::new(Counted {
            inner: tcp,
            read: read.clone(),
        });
        let service = {
            let routes = self.routes.clone();
            let activity = activity.clone();
            let share = ConnBudget(Arc::new(Budget::new(self.limits.connection_share())));
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(share.clone());
                let busy = activity.begin();
                let mut routes = routes.clone();
                async move {
                    let answer = routes.call(req.map(tonic::body::Body::new)).await;
                    drop(busy);
                    answer
                }
            })
        };
        let conn = self.h2.serve_connection(io, service);
        let mut conn = std::pin::pin!(conn);
        let limits = self.limits.clone();
        let mut handshaken = false;
        // Set once GOAWAY is sent: when the connection is cut if still open.
        let mut cut_at: Option<Instant> = None;
        let mut stopping = false;
        loop {
            let next = match cut_at {
                Some(at) => at,
                None if stopping => born + Duration::from_secs(365 * 24 * 3600),
                None => {
                    let mut next = born + limits.max_connection_age;
                    if handshaken {
                        next = next.min(activity.idle_deadline(limits.idle_timeout));
                    } else {
                        next = next.min(born + limits.handshake_timeout);
                    }
                    next
                }
            };
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "grpc connection ended");
                    }
                    break;
                }
                _ = tokio::time::sleep_until(next.into()) => {
                    if cut_at.is_some() {
                        break;
                    }
                    let now = Instant::now();
                    if !handshaken {
                        if read.load(Ordering::Relaxed) < HANDSHAKE_BYTES {
                            // Not HTTP/2 yet: nothing to say GOAWAY to.
                            telemetry::connection_closed("grpc", "handshake_timeout");
                            break;
                        }
                        handshaken = true;
                    }
                    let cause = if now >= born + limits.max_connection_age {
                        Some("max_age")
                    } else if activity.idle_deadline(limits.idle_timeout) <= now {
                        Some("idle_timeout")
                    } else {
                        None
                    };
                    if let Some(cause) = cause {
                        telemetry::connection_closed("grpc", cause);
                        conn.as_mut().graceful_shutdown();
                        cut_at = Some(now + CLOSE_GRACE);
                    }
                }
                _ = self.stop.wait_for(|s| *s), if !stopping => {
                    // Shutdown: GOAWAY, then the app's grace period bounds the wait.
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
        drop(slot);
    }
}

/// Checks in flight on one connection, and when the last one ended.
struct Activity {
    born: Instant,
    active: AtomicUsize,
    /// Milliseconds from `born` to the end of the last Check.
    last_end_ms: AtomicU64,
}

struct Busy(Arc<Activity>);

impl Activity {
    fn new(born: Instant) -> Self {
        Activity {
            born,
            active: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// When the connection becomes idle for `idle`; if a Check is in flight,
    /// the earliest it could be.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.active.load(Ordering::Acquire) > 0 {
            return Instant::now() + idle;
        }
        self.born + Duration::from_millis(self.last_end_ms.load(Ordering::Acquire)) + idle
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = a.born.elapsed().as_millis() as u64;
        a.last_end_ms.fetch_max(ms, Ordering::AcqRel);
        a.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream that counts the bytes read from it: enough to tell a client that
/// sent the HTTP/2 preface from one that sent nothing.
struct Counted {
    inner: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A byte size: a number, optionally with KiB or MiB (`256KiB`, `16MiB`).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("not a size: {text:?} (e.g. 262144, 256KiB, 16MiB)"))?;
    let unit = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        _ => return Err(format!("unknown unit in {text:?}: use KiB or MiB")),
    };
    n.checked_mul(unit)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("size out of range: {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_below_the_descriptor_limit() {
        assert_eq!(connection_cap(1024, 1, Some(65536)), 1024);
        // The common soft limit of 1024: room for the admin port and the rest.
        assert_eq!(connection_cap(1024, 1, Some(1024)), 1024 - FD_RESERVE);
        assert_eq!(connection_cap(1024, 2, Some(1024)), (1024 - FD_RESERVE) / 2);
        assert_eq!(connection_cap(1024, 1, Some(100)), 1);
        assert_eq!(connection_cap(1024, 1, None), 1024);
        assert!(fd_limit().is_some_and(|n| n > 0));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("262144"), Ok(262144));
        assert_eq!(parse_size("256KiB"), Ok(256 * 1024));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1GB").is_err());
        assert!(parse_size("KiB").is_err());
    }

    #[test]
    fn a_gate_counts_and_refuses() {
        let gate = Gate::new("test", 2);
        let a = gate.enter().unwrap();
        let _b = gate.enter().unwrap();
        assert!(gate.enter().is_none());
        drop(a);
        assert_eq!(gate.open(), 1);
        assert!(gate.enter().is_some());
    }

    #[test]
    fn idleness_starts_when_the_last_check_ends() {
        let born = Instant::now() - Duration::from_secs(100);
        let a = Arc::new(Activity::new(born));
        let idle = Duration::from_secs(60);
        assert_eq!(a.idle_deadline(idle), born + idle);
        let busy = a.begin();
        assert!(a.idle_deadline(idle) > Instant::now());
        drop(busy);
        assert!(a.idle_deadline(idle) >= born + Duration::from_secs(100) + idle);
    }
}
