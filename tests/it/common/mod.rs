//! Black-box test support: the real `valet` binary on a free port, real gRPC with
//! Envoy's message types, tokens signed with the fixture keys.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use envoy_types::ext_authz::v3::pb::{CheckRequest, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::google::protobuf::Struct;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use tonic::transport::Channel;

pub mod denylist_server;
pub mod http1;
pub mod idp;
pub mod in_process;
pub mod jwks_server;
pub mod load;
pub mod otlp;
pub mod pem_key;
pub mod pki;
pub mod tempdir;
pub mod tools;

pub use tempdir::{TempDir, tempdir};

pub const ISSUER: &str = "https://idp.test/";
pub const AUDIENCE: &str = "orders-api";
pub const HMAC_SECRET: &[u8] = b"a-test-hmac-secret-of-at-least-32-bytes!";

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("keys/{name}"))).unwrap()
}

/// The fixture key in `keys/{name}`, parsed once per test process: PEM decoding
/// is slow in debug builds, and tests sign thousands of tokens.
pub fn pem_key(name: &str, alg: Algorithm) -> EncodingKey {
    static KEYS: std::sync::OnceLock<Mutex<HashMap<String, EncodingKey>>> =
        std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(Default::default);
    if let Some(k) = keys.lock().unwrap().get(name) {
        return k.clone();
    }
    let key = pem_key::encoding_key(&pem(name), alg).unwrap();
    keys.lock().unwrap().insert(name.to_string(), key.clone());
    key
}

/// The signing key and kid the fixture JWKS publishes for `alg`.
pub fn signing_key(alg: Algorithm) -> (EncodingKey, &'static str) {
    use Algorithm::*;
    match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => (pem_key("rsa.pem", alg), "rsa-1"),
        ES256 => (pem_key("ec256.pem", alg), "ec256-1"),
        ES384 => (pem_key("ec384.pem", alg), "ec384-1"),
        EdDSA => (pem_key("ed25519.pem", alg), "ed-1"),
        HS256 | HS384 | HS512 => (EncodingKey::from_secret(HMAC_SECRET), "hs-1"),
        other => panic!("no fixture key for {other:?}"),
    }
}

/// An RSA key the JWKS does not hold.
pub fn other_rsa_key() -> EncodingKey {
    pem_key("rsa-other.pem", Algorithm::RS256)
}

pub fn rsa_public_pem() -> Vec<u8> {
    pem("rsa.pub.pem")
}

/// The fixture JWKS: one key per kind, plus an oct key for HMAC.
pub fn jwks() -> Value {
    let mut keys = Vec::new();
    for (alg, pin) in [
        (Algorithm::RS256, false),
        (Algorithm::ES256, true),
        (Algorithm::ES384, true),
        (Algorithm::EdDSA, true),
        (Algorithm::HS256, false),
    ] {
        let (key, kid) = signing_key(alg);
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        if !pin {
            // RSA serves RS* and PS*; oct serves HS*: no pinned alg.
            jwk.common.key_algorithm = None;
        }
        keys.push(serde_json::to_value(jwk).unwrap());
    }
    json!({ "keys": keys })
}

/// The fixture JWKS with only the keys whose kid is listed.
pub fn jwks_with(kids: &[&str]) -> Value {
    let all = jwks();
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| kids.contains(&k["kid"].as_str().unwrap_or("")))
        .cloned()
        .collect();
    json!({ "keys": keys })
}

pub fn claims(scope: &str) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now(),
        "exp": now() + 600,
        "scope": scope,
    })
}

/// Signs any header and claims as given: for tokens no honest library would mint.
pub fn sign_raw(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{sig}")
}

pub fn alg_name(alg: Algorithm) -> String {
    serde_json::to_value(alg)
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

/// A well-formed token for `alg`, with the fixture key and kid.
pub fn token(alg: Algorithm, claims: &Value) -> String {
    let (key, kid) = signing_key(alg);
    sign_raw(
        &json!({"alg": alg_name(alg), "typ": "JWT", "kid": kid}),
        claims,
        &key,
        alg,
    )
}

pub fn rs256(scope: &str) -> String {
    token(Algorithm::RS256, &claims(scope))
}

/// Load tests (floods, faults under load, the differential runs) at most two at a
/// time. The harness hands tests to its threads in name order and
/// the load suites are neighbours, so with one at a time the other thread mostly
/// sat waiting for the lock; their assertions are counts and bounds, not
/// durations, and hold with two side by side. Take it once the test is set up
/// (its Valet, IdP, proxy and tokens ready) and hold it to the end: the load tests
/// one after the other are the suite's longest path, so setup (seconds, for a
/// node IdP on a busy machine) is done outside it.
pub async fn load_slot() -> tokio::sync::SemaphorePermit<'static> {
    static LOAD: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    LOAD.acquire().await.unwrap()
}

