//! Property-based fuzzing (proptest, stable Rust) of the parts that read untrusted
//! input: tokens and their verification, config files, path normalisation and
//! route matching. Bounded so CI stays fast; failures are persisted by proptest in
//! tests/fuzz.proptest-regressions and replayed on every run.

use crate::common;

use std::path::Path;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use proptest::prelude::*;
use valet::decision::Decision;
use valet::stores::Snapshot;

const POLICY: &str = "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\n    algorithms: [RS256, ES256, EdDSA, HS256]\n    tokens_from: [{ header: authorization, prefix: 'Bearer ' }, { cookie: at }, { query: at }]\nroutes:\n  - name: health\n    match: { path: /healthz }\n    anonymous: true\n  - name: tpl\n    match: { methods: [GET], path_template: '/o/{id}/items/{item}' }\n    require: { scopes: [a] }\n  - name: re\n    match: { hosts: ['*.example.com'], path_regex: '/v[0-9]+/.*' }\n    require: { any_scopes: [a, b] }\n  - name: all\n    match: { path_prefix: / }\n    require: { claims: { 'x.y': [1, true, 'z'] } }\n";

fn policy() -> &'static Snapshot {
    static P: OnceLock<Snapshot> = OnceLock::new();
    P.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let snap = valet::load::parse(POLICY, &dir.join("valet.yaml"))
            .unwrap()
            .into_snapshot();
        let set = valet::jwks::KeySet::parse(jwks().to_string().as_bytes()).unwrap();
        snap.stores.keys[0].publish(set, 1);
        snap
    })
}

