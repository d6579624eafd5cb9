//! HTTP mode end to end through the real proxies, each with its snippet from
//! `examples/http/` (addresses rewritten): nginx `auth_request`, Traefik
//! `forwardAuth`, Envoy ext_authz `http_service`. Each runs the real `valet`
//! binary with `listen.http_proxy` set for it, and a hand-written upstream that
//! records what reached it.
//!
//! Needs the proxies: `VALET_NGINX` (else `/usr/sbin/nginx`), `VALET_TRAEFIK` (else
//! `<repo>/.tools/py-venv/bin/traefik`), `VALET_ENVOY` (else
//! `<repo>/.tools/py-venv/bin/envoy`). `scripts/test.sh` installs them all
//! (scripts/install-test-deps.sh) and exports the three variables.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http1::{Log, Reply, Seen, send, upstream};
use common::tools::{Process, envoy_path, free_port, nginx_path, repo, traefik_path};
use common::*;

const POLICY: &str = r#"
providers:
  - name: corp
    issuer: https://idp.test/
    audiences: [orders-api]
    jwks: { file: jwks.json }
    claims_to_headers: { sub: x-user-id }
routes:
  - name: health
    match: { path: /healthz }
    anonymous: true
  - name: public-site
    match: { hosts: [public.example.com], path_prefix: /pub }
    anonymous: true
  - name: orders-write
    match: { methods: [DELETE, POST], path_prefix: /orders }
    require: { scopes: [orders:write] }
  - name: orders-read
    match: { methods: [GET], path_prefix: /orders }
    require: { scopes: [orders:read] }
  - name: admin
    match: { path_prefix: /admin }
    require: { scopes: [admin] }
default: deny
"#;

fn example(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/http")
            .join(name),
    )
    .unwrap()
}

