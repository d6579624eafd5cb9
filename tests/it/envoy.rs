//! End to end: a real Envoy (examples/envoy.yaml, ports rewritten) in front of a
//! hand-written upstream, asking the real `valet` binary over ext_authz gRPC.
//!
//! Needs Envoy: `VALET_ENVOY`, else `<repo>/.tools/py-venv/bin/envoy`.
//! `scripts/test.sh` installs it and exports `VALET_ENVOY`.

use crate::common;
use crate::common::idp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http1::{Log, Reply, Seen, send, upstream};
use common::tools::{envoy_path, free_port};
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

pub(crate) const POLICY: &str = r#"
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
  - name: orders
    match: { context: { route: orders } }
    require: { scopes: [orders:read] }
  - name: admin
    match: { path_prefix: /admin }
    require: { scopes: [admin] }
default: deny
"#;

// === Envoy ===

/// examples/envoy.yaml with every port replaced; each must occur exactly once.
pub(crate) fn envoy_config(listener: u16, valet: u16, upstream: u16, admin: u16) -> String {
    let mut yaml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy.yaml"))
            .unwrap();
    for (from, to) in [
        (10000, listener),
        (9001, valet),
        (8080, upstream),
        (9901, admin),
    ] {
        let needle = format!("port_value: {from} }}");
        assert_eq!(
            yaml.matches(&needle).count(),
            1,
            "examples/envoy.yaml must contain `{needle}` exactly once"
        );
        yaml = yaml.replace(&needle, &format!("port_value: {to} }}"));
    }
    yaml
}

/// A running Envoy, killed by its PID when dropped.
pub(crate) struct Envoy {
    child: Child,
    log: PathBuf,
}