fn decide(path: &str, host: &str, headers: &[(&str, &str)]) -> Decision {
    let mut req = get(path).host(host);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    valet::check::check(policy(), &req.build(), now() as u64)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        // proptest's default per run (these are most of the suite's CPU in a debug
        // build); PROPTEST_CASES=N runs more.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes as a token: an answer, never a panic, never an allow.
    #[test]
    fn arbitrary_tokens_are_denied(token in "\\PC{0,300}") {
        let d = decide("/anything", "a", &[("authorization", &format!("Bearer {token}"))]);
        prop_assert!(!d.is_allow());
    }

    /// A DPoP-bound token with any proof header and any client certificate:
    /// a denial with a reason, never a panic.
    #[test]
    fn arbitrary_dpop_proofs_and_certificates_are_denied(
        proof in "\\PC{0,200}",
        parts in proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 3),
        cert in "(%[0-9A-Fa-f+]{0,3}|-----BEGIN CERTIFICATE-----|[A-Za-z0-9+/=\n]){0,30}",
    ) {
        // One token for every case: the inputs are the proof and the certificate
        // (an RSA signature per case is most of what an unoptimised build spends).
        static TOKEN: OnceLock<String> = OnceLock::new();
        let t = TOKEN.get_or_init(|| {
            let mut claims = claims("a");
            claims["cnf"] = serde_json::json!({"jkt": "abc", "x5t#S256": "def"});
            claims["x"] = serde_json::json!({"y": 1});
            token(jsonwebtoken::Algorithm::RS256, &claims)
        });
        let structured = parts.join(".");
        for p in [proof.as_str(), structured.as_str()] {
            let req = get("/anything")
                .header("authorization", &format!("DPoP {t}"))
                .header("dpop", p)
                .certificate(&cert);
            let d = valet::check::check(policy(), &req.build(), now() as u64);
            prop_assert!(!d.is_allow());
            let r = d.reason().label();
            prop_assert!(r == "invalid_dpop_proof" || r == "binding_mismatch", "{}", r);
        }
    }

    /// Structured tokens with arbitrary JSON-ish header and payload.
    #[test]
    fn arbitrary_jose_parts_are_denied(header in "\\PC{0,120}", payload in "\\PC{0,200}", sig in "[A-Za-z0-9_-]{0,100}") {
        let t = format!("{}.{}.{sig}", URL_SAFE_NO_PAD.encode(&header), URL_SAFE_NO_PAD.encode(&payload));
        let d = decide("/anything", "a", &[("authorization", &format!("Bearer {t}"))]);
        prop_assert!(!d.is_allow());
    }

    /// A valid token with one byte changed anywhere never verifies.
    #[test]
    fn mutated_tokens_never_verify(pos in 0usize..10_000, byte in "[A-Za-z0-9_.-]") {
        static GOOD: OnceLock<String> = OnceLock::new();
        let good = GOOD.get_or_init(|| token(jsonwebtoken::Algorithm::ES256, &claims("a"))).clone();
        let pos = pos % good.len();
        let b = byte.as_bytes()[0];
        prop_assume!(good.as_bytes()[pos] != b);
        let mut bytes = good.into_bytes();
        bytes[pos] = b;
        let t = String::from_utf8(bytes).unwrap();
        let d = decide("/o/1/items/2", "a", &[("authorization", &format!("Bearer {t}"))]);
        // Base64 slack: a change in the last character's unused bits may decode the same.
        if d.is_allow() {
            prop_assert_eq!(pos, t.len() - 1);
        }
    }

    /// Any claims, validly signed: an answer, never a panic.
    #[test]
    fn arbitrary_claims_are_answered(claims_json in "\\PC{0,200}", exp in any::<i64>(), aud in any::<u8>()) {
        let mut c = serde_json::from_str::<serde_json::Value>(&claims_json).unwrap_or(serde_json::json!({}));
        if let Some(o) = c.as_object_mut() {
            o.insert("iss".into(), "https://idp.test/".into());
            o.insert("exp".into(), exp.into());
            if aud % 2 == 0 { o.insert("aud".into(), "orders-api".into()); }
        }
        let t = token(jsonwebtoken::Algorithm::HS256, &c);
        let _ = decide("/v2/x", "a.example.com", &[("authorization", &format!("Bearer {t}"))]);
    }

    /// Paths: never a panic; normalised output is absolute, has no dot segments or
    /// empty segments, and normalising again changes nothing.
    #[test]
    fn normalisation_is_safe_and_idempotent(path in "(/|[a-z.%2eE/\\\\]|%[0-9a-fA-F]{2}|\\.\\.){0,40}") {
        if let Ok(n) = valet::request::normalize(&path) {
            prop_assert!(n.starts_with('/'));
            prop_assert!(!n.contains("//"));
            prop_assert!(!n.split('/').any(|s| s == "." || s == ".."));
            prop_assert_eq!(valet::request::normalize(&n), Ok(n.clone()));
        }
    }

    /// The canonical form is one spelling per resource: ASCII, upper-case hex in
    /// every escape, no escape of a character a segment carries as it is, and the
    /// same for a spelling that escapes some of those characters or flips the
    /// case of some hex digits.
    #[test]
    fn every_spelling_has_one_canonical_form(
        path in "/(\\PC|%[0-9a-fA-F]{2}|[/.:@!$&'()*+,;=~_-]){0,30}",
        flips in proptest::collection::vec(any::<bool>(), 0..60),
    ) {
        let Ok(n) = valet::request::normalize(&path) else { return Ok(()) };
        prop_assert!(n.is_ascii());
        let b = n.as_bytes();
        for (i, c) in b.iter().enumerate() {
            if *c == b'%' {
                let hex = &b[i + 1..i + 3];
                prop_assert!(hex.iter().all(|h| h.is_ascii_digit() || h.is_ascii_uppercase()), "{n}");
                let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
                prop_assert!(!valet::request::is_pchar(v), "{n}");
            }
        }
        // Another spelling of the same path: escape some pchar bytes, in either case.
        let mut other = String::new();
        let mut in_escape = 0u8;
        for (i, c) in n.bytes().enumerate() {
            let escaped_digit = in_escape > 0;
            in_escape = if c == b'%' { 2 } else { in_escape.saturating_sub(1) };
            if !escaped_digit && c != b'/' && c != b'%' && c != b'.' && valet::request::is_pchar(c) && flips.get(i).copied().unwrap_or(false) {
                if i % 2 == 0 { other.push_str(&format!("%{c:02x}")) } else { other.push_str(&format!("%{c:02X}")) }
            } else {
                other.push(c as char);
            }
        }
        prop_assert_eq!(valet::request::normalize(&other), Ok(n.clone()), "{}", other);
    }

    /// Route matching on arbitrary requests: no panic, and the decision's route is
    /// the first route that matches.
    #[test]
    fn route_matching_is_total(path in "/\\PC{0,60}", host in "\\PC{0,30}", method in "[A-Z]{0,7}", cookie in "\\PC{0,60}") {
        let d = valet::check::check(policy(), &get(&path).host(&host).method(&method).header("cookie", &cookie).build(), 0);
        let _ = d.reason();
    }

    /// Arbitrary config text: an error with a position, or a policy; never a panic.
    #[test]
    fn arbitrary_configs_are_answered(text in "\\PC{0,400}") {
        match valet::load::parse(&text, Path::new("/x/valet.yaml")) {
            Ok(_) => {}
            Err(valet::config::LoadError::Invalid(errors)) => {
                prop_assert!(!errors.is_empty());
                for e in errors {
                    prop_assert!(e.position.line >= 1 && e.position.column >= 1);
                }
            }
            Err(e) => prop_assert!(false, "unexpected {}", e),
        }
    }

    /// Structured config mutations: real keys, odd values.
    #[test]
    fn mutated_configs_are_answered(idx in 0usize..2000, junk in "[\\[\\]{}:,'\"&*!|>-]|\\PC{1,5}") {
        let mut text = POLICY.to_string();
        let i = idx % text.len();
        if text.is_char_boundary(i) {
            text.insert_str(i, &junk);
            let _ = valet::load::parse(&text, Path::new("/x/valet.yaml"));
        }
    }
}
