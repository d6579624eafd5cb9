//! API keys as a provider: a key from `x-api-key` (or `Authorization: ApiKey`)
//! found by its SHA-256 in a watched file; its claims go through revocation,
//! route requirements and `claims_to_headers` like a JWT's; the key never
//! reaches the upstream nor the logs.

use crate::common;

use common::*;

const POLICY: &str = r#"
realm: test
revocation: { file: denylist.yaml }
providers:
  - name: corp
    issuer: https://idp.test/
    audiences: [orders-api]
    jwks: { file: jwks.json }
    claims_to_headers: { sub: x-user-id }
  - name: partners
    issuer: api-keys:partners
    api_keys: { file: keys.yaml }
    tokens_from: [{ header: x-api-key }, { header: authorization, prefix: "ApiKey " }]
    claims_to_headers: { sub: x-user-id, partner: x-partner }
routes:
  - name: invoices
    match: { path_prefix: /invoices }
    require:
      any_of:
        - { providers: [corp], scopes: [invoices:read] }
        - { providers: [partners], claims: { partner: acme } }
  - name: partner-only
    match: { path_prefix: /partner }
    require: { providers: [partners], scopes: [reports:read] }
"#;

fn entry(key: &str, claims: &str) -> String {
    format!(
        "  - sha256: {}\n    claims: {claims}\n",
        valet::api_keys::hex_digest(key)
    )
}

async fn start(keys: &str) -> Valet {
    let dir = tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks().to_string()).unwrap();
    std::fs::write(dir.path().join("denylist.yaml"), "revoked: []\n").unwrap();
    std::fs::write(dir.path().join("keys.yaml"), keys).unwrap();
    let path = dir.path().join("valet.yaml");
    std::fs::write(&path, with_free_ports(POLICY)).unwrap();
    Valet::in_process_at(dir, &path)
}

#[tokio::test]
async fn a_key_stands_for_its_claims_and_never_goes_upstream() {
    let (acme, _) = valet::api_keys::generate().unwrap();
    let (globex, _) = valet::api_keys::generate().unwrap();
    let keys = format!(
        "keys:\n{}{}",
        entry(
            &acme,
            "{ sub: acme-billing, partner: acme, scope: 'reports:read' }"
        ),
        entry(&globex, "{ sub: globex, partner: globex }")
    );
    let v = start(&keys).await;
    let mut c = v.client().await;

    let a = check(&mut c, get("/invoices/1").header("x-api-key", &acme)).await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(a.reason(), "verified");
    assert_eq!(meta_str(&a.metadata, "provider"), "partners");
    assert_eq!(a.headers["x-user-id"], "acme-billing");
    assert_eq!(a.headers["x-partner"], "acme");
    assert!(a.remove.contains(&"x-api-key".to_string()), "{a:?}");
    let a = check(
        &mut c,
        get("/partner/r").header("authorization", &format!("ApiKey {acme}")),
    )
    .await;
    assert!(a.allowed(), "{a:?}");
    assert!(a.remove.contains(&"authorization".to_string()));

    // Another partner's key: the claim requirement says no.
    let a = check(&mut c, get("/invoices/1").header("x-api-key", &globex)).await;
    assert_eq!(
        (a.http_status, a.reason().as_str()),
        (403, "claim_mismatch"),
        "{a:?}"
    );
    // An unknown key, or a digest presented as a key.
    for bad in ["nope".to_string(), valet::api_keys::hex_digest(&acme)] {
        let a = check(&mut c, get("/partner/r").header("x-api-key", &bad)).await;
        assert_eq!(
            (a.http_status, a.reason().as_str()),
            (401, "unknown_api_key")
        );
        assert!(a.challenge().contains("invalid_token"), "{a:?}");
    }
    // A user token still works where the route takes either.
    let a = check(&mut c, get("/invoices/1").bearer(&rs256("invoices:read"))).await;
    assert!(a.allowed(), "{a:?}");

    // Revoked like any token: by its subject.
    std::fs::write(
        v.dir.path().join("denylist.yaml"),
        "revoked:\n  - sub: acme-billing\n",
    )
    .unwrap();
    assert!(v.logged("revocation denylist loaded denylist=").await);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let a = check(&mut c, get("/partner/r").header("x-api-key", &acme)).await;
        if a.reason() == "revoked" {
            assert_eq!(a.http_status, 401);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never revoked: {a:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let logs = v.logs();
    assert!(logs.contains("API keys loaded"), "{logs}");
    for key in [&acme, &globex] {
        assert!(!logs.contains(key.as_str()), "a key in the logs");
    }
    let (_, metrics) = v.admin_get("/metrics").await;
    assert!(
        metrics.contains("valet_api_keys_entries{provider=\"partners\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains(&acme));
}

/// At start (and in `check-config`) a broken key file is a policy error, placed.
#[test]
fn a_broken_key_file_is_a_configuration_error_with_its_position() {
    let dir = tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks().to_string()).unwrap();
    std::fs::write(dir.path().join("denylist.yaml"), "revoked: []\n").unwrap();
    std::fs::write(dir.path().join("keys.yaml"), "keys:\n  - sha256: nothex\n").unwrap();
    let path = dir.path().join("valet.yaml");
    std::fs::write(&path, POLICY).unwrap();
    let e = valet::load::load(&path).err().expect("refused").to_string();
    assert!(
        e.contains("keys.yaml:2:13: keys[0].sha256: must be the 64"),
        "{e}"
    );
    std::fs::remove_file(dir.path().join("keys.yaml")).unwrap();
    let e = valet::load::load(&path).err().expect("refused").to_string();
    assert!(e.contains("providers[1].api_keys.file: cannot read"), "{e}");
}

#[tokio::test]
async fn the_key_file_reloads_and_a_broken_one_keeps_the_keys_in_force() {
    let (old, _) = valet::api_keys::generate().unwrap();
    let (new, _) = valet::api_keys::generate().unwrap();
    let v = start(&format!(
        "keys:\n{}",
        entry(&old, "{ sub: a, scope: 'reports:read' }")
    ))
    .await;
    let mut c = v.client().await;
    let ask = |key: String| get("/partner/r").header("x-api-key", &key);
    assert!(check(&mut c, ask(old.clone())).await.allowed());

    // Broken: the keys in force stay, the problem is placed and counted.
    let file = v.dir.path().join("keys.yaml");
    std::fs::write(&file, "keys:\n  - sha256: 12\n").unwrap();
    assert!(
        v.logged("keys.yaml:2:13: keys[0].sha256: must be the 64")
            .await,
        "{}",
        v.logs()
    );
    assert!(
        check(&mut c, ask(old.clone())).await.allowed(),
        "last good kept"
    );
    assert_eq!(
        v.metric("valet_api_keys_last_reload_successful{provider=\"partners\"}")
            .await,
        Some(0.0)
    );

    // Fixed, with a rotated key: the new one works, the old one is gone.
    std::fs::write(
        &file,
        format!(
            "keys:\n{}",
            entry(&new, "{ sub: a, scope: 'reports:read' }")
        ),
    )
    .unwrap();
    assert!(
        v.wait_metric(
            "valet_api_keys_last_reload_successful{provider=\"partners\"}",
            1.0,
            std::time::Duration::from_secs(10)
        )
        .await
    );
    assert!(check(&mut c, ask(new.clone())).await.allowed());
    assert_eq!(
        check(&mut c, ask(old.clone())).await.reason(),
        "unknown_api_key"
    );
    assert!(!v.logs().contains(&new) && !v.logs().contains(&old));
}