/// `text` with `from` replaced where it occurs (exactly once) outside comments.
fn replace_once(text: &str, file: &str, from: &str, to: &str) -> String {
    let is_comment = |l: &str| l.trim_start().starts_with('#');
    let count: usize = text
        .lines()
        .filter(|l| !is_comment(l))
        .map(|l| l.matches(from).count())
        .sum();
    assert_eq!(
        count, 1,
        "examples/http/{file} must contain `{from}` exactly once outside comments"
    );
    text.lines()
        .map(|l| {
            if is_comment(l) {
                l.to_string()
            } else {
                l.replace(from, to)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

// === A proxy process, stopped by its PID when dropped ===

/// The proxy, its output in `dir/proxy.log`; `graceful`: SIGTERM first (nginx's
/// master then stops its worker).
fn spawn_proxy(cmd: &mut Command, dir: &Path, graceful: bool) -> Process {
    let mut proxy = Process::spawn(cmd, dir.join("proxy.log"));
    proxy.terminate = graceful;
    proxy
}

/// Waits until GET /healthz through the proxy reaches the upstream (200).
async fn wait_ready(proxy: &mut Process, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proxy.exited() {
            panic!("proxy exited early ({status}):\n{}", proxy.log());
        }
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(2),
            send(port, "GET", "/healthz", "api.example.com", &[]),
        )
        .await
            && r.status == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "proxy did not answer on {port} within 30s:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// === The cases, the same through every proxy ===

struct Setup {
    port: u16,
    seen: Log,
    proxy: Process,
    valet: Valet,
}

impl Setup {
    /// Sends one request; returns the reply and the headers the upstream got (None
    /// when the request did not reach it).
    async fn ask(
        &self,
        method: &str,
        path: &str,
        host: &str,
        headers: &[(&str, &str)],
    ) -> (Reply, Option<Seen>) {
        self.seen.lock().unwrap().clear();
        let r = send(self.port, method, path, host, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.proxy.log()));
        let up = self.seen.lock().unwrap().pop();
        (r, up)
    }
}

/// Every spoof header a client could try, each pointing at the anonymous route.
const SPOOF_TO_HEALTHZ: &[(&str, &str)] = &[
    ("x-forwarded-uri", "/healthz"),
    ("x-forwarded-method", "GET"),
    ("x-forwarded-host", "api.example.com"),
    ("x-original-uri", "/healthz"),
    ("x-original-method", "GET"),
    ("x-original-host", "api.example.com"),
];

async fn decides_as_valet_would(s: &Setup, name: &str) {
    let read = format!("Bearer {}", rs256("orders:read"));
    let ctx = |what: &str| {
        format!(
            "{name}: {what}\nproxy log:\n{}\nvalet log:\n{}",
            s.proxy.log(),
            s.valet.logs()
        )
    };

    // Allow with a token: 200, the identity reaches the upstream (a client's own
    // x-user-id does not), the token does not.
    let (r, up) = s
        .ask(
            "GET",
            "/orders/1?x=1",
            "api.example.com",
            &[("authorization", &read), ("x-user-id", "mallory")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", ctx("allow"));
    let up = up.unwrap_or_else(|| panic!("{}", ctx("allowed but not forwarded")));
    assert_eq!(up.all("x-user-id"), ["alice"], "{}", ctx("identity"));
    assert_eq!(
        up.all("authorization"),
        Vec::<&str>::new(),
        "{}",
        ctx("token stripped")
    );
    assert!(up.request_line.starts_with("GET /orders/1?x=1 "));

    // No token: 401 with the challenge.
    let (r, up) = s.ask("GET", "/orders/1", "api.example.com", &[]).await;
    assert_eq!(r.status, 401, "{}", ctx("no token"));
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"valet\""),
        "{}",
        ctx("challenge")
    );
    assert!(up.is_none());

    // Insufficient scope: 403.
    let (r, up) = s
        .ask(
            "GET",
            "/orders/1",
            "api.example.com",
            &[("authorization", &format!("Bearer {}", rs256("other")))],
        )
        .await;
    assert_eq!(r.status, 403, "{}", ctx("insufficient scope"));
    assert!(up.is_none());

    // GET /admin dressed up as /healthz by every family: still /admin.
    let (r, up) = s
        .ask("GET", "/admin", "api.example.com", SPOOF_TO_HEALTHZ)
        .await;
    assert_eq!(r.status, 401, "{}", ctx("GET /admin spoofed as /healthz"));
    assert!(
        up.is_none(),
        "{}",
        ctx("spoofed /admin reached the upstream")
    );
    // DELETE with a read token, claimed to be a GET: decided as the DELETE it is.
    let mut h = vec![("authorization", read.as_str())];
    h.extend([("x-forwarded-method", "GET"), ("x-original-method", "GET")]);
    let (r, up) = s.ask("DELETE", "/orders/1", "api.example.com", &h).await;
    assert_eq!(r.status, 403, "{}", ctx("DELETE spoofed as GET"));
    assert!(up.is_none());

    // A host route matches on the original Host, and only on it.
    let (r, up) = s
        .ask(
            "GET",
            "/pub/page",
            "public.example.com",
            &[("x-user-id", "mallory")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", ctx("host route"));
    let up = up.unwrap();
    assert_eq!(
        up.all("x-user-id"),
        Vec::<&str>::new(),
        "{}",
        ctx("x-user-id on an anonymous route")
    );
    let (r, _) = s
        .ask(
            "GET",
            "/pub/page",
            "api.example.com",
            &[
                ("x-forwarded-host", "public.example.com"),
                ("x-original-host", "public.example.com"),
            ],
        )
        .await;
    assert_eq!(r.status, 403, "{}", ctx("host spoofed"));

    // Anonymous route: a client's own x-user-id never reaches the upstream.
    let (r, up) = s
        .ask(
            "GET",
            "/healthz",
            "api.example.com",
            &[("x-user-id", "mallory")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", ctx("anonymous"));
    assert_eq!(
        up.unwrap().all("x-user-id"),
        Vec::<&str>::new(),
        "{}",
        ctx("x-user-id on /healthz")
    );
}

fn valet_behind(proxy: &str) -> Valet {
    let config = format!(
        "listen:\n  grpc: 127.0.0.1:0\n  admin: 127.0.0.1:0\n  http: 127.0.0.1:0\n  http_proxy: {proxy}\n{POLICY}"
    );
    Valet::start(&config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request() {
    let nginx = nginx_path();
    let valet = valet_behind("nginx");
    let (up, seen) = upstream().await;
    let up = up.port();
    let port = free_port();
    let file = "nginx.conf";
    let mut conf = example(file);
    for (from, to) in [
        ("127.0.0.1:8000", port),
        ("127.0.0.1:9002", valet.http.unwrap().port()),
        ("127.0.0.1:8080", up),
    ] {
        conf = replace_once(&conf, file, from, &format!("127.0.0.1:{to}"));
    }
    let dir = tempdir().unwrap();
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let mut proxy = spawn_proxy(
        Command::new(&nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf")),
        dir.path(),
        true,
    );
    wait_ready(&mut proxy, port).await;
    let s = Setup {
        port,
        seen,
        proxy,
        valet,
    };
    decides_as_valet_would(&s, "nginx").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_forward_auth() {
    let traefik = traefik_path();
    let valet = valet_behind("traefik");
    let (up, seen) = upstream().await;
    let up = up.port();
    let port = free_port();
    let dir = tempdir().unwrap();
    let dynamic_path = dir.path().join("dynamic.yml");
    let mut dynamic = example("traefik-dynamic.yml");
    for (from, to) in [
        ("127.0.0.1:9002", valet.http.unwrap().port()),
        ("127.0.0.1:8080", up),
    ] {
        dynamic = replace_once(
            &dynamic,
            "traefik-dynamic.yml",
            from,
            &format!("127.0.0.1:{to}"),
        );
    }
    std::fs::write(&dynamic_path, dynamic).unwrap();
    let mut static_ = example("traefik.yml");
    static_ = replace_once(
        &static_,
        "traefik.yml",
        "127.0.0.1:8000",
        &format!("127.0.0.1:{port}"),
    );
    static_ = replace_once(
        &static_,
        "traefik.yml",
        "/etc/traefik/valet-dynamic.yml",
        dynamic_path.to_str().unwrap(),
    );
    let static_path = dir.path().join("traefik.yml");
    std::fs::write(&static_path, static_).unwrap();
    let mut proxy = spawn_proxy(
        Command::new(&traefik)
            .arg(format!("--configFile={}", static_path.display()))
            .current_dir(dir.path()),
        dir.path(),
        false,
    );
    wait_ready(&mut proxy, port).await;
    let s = Setup {
        port,
        seen,
        proxy,
        valet,
    };
    decides_as_valet_would(&s, "traefik").await;
}

/// examples/http/envoy-http-service.yaml with its ports replaced.
pub(crate) fn envoy_config(listener: u16, valet: u16, app: u16, admin: u16) -> String {
    let file = "envoy-http-service.yaml";
    let mut yaml = example(file);
    for (from, to) in [(10000, listener), (9002, valet), (8080, app), (9901, admin)] {
        yaml = replace_once(
            &yaml,
            file,
            &format!("port_value: {from} }}"),
            &format!("port_value: {to} }}"),
        );
    }
    replace_once(
        &yaml,
        file,
        "uri: http://127.0.0.1:9002",
        &format!("uri: http://127.0.0.1:{valet}"),
    )
}

#[test]
fn envoy_http_service_example_validates() {
    let out = Command::new(envoy_path())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(repo("examples/http/envoy-http-service.yaml"))
        .stdin(Stdio::null())
        .output()
        .expect("run envoy --mode validate");
    assert!(
        out.status.success(),
        "envoy --mode validate failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_http_service() {
    let envoy = envoy_path();
    let valet = valet_behind("envoy");
    let (up, seen) = upstream().await;
    let up = up.port();
    let port = free_port();
    let dir = tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(
        &path,
        envoy_config(port, valet.http.unwrap().port(), up, free_port()),
    )
    .unwrap();
    let mut proxy = spawn_proxy(
        Command::new(&envoy).arg("-c").arg(&path).args([
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--disable-hot-restart",
        ]),
        dir.path(),
        false,
    );
    wait_ready(&mut proxy, port).await;
    let s = Setup {
        port,
        seen,
        proxy,
        valet,
    };
    decides_as_valet_would(&s, "envoy").await;
}

/// The README's HTTP-mode snippets are the example files, line for line.
#[test]
fn readme_shows_the_example_files() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    for file in [
        "nginx.conf",
        "traefik.yml",
        "traefik-dynamic.yml",
        "envoy-http-service.yaml",
    ] {
        let text = example(file);
        let body: String = text
            .lines()
            .skip_while(|l| l.starts_with('#') || l.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            readme.contains(&body),
            "README.md must contain examples/http/{file} (from its first non-comment line) verbatim"
        );
    }
}