impl Envoy {
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        // The venv's `envoy` is a Python shim that execv()s the real binary, so
        // this PID is Envoy's own.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn validate(envoy: &Path, config: &Path) {
    let out = Command::new(envoy)
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .arg("--disable-hot-restart")
        .stdin(Stdio::null())
        .output()
        .expect("run envoy --mode validate");
    assert!(
        out.status.success(),
        "envoy --mode validate failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts Envoy and waits until its listener answers through to the upstream.
pub(crate) async fn start_ready(
    envoy_bin: &Path,
    config: &Path,
    dir: &Path,
    listen_port: u16,
) -> Envoy {
    let mut envoy = start_envoy(envoy_bin, config, dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = envoy.child.try_wait().unwrap() {
            panic!("envoy exited early ({status}):\n{}", envoy.log());
        }
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(2),
            request(listen_port, "/healthz", &[]),
        )
        .await
            && r.status == 200
        {
            return envoy;
        }
        assert!(
            Instant::now() < deadline,
            "envoy did not answer on {listen_port} within 30s:\n{}",
            envoy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn start_envoy(envoy: &Path, config: &Path, dir: &Path) -> Envoy {
    let log = dir.join("envoy.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(envoy)
        .arg("-c")
        .arg(config)
        .args(["--concurrency", "1", "--log-level", "warn"])
        // No shared memory: parallel Envoys cannot collide.
        .arg("--disable-hot-restart")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawn envoy");
    Envoy { child, log }
}

// === Upstream: echoes what reached it ===

/// A GET (or "POST /x": another method) with Host api.example.com.
pub(crate) async fn request(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Reply> {
    let (method, path) = path
        .split_once(' ')
        .filter(|(m, _)| m.bytes().all(|b| b.is_ascii_uppercase()))
        .unwrap_or(("GET", path));
    send(port, method, path, "api.example.com", headers).await
}

/// One request through Envoy, tagged with a unique `x-test-id` so the upstream
/// log tells whether this very request got through.
struct Through {
    port: u16,
    seen: Log,
    next: std::sync::atomic::AtomicU32,
}

impl Through {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (Reply, Option<Seen>) {
        let id = self
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        let mut all = headers.to_vec();
        all.push(("x-test-id", &id));
        let reply = tokio::time::timeout(Duration::from_secs(10), request(self.port, path, &all))
            .await
            .unwrap_or_else(|_| panic!("GET {path}: no answer from Envoy in 10s"))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let seen = self
            .seen
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.all("x-test-id") == [id.as_str()])
            .cloned();
        (reply, seen)
    }
}

fn expect_denied(reply: &Reply, seen: &Option<Seen>, status: u16, reason: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert!(seen.is_none(), "denied request reached upstream: {seen:?}");
    assert_eq!(reply.json()["error"], reason, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_asks_valet_before_the_upstream() {
    let started = Instant::now();
    let envoy_bin = envoy_path();

    let (up_addr, seen) = upstream().await;
    let valet = Valet::start(POLICY);
    let (listen_port, admin_port) = (free_port(), free_port());
    let config = envoy_config(listen_port, valet.grpc.port(), up_addr.port(), admin_port);
    let dir = tempdir().unwrap();
    let config_path = dir.path().join("envoy.yaml");
    std::fs::write(&config_path, &config).unwrap();

    validate(&envoy_bin, &config_path);
    let envoy = start_ready(&envoy_bin, &config_path, dir.path(), listen_port).await;
    let ready = started.elapsed();

    let through = Through {
        port: listen_port,
        seen: seen.clone(),
        next: Default::default(),
    };
    let orders = rs256("orders:read");
    let orders_bearer = format!("Bearer {orders}");

    // Allowed: identity injected, token stripped, spoofed identity overwritten.
    let (r, s) = through
        .get(
            "/orders/7",
            &[("authorization", &orders_bearer), ("x-user-id", "mallory")],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}\nvalet:\n{}", valet.logs());
    let s = s.expect("allowed request reached upstream");
    assert_eq!(s.request_line, "GET /orders/7 HTTP/1.1");
    assert_eq!(s.all("x-user-id"), ["alice"], "{s:?}");
    assert!(s.all("authorization").is_empty(), "token forwarded: {s:?}");
    assert_eq!(r.json()["upstream"], true);

    // No token: 401 with the default realm, no error.
    let (r, s) = through.get("/orders/7", &[]).await;
    expect_denied(&r, &s, 401, "missing_token");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"valet\""),
        "{r:?}"
    );
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert_eq!(r.json()["route"], "orders");

    // Expired.
    let mut expired = claims("orders:read");
    expired["exp"] = json!(now() - 3600);
    expired["iat"] = json!(now() - 7200);
    let bearer = format!("Bearer {}", token(Algorithm::RS256, &expired));
    let (r, s) = through
        .get("/orders/7", &[("authorization", &bearer)])
        .await;
    expect_denied(&r, &s, 401, "expired");
    let challenge = r.header("www-authenticate").unwrap_or("");
    assert!(
        challenge.starts_with("Bearer realm=\"valet\"")
            && challenge.contains("error=\"invalid_token\""),
        "{r:?}"
    );

    // A good token without the scope.
    let bearer = format!("Bearer {}", rs256("orders:write"));
    let (r, s) = through
        .get("/orders/7", &[("authorization", &bearer)])
        .await;
    expect_denied(&r, &s, 403, "insufficient_scope");
    let challenge = r.header("www-authenticate").unwrap_or("");
    assert!(
        challenge.contains("error=\"insufficient_scope\"")
            && challenge.contains("scope=\"orders:read\""),
        "{r:?}"
    );

    // /admin goes through Envoy's catch-all route (no context): Valet's admin route.
    let (r, s) = through
        .get("/admin", &[("authorization", &orders_bearer)])
        .await;
    expect_denied(&r, &s, 403, "insufficient_scope");
    assert_eq!(r.json()["route"], "admin");

    // ext_authz is disabled on /healthz in Envoy, so Valet cannot strip spoofed
    // identity there: the example removes x-user-id on that route itself.
    let (r, s) = through.get("/healthz", &[("x-user-id", "mallory")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let s = s.expect("healthz reached upstream");
    assert_eq!(s.request_line, "GET /healthz HTTP/1.1");
    assert!(
        s.all("x-user-id").is_empty(),
        "spoofed identity reached the upstream: {s:?}"
    );

    // No Valet route: default deny, even with a good token.
    let (r, s) = through
        .get("/elsewhere", &[("authorization", &orders_bearer)])
        .await;
    expect_denied(&r, &s, 403, "no_route");
    assert_eq!(r.header("www-authenticate"), None, "{r:?}");

    drop(envoy);
    eprintln!(
        "envoy ready after {ready:?}; whole test {:?}",
        started.elapsed()
    );
}

const GENERATED_POLICY: &str = r#"
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
  - name: docs
    match: { path_prefix: /docs }
    anonymous: true
  - name: read
    match: { methods: [GET], path_prefix: /orders }
    require: { scopes: [orders:read] }
  - name: write
    match: { methods: [POST, PUT], path_template: "/orders/{id}" }
    require: { scopes: [orders:write] }
  - name: reports
    match: { path_regex: "/v[0-9]+/reports" }
    require: { any_scopes: [reports:read, admin] }
  - name: tenant
    match: { hosts: [api.example.com], path_prefix: /tenant }
    require: { claims: { tenant: acme } }
protected_resources:
  - resource: https://api.example.com/orders
    routes: [read, write]
default: deny
"#;

/// `valet envoy-config` for `valet`'s policy: Envoy on `listen`, the app on
/// `upstream`, Envoy's admin on `admin`.
pub(crate) fn generated(valet: &Valet, listen: u16, upstream: SocketAddr, admin: u16) -> Vec<u8> {
    let out = Command::new(env!("CARGO_BIN_EXE_valet"))
        .args(["envoy-config", "--config"])
        .arg(valet.dir.path().join("valet.yaml"))
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--upstream", &upstream.to_string()])
        .args(["--valet", &valet.grpc.to_string()])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `valet envoy-config` round trip: the generated bootstrap validates, and real
/// Envoy in front of Valet decides every case as Valet alone does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_envoy_config_decides_as_valet_does() {
    let envoy_bin = envoy_path();
    let (up_addr, seen) = upstream().await;
    let valet = Valet::start(GENERATED_POLICY);
    let (listen_port, admin_port) = (free_port(), free_port());
    let out = generated(&valet, listen_port, up_addr, admin_port);
    let dir = tempdir().unwrap();
    let config_path = dir.path().join("generated.yaml");
    std::fs::write(&config_path, &out).unwrap();
    validate(&envoy_bin, &config_path);
    let _envoy = start_ready(&envoy_bin, &config_path, dir.path(), listen_port).await;
    let through = Through {
        port: listen_port,
        seen,
        next: Default::default(),
    };
    let mut grpc = valet.client().await;

    let bearer = |scope: &str| format!("Bearer {}", rs256(scope));
    let tenant = |t: &str| {
        let mut c = claims("");
        c["tenant"] = serde_json::json!(t);
        format!("Bearer {}", token(jsonwebtoken::Algorithm::RS256, &c))
    };
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("/healthz", vec![("x-user-id", "mallory".into())]),
        // An underscore twin of an identity header: 400 from Envoy and from Valet.
        ("/healthz", vec![("x_user_id", "mallory".into())]),
        (
            "/orders/1",
            vec![
                ("authorization", bearer("orders:read")),
                ("x-user_id", "mallory".into()),
            ],
        ),
        ("/healthz/../orders/1", vec![]),
        ("/docs/intro", vec![]),
        ("/docsx", vec![]),
        ("/orders/1", vec![("authorization", bearer("orders:read"))]),
        ("/orders/1", vec![]),
        ("/orders/1", vec![("authorization", "Bearer junk".into())]),
        (
            "POST /orders/1",
            vec![("authorization", bearer("orders:read"))],
        ),
        (
            "POST /orders/1",
            vec![("authorization", bearer("orders:write"))],
        ),
        (
            "PUT /orders/1/x",
            vec![("authorization", bearer("orders:write"))],
        ),
        ("/v2/reports", vec![("authorization", bearer("admin"))]),
        (
            "/v2/reports",
            vec![("authorization", bearer("orders:read"))],
        ),
        ("/tenant/a", vec![("authorization", tenant("acme"))]),
        ("/tenant/a", vec![("authorization", tenant("globex"))]),
        (
            "//orders//1",
            vec![("authorization", bearer("orders:read"))],
        ),
        ("/nowhere", vec![("authorization", bearer("admin"))]),
    ];
    for (target, headers) in &cases {
        let (method, path) = target.split_once(' ').unwrap_or(("GET", target));
        let mut req = get(path).method(method);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let alone = check(&mut grpc, req).await;
        let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (r, s) = through.get(target, &refs).await;
        assert_eq!(
            r.status as i32, alone.http_status,
            "{target}: Envoy {r:?} vs Valet alone {alone:?}"
        );
        assert_eq!(s.is_some(), alone.allowed(), "{target}: upstream reached?");
        if let Some(s) = s {
            let id = s.all("x-user-id");
            let want: Vec<&str> = alone
                .headers
                .get("x-user-id")
                .map(|v| vec![v.as_str()])
                .unwrap_or_default();
            assert_eq!(id, want, "{target}: identity upstream");
            assert!(
                s.all("authorization").is_empty() || !alone.allowed(),
                "{target}: token stripped"
            );
        }
    }
    // A DPoP-bound token: `allowed_headers` lets the proof through to Valet.
    let key = idp::DpopKey::generate();
    let mut bound = claims("orders:read");
    bound["cnf"] = json!({ "jkt": key.thumbprint() });
    let bound = token(jsonwebtoken::Algorithm::RS256, &bound);
    let dpop = format!("DPoP {bound}");
    let proof = key.proof("GET", "http://api.example.com/orders/1", Some(&bound));
    let (r, s) = through
        .get("/orders/1", &[("authorization", &dpop), ("dpop", &proof)])
        .await;
    assert_eq!(r.status, 200, "{r:?}\nvalet:\n{}", valet.logs());
    let s = s.expect("DPoP request reached upstream");
    assert_eq!(s.all("x-user-id"), ["alice"]);
    assert!(s.all("dpop").is_empty(), "the proof was forwarded: {s:?}");
    let (r, s) = through.get("/orders/1", &[("authorization", &dpop)]).await;
    assert_eq!(r.status, 401, "without its proof: {r:?}");
    assert!(s.is_none());

    // RFC 9728: Envoy answers the metadata itself; challenges point to it.
    let (r, s) = through
        .get("/.well-known/oauth-protected-resource/orders", &[])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(s.is_none(), "the metadata request reached the upstream");
    assert_eq!(r.json()["resource"], "https://api.example.com/orders");
    assert_eq!(
        r.json()["scopes_supported"],
        json!(["orders:read", "orders:write"])
    );
    let (r, _) = through.get("/orders/1", &[]).await;
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.contains("resource_metadata=\"https://api.example.com/.well-known/oauth-protected-resource/orders\""),
        "{challenge}"
    );

    // Anonymous routes never reached Valet: only the others were counted.
    let anon = valet
        .metric("valet_check_total{decision=\"allow\",reason=\"anonymous\",route=\"health\"}")
        .await
        .unwrap_or(0.0);
    assert_eq!(
        anon, 1.0,
        "only the direct gRPC Check of /healthz; Envoy skipped ext_authz"
    );
}

/// The generated bootstrap turns ext_authz off on anonymous routes with the generic
/// per-route `FilterConfig { disabled: true }` (Envoy then does not create the
/// filter for the request), not with `ExtAuthzPerRoute { disabled: true }`.
#[test]
fn anonymous_routes_switch_the_ext_authz_filter_off_per_route() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("valet.yaml");
    std::fs::write(&path, GENERATED_POLICY).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_valet"))
        .args(["envoy-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let boot: Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let hcm =
        &boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        .as_array()
        .unwrap();
    for r in routes {
        let per = &r["typed_per_filter_config"]["envoy.filters.http.ext_authz"];
        match r["name"].as_str().unwrap() {
            "health" | "docs" | "valet-resource-metadata-0" => assert_eq!(
                *per,
                json!({ "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true }),
                "{r}"
            ),
            "valet-default" => assert!(per.is_null(), "{r}"),
            name => assert_eq!(
                per["check_settings"]["context_extensions"]["valet_route"], name,
                "{r}"
            ),
        }
    }
    // Enabled by default: a route without per-route config (the catch-all) is checked.
    let filters = hcm["http_filters"].as_array().unwrap();
    assert_eq!(filters[0]["name"], "envoy.filters.http.ext_authz");
    assert!(filters[0].get("disabled").is_none(), "{}", filters[0]);
}

// === Istio ===

/// Routes whose order matters: `/public/admin` is protected before `/public` is
/// anonymous, `/orders/status` is anonymous after the protected `/orders`, and a
/// protected regex route comes before `/assets` (a regex may match anything below
/// a prefix: only the exact `/assets` is safe).
const ISTIO_POLICY: &str = r#"
providers:
  - name: corp
    issuer: https://idp.test/
    audiences: [orders-api]
    jwks: { file: jwks.json }
    tokens_from:
      - { header: authorization, prefix: "Bearer " }
      - { cookie: session }
    claims_to_headers: { sub: x-user-id }
routes:
  - name: admin
    match: { path_prefix: /public/admin }
    require: { scopes: [admin] }
  - name: public
    match: { path_prefix: /public }
    anonymous: true
  - name: health
    match: { path: /healthz }
    anonymous: true
  - name: docs
    match: { methods: [GET], path_prefix: /docs }
    anonymous: true
  - name: orders
    match: { path_prefix: /orders }
    require: { scopes: [orders:read] }
  - name: status
    match: { path: /orders/status }
    anonymous: true
  - name: static
    match: { path_prefix: /static }
    anonymous: true
  - name: reports
    match: { path_regex: "/v[0-9]+/reports" }
    require: { scopes: [reports] }
  - name: assets
    match: { path_prefix: /assets }
    anonymous: true
default: deny
"#;

/// Does an AuthorizationPolicy `paths`/`notPaths` entry (exact, `prefix*`) match?
fn istio_path_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => pattern == path,
    }
}

/// JSON merged as an EnvoyFilter MERGE merges protos: messages field by field,
/// repeated fields appended, scalars replaced.
fn proto_merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(slot) => proto_merge(slot, v),
                    None => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => a.extend(b.iter().cloned()),
        (slot, v) => *slot = v.clone(),
    }
}

/// An Envoy bootstrap shaped like the inbound listener Istio builds for a CUSTOM
/// provider, as pilot does it: the AuthorizationPolicy's rule becomes the shadow
/// rule of an RBAC filter, and the ext_authz filter (as pilot writes it for an
/// `envoyExtAuthzGrpc` provider) runs only when that rule matched
/// (`filter_enabled_metadata`); then the EnvoyFilter's patches, applied as Istio
/// applies them. Addresses: (listen, Valet, app, admin).
fn istio_inbound(
    policy: &Value,
    envoy_filter: &Value,
    (listen, valet, app, admin): (u16, SocketAddr, SocketAddr, u16),
) -> Value {
    let rules = policy["spec"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "one rule expected: {policy}");
    let permission = match rules[0]["to"][0]["operation"]["notPaths"].as_array() {
        None => json!({ "any": true }),
        Some(not_paths) => {
            let matchers: Vec<Value> = not_paths
                .iter()
                .map(|p| {
                    let p = p.as_str().unwrap();
                    let m = match p.strip_suffix('*') {
                        Some(prefix) => json!({ "prefix": prefix }),
                        None => json!({ "exact": p }),
                    };
                    json!({ "url_path": { "path": m } })
                })
                .collect();
            json!({ "and_rules": { "rules": [{ "not_rule": { "or_rules": { "rules": matchers } } }] } })
        }
    };
    let rbac = json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "shadow_rules": { "action": "DENY", "policies": {
                "istio-ext-authz-ns[shop]-policy[shop-valet]-rule[0]": {
                    "permissions": [permission], "principals": [{ "any": true }] } } },
            "shadow_rules_stat_prefix": "istio_ext_authz_"
        }
    });
    let mut ext_authz = json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": {
                "envoy_grpc": { "cluster_name": "outbound|9001||valet.local", "authority": "outbound_.9001_._.valet.local" },
                "timeout": "600s"
            },
            "transport_api_version": "V3",
            "failure_mode_allow": false,
            "filter_enabled_metadata": {
                "filter": "envoy.filters.http.rbac",
                "path": [{ "key": "istio_ext_authz_shadow_effective_policy_id" }],
                "value": { "string_match": { "prefix": "istio-ext-authz" } }
            }
        }
    });
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound_0.0.0.0_8080",
        "route_config": { "name": "inbound|8080||", "virtual_hosts": [{
            "name": "inbound|http|8080", "domains": ["*"],
            "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": "inbound|8080||" } }]
        }] }
    });
    let mut before = Vec::new();
    for p in envoy_filter["spec"]["configPatches"].as_array().unwrap() {
        assert_eq!(p["match"]["context"], "SIDECAR_INBOUND", "{p}");
        let value = &p["patch"]["value"];
        match (
            p["applyTo"].as_str().unwrap(),
            p["patch"]["operation"].as_str().unwrap(),
        ) {
            ("HTTP_FILTER", "MERGE") => proto_merge(&mut ext_authz, value),
            ("HTTP_FILTER", "INSERT_BEFORE") => before.push(value.clone()),
            ("NETWORK_FILTER", "MERGE") => proto_merge(&mut hcm, &value["typed_config"]),
            other => panic!("unexpected patch {other:?}: {p}"),
        }
    }
    let mut filters = vec![rbac];
    filters.extend(before);
    filters.push(ext_authz);
    filters.push(json!({ "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } }));
    hcm["http_filters"] = Value::Array(filters);
    let addr =
        |ip: String, port: u16| json!({ "socket_address": { "address": ip, "port_value": port } });
    let endpoint = |a: SocketAddr| json!([{ "lb_endpoints": [{ "endpoint": { "address": addr(a.ip().to_string(), a.port()) } }] }]);
    json!({
        "admin": { "address": addr("127.0.0.1".into(), admin) },
        "static_resources": {
            "listeners": [{
                "name": "virtualInbound",
                "address": addr("127.0.0.1".into(), listen),
                "filter_chains": [{ "filters": [{ "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm }] }]
            }],
            "clusters": [
                { "name": "inbound|8080||", "type": "STATIC",
                  "load_assignment": { "cluster_name": "app", "endpoints": endpoint(app) } },
                { "name": "outbound|9001||valet.local", "type": "STATIC",
                  "typed_extension_protocol_options": { "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                      "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                      "explicit_http_config": { "http2_protocol_options": {} } } },
                  "load_assignment": { "cluster_name": "valet", "endpoints": endpoint(valet) } }
            ]
        }
    })
}

/// `valet envoy-config --format istio`: an AuthorizationPolicy and an EnvoyFilter
/// that parse, carry the flags, skip the Check only on paths real Valet allows
/// anonymously (for any method and host), never on a path an earlier protected
/// route matches, and whose patches real Envoy accepts in an Istio-shaped chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_istio_output_skips_only_paths_valet_allows_anonymously() {
    let envoy_bin = envoy_path();
    let valet = Valet::start(ISTIO_POLICY);
    let out = Command::new(env!("CARGO_BIN_EXE_valet"))
        .args(["envoy-config", "--format", "istio", "--config"])
        .arg(valet.dir.path().join("valet.yaml"))
        .args(["--name", "shop-valet", "--namespace", "shop"])
        .args(["--provider", "valet-shop"])
        .args(["--selector", "app=shop", "--selector", "tier=web"])
        .args(["--valet-service", "valet.shop.svc.cluster.local"])
        .args(["--valet", "127.0.0.1:9101", "--timeout", "300ms"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &Value| !d.is_null())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["AuthorizationPolicy", "EnvoyFilter"], "{text}");
    let (ap, ef) = (&docs[0], &docs[1]);
    let labels = json!({ "app": "shop", "tier": "web" });

    assert_eq!(ap["apiVersion"], "security.istio.io/v1");
    assert_eq!(
        ap["metadata"],
        json!({ "name": "shop-valet", "namespace": "shop" })
    );
    assert_eq!(ap["spec"]["action"], "CUSTOM");
    assert_eq!(ap["spec"]["provider"], json!({ "name": "valet-shop" }));
    assert_eq!(ap["spec"]["selector"]["matchLabels"], labels);
    let rules = ap["spec"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{ap}");
    let not_paths: Vec<&str> = rules[0]["to"][0]["operation"]["notPaths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    // /public/* is not skipped (admin is protected below it, and comes first),
    // /orders/status is not (orders comes first), docs has methods.
    assert_eq!(
        not_paths,
        ["/public", "/healthz", "/static", "/static/*", "/assets"]
    );
    for (route, why) in [
        (
            "public (/public/*)",
            "earlier route admin (path_prefix /public/admin)",
        ),
        ("status (/orders/status)", "earlier route orders"),
        ("docs (path_prefix /docs)", "limited to methods"),
        (
            "assets (/assets/*)",
            "earlier route reports (path_regex /v[0-9]+/reports)",
        ),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with('#') && l.contains(route) && l.contains(why)),
            "no comment saying route {route} is left to Valet because {why}:\n{text}"
        );
    }

    // The skipped set, tried against Valet alone: every path Istio would not send
    // to Valet is one Valet allows without a token, whatever the method and host.
    let samples = [
        "/",
        "/public",
        "/public/",
        "/public/x",
        "/public/admin",
        "/public/admin/x",
        "/publicx",
        "/healthz",
        "/healthz/",
        "/healthz/x",
        "/docs",
        "/docs/a",
        "/orders",
        "/orders/status",
        "/orders/1",
        "/v1/reports",
        "/assets",
        "/assets/",
        "/assets/a/b.css",
        "/static",
        "/static/x/y.js",
        "/staticx",
        "/assetsx",
        "/elsewhere",
    ];
    let mut grpc = valet.client().await;
    let mut skipped = Vec::new();
    for path in samples {
        if !not_paths.iter().any(|p| istio_path_matches(p, path)) {
            continue;
        }
        skipped.push(path);
        for (method, host) in [("GET", "api.example.com"), ("DELETE", "other.example")] {
            let alone = check(&mut grpc, get(path).method(method).host(host)).await;
            assert!(
                alone.allowed() && alone.reason() == "anonymous",
                "Istio would skip {method} {path} but Valet answers {alone:?}"
            );
        }
    }
    assert_eq!(
        skipped,
        [
            "/public",
            "/healthz",
            "/assets",
            "/static",
            "/static/x/y.js"
        ]
    );
    // And what stays with Valet includes the tricky ones, which Valet does protect.
    for path in ["/public/admin", "/public/admin/x", "/orders/status"] {
        let alone = check(&mut grpc, get(path)).await;
        assert_eq!(alone.http_status, 401, "{path}: {alone:?}");
    }

    // The meshConfig snippet in the comments, uncommented, is the provider.
    let snippet: String = text
        .lines()
        .skip_while(|l| !l.contains("meshConfig:"))
        .take_while(|l| *l != "#")
        .map(|l| format!("{}\n", &l[1..]))
        .collect();
    let mesh: Value = serde_yaml::from_str(&snippet).unwrap_or_else(|e| panic!("{e}:\n{snippet}"));
    assert_eq!(
        mesh["meshConfig"]["extensionProviders"],
        json!([{ "name": "valet-shop", "envoyExtAuthzGrpc": {
            "service": "valet.shop.svc.cluster.local", "port": 9101, "timeout": "0.3s", "failOpen": false } }]),
        "{snippet}"
    );

    // The EnvoyFilter: same workload, what the policy implies merged into Istio's
    // ext_authz, identity headers stripped before it, paths normalised as Valet does.
    assert_eq!(ef["apiVersion"], "networking.istio.io/v1alpha3");
    assert_eq!(ef["metadata"], ap["metadata"]);
    assert_eq!(ef["spec"]["workloadSelector"]["labels"], labels);
    let (listen_port, admin_port) = (free_port(), free_port());
    let (up_addr, seen) = upstream().await;
    let boot = istio_inbound(ap, ef, (listen_port, valet.grpc, up_addr, admin_port));
    let hcm =
        &boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    assert_eq!(hcm["normalize_path"], true);
    assert_eq!(hcm["merge_slashes"], true);
    assert_eq!(hcm["path_with_escaped_slashes_action"], "REJECT_REQUEST");
    let filters = hcm["http_filters"].as_array().unwrap();
    let names: Vec<&str> = filters
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "envoy.filters.http.rbac",
            "valet.strip_identity_headers",
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.router"
        ]
    );
    let ext = &filters[2]["typed_config"];
    assert_eq!(
        ext["allowed_headers"],
        json!({ "patterns": [{ "exact": "authorization" }, { "exact": "cookie" }, { "exact": "dpop" }] })
    );
    assert_eq!(ext["include_peer_certificate"], true);
    assert_eq!(ext["grpc_service"]["timeout"], "0.3s");
    assert_eq!(
        ext["grpc_service"]["envoy_grpc"]["cluster_name"], "outbound|9001||valet.local",
        "Istio's own target survives the merge"
    );

    // Real Envoy with that chain in front of Valet and an upstream.
    let dir = tempdir().unwrap();
    let path = dir.path().join("istio-inbound.json");
    std::fs::write(&path, boot.to_string()).unwrap();
    validate(&envoy_bin, &path);
    let _envoy = start_ready(&envoy_bin, &path, dir.path(), listen_port).await;
    let through = Through {
        port: listen_port,
        seen,
        next: Default::default(),
    };
    let anonymous = |route: &str| {
        format!("valet_check_total{{decision=\"allow\",reason=\"anonymous\",route=\"{route}\"}}")
    };
    let asked = |route: String| {
        let valet = &valet;
        async move { valet.metric(&route).await.unwrap_or(0.0) }
    };
    let (health0, static0, assets0) = (
        asked(anonymous("health")).await,
        asked(anonymous("static")).await,
        asked(anonymous("assets")).await,
    );
    let spoof = [("x-user-id", "mallory")];
    // Skipped paths: straight to the app, the spoofed identity removed by Envoy.
    for target in ["/healthz", "/static/app.js", "/public"] {
        let (r, s) = through.get(target, &spoof).await;
        assert_eq!(r.status, 200, "{target}: {r:?}");
        let s = s.unwrap_or_else(|| panic!("{target} did not reach the app"));
        assert!(
            s.all("x-user-id").is_empty(),
            "{target}: spoofed identity passed: {s:?}"
        );
    }
    // Left to Valet: anonymous there too (Valet strips), or protected.
    let (r, s) = through.get("/assets/a.css", &spoof).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(s.unwrap().all("x-user-id").is_empty());
    let (r, s) = through.get("/public/admin", &[]).await;
    expect_denied(&r, &s, 401, "missing_token");
    // Dot segments are resolved before Istio's rule sees the path; escaped slashes
    // are refused outright.
    let (r, s) = through.get("/static/../orders/1", &[]).await;
    expect_denied(&r, &s, 401, "missing_token");
    let (r, s) = through.get("/static/..%2Forders/1", &[]).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(s.is_none());
    // A token through the cookie source (allowed_headers lets it through): Valet's
    // identity, not the client's.
    let cookie = format!("session={}", rs256("orders:read"));
    let (r, s) = through
        .get(
            "/orders/1",
            &[("cookie", cookie.as_str()), ("x-user-id", "mallory")],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}\nvalet:\n{}", valet.logs());
    assert_eq!(s.unwrap().all("x-user-id"), ["alice"]);
    // The token cookie goes; every other cookie byte reaches the app as sent.
    let cookie = format!(
        "session={}; prefs=a,b;x=\"q, r\";  lang=en",
        rs256("orders:read")
    );
    let (r, s) = through
        .get("/orders/1", &[("cookie", cookie.as_str())])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(s.unwrap().all("cookie"), ["prefs=a,b;x=\"q, r\";  lang=en"]);

    assert_eq!(
        asked(anonymous("health")).await,
        health0,
        "Valet was asked about /healthz"
    );
    assert_eq!(
        asked(anonymous("static")).await,
        static0,
        "Valet was asked about /static/…"
    );
    assert_eq!(
        asked(anonymous("assets")).await,
        assets0 + 1.0,
        "Valet decides /assets/…"
    );
}

// === mTLS: certificate-bound tokens through real Envoy ===

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed.
fn make_pki(dir: &Path) {
    common::pki::make(dir, &[("client", "extendedKeyUsage=clientAuth\n")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_bound_tokens_through_envoy_mtls() {
    let envoy_bin = envoy_path();
    let pki = tempdir().unwrap();
    make_pki(pki.path());
    let client_pem = std::fs::read_to_string(pki.path().join("client.pem")).unwrap();
    let x5t = idp::cert_thumbprint(&client_pem);

    let (up_addr, seen) = upstream().await;
    let valet = Valet::start(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\n    claims_to_headers: { sub: x-user-id }\nroutes:\n  - name: health\n    match: { path: /healthz }\n    anonymous: true\n  - name: orders\n    match: { path_prefix: /orders }\n    require: { scopes: [orders:read], binding: mtls }\n",
    );
    let (listen, admin) = (free_port(), free_port());
    let mut cfg: Value = serde_yaml::from_str(&envoy_config(
        listen,
        valet.grpc.port(),
        up_addr.port(),
        admin,
    ))
    .unwrap();
    common::pki::require_mtls(&mut cfg, pki.path());
    let dir = tempdir().unwrap();
    let config_path = dir.path().join("mtls.yaml");
    std::fs::write(&config_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    validate(&envoy_bin, &config_path);
    let envoy = start_envoy(&envoy_bin, &config_path, dir.path());

    let client = common::pki::client(pki.path(), "client");
    let url = |p: &str| format!("https://127.0.0.1:{listen}{p}");
    common::pki::wait_ok(&client, &url("/healthz"), || envoy.log()).await;

    let bound = |x5t: &str| {
        let mut c = claims("orders:read");
        c["cnf"] = json!({ "x5t#S256": x5t });
        token(Algorithm::RS256, &c)
    };
    let get = |token: String| client.get(url("/orders/1")).bearer_auth(token).send();
    let r = get(bound(&x5t)).await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "{}\nvalet:\n{}",
        r.text().await.unwrap(),
        valet.logs()
    );
    let last = seen
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("reached the upstream");
    assert_eq!(last.all("x-user-id"), ["alice"]);

    // Bound to another certificate; a plain bearer token where mTLS binding is required.
    let r = get(bound("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("binding_mismatch"));
    let r = get(rs256("orders:read")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("unbound_token"));
}
