use std::path::Path;

use crate::config::{ConfigError, LoadError};
use crate::load::parse;

const JWKS_DIR: &str = "/nonexistent";

fn errors(src: &str) -> Vec<ConfigError> {
    match parse(src, &Path::new(JWKS_DIR).join("valet.yaml")) {
        Err(LoadError::Invalid(e)) => e,
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("accepted:\n{src}"),
    }
}

fn one(src: &str) -> String {
    let e = errors(src);
    assert_eq!(e.len(), 1, "{e:#?}");
    e[0].to_string()
}

const PROVIDER: &str = "providers:\n  - name: corp\n    issuer: https://idp/\n    audiences: [api]\n    jwks: { file: jwks.json }\n";

#[test]
fn a_valid_file_compiles() {
    let src = format!(
        "{PROVIDER}routes:\n  - name: a\n    match: {{ hosts: ['*.Example.com'], methods: [get], path_template: '/o/{{id}}' }}\n    require: {{ scopes: [x], claims: {{ tenant: acme, level: [1, 2], ok: true }} }}\n  - name: b\n    match: {{ path_prefix: /orders/ }}\n    anonymous: true\n"
    );
    let c = parse(&src, Path::new("/etc/valet/valet.yaml")).unwrap();
    assert_eq!(c.policy.routes.len(), 2);
    assert_eq!(c.listen.grpc.unwrap().to_string(), "127.0.0.1:9001");
    assert_eq!(c.listen.http, None, "HTTP mode is off unless asked for");
    assert_eq!(
        c.policy.providers[0].jwks,
        crate::provider::JwksSource::File("/etc/valet/jwks.json".into()),
        "relative to the config file"
    );
}

#[test]
fn unknown_keys_are_rejected_with_their_position() {
    let e = one("routes:\n  - name: a\n    match: { pathh: /x }\n");
    assert!(e.starts_with("/nonexistent/valet.yaml:3:"), "{e}");
    assert!(e.contains("unknown field `pathh`"), "{e}");
}

