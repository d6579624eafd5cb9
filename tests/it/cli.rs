//! The policy author's tools: check-config, explain, test; dry-run; bad configs.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn valet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_valet"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write_config(dir: &Path, yaml: &str) -> String {
    std::fs::write(dir.join("jwks.json"), jwks().to_string()).unwrap();
    let path = dir.join("valet.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

#[test]
fn check_config_accepts_the_shipped_config() {
    let o = valet(&["check-config", "--config", "config/valet.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ok (4 routes, 1 providers)"));
}

#[test]
fn check_config_reports_every_error_with_its_position() {
    let dir = tempdir().unwrap();
    let path = write_config(
        dir.path(),
        r#"providers:
  - name: corp
    issuer: https://idp.test/
    jwks: { file: jwks.json }
    clock_skew: 30
  - name: corp
    issuer: https://other.test/
    jwks: { file: missing.json, uri: "https://x/" }
routes:
  - name: a
    match: { path_regex: "(" }
  - name: a
    match: { path_template: "/o/{id}/{id}" }
  - name: c
    match: { path: /x, path_prefix: /y }
    require: { providers: [nobody], scopes: ["two words"] }
"#,
    );
    let o = valet(&["check-config", "--config", &path]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o);
    for (line, needle) in [
        (5, "add a unit"),
        (6, "duplicate provider name"),
        (8, "set exactly one of file, uri"),
        (11, "invalid regex"),
        (12, "duplicate route name"),
        (13, "appears twice"),
        (15, "use only one of path"),
        (16, "unknown provider \"nobody\""),
        (16, "a scope is one non-empty word"),
    ] {
        let found = out
            .lines()
            .any(|l| l.starts_with(&format!("{path}:{line}:")) && l.contains(needle));
        assert!(found, "no {needle:?} at line {line} in:\n{out}");
    }
    // Unknown keys are caught by the parser, with their position too.
    std::fs::write(
        &path,
        "routes:\n  - name: a\n    anonymous: true\n    match: { pth: /x }\n",
    )
    .unwrap();
    let o = valet(&["check-config", "--config", &path]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).starts_with(&format!("{path}:4:")), "{}", text(&o));
    assert!(text(&o).contains("unknown field `pth`"));
}

#[test]
fn check_config_checks_the_jwks_file_and_prints_warnings() {
    let dir = tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks: { file: nope.json }\nroutes:\n  - name: all\n    match: { path_prefix: / }\n  - name: never\n    match: { path: /x }\n",
    );
    let o = valet(&["check-config", "--config", &path]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o);
    assert!(out.contains("provider corp: cannot read"), "{out}");
    assert!(
        out.contains("warning:") && out.contains("never reached"),
        "{out}"
    );
}

#[test]
fn serve_refuses_a_bad_config_with_ex_usage() {
    let dir = tempdir().unwrap();
    let path = write_config(dir.path(), "routes: [ broken");
    let o = valet(&["serve", "--config", &path]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("valet.yaml:1:"), "{}", text(&o));
}

#[test]
fn explain_tells_the_whole_story() {
    let dir = tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\n    claims_to_headers: { sub: x-user-id }\nroutes:\n  - name: health\n    match: { path: /healthz }\n    anonymous: true\n  - name: write\n    match: { methods: [POST], path_prefix: /orders }\n    require: { scopes: [orders:write] }\n  - name: read\n    match: { path_prefix: /orders }\n    require: { scopes: [orders:read] }\n",
    );
    let token = rs256("orders:read");
    let o = valet(&[
        "explain",
        "--config",
        &path,
        "--path",
        "/orders/7?x=1",
        "--token",
        &token,
    ]);
    assert!(o.status.success());
    let out = text(&o);
    for needle in [
        "[0] health  no: /orders/7 does not match path /healthz",
        "[1] write   no: method GET is not POST",
        "[2] read    MATCH",
        "requires: a valid token from corp; scopes all of [orders:read]",
        "decision: ALLOW 200 (verified)",
        "verified by provider corp, kid rsa-1",
        "upstream gets x-user-id: alice",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    assert!(!out.contains(&token), "explain never prints the token");

    let o = valet(&[
        "explain",
        "--config",
        &path,
        "--method",
        "POST",
        "--path",
        "/orders/7",
        "--claims",
        r#"{"iss":"https://idp.test/","aud":"orders-api","scope":"orders:read"}"#,
    ]);
    let out = text(&o);
    assert!(out.contains("claims taken as given"), "{out}");
    assert!(
        out.contains("decision: DENY 403 insufficient_scope"),
        "{out}"
    );
    assert!(out.contains("scope=\"orders:write\""), "{out}");

    let expired = {
        let mut c = claims("orders:read");
        c["exp"] = serde_json::json!(now() - 3600);
        token_for(&c)
    };
    let out = text(&valet(&[
        "explain", "--config", &path, "--path", "/orders", "--token", &expired,
    ]));
    assert!(out.contains("decision: DENY 401 expired"), "{out}");
}

