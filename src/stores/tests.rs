//! What a reload keeps and what it drops (the table in the module comment).

use std::path::Path;
use std::sync::Arc;

use super::replay::{ReplayCache, Spend};
use super::{Snapshot, Stores};
use crate::load::{self, Loaded};

const BASE: &str = "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\n    introspection:\n      endpoint: https://idp.test/introspect\n      client_id: valet\n      client_secret_file: secret\n      timeout: 2s\nroutes:\n  - name: orders\n    match: { path_prefix: /orders }\n    require: { scopes: [orders:read] }\nrevocation: { file: denylist.yaml }\n";

fn loaded(dir: &Path, yaml: &str) -> Loaded {
    load::parse(yaml, &dir.join("valet.yaml")).unwrap()
}

fn dir() -> crate::tempdir::TempDir {
    let dir = crate::tempdir::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    std::fs::write(dir.path().join("denylist.yaml"), "revoked:\n  - jti: x\n").unwrap();
    std::fs::write(dir.path().join("other.yaml"), "revoked:\n  - jti: y\n").unwrap();
    dir
}

fn first(dir: &Path) -> Snapshot {
    loaded(dir, BASE).into_snapshot()
}

/// The reload of `yaml` after `old`, keeping `old`'s key cells (the Supervisor's part).
fn reload(dir: &Path, old: &Snapshot, yaml: &str) -> Snapshot {
    let l = loaded(dir, yaml);
    let stores = Stores::carry(&l.policy, old.stores.keys.clone(), l.revocation, Some(old));
    Snapshot::new(l.policy, stores)
}

#[test]
fn an_unchanged_policy_keeps_every_store() {
    let d = dir();
    let old = first(d.path());
    let new = reload(d.path(), &old, BASE);
    let (o, n) = (&old.stores, &new.stores);
    assert!(
        Arc::ptr_eq(&o.verified, &n.verified),
        "verified-token cache"
    );
    assert!(Arc::ptr_eq(&o.replay, &n.replay), "DPoP replay cache");
    assert!(Arc::ptr_eq(
        o.introspectors[0].as_ref().unwrap(),
        n.introspectors[0].as_ref().unwrap()
    ));
    assert!(Arc::ptr_eq(
        o.revocation.as_ref().unwrap(),
        n.revocation.as_ref().unwrap()
    ));
}

#[test]
fn a_changed_provider_drops_the_verified_cache_only() {
    let d = dir();
    let old = first(d.path());
    let new = reload(
        d.path(),
        &old,
        &BASE.replace("audiences: [orders-api]", "audiences: [other-api]"),
    );
    let (o, n) = (&old.stores, &new.stores);
    assert!(
        !Arc::ptr_eq(&o.verified, &n.verified),
        "claims verified for another audience"
    );
    assert!(Arc::ptr_eq(&o.replay, &n.replay));
    assert!(Arc::ptr_eq(
        o.introspectors[0].as_ref().unwrap(),
        n.introspectors[0].as_ref().unwrap()
    ));
    // The cache bounds matter too.
    let new = reload(
        d.path(),
        &old,
        &format!("{BASE}cache: {{ max_entries: 5 }}\n"),
    );
    assert!(!Arc::ptr_eq(&old.stores.verified, &new.stores.verified));
}

#[test]
fn changed_introspection_settings_start_a_new_introspector() {
    let d = dir();
    let old = first(d.path());
    let new = reload(d.path(), &old, &BASE.replace("timeout: 2s", "timeout: 1s"));
    assert!(!Arc::ptr_eq(
        old.stores.introspectors[0].as_ref().unwrap(),
        new.stores.introspectors[0].as_ref().unwrap()
    ));
    // Its answers could differ: verified claims are not kept either.
    assert!(!Arc::ptr_eq(&old.stores.verified, &new.stores.verified));
    // A new secret is a new setting.
    std::fs::write(d.path().join("secret"), "other\n").unwrap();
    let newer = reload(d.path(), &new, &BASE.replace("timeout: 2s", "timeout: 1s"));
    assert!(!Arc::ptr_eq(
        new.stores.introspectors[0].as_ref().unwrap(),
        newer.stores.introspectors[0].as_ref().unwrap()
    ));
}

#[test]
fn spent_proofs_stay_spent_when_the_dpop_window_changes() {
    let d = dir();
    let old = first(d.path());
    let id = ReplayCache::id("thumb", "jti-1");
    assert!(matches!(old.stores.replay.spend(id, 1_000), Spend::Fresh));
    let new = reload(
        d.path(),
        &old,
        &format!("{BASE}dpop: {{ max_age: 120s }}\n"),
    );
    assert!(!Arc::ptr_eq(&old.stores.replay, &new.stores.replay));
    assert!(matches!(
        new.stores.replay.spend(id, 1_001),
        Spend::Replayed
    ));
}

#[test]
fn another_denylist_file_is_the_list_just_read() {
    let d = dir();
    let old = first(d.path());
    let new = reload(d.path(), &old, &BASE.replace("denylist.yaml", "other.yaml"));
    let (o, n) = (
        old.stores.revocation.as_ref().unwrap(),
        new.stores.revocation.as_ref().unwrap(),
    );
    assert!(!Arc::ptr_eq(o, n));
    assert!(n.source.to_string().ends_with("other.yaml"));
    // And no denylist at all drops it.
    let none = reload(
        d.path(),
        &new,
        &BASE.replace("revocation: { file: denylist.yaml }\n", ""),
    );
    assert!(none.stores.revocation.is_none());
}

#[tokio::test]
async fn key_cells_follow_provider_identity() {
    let d = dir();
    std::fs::write(d.path().join("jwks.json"), r#"{"keys":[]}"#).unwrap();
    let mut keys = crate::jwks::Supervisor::new();
    let a = loaded(d.path(), BASE);
    let first = keys.adopt(&a.policy.providers);
    let same = keys.adopt(&loaded(d.path(), BASE).policy.providers);
    assert!(
        Arc::ptr_eq(&first[0], &same[0]),
        "same name, issuer and jwks"
    );
    let moved = BASE.replace("issuer: https://idp.test/", "issuer: https://other.test/");
    let other = keys.adopt(&loaded(d.path(), &moved).policy.providers);
    assert!(!Arc::ptr_eq(&first[0], &other[0]), "another issuer");
}
