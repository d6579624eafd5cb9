//! Floods on the Check port's connections and messages (issue #20, item 1): what a
//! client that is not Envoy can make Valet hold. Each test is bounded (a few
//! seconds); VALET_FLOOD_LONG=1 floods harder. Figures go to stderr
//! (`--nocapture`) for the README's "Limits and floods".

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use envoy_types::ext_authz::v3::pb::{CheckResponse, HttpResponse};
use h2::client::SendRequest;
use prost::Message;
use prost::bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::codegen::http;

const POLICY: &str = r#"
realm: test
providers:
  - name: corp
    issuer: https://idp.test/
    audiences: [orders-api]
    jwks: { file: jwks.json }
    algorithms: [RS256]
routes:
  - name: orders
    match: { path_prefix: /orders }
    require: { scopes: [orders:read] }
default: deny
"#;

const MIB: u64 = 1024 * 1024;
/// The pod's memory limit (k8s/deployment.yaml): no flood may take Valet past it.
const RSS_BOUND: u64 = 64 * MIB;

fn long() -> bool {
    std::env::var("VALET_FLOOD_LONG").is_ok_and(|v| v == "1")
}

/// Valet's resident memory, from /proc.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib * 1024
}

/// Samples RSS every 20 ms until dropped; `peak()` is the highest seen.
struct RssSampler {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss(pid)));
        let p = peak.clone();
        let task = common::spawn(async move {
            loop {
                p.fetch_max(rss(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        RssSampler { peak, task }
    }
    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

// === Raw HTTP/2 ===

/// One HTTP/2 connection to the Check port, driven by its own task.
async fn h2_connect(addr: SocketAddr) -> (SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        // The flood is the client's sending, not its receiving.
        .initial_window_size(1 << 20)
        .handshake(tcp)
        .await
        .unwrap();
    let task = common::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn check_request(addr: SocketAddr) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/envoy.service.auth.v3.Authorization/Check"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// What came back on one stream.
#[derive(Debug, Default)]
struct Reply {
    /// The CheckResponse's denied status (200 if allowed), if one came.
    http_status: Option<i32>,
    reason: String,
    grpc_status: Option<String>,
}

/// Sends `data` on a stream as the peer's windows allow; stops quietly when the
/// server answers or resets the stream first.
async fn send_paced(stream: &mut h2::SendStream<Bytes>, mut data: Bytes, end: bool) -> bool {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(n)) if n > 0 => n,
            Some(Ok(_)) => continue,
            _ => return false,
        };
        let part = data.split_to(granted.min(data.len()));
        if stream.send_data(part, end && data.is_empty()).is_err() {
            return false;
        }
    }
    if end && stream.send_data(Bytes::new(), true).is_err() {
        return false;
    }
    true
}

/// Reads a gRPC reply: the CheckResponse (if any) and grpc-status.
async fn read_reply(resp: h2::client::ResponseFuture) -> Reply {
    let mut reply = Reply::default();
    let Ok(resp) = resp.await else {
        return reply;
    };
    if let Some(s) = resp.headers().get("grpc-status") {
        reply.grpc_status = Some(s.to_str().unwrap_or("?").to_string());
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    if let Ok(Some(t)) = body.trailers().await
        && let Some(s) = t.get("grpc-status")
    {
        reply.grpc_status = Some(s.to_str().unwrap_or("?").to_string());
    }
    if buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if let Ok(r) = CheckResponse::decode(&buf[5..(5 + len).min(buf.len())]) {
            match r.http_response {
                Some(HttpResponse::DeniedResponse(d)) => {
                    reply.http_status = Some(d.status.map_or(0, |s| s.code));
                    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap_or_default();
                    reply.reason = body["error"].as_str().unwrap_or("").to_string();
                }
                Some(HttpResponse::OkResponse(_)) => reply.http_status = Some(200),
                _ => {}
            }
        }
    }
    reply
}

/// A gRPC frame prefix declaring `len` bytes.
fn prefix(len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(5);
    b.put_u8(0);
    b.put_u32(len as u32);
    b.freeze()
}

/// Opens `streams` streams on one connection, each declaring a `declared`-byte
/// message and sending all of it but the last byte. Returns the tasks (they end
/// when the server answers a stream or the connection goes) and the connection.
async fn half_sent_flood(
    addr: SocketAddr,
    streams: usize,
    declared: usize,
    sent: Arc<AtomicUsize>,
    answered: Arc<std::sync::Mutex<Vec<Reply>>>,
) -> (
    Vec<tokio::task::JoinHandle<()>>,
    tokio::task::JoinHandle<()>,
) {
    // One zero-filled buffer, sliced per stream: the test itself stays small.
    let zeros = Bytes::from(vec![0u8; declared.saturating_sub(1)]);
    let (send, conn) = h2_connect(addr).await;
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let Ok(mut send) = send.clone().ready().await else {
            break;
        };
        let Ok((resp, mut stream)) = send.send_request(check_request(addr), false) else {
            break;
        };
        let (zeros, sent, answered) = (zeros.clone(), sent.clone(), answered.clone());
        tasks.push(common::spawn(async move {
            let reply = common::spawn(read_reply(resp));
            if send_paced(&mut stream, prefix(declared), false).await
                && send_paced(&mut stream, zeros, false).await
            {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            // Keep the stream open (never the last byte) until the server
            // answers or the connection is dropped.
            if let Ok(r) = reply.await
                && r.http_status.is_some()
            {
                answered.lock().unwrap().push(r);
            }
            drop(stream);
        }));
    }
    (tasks, conn)
}

async fn normal_check(v: &Valet) -> Answer {
    let mut c = v.client().await;
    check(&mut c, get("/orders/1").bearer(&rs256("orders:read"))).await
}

/// (a) Streams that declare a large message and stop one byte short: memory is
/// taken as bytes arrive and within a budget, an oversize declaration is
/// answered at once, and a normal Check on its own connection still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_messages_stay_within_the_memory_limit() {
    let v = Valet::start_with(POLICY, &[("VALET_LOG", "info")]);
    assert!(v.wait_ready(200, Duration::from_secs(15)).await);
    let _load = common::load_slot().await;
    assert!(normal_check(&v).await.allowed());
    let pid = v.pid();
    let base = rss(pid);
    let sampler = RssSampler::start(pid);

    // The issue's flood: 120 streams each declaring 4 MiB (then the whole limit),
    // then at Valet's cap on a few connections: as much as one message may be.
    let rounds: Vec<(usize, usize, usize)> = vec![
        (1, if long() { 1000 } else { 120 }, 4 << 20),
        (2, if long() { 1000 } else { 128 }, 256 << 10),
    ];
    let mut conns = Vec::new();
    let mut all_tasks = Vec::new();
    let sent = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    for (connections, streams, declared) in rounds {
        for _ in 0..connections {
            let (tasks, conn) =
                half_sent_flood(v.grpc, streams, declared, sent.clone(), answered.clone()).await;
            all_tasks.extend(tasks);
            conns.push(conn);
        }
    }
    // Every stream has either sent all but its last byte or been answered.
    let deadline = Instant::now() + Duration::from_secs(if long() { 120 } else { 30 });
    while sent.load(Ordering::Relaxed) + answered.lock().unwrap().len() < all_tasks.len()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = sampler.peak();
    let normal = normal_check(&v).await;
    let flood_secs = started.elapsed().as_secs_f64();

    for c in &conns {
        c.abort();
    }
    for t in all_tasks.drain(..) {
        t.abort();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss(pid);
    let answered = std::mem::take(&mut *answered.lock().unwrap());
    let mut reasons = std::collections::BTreeMap::new();
    for r in &answered {
        *reasons
            .entry(format!("{} {}", r.http_status.unwrap_or(0), r.reason))
            .or_insert(0) += 1;
    }
    eprintln!(
        "half-sent flood: base {:.1} MiB, peak {:.1} MiB, after close {:.1} MiB; \
         {} streams fully half-sent, answered early {:?}, in {flood_secs:.1} s; \
         normal Check during: {} {}",
        mib(base),
        mib(during),
        mib(after),
        sent.load(Ordering::Relaxed),
        reasons,
        normal.http_status,
        normal.reason()
    );
    assert!(
        during < RSS_BOUND,
        "peak RSS {:.1} MiB under the flood",
        mib(during)
    );
    assert!(
        after < RSS_BOUND,
        "RSS {:.1} MiB after the flood",
        mib(after)
    );
    assert!(
        normal.allowed(),
        "a normal Check during the flood: {normal:?}"
    );
    // The 4 MiB declarations are over the cap: each got a CheckResponse deny.
    let too_large = answered
        .iter()
        .filter(|r| r.http_status == Some(413) && r.reason == "request_too_large")
        .count();
    assert!(
        too_large >= 120,
        "oversize declarations answered: {reasons:?}"
    );
    assert!(normal_check(&v).await.allowed());
}

/// Opens silent TCP connections to `addr` until `stop`: each one is kept until
/// the server closes it, counted in `closed`; a connection closed at once
/// (refused over the cap) is opened again, so the port stays at its cap.
struct SilentFlood {
    held: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SilentFlood {
    fn start(addr: SocketAddr, connections: usize) -> Self {
        let held = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (held, closed, refused, stop) =
                (held.clone(), closed.clone(), refused.clone(), stop.clone());
            tasks.push(common::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut tcp) = TcpStream::connect(addr).await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let mut buf = [0u8; 256];
                    // Valet's SETTINGS first: accepted and held. EOF without a
                    // byte: refused over the cap. Nothing for a while: still in
                    // the kernel's backlog, not Valet's yet; try again.
                    let first =
                        tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await;
                    match first {
                        Ok(Ok(n)) if n > 0 => {}
                        Ok(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        Err(_) => continue,
                    }
                    held.fetch_add(1, Ordering::Relaxed);
                    // Silent: read whatever Valet sends until it closes (EOF or reset).
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }));
        }
        SilentFlood {
            held,
            closed,
            refused,
            stop,
            tasks,
        }
    }
}

