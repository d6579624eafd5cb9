//! Floods of forged tokens against the real binary: each shape an attacker
//! controls (tests/floods_forged/shapes.rs) is refused with its reason, costs at
//! most one signature verification per token (counted by
//! `valet_signature_verifications_total`, not timed), and a legitimate token
//! still passes afterwards. `VALET_FLOOD_LONG=1` sends 500 of each instead of 10.

use crate::common;
mod shapes;

use std::time::Duration;

use common::{Valet, check, get, tempdir, with_free_ports};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use shapes::Kind;
use tonic::transport::Channel;

const CALLERS: usize = 8;

fn per_shape() -> usize {
    if std::env::var_os("VALET_FLOOD_LONG").is_some() {
        500
    } else {
        10
    }
}

async fn start() -> Valet {
    let dir = tempdir().unwrap();
    let policy = shapes::lay_out(dir.path());
    let path = dir.path().join("valet.yaml");
    std::fs::write(&path, with_free_ports(&policy)).unwrap();
    let v = Valet::spawn(dir, &path, &[("VALET_LOG", "info")]);
    assert!(
        v.wait_ready(200, Duration::from_secs(15)).await,
        "valet not ready:\n{}",
        v.logs()
    );
    v
}

/// Signature verifications so far, over every provider, with `result`, read from
/// one scrape.
fn count(metrics: &str, result: &str) -> u64 {
    let label = format!("result=\"{result}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("valet_signature_verifications_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn verifications(v: &Valet, result: &str) -> u64 {
    count(&v.admin_get("/metrics").await.1, result)
}

async fn total_verifications(v: &Valet) -> u64 {
    let metrics = v.admin_get("/metrics").await.1;
    count(&metrics, "valid") + count(&metrics, "invalid")
}

/// Sends `n` copies of the request from the callers (one connection each, all at
/// once); every answer's reason.
async fn flood(
    callers: &[AuthorizationClient<Channel>],
    headers: &[(String, String)],
    n: usize,
) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for (c, client) in callers.iter().enumerate() {
        let count = n / callers.len() + usize::from(c < n % callers.len());
        let mut client = client.clone();
        let headers = headers.to_vec();
        tasks.spawn(async move {
            let mut reasons = Vec::with_capacity(count);
            for _ in 0..count {
                let mut req = get(shapes::PATH);
                for (k, val) in &headers {
                    req = req.header(k, val);
                }
                let a = check(&mut client, req).await;
                assert!(!a.allowed(), "a forged token must never pass");
                reasons.push(a.reason());
            }
            reasons
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("no caller panicked"));
    }
    all
}

async fn assert_legit_passes(v: &Valet) {
    let mut client = v.client().await;
    for (kind, with_kid) in [
        (Kind::Rs256, true),
        (Kind::Es384, true),
        (Kind::Rs256, false),
        (Kind::EdDsa, false),
    ] {
        let before = verifications(v, "valid").await;
        let a = check(
            &mut client,
            get(shapes::PATH).bearer(&shapes::legit(kind, with_kid)),
        )
        .await;
        assert!(
            a.allowed(),
            "{} with_kid={with_kid}: {} {:?}",
            kind.label(),
            a.reason(),
            a.body
        );
        assert_eq!(
            verifications(v, "valid").await,
            before + 1,
            "one verification"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forged_shape_is_refused_for_at_most_one_verification() {
    let v = start().await;
    let shapes = shapes::shapes();
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        callers.push(v.client().await);
    }
    let _load = common::load_slot().await;
    let n = per_shape();
    let mut report = Vec::new();
    // One scrape between shapes: this shape's count after is the next one's before.
    let mut before = total_verifications(&v).await;
    for shape in shapes {
        let reasons = flood(&callers, &shape.headers, n).await;
        let after = total_verifications(&v).await;
        let wrong: Vec<&String> = reasons.iter().filter(|r| *r != shape.reason).collect();
        assert!(
            wrong.is_empty(),
            "{}: {} of {n} answered {:?}, not {}",
            shape.name,
            wrong.len(),
            wrong.first(),
            shape.reason
        );
        let spent = after - before;
        // Forged tokens are never cached: the count is exact, not just a bound.
        assert_eq!(
            spent,
            n as u64 * shape.max_verifications,
            "{}: signature verifications for {n} tokens",
            shape.name
        );
        report.push(format!(
            "{}: {n} × {} ({:.0} verifications/token)",
            shape.name,
            shape.reason,
            spent as f64 / n as f64
        ));
        before = after;
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(
        verifications(&v, "valid").await,
        0,
        "no forged signature verified"
    );
    assert_legit_passes(&v).await;
    assert!(!v.logs().contains("panicked"), "{}", v.logs());
}

#[tokio::test]
async fn a_kidless_token_is_tried_against_one_key_only() {
    let v = start().await;
    let _load = common::load_slot().await;
    let mut client = v.client().await;
    // Honestly signed by a key of a set where several keys fit: Valet does not
    // guess which (OpenID Connect Core §10.1: a kid is required then).
    for kind in Kind::SMALL {
        let provider = format!("{}-3", kind.label());
        let header =
            serde_json::json!({ "alg": serde_json::to_value(kind.alg()).unwrap(), "typ": "JWT" });
        let t = shapes::signed(
            &header,
            &shapes::claims(&provider),
            &kind.key(2),
            kind.alg(),
        );
        let a = check(&mut client, get(shapes::PATH).bearer(&t)).await;
        assert_eq!(a.reason(), "unknown_key", "{provider}");
        assert_eq!(a.http_status, 401);
        assert!(
            a.body["error_description"]
                .as_str()
                .unwrap_or("")
                .contains("no kid"),
            "{:?}",
            a.body
        );
    }
    assert_eq!(total_verifications(&v).await, 0);
    // With one key of the kind in the set, a kid-less token verifies.
    assert_legit_passes(&v).await;
}