/// `tokio::spawn` of a boxed future: tokio's task code (~1.7k lines of LLVM IR) is
/// then compiled once per output type, not once per kind of spawned future (this
/// crate spawns dozens).
pub fn spawn<T: Send + 'static>(
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    let boxed: std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> = Box::pin(future);
    tokio::spawn(boxed)
}

/// The client of every `admin_get`: tests poll /metrics and /readyz every few
/// milliseconds, and `reqwest::get` built a new client each time (its TLS setup
/// parses the root certificates: most of a poll's CPU in a debug build). Nothing
/// pooled, so no connection outlives the test runtime that opened it.
fn admin_http() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .unwrap()
    })
}

// === Valet process ===

/// `config` (which has no `listen:`) with both ports chosen by the kernel.
pub fn with_free_ports(config: &str) -> String {
    if config.contains("listen:") {
        return config.to_string();
    }
    format!("listen:\n  grpc: 127.0.0.1:0\n  admin: 127.0.0.1:0\n{config}")
}

/// Where a Valet runs: the real binary, or its server inside the test process.
enum Run {
    Process(Child),
    InProcess(in_process::Server),
}

pub struct Valet {
    run: Run,
    pub grpc: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
    pub dir: TempDir,
}

impl Valet {
    /// Starts `valet serve` on a free port with `config` (no `listen:` section) and
    /// the fixture JWKS as `jwks.json` beside it.
    pub fn start(config: &str) -> Valet {
        Self::start_with(config, &[("VALET_LOG", "info")])
    }

    /// Starts Valet and waits (15 s at most) until it is ready: every provider a
    /// route uses has keys (remote JWKS and discovery take a moment).
    pub async fn start_ready(config: &str) -> Valet {
        let v = Self::start(config);
        assert!(
            v.wait_ready(200, Duration::from_secs(15)).await,
            "valet not ready:\n{}",
            v.logs()
        );
        v
    }

    /// Valet on `config` written into `dir` (beside the files it names, such as a
    /// client secret), logging at info, ready.
    pub async fn start_ready_in(config: &str, dir: TempDir) -> Valet {
        let path = dir.path().join("valet.yaml");
        std::fs::write(&path, with_free_ports(config)).unwrap();
        let v = Self::spawn(dir, &path, &[("VALET_LOG", "info")]);
        assert!(
            v.wait_ready(200, Duration::from_secs(15)).await,
            "{}",
            v.logs()
        );
        v
    }

    /// [`Valet::start_ready_in`], in process.
    pub async fn in_process_ready_in(config: &str, dir: TempDir) -> Valet {
        let path = dir.path().join("valet.yaml");
        std::fs::write(&path, with_free_ports(config)).unwrap();
        let v = Self::in_process_at(dir, &path);
        assert!(
            v.wait_ready(200, Duration::from_secs(15)).await,
            "{}",
            v.logs()
        );
        v
    }

    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Valet {
        let dir = tempdir().unwrap();
        std::fs::write(dir.path().join("jwks.json"), jwks().to_string()).unwrap();
        let path = dir.path().join("valet.yaml");
        std::fs::write(&path, with_free_ports(config)).unwrap();
        Self::spawn(dir, &path, env)
    }

    /// Starts Valet on a config file the test laid out itself (in `dir`, which the
    /// returned Valet keeps alive).
    pub fn spawn(dir: TempDir, path: &Path, env: &[(&str, &str)]) -> Valet {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_valet"));
        cmd.arg("serve").arg("--config").arg(path);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn valet");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    // Text logs say grpc=ADDR; JSON logs say "grpc":"ADDR".
                    for (kind, json) in [
                        ("grpc=", "\"grpc\":\""),
                        ("admin=", "\"admin\":\""),
                        ("http=", "\"http\":\""),
                    ] {
                        if let Some(rest) =
                            line.split(kind).nth(1).or_else(|| line.split(json).nth(1))
                        {
                            let addr = rest
                                .trim_start_matches('"')
                                .split(|c: char| c == '"' || c.is_whitespace())
                                .next()
                                .unwrap_or("");
                            let _ = tx.send((kind, addr.parse::<SocketAddr>().ok()));
                        }
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut admin = None;
        let mut http = None;
        let grpc = loop {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(("admin=", addr)) => admin = addr,
                Ok(("http=", addr)) => http = addr,
                Ok((_, Some(addr))) => break addr,
                _ => {
                    let _ = child.kill();
                    panic!("valet did not start:\n{}", logs.lock().unwrap().join("\n"));
                }
            }
        };
        Valet {
            run: Run::Process(child),
            grpc,
            admin,
            http,
            logs,
            dir,
        }
    }