impl Drop for SilentFlood {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// (b) Thousands of silent connections: the Check port holds at most its cap,
/// closes each after the handshake timeout, the admin port answers all along,
/// and a legitimate Check connects and passes once slots free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_and_closed() {
    let cap = 500usize;
    let cap_text = cap.to_string();
    let v = Valet::start_with(
        POLICY,
        &[
            ("VALET_LOG", "info"),
            ("VALET_MAX_CONNECTIONS", &cap_text),
            ("VALET_HANDSHAKE_TIMEOUT", "2s"),
            ("VALET_IDLE_TIMEOUT", "2s"),
        ],
    );
    assert!(v.wait_ready(200, Duration::from_secs(15)).await);
    let _load = common::load_slot().await;
    let connections = if long() { 5000 } else { 2000 };
    let pid = v.pid();
    let sampler = RssSampler::start(pid);

    // HTTP/2 clients that shake hands and then say nothing: the idle timeout's.
    let mut idle_h2 = Vec::new();
    for _ in 0..20 {
        idle_h2.push(h2_connect(v.grpc).await);
    }
    let flood = SilentFlood::start(v.grpc, connections);
    let started = Instant::now();

    // While the flood holds the port at its cap, the admin port answers.
    let mut at_cap = false;
    let mut healthz_ok = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let (status, _) = v.admin_get("/healthz").await;
        if status == 200 {
            healthz_ok += 1;
        }
        let open = v
            .metric("valet_connections_open{listener=\"grpc\"}")
            .await
            .unwrap_or(0.0);
        if open >= cap as f64 && healthz_ok > 0 {
            at_cap = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        at_cap,
        "the Check port never reached its cap of {cap}: held {}, refused {}, metrics:\n{}",
        flood.held.load(Ordering::Relaxed),
        flood.refused.load(Ordering::Relaxed),
        v.admin_get("/metrics")
            .await
            .1
            .lines()
            .filter(|l| l.contains("connections"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Stop refilling; every held connection must be closed by Valet.
    flood.stop.store(true, Ordering::Relaxed);
    let held_at_stop = flood.held.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while flood.closed.load(Ordering::Relaxed) < flood.held.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed = flood.closed.load(Ordering::Relaxed);
    let held = flood.held.load(Ordering::Relaxed);
    let closed_after = started.elapsed().as_secs_f64();
    // The handshaken-then-idle HTTP/2 connections: closed by Valet (GOAWAY).
    let mut idle_closed = 0;
    for (send, conn) in idle_h2 {
        drop(send);
        if tokio::time::timeout(Duration::from_secs(15), conn)
            .await
            .is_ok()
        {
            idle_closed += 1;
        }
    }
    let (status, _) = v.admin_get("/healthz").await;
    let normal = normal_check(&v).await;
    eprintln!(
        "silent flood: {connections} clients, {held} connections held ({held_at_stop} when \
         stopped), {closed} closed by Valet within {closed_after:.1} s, {} refused over the cap, \
         20 idle HTTP/2 connections: {idle_closed} closed; healthz answered {healthz_ok}× during; \
         peak RSS {:.1} MiB; normal Check after: {}",
        flood.refused.load(Ordering::Relaxed),
        mib(sampler.peak()),
        normal.http_status
    );
    assert_eq!(closed, held, "silent connections left open");
    assert_eq!(idle_closed, 20, "idle HTTP/2 connections left open");
    assert_eq!(status, 200);
    assert!(normal.allowed(), "{normal:?}");
    assert!(sampler.peak() < RSS_BOUND);
}

/// (c) A CheckRequest over the message cap is a CheckResponse deny (413
/// `request_too_large`), never a gRPC error; one just under it is decided.
#[tokio::test]
async fn oversize_check_request_is_a_deny() {
    let v = Valet::start_with(
        POLICY,
        &[("VALET_LOG", "info"), ("VALET_MAX_MESSAGE_BYTES", "64KiB")],
    );
    assert!(v.wait_ready(200, Duration::from_secs(15)).await);
    let _load = common::load_slot().await;
    let mut c = v.client().await;
    let token = rs256("orders:read");
    let under = check(
        &mut c,
        get("/orders/1")
            .bearer(&token)
            .header("x-padding", &"a".repeat(40 << 10)),
    )
    .await;
    assert!(under.allowed(), "{under:?}");
    for size in [80usize << 10, 5 << 20] {
        let r = check(
            &mut c,
            get("/orders/1")
                .bearer(&token)
                .header("x-padding", &"a".repeat(size)),
        )
        .await;
        eprintln!(
            "oversize CheckRequest ({size} bytes of header): {} {} {}",
            r.http_status,
            r.reason(),
            r.body
        );
        assert_eq!(r.http_status, 413, "{r:?}");
        assert_eq!(r.reason(), "request_too_large");
        assert!(!r.allowed());
    }
    // The connection stays usable.
    assert!(
        check(&mut c, get("/orders/1").bearer(&token))
            .await
            .allowed()
    );
    assert_eq!(
        v.metric(
            "valet_check_total{decision=\"deny\",reason=\"request_too_large\",route=\"_none\"}"
        )
        .await,
        Some(2.0)
    );
}