fn token_for(c: &serde_json::Value) -> String {
    token(jsonwebtoken::Algorithm::RS256, c)
}

#[test]
fn the_example_policy_suite_passes() {
    let o = valet(&["test", "examples/policy-tests.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("12 passed, 0 failed"), "{}", text(&o));
}

#[test]
fn a_failing_suite_shows_a_readable_diff_and_fails() {
    let dir = tempdir().unwrap();
    let suite = dir.path().join("suite.yaml");
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/valet.yaml");
    std::fs::write(
        &suite,
        format!(
            "config: {}\ncases:\n  - name: readers can write (wrong)\n    request: {{ method: POST, path: /orders/1 }}\n    claims: {{ iss: \"https://idp.example.com/\", aud: orders-api, scope: \"orders:read\" }}\n    expect: {{ decision: allow, status: 200 }}\n  - name: health\n    request: {{ path: /healthz }}\n    expect: {{ decision: allow, reason: anonymous }}\n",
            policy.display()
        ),
    )
    .unwrap();
    let o = valet(&["test", suite.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o);
    for needle in [
        "FAIL  readers can write (wrong)",
        "decision: expected allow, got deny",
        "status:   expected 200, got 403",
        "(reason was insufficient_scope)",
        "ok    health",
        "1 passed, 1 failed",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    std::fs::write(&suite, "cases:\n  - name: x\n    request: { pth: / }\n").unwrap();
    let o = valet(&[
        "test",
        suite.to_str().unwrap(),
        "--config",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(64));
    assert!(text(&o).contains("suite.yaml:3:"), "{}", text(&o));
}

#[tokio::test]
async fn dry_run_records_the_denial_but_lets_the_request_pass() {
    let v = Valet::start(
        "providers:\n  - name: corp\n    issuer: https://idp.test/\n    jwks: { file: jwks.json }\n    claims_to_headers: { sub: x-user-id }\nroutes:\n  - name: new-rule\n    match: { path_prefix: /new }\n    require: { scopes: [new:scope] }\n    dry_run: true\n  - name: old-rule\n    match: { path_prefix: /old }\n    require: { scopes: [old:scope] }\n",
    );
    let mut c = v.client().await;
    let a = check(
        &mut c,
        get("/new")
            .bearer(&rs256("other"))
            .header("x-user-id", "mallory"),
    )
    .await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(a.reason(), "insufficient_scope");
    assert!(
        a.remove.contains(&"x-user-id".to_string()),
        "no identity on a dry-run pass"
    );
    assert!(
        check(&mut c, get("/new").bearer(&rs256("new:scope")))
            .await
            .allowed()
    );
    assert!(
        !check(&mut c, get("/old").bearer(&rs256("other")))
            .await
            .allowed(),
        "only the dry-run route"
    );
    assert_eq!(
        v.metric("valet_check_total{decision=\"allow\",reason=\"insufficient_scope\",route=\"new-rule\",dry_run=\"true\"}").await,
        Some(1.0)
    );
    assert!(v.wait_for_log("dry-run: would deny"));
}
