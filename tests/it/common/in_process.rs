//! Valet's server inside the test process: `valet::app::serve_with`, the function
//! the binary's `serve` runs, on listeners bound to 127.0.0.1:0 before it starts,
//! on a runtime of its own (two workers, threads named `valet-N`) so a test that
//! blocks its own thread cannot stall it. Its log lines are captured per Valet by
//! thread name, formatted as the binary writes them to stderr.
//!
//! Each Valet has its own metrics (per-instance telemetry), served on its own
//! admin listener, so a test reads them as it would from the binary. A test that
//! moves time hands it a [`valet::clock::Clock`] and keeps a clone to advance.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;

pub type Logs = Arc<Mutex<Vec<String>>>;

/// A running in-process Valet; dropping it stops the server and its runtime.
pub struct Server {
    stop: Option<oneshot::Sender<()>>,
    pub grpc: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

impl Server {
    /// Stops serving (as SIGTERM would, with no drain): the runtime ends with it.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts Valet on the config file at `path`, with `logs` receiving its log lines,
/// on `clock` (a clone shares its `advance_unix`).
pub fn start(path: &Path, logs: Logs, clock: valet::clock::Clock) -> Server {
    install_log_capture();
    let config = valet::load::load(path).unwrap_or_else(|e| panic!("config: {e}"));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("valet-{n}");
    sinks().lock().unwrap().insert(name.clone(), logs);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread_name = name.clone();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(thread_name.clone())
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listeners = valet::app::Listeners::bind(&config).await.unwrap();
                let addr = |l: &Option<tokio::net::TcpListener>| {
                    l.as_ref().map(|l| l.local_addr().unwrap())
                };
                let _ = ready_tx.send((
                    addr(&listeners.grpc),
                    addr(&listeners.admin),
                    addr(&listeners.http),
                ));
                let shutdown = valet::app::Shutdown {
                    drain: Duration::ZERO,
                    grace: Duration::ZERO,
                    ..Default::default()
                };
                let stop = async move {
                    let _ = stop_rx.await;
                };
                let limits = valet::conn::Limits::default();
                if let Err(e) =
                    valet::app::serve_with(config, shutdown, limits, listeners, stop, clock).await
                {
                    panic!("in-process valet: {e}");
                }
            });
            // Key refreshers, the reloader and watchers stop with their runtime.
            runtime.shutdown_background();
            sinks().lock().unwrap().remove(&thread_name);
        })
        .unwrap();
    let (grpc, admin, http) = ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("in-process valet did not bind");
    Server {
        stop: Some(stop_tx),
        grpc,
        admin,
        http,
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Log buffers by the name of the runtime threads that write to them.
fn sinks() -> &'static Mutex<HashMap<String, Logs>> {
    static SINKS: OnceLock<Mutex<HashMap<String, Logs>>> = OnceLock::new();
    SINKS.get_or_init(Default::default)
}

/// One subscriber for the test process, as the binary's (text, `info`), writing
/// each line to the Valet whose thread emitted it; lines from other threads are dropped.
fn install_log_capture() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(|| LineWriter {
                sink: std::thread::current()
                    .name()
                    .and_then(|n| sinks().lock().unwrap().get(n).cloned()),
                line: Vec::new(),
            })
            .try_init();
    });
}

struct LineWriter {
    sink: Option<Logs>,
    line: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if let Some(sink) = &self.sink {
            let text = String::from_utf8_lossy(&self.line);
            let mut logs = sink.lock().unwrap();
            logs.extend(text.lines().map(str::to_string));
        }
    }
}