#[test]
fn every_semantic_error_is_reported_at_once_with_its_position() {
    let src = format!(
        "{PROVIDER}routes:\n  - name: a\n    match: {{ path_regex: '(' }}\n  - name: a\n    require: {{ providers: [nobody], scopes: ['two words'] }}\n  - name: c\n    match: {{ path: /x, path_prefix: /y }}\n    anonymous: true\n    require: {{ scopes: [x] }}\n"
    );
    let e = errors(&src);
    let text: Vec<String> = e.iter().map(ToString::to_string).collect();
    let find = |needle: &str| {
        text.iter()
            .find(|t| t.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {text:#?}"))
            .clone()
    };
    assert!(find("invalid regex").starts_with("/nonexistent/valet.yaml:8:"));
    assert!(find("duplicate route name").starts_with("/nonexistent/valet.yaml:9:"));
    assert!(find("unknown provider \"nobody\"").contains(":10:"));
    assert!(find("a scope is one non-empty word").contains(":10:"));
    find("use only one of path");
    find("an anonymous route cannot require anything");
    assert_eq!(e.len(), 6, "{text:#?}");
}

#[test]
fn provider_mistakes() {
    let cases = [
        ("algorithms: [none]", "alg none"),
        ("algorithms: [HS1024]", "unsupported algorithm"),
        ("clock_skew: 30", "add a unit"),
        (
            "tokens_from: [{ cookie: a, query: b }]",
            "exactly one of header",
        ),
        (
            "tokens_from: [{ cookie: a, prefix: 'x' }]",
            "prefix goes with header only",
        ),
        (
            "claims_to_headers: { sub: 'x user' }",
            "not a valid header name",
        ),
        ("claims_to_headers: { sub: host }", "cannot carry identity"),
    ];
    for (extra, want) in cases {
        let src = format!("{PROVIDER}    {extra}\n");
        let e = one(&src);
        assert!(e.contains(want), "{extra}: {e}");
        assert!(e.starts_with("/nonexistent/valet.yaml:6:"), "{extra}: {e}");
    }
}

#[test]
fn match_mistakes() {
    let cases = [
        ("{ path: /a/../b }", "write \"/b\""),
        // Literals no request can match, or that match one spelling of a
        // resource and not another: each says the spelling to write.
        ("{ path_prefix: /café }", "write \"/caf%C3%A9\""),
        ("{ path_prefix: /men%c3%bc }", "write \"/men%C3%BC\""),
        (
            "{ path: '/v1/users%3Asearch' }",
            "write \"/v1/users:search\"",
        ),
        ("{ path: '/admin%09' }", "can never match"),
        ("{ path_template: '/%61dmin/{id}' }", "write \"admin\""),
        (
            "{ path_template: '/users/a[b]/{id}' }",
            "write \"a%5Bb%5D\"",
        ),
        ("{ hosts: ['admin.test.'] }", "write \"admin.test\""),
        ("{ hosts: ['::1'] }", "write \"[::1]\""),
        ("{ hosts: ['[::1]:8080'] }", "in brackets, without a port"),
        ("{ hosts: ['café.test'] }", "punycode"),
        ("{ path: relative }", "does not start with /"),
        ("{ hosts: ['*'] }", "leave hosts out"),
        (
            "{ hosts: ['a.example:80'] }",
            "without a port: write \"a.example\"",
        ),
        ("{ hosts: ['a.*.example'] }", "leading"),
        ("{ methods: ['GE T'] }", "not an HTTP method"),
        ("{ path_template: '/o/{id}/{id}' }", "appears twice"),
        ("{ path_template: '/o/x{id}' }", "whole segment"),
        ("{ path_template: '/o//x' }", "empty segment"),
    ];
    for (m, want) in cases {
        let src = format!("routes:\n  - name: r\n    anonymous: true\n    match: {m}\n");
        let e = one(&src);
        assert!(e.contains(want), "{m}: {e}");
        assert!(e.starts_with("/nonexistent/valet.yaml:4:"), "{m}: {e}");
    }
}

#[test]
fn canonical_literals_pass() {
    for m in [
        "{ path_prefix: /caf%C3%A9 }",
        "{ path: '/v1/users:search' }",
        "{ path_template: '/users/{id}/a:b' }",
        "{ hosts: ['[::1]', '*.example.com', 'Admin.Test'] }",
    ] {
        let src = format!("routes:\n  - name: r\n    anonymous: true\n    match: {m}\n");
        if let Err(e) = parse(&src, &Path::new(JWKS_DIR).join("valet.yaml")) {
            panic!("{m}: {e}");
        }
    }
}

#[test]
fn routes_that_need_tokens_need_providers() {
    let e = one("routes:\n  - name: r\n    match: { path: /x }\n");
    assert!(e.contains("no providers are configured"), "{e}");
}

#[test]
fn names_and_defaults_are_checked() {
    let e = errors("routes:\n  - name: _hidden\n    anonymous: true\ndefault: maybe\n");
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].to_string().contains("must be deny or allow"));
    assert!(e[1].to_string().contains("names are 1-64"));
}

fn warnings(src: &str) -> Vec<String> {
    parse(src, &Path::new(JWKS_DIR).join("valet.yaml"))
        .unwrap_or_else(|e| panic!("{e}"))
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn shadowed_routes_are_warned_about() {
    let src = format!(
        "{PROVIDER}routes:\n  - name: all-orders\n    match: {{ path_prefix: /orders }}\n  - name: one-order\n    match: {{ methods: [GET], path_template: '/orders/{{id}}' }}\n  - name: get-only\n    match: {{ methods: [GET], path_prefix: /x }}\n  - name: post-x\n    match: {{ methods: [POST], path: /x/y }}\n  - name: exact\n    match: {{ path: /x/y }}\n"
    );
    let w = warnings(&src);
    let shadow: Vec<&String> = w.iter().filter(|w| w.contains("never reached")).collect();
    assert_eq!(shadow.len(), 1, "{w:#?}");
    assert!(shadow[0].contains("\"one-order\"") && shadow[0].contains("routes[0]"));
    assert!(
        shadow[0].starts_with("/nonexistent/valet.yaml:10:"),
        "{}",
        shadow[0]
    );
}

#[test]
fn empty_requirements_are_warned_about() {
    let w = warnings(&format!(
        "{PROVIDER}routes:\n  - name: r\n    require: {{}}\n"
    ));
    assert!(
        w.iter()
            .any(|w| w.contains("requires nothing beyond a valid token")),
        "{w:#?}"
    );
}
