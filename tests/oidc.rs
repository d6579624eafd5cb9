//! Against a real OpenID provider: npm `oidc-provider`, installed by
//! scripts/install-idp.sh and started here on 127.0.0.1. Valet finds its keys by
//! discovery, verifies its JWT access tokens, follows its key rotation, and denies
//! a token minted for another resource.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;

struct Idp {
    child: Child,
    issuer: String,
}

impl Idp {
    fn start() -> Idp {
        let server = std::env::var_os("VALET_IDP_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/idp/server.mjs")
            });
        let modules = server.parent().unwrap().join("node_modules/oidc-provider");
        assert!(
            modules.exists(),
            "oidc-provider is not installed: run scripts/test.sh (or scripts/install-idp.sh) first"
        );
        let mut child = Command::new("node")
            .arg(&server)
            .arg("0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(issuer) = line.strip_prefix("READY ") {
                    let _ = tx.send(issuer.trim().to_string());
                }
            }
        });
        let issuer = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(i) => i,
            Err(_) => {
                let _ = child.kill();
                panic!("the IdP did not start");
            }
        };
        Idp { child, issuer }
    }

    async fn token(&self, resource: &str, scope: &str) -> String {
        let basic =
            base64::engine::general_purpose::STANDARD.encode("valet-test:valet-test-secret");
        let body = format!(
            "grant_type=client_credentials&resource={}&scope={}",
            urlencode(resource),
            urlencode(scope)
        );
        let r = reqwest::Client::new()
            .post(format!("{}/token", self.issuer))
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "token request: {}", r.status());
        let json: serde_json::Value = r.json_body().await;
        json["access_token"].as_str().unwrap().to_string()
    }

    async fn admin(&self, path: &str) {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.issuer))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

trait JsonBody {
    async fn json_body(self) -> serde_json::Value;
}

impl JsonBody for reqwest::Response {
    async fn json_body(self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn kid(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["kid"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_a_real_openid_provider() {
    let idp = Idp::start();
    let config = format!(
        "providers:\n  - name: idp\n    issuer: {}\n    audiences: [\"https://orders.example/\"]\n    jwks: {{ discovery: true }}\n    claims_to_headers: {{ client_id: x-client-id }}\nroutes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\n",
        idp.issuer
    );
    let v = Valet::start(&config);
    assert!(
        v.wait_ready(200, Duration::from_secs(15)).await,
        "{}",
        v.logs()
    );
    let mut c = v.client().await;

    let t1 = idp.token("https://orders.example/", "orders:read").await;
    let a = check(&mut c, get("/orders/1").bearer(&t1)).await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(
        a.headers.get("x-client-id").map(String::as_str),
        Some("valet-test")
    );

    // Scope too small: 403. Another resource's token: not for us.
    let write_only = idp.token("https://orders.example/", "orders:write").await;
    assert_eq!(
        check(&mut c, get("/orders/1").bearer(&write_only))
            .await
            .reason(),
        "insufficient_scope"
    );
    let other = idp.token("https://other.example/", "orders:read").await;
    let a = check(&mut c, get("/orders/1").bearer(&other)).await;
    assert_eq!(
        (a.http_status, a.reason().as_str()),
        (401, "audience_not_allowed")
    );

    // The IdP rotates and signs with the new key at once.
    idp.admin("/__rotate").await;
    let t2 = idp.token("https://orders.example/", "orders:read").await;
    assert_ne!(kid(&t1), kid(&t2), "the IdP signs with a new key");
    let started = Instant::now();
    let a = check(&mut c, get("/orders/1").bearer(&t2)).await;
    eprintln!(
        "oidc-provider rotation: new kid {} accepted on the first Check, in {:.1} ms",
        kid(&t2),
        started.elapsed().as_secs_f64() * 1e3
    );
    assert!(a.allowed(), "{a:?}");
    // Old tokens keep working while the old key is published.
    assert!(check(&mut c, get("/orders/1").bearer(&t1)).await.allowed());
}
