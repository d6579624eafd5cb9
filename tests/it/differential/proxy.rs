//! The proxy under test, in front of Valet and the recording upstream. The
//! generator, the oracle and the comparison do not know which proxy it is: a driver
//! starts it and says where clients reach it.
//!
//! - `envoy`: real Envoy with the bootstrap `valet envoy-config` generates from the
//!   policy (ext_authz over gRPC, off on anonymous routes).
//!
//! - `nginx`: nginx `auth_request` in front of Valet's HTTP mode
//!   (`http_proxy: nginx`), with examples/http/nginx.conf, its addresses replaced and
//!   one `auth_request_set` + `proxy_set_header` pair per identity header.
//!
//! - `traefik`: Traefik `forwardAuth` in front of Valet's HTTP mode
//!   (`http_proxy: traefik`), with examples/http/traefik.yml and
//!   traefik-dynamic.yml, their addresses replaced and every identity header in
//!   `authResponseHeaders`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::wire::{Client, Reply};
use crate::common::tools::{Process, envoy_path, free_port, nginx_path, traefik_path};

/// What every driver gets.
pub struct Setup<'a> {
    /// The policy Valet serves (`valet.yaml`, with its JWKS beside it).
    pub policy: &'a Path,
    /// Valet's gRPC Check port.
    pub valet_grpc: SocketAddr,
    /// Valet's HTTP-mode port, when the policy listens on one (for the nginx and
    /// Traefik drivers).
    pub valet_http: Option<SocketAddr>,
    pub upstream: SocketAddr,
    /// A scratch directory that outlives the proxy.
    pub dir: &'a Path,
    /// The policy's identity headers (`claims_to_headers`), lower-case.
    pub identity: &'a [&'a str],
}

pub trait Proxy: Send + Sync {
    fn name(&self) -> &str;
    /// Where clients connect.
    fn addr(&self) -> SocketAddr;
    /// The proxy's own log, for failure messages.
    fn log(&self) -> String;
}

