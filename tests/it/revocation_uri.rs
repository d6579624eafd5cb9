//! `revocation.uri`: the denylist every replica of a fleet polls. Readiness
//! waits for the first list; a change is enforced within one interval and one
//! fetch (measured, printed); unchanged lists are confirmed by 304; a failing
//! URL keeps the list in force, and a list unconfirmed for `max_stale` is
//! reported stale (metric and /statusz) until the URL answers again. Valet's
//! clock is moved past `max_stale` instead of sleeping.

use crate::common;

use std::time::{Duration, Instant};

use common::denylist_server::DenylistServer;
use common::*;
use serde_json::json;

fn config(url: &str) -> String {
    format!(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: {{ file: jwks.json }}\nroutes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\nrevocation: {{ uri: \"{url}\", refresh_interval: 200ms, max_stale: 30s }}\n"
    )
}

async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denylist_url_is_followed_confirmed_and_reported_stale() {
    let server = DenylistServer::start("revoked: []\n").await;
    server.fail(Some(503));
    let clock = valet::clock::Clock::system();
    let valet = Valet::in_process_on(&config(&server.url), clock.clone());

    // No list yet: not ready, and /readyz says why.
    until("asked", async || server.requests() >= 2).await;
    let (status, body) = valet.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no revocation denylist yet"), "{body}");
    server.fail(None);
    assert!(valet.wait_ready(200, Duration::from_secs(30)).await);

    let victim = {
        let mut c = claims("orders:read");
        c["jti"] = json!("victim-1");
        token(jsonwebtoken::Algorithm::RS256, &c)
    };
    let bystander = rs256("orders:read");
    let mut client = valet.client().await;
    assert_eq!(
        check(&mut client, get("/orders").bearer(&victim))
            .await
            .reason(),
        "verified"
    );

    // Unchanged: confirmed by 304s, not re-read.
    let before = server.not_modified();
    until("304s", async || server.not_modified() >= before + 2).await;

    // A change at the URL: enforced at the next fetch.
    server.set("revoked:\n  - jti: victim-1\n");
    let written = Instant::now();
    until("revoked", async || {
        check(&mut client, get("/orders").bearer(&victim))
            .await
            .reason()
            == "revoked"
    })
    .await;
    println!(
        "denylist URL change → first denial: {:?} (refresh_interval 200ms)",
        written.elapsed()
    );
    assert!(
        check(&mut client, get("/orders").bearer(&bystander))
            .await
            .allowed()
    );
    assert_eq!(valet.metric("valet_revocation_entries").await, Some(1.0));
    assert_eq!(valet.metric("valet_revocation_stale").await, Some(0.0));

    // A broken answer keeps the list in force and says where.
    server.set("revoked:\n  - jit: victim-1\n");
    assert!(
        valet.wait_for_log("deny.yaml:2:5: revoked[0]: unknown field `jit`"),
        "{}",
        valet.logs()
    );
    assert!(
        valet
            .wait_metric(
                "valet_revocation_last_reload_successful",
                0.0,
                Duration::from_secs(30)
            )
            .await
    );
    // The URL fails: the list stays, and once unconfirmed past max_stale it is stale.
    server.fail(Some(503));
    clock.advance_unix(31);
    assert!(
        valet
            .wait_metric("valet_revocation_stale", 1.0, Duration::from_secs(30))
            .await
    );
    let (_, status) = valet.admin_get("/statusz").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let r = &status["revocation"];
    assert_eq!(r["stale"], true, "{r}");
    assert_eq!(r["entries"], 1, "{r}");
    assert!(r["unconfirmed_seconds"].as_u64().unwrap() >= 31, "{r}");
    assert!(
        r["last_error"].as_str().unwrap().contains("HTTP 503"),
        "{r}"
    );
    assert_eq!(
        check(&mut client, get("/orders").bearer(&victim))
            .await
            .reason(),
        "revoked",
        "the last good list stays in force"
    );

    // The URL is back with a good list: confirmed, fresh again.
    server.fail(None);
    server.set("revoked:\n  - jti: victim-1\n  - sub: nobody\n");
    assert!(
        valet
            .wait_metric("valet_revocation_stale", 0.0, Duration::from_secs(30))
            .await
    );
    assert!(
        valet
            .wait_metric("valet_revocation_entries", 2.0, Duration::from_secs(30))
            .await
    );
    let (_, status) = valet.admin_get("/statusz").await;
    assert!(status.contains("\"stale\":false"), "{status}");
}

#[test]
fn exactly_one_of_file_and_uri() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("valet.yaml");
    let err = |revocation: &str| {
        let src = format!("routes: []\nrevocation: {revocation}\n");
        match valet::load::parse(&src, &path) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    assert!(err("{}").contains("exactly one of file, uri"));
    assert!(err("{ file: d.yaml, uri: \"https://x/d\" }").contains("exactly one of file, uri"));
    assert!(err("{ uri: \"ftp://x/d\" }").contains("only http and https"));
    assert!(err("{ uri: \"https://x/d\", refresh_interval: 10ms }").contains("at least 100ms"));
    assert!(
        err("{ uri: \"https://x/d\", refresh_interval: 10s, max_stale: 5s }")
            .contains("at least refresh_interval")
    );
    assert!(err("{ file: d.yaml, max_stale: 5s }").contains("applies to uri only"));
    assert_eq!(err("{ uri: \"https://x/d\" }"), "");
}