    /// Valet's server in this process (`valet::app::serve_with`, as the binary
    /// serves) with `config` (no `listen:` section) and the fixture JWKS beside it.
    /// For tests about decisions, not about the process: no pid, no signals; its
    /// metrics are its own (per-instance telemetry).
    pub fn in_process(config: &str) -> Valet {
        Self::in_process_on(config, valet::clock::Clock::system())
    }

    /// [`Valet::in_process`] on `clock`: the test keeps a clone and moves Valet's
    /// time with `advance_unix` instead of sleeping.
    pub fn in_process_on(config: &str, clock: valet::clock::Clock) -> Valet {
        let dir = tempdir().unwrap();
        std::fs::write(dir.path().join("jwks.json"), jwks().to_string()).unwrap();
        let path = dir.path().join("valet.yaml");
        std::fs::write(&path, with_free_ports(config)).unwrap();
        Self::in_process_at_on(dir, &path, clock)
    }

    /// [`Valet::in_process`] on a config file the test laid out itself in `dir`.
    pub fn in_process_at(dir: TempDir, path: &Path) -> Valet {
        Self::in_process_at_on(dir, path, valet::clock::Clock::system())
    }

    /// [`Valet::in_process_at`] on `clock`.
    pub fn in_process_at_on(dir: TempDir, path: &Path, clock: valet::clock::Clock) -> Valet {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let server = in_process::start(path, logs.clone(), clock);
        Valet {
            grpc: server.grpc.expect("a gRPC listener"),
            admin: server.admin,
            http: server.http,
            run: Run::InProcess(server),
            logs,
            dir,
        }
    }

    /// [`Valet::in_process`], waiting until it is ready.
    pub async fn in_process_ready(config: &str) -> Valet {
        let v = Self::in_process(config);
        assert!(
            v.wait_ready(200, Duration::from_secs(15)).await,
            "valet not ready:\n{}",
            v.logs()
        );
        v
    }

    fn child(&mut self) -> &mut Child {
        match &mut self.run {
            Run::Process(child) => child,
            Run::InProcess(_) => panic!("an in-process Valet has no process"),
        }
    }