/// Polls with `probe` (a request the policy lets through anonymously) until the
/// proxy answers 200; panics with the log if the process exits or 60 s pass.
pub async fn wait_answering(process: &mut Process, addr: SocketAddr, probe: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = process.exited() {
            panic!("proxy exited early ({status}):\n{}", process.log());
        }
        let mut client = Client::new(addr);
        if let Reply::Response { status: 200, .. } = client.send(probe, false).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "proxy did not answer on {addr}:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// === Envoy ===

pub struct Envoy {
    process: Process,
    addr: SocketAddr,
}

impl Proxy for Envoy {
    fn name(&self) -> &str {
        "envoy"
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn log(&self) -> String {
        self.process.log()
    }
}

/// Real Envoy with the bootstrap the real `valet envoy-config` prints for the policy.
pub async fn envoy(setup: &Setup<'_>, probe: &[u8]) -> Envoy {
    let bin = envoy_path();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_valet"))
        .args(["envoy-config", "--config"])
        .arg(setup.policy)
        .args(["--listen", &listen.to_string()])
        .args(["--upstream", &setup.upstream.to_string()])
        .args(["--valet", &setup.valet_grpc.to_string()])
        .args(["--admin", &admin])
        // A debug Valet under a few thousand Checks: a timeout would only turn
        // cases into denials, never into disagreements, but it hides them.
        .args(["--timeout", "5s"])
        .output()
        .expect("run valet envoy-config");
    assert!(
        out.status.success(),
        "valet envoy-config failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = setup.dir.join("envoy.yaml");
    std::fs::write(&config, &out.stdout).unwrap();
    let mut process = Process::spawn(
        Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", "2", "--log-level", "warn"])
            .arg("--disable-hot-restart"),
        setup.dir.join("envoy.log"),
    );
    wait_answering(&mut process, listen, probe).await;
    Envoy {
        process,
        addr: listen,
    }
}

// === nginx ===

pub struct Nginx {
    process: Process,
    addr: SocketAddr,
}

impl Proxy for Nginx {
    fn name(&self) -> &str {
        "nginx"
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn log(&self) -> String {
        self.process.log()
    }
}

/// examples/http/nginx.conf in front of Valet's HTTP mode.
pub async fn nginx(setup: &Setup<'_>, probe: &[u8]) -> Nginx {
    let bin = nginx_path();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let valet = setup
        .valet_http
        .expect("the nginx driver needs Valet's HTTP mode (listen.http)");
    let mut conf = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/http/nginx.conf"),
    )
    .expect("examples/http/nginx.conf");
    for (from, to) in [
        ("127.0.0.1:8000", listen.to_string()),
        ("127.0.0.1:9002", valet.to_string()),
        ("127.0.0.1:8080", setup.upstream.to_string()),
    ] {
        let needle = format!("{from};");
        assert_eq!(
            conf.matches(&needle).count(),
            1,
            "examples/http/nginx.conf must contain `{needle}` exactly once"
        );
        conf = conf.replace(&needle, &format!("{to};"));
    }
    // The snippet copies X-User-Id; every other identity header the same way.
    let anchor = "proxy_set_header X-User-Id $valet_user_id;";
    assert!(
        conf.contains(anchor),
        "examples/http/nginx.conf: no `{anchor}`"
    );
    let mut extra = String::new();
    for h in setup.identity.iter().filter(|h| **h != "x-user-id") {
        let var = format!("$valet_{}", h.replace('-', "_"));
        extra.push_str(&format!(
            "\n            auth_request_set {var} $upstream_http_{};\n            proxy_set_header {h} {var};",
            h.replace('-', "_")
        ));
    }
    conf = conf.replacen(anchor, &format!("{anchor}{extra}"), 1);
    let prefix = setup.dir.join("nginx");
    std::fs::create_dir_all(&prefix).unwrap();
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut process = Process::spawn(
        Command::new(&bin)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&path),
        setup.dir.join("nginx.log"),
    );
    process.terminate = true;
    wait_answering(&mut process, listen, probe).await;
    Nginx {
        process,
        addr: listen,
    }
}

// === Traefik ===

pub struct Traefik {
    process: Process,
    addr: SocketAddr,
}

impl Proxy for Traefik {
    fn name(&self) -> &str {
        "traefik"
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn log(&self) -> String {
        self.process.log()
    }
}

/// `examples/http/<file>` with each `from` replaced exactly once.
fn example_with(file: &str, replacements: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/http")
            .join(file),
    )
    .unwrap_or_else(|e| panic!("examples/http/{file}: {e}"));
    for (from, to) in replacements {
        assert_eq!(
            text.matches(from).count(),
            1,
            "examples/http/{file} must contain `{from}` exactly once"
        );
        text = text.replace(from, to);
    }
    text
}

/// examples/http/traefik.yml + traefik-dynamic.yml in front of Valet's HTTP mode.
pub async fn traefik(setup: &Setup<'_>, probe: &[u8]) -> Traefik {
    let bin = traefik_path();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let valet = setup
        .valet_http
        .expect("the Traefik driver needs Valet's HTTP mode (listen.http)");
    // Every identity header in authResponseHeaders, as the snippet does X-User-Id.
    let listed: String = setup
        .identity
        .iter()
        .map(|h| format!("\n          - {h}"))
        .collect();
    let dynamic = example_with(
        "traefik-dynamic.yml",
        &[
            ("http://127.0.0.1:9002/", format!("http://{valet}/")),
            (
                "http://127.0.0.1:8080",
                format!("http://{}", setup.upstream),
            ),
            ("\n          - X-User-Id", listed),
        ],
    );
    let dynamic_path = setup.dir.join("traefik-dynamic.yml");
    std::fs::write(&dynamic_path, dynamic).unwrap();
    let static_ = example_with(
        "traefik.yml",
        &[
            ("address: 127.0.0.1:8000", format!("address: {listen}")),
            (
                "/etc/traefik/valet-dynamic.yml",
                dynamic_path.display().to_string(),
            ),
        ],
    );
    let static_path = setup.dir.join("traefik.yml");
    std::fs::write(&static_path, static_).unwrap();
    let mut process = Process::spawn(
        Command::new(&bin)
            .arg(format!("--configFile={}", static_path.display()))
            .current_dir(setup.dir),
        setup.dir.join("traefik.log"),
    );
    wait_answering(&mut process, listen, probe).await;
    Traefik {
        process,
        addr: listen,
    }
}
