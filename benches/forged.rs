//! What a forged token costs the server, against what a Check without a token
//! costs: the real release binary, real gRPC on 127.0.0.1, and the server's own
//! CPU time (from /proc/<pid>/task/*/schedstat) per Check, not wall time.
//!
//!   cargo bench --bench forged
//!
//! Each shape (tests/it/floods_forged/shapes.rs) is sent by 16 concurrent callers
//! on one HTTP/2 connection, as Envoy does; criterion reports server CPU per
//! Check, and the table printed at the end gives each as a ratio to the
//! missing-token baseline of the same run. The goal is ≤ 20× for every shape.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use envoy_types::ext_authz::v3::pb::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tonic::transport::Channel;

#[path = "../tests/it/common/pem_key.rs"]
mod pem_key;
#[path = "../tests/it/floods_forged/shapes.rs"]
mod shapes;
#[path = "../tests/it/common/tempdir.rs"]
mod tempdir;
/// What shapes.rs takes from the test binary's `common`.
mod common {
    pub(crate) use super::pem_key;
}

const CALLERS: u64 = 16;
const GOAL: f64 = 20.0;

struct Server {
    child: Child,
    grpc: String,
    _dir: tempdir::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Server {
        let dir = tempdir::tempdir().unwrap();
        let policy = shapes::lay_out(dir.path());
        let path = dir.path().join("valet.yaml");
        std::fs::write(
            &path,
            format!("listen:\n  grpc: 127.0.0.1:0\n  admin: 127.0.0.1:0\n{policy}"),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_valet"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env("VALET_LOG", "warn,valet=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn valet");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Keep draining so the server never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("grpc=").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let addr = addr.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let grpc = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("valet prints its address");
        Server {
            child,
            grpc,
            _dir: dir,
        }
    }

    /// Nanoseconds of CPU the server's threads have used so far.
    fn cpu_ns(&self) -> u64 {
        let tasks = format!("/proc/{}/task", self.child.id());
        std::fs::read_dir(tasks)
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

fn request(headers: &[(String, String)]) -> CheckRequest {
    let mut map: HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", "GET"),
        (":path", shapes::PATH),
        (":scheme", "https"),
        ("accept", "application/json"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) orders-web/2.14.1",
        ),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "0f6c2b8e-7a41-4d3b-bc39-5e2a9d1f4c77"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    map.extend(headers.iter().cloned());
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: shapes::PATH.into(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: map,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The reason of one answer (`verified` on allow).
async fn reason(client: &mut AuthorizationClient<Channel>, req: &CheckRequest) -> String {
    let r = client.check(req.clone()).await.unwrap().into_inner();
    match r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            let body: serde_json::Value = serde_json::from_str(&d.body).unwrap_or_default();
            body["error"].as_str().unwrap_or("?").to_string()
        }
        Some(HttpResponse::OkResponse(_)) => "verified".into(),
        _ => "?".into(),
    }
}

/// `n` Checks of `req` from CALLERS concurrent callers; the server CPU they cost.
async fn flood(
    server: &Server,
    client: &AuthorizationClient<Channel>,
    req: &CheckRequest,
    n: u64,
) -> Duration {
    let before = server.cpu_ns();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CALLERS {
        let count = n / CALLERS + u64::from(c < n % CALLERS);
        let mut client = client.clone();
        let req = req.clone();
        tasks.spawn(async move {
            for _ in 0..count {
                client
                    .check(req.clone())
                    .await
                    .expect("a Check is never a gRPC error");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    Duration::from_nanos(server.cpu_ns() - before)
}

fn bench_forged(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = Server::start();
    let client = rt.block_on(async {
        let url = format!("http://{}", server.grpc);
        let mut client = loop {
            match AuthorizationClient::connect(url.clone()).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        // Ready once a legitimate token verifies (every key set loaded).
        let legit = request(&[(
            "authorization".into(),
            format!("Bearer {}", shapes::legit(shapes::Kind::Rs256, true)),
        )]);
        for _ in 0..200 {
            if reason(&mut client, &legit).await == "verified" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(reason(&mut client, &legit).await, "verified");
        client
    });

    let mut cases = vec![(
        "missing_token_baseline".to_string(),
        request(&[]),
        "missing_token",
        0,
    )];
    for s in shapes::shapes() {
        cases.push((s.name, request(&s.headers), s.reason, s.max_verifications));
    }
    // Per shape: (reason seen, per-sample server CPU per Check in ns).
    let mut seen: Vec<(String, String, Vec<f64>)> = Vec::new();
    let mut g = c.benchmark_group("forged");
    for (name, req, _, _) in &cases {
        let got = rt.block_on(reason(&mut client.clone(), req));
        let mut rates = Vec::new();
        g.bench_function(name.as_str(), |b| {
            b.iter_custom(|iters| {
                let cpu = rt.block_on(flood(&server, &client, req, iters));
                rates.push(cpu.as_nanos() as f64 / iters as f64);
                cpu
            })
        });
        seen.push((name.clone(), got, rates));
    }
    g.finish();
    if seen.iter().any(|(_, _, rates)| rates.is_empty()) {
        return; // filtered out: nothing to compare
    }

    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let base = median(&mut seen[0].2.clone());
    println!("\nserver CPU per Check, ratio to a missing-token Check (goal ≤ {GOAL}×):\n");
    println!("| shape | reason | verifications at most | µs/Check | ratio |");
    println!("|---|---|---:|---:|---:|");
    let mut over = 0;
    for ((name, got, rates), (_, _, want, max)) in seen.iter_mut().zip(&cases) {
        let m = median(rates);
        let ratio = m / base;
        let mark = if ratio > GOAL {
            over += 1;
            " OVER"
        } else {
            ""
        };
        let reason = if got == want {
            got.clone()
        } else {
            format!("{got} (expected {want})")
        };
        println!(
            "| {name} | {reason} | {max} | {:.1} | {ratio:.1}×{mark} |",
            m / 1000.0
        );
    }
    println!("\n{over} shape(s) over {GOAL}×\n");
}

/// The decision alone, in-process: protobuf decode and `check::check`, no
/// transport, no logging. Shows what scanning a large header or reading a large
/// token costs by itself (the 60 KiB cookie against a bearer header).
fn bench_inprocess(c: &mut Criterion) {
    use prost::Message;
    let dir = tempdir::tempdir().unwrap();
    let yaml = shapes::lay_out(dir.path());
    let policy = valet::load::parse(&yaml, &dir.path().join("valet.yaml"))
        .expect("flood policy compiles")
        .into_snapshot();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (p, cell) in policy.providers.iter().zip(&policy.stores.keys) {
        let set = std::fs::read(dir.path().join(format!("{}.json", p.name))).unwrap();
        cell.publish(valet::jwks::KeySet::parse(&set).unwrap(), now);
    }
    let mut g = c.benchmark_group("forged_inprocess");
    let mut cases = vec![("missing_token_baseline".to_string(), request(&[]))];
    let wanted = [
        "bad_signature_rs256",
        "cookie_60k_token_last",
        "claims700_rs256",
        "alg_not_allowed_claims700",
    ];
    for s in shapes::shapes()
        .into_iter()
        .filter(|s| wanted.contains(&s.name.as_str()))
    {
        cases.push((s.name, request(&s.headers)));
    }
    for (name, req) in &cases {
        let bytes = req.encode_to_vec();
        g.bench_function(name.as_str(), |b| {
            b.iter(|| {
                let req = CheckRequest::decode(std::hint::black_box(bytes.as_slice())).unwrap();
                valet::check::check(&policy, &req, now)
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    targets = bench_forged, bench_inprocess
}
criterion_main!(benches);