    pub async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    /// GET on the admin port: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.admin.expect("admin port"));
        let r = admin_http().get(url).send().await.expect("admin answers");
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The value of one metric series on /metrics (name with labels, as rendered).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.admin_get("/metrics").await;
        body.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Polls /readyz until it answers `want` (200 or 503), up to `within`.
    pub async fn wait_ready(&self, want: u16, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.admin_get("/readyz").await.0 == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Waits until a metric series has this value; false if it did not within `within`.
    pub async fn wait_metric(&self, series: &str, value: f64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.metric(series).await == Some(value) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Waits until a metric series is above `value`; false if not within `within`.
    pub async fn wait_metric_above(&self, series: &str, value: f64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.metric(series).await.is_some_and(|v| v > value) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        assert!(matches!(self.run, Run::Process(_)), "no signals in process");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
    }

    /// Waits for the process to exit, up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child().try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        match &self.run {
            Run::Process(child) => child.id(),
            Run::InProcess(_) => panic!("an in-process Valet has no pid of its own"),
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Whether a log line from the `from`th on contains `needle`; where to look
    /// from next time. Polls read only the lines new since the last one: under
    /// load every Check logs a line, and joining them all every 20 ms was most of
    /// what a waiting test spent.
    fn logged_since(&self, needle: &str, from: usize) -> (bool, usize) {
        let logs = self.logs.lock().unwrap();
        let from = from.min(logs.len());
        (logs[from..].iter().any(|l| l.contains(needle)), logs.len())
    }

    /// Waits until a log line contains `needle`, without blocking the runtime.
    pub async fn logged(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut from = 0;
        while Instant::now() < deadline {
            let (found, next) = self.logged_since(needle, from);
            if found {
                return true;
            }
            from = next;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut from = 0;
        while Instant::now() < deadline {
            let (found, next) = self.logged_since(needle, from);
            if found {
                return true;
            }
            from = next;
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Valet {
    fn drop(&mut self) {
        match &mut self.run {
            Run::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Run::InProcess(server) => server.stop(),
        }
    }
}

// === Requests and answers ===

#[derive(Clone)]
pub struct Req {
    method: String,
    path: String,
    host: String,
    headers: HashMap<String, String>,
    context: HashMap<String, String>,
    scheme: String,
    certificate: String,
    principal: String,
}

pub fn get(path: &str) -> Req {
    Req {
        method: "GET".into(),
        path: path.into(),
        host: "api.example.com".into(),
        headers: HashMap::new(),
        context: HashMap::new(),
        scheme: "https".into(),
        certificate: String::new(),
        principal: String::new(),
    }
}

impl Req {
    pub fn method(mut self, m: &str) -> Self {
        self.method = m.into();
        self
    }
    pub fn host(mut self, h: &str) -> Self {
        self.host = h.into();
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.insert(k.to_ascii_lowercase(), v.into());
        self
    }
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }
    pub fn context(mut self, k: &str, v: &str) -> Self {
        self.context.insert(k.into(), v.into());
        self
    }
    /// The client certificate, as Envoy sends it: URL-encoded PEM.
    pub fn certificate(mut self, url_encoded_pem: &str) -> Self {
        self.certificate = url_encoded_pem.into();
        self
    }
    /// The peer's workload identity, as Envoy sends it (`source.principal`).
    pub fn principal(mut self, id: &str) -> Self {
        self.principal = id.into();
        self
    }
    /// `Authorization: DPoP <token>` and the `DPoP` proof header.
    pub fn dpop(self, token: &str, proof: &str) -> Self {
        self.header("authorization", &format!("DPoP {token}"))
            .header("dpop", proof)
    }
    pub fn build(self) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: self.method,
                        path: self.path,
                        host: self.host,
                        headers: self.headers,
                        protocol: "HTTP/1.1".into(),
                        scheme: self.scheme,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                source: (!self.certificate.is_empty() || !self.principal.is_empty()).then(|| {
                    Peer {
                        certificate: self.certificate,
                        principal: self.principal,
                        ..Default::default()
                    }
                }),
                context_extensions: self.context,
                ..Default::default()
            }),
        }
    }
}

/// `check` as Envoy sends it for a client at `address` (`attributes.source.address`).
pub fn from_address(mut check: CheckRequest, address: &str) -> CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    check.attributes.get_or_insert_default().source = Some(Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: address.into(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    });
    check
}

#[derive(Debug)]
pub struct Answer {
    pub grpc_code: i32,
    /// 200 for allow, else the denied response's status.
    pub http_status: i32,
    /// Headers set (allow) or sent back (deny), lower-case.
    pub headers: HashMap<String, String>,
    pub remove: Vec<String>,
    pub remove_query: Vec<String>,
    pub body: Value,
    pub metadata: Option<Struct>,
}

impl Answer {
    pub fn allowed(&self) -> bool {
        self.grpc_code == 0 && self.http_status == 200
    }
    pub fn reason(&self) -> String {
        if self.allowed() {
            meta_str(&self.metadata, "reason")
        } else {
            self.body["error"].as_str().unwrap_or("").to_string()
        }
    }
    pub fn challenge(&self) -> &str {
        self.headers
            .get("www-authenticate")
            .map_or("", String::as_str)
    }
}

pub fn meta_str(meta: &Option<Struct>, key: &str) -> String {
    use envoy_types::pb::google::protobuf::value::Kind;
    match meta
        .as_ref()
        .and_then(|m| m.fields.get(key))
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(s)) => s.clone(),
        _ => String::new(),
    }
}

pub async fn check(client: &mut AuthorizationClient<Channel>, req: Req) -> Answer {
    let response = client
        .check(req.build())
        .await
        .expect("Check must never fail as a gRPC error")
        .into_inner();
    let status = response.status.unwrap_or_default();
    let mut answer = Answer {
        grpc_code: status.code,
        http_status: 0,
        headers: HashMap::new(),
        remove: Vec::new(),
        remove_query: Vec::new(),
        body: Value::Null,
        metadata: response.dynamic_metadata,
    };
    match response.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            answer.http_status = 200;
            for h in ok.headers.into_iter().filter_map(|h| h.header) {
                answer.headers.insert(h.key, h.value);
            }
            answer.remove = ok.headers_to_remove;
            answer.remove_query = ok.query_parameters_to_remove;
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            answer.http_status = d.status.map_or(0, |s| s.code);
            for h in d.headers.into_iter().filter_map(|h| h.header) {
                answer.headers.insert(h.key, h.value);
            }
            answer.body = serde_json::from_str(&d.body).unwrap_or(Value::Null);
        }
        other => panic!("no http response: {other:?}"),
    }
    answer
}
