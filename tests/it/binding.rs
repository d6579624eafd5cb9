//! Sender-constrained tokens, black-box: certificate-bound (RFC 8705 `cnf.x5t#S256`)
//! and DPoP-bound (RFC 9449 `cnf.jkt`) tokens minted with real keys, here and by
//! the real oidc-provider; every way a proof or a binding can be wrong.

use crate::common;
use crate::common::idp;

use common::*;
use idp::{CLIENT_CERT_PEM, CLIENT_CERT_X5T_S256, DpopKey, Idp, ORDERS, urlencode};
use serde_json::{Value, json};

const CONFIG: &str = "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\n    claims_to_headers: { sub: x-user-id }\nroutes:\n  - name: mtls\n    match: { path_prefix: /mtls }\n    require: { binding: mtls }\n  - name: dpop\n    match: { path_prefix: /dpop }\n    require: { binding: dpop }\n  - name: bound\n    match: { path_prefix: /bound }\n    require: { binding: any }\n  - name: orders\n    match: { path_prefix: /orders }\n    require: { scopes: [orders:read] }\n";

fn bound(cnf: Value) -> String {
    let mut c = claims("orders:read");
    c["cnf"] = cnf;
    token(jsonwebtoken::Algorithm::ES256, &c)
}

/// A PEM whose DER differs from the test certificate: another certificate.
fn other_cert() -> String {
    let body: String = CLIENT_CERT_PEM
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut bytes = body.into_bytes();
    let i = bytes.len() / 2;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        String::from_utf8(bytes).unwrap()
    )
}

const URL: &str = "https://api.example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_bound_tokens_need_their_certificate() {
    let v = Valet::in_process(CONFIG);
    let mut c = v.client().await;
    let cert = urlencode(CLIENT_CERT_PEM);
    let t = bound(json!({"x5t#S256": CLIENT_CERT_X5T_S256}));

    let a = check(&mut c, get("/mtls/1").bearer(&t).certificate(&cert)).await;
    assert_eq!(a.reason(), "verified", "{a:?}");
    let a = check(&mut c, get("/orders/1").bearer(&t).certificate(&cert)).await;
    assert_eq!(a.reason(), "verified", "a bound token works on any route");

    for req in [
        get("/orders/1").bearer(&t),
        get("/orders/1")
            .bearer(&t)
            .certificate(&urlencode(&other_cert())),
        get("/mtls/1").bearer(&t).certificate("garbage"),
    ] {
        let a = check(&mut c, req).await;
        assert_eq!(
            (a.http_status, a.reason().as_str()),
            (401, "binding_mismatch"),
            "{a:?}"
        );
        assert!(
            a.challenge()
                .starts_with("Bearer realm=\"valet\", error=\"invalid_token\""),
            "{}",
            a.challenge()
        );
    }
    // Unbound tokens: fine on ordinary routes, not where a binding is required.
    let plain = rs256("orders:read");
    assert!(
        check(&mut c, get("/orders/1").bearer(&plain).certificate(&cert))
            .await
            .allowed()
    );
    for path in ["/mtls/1", "/bound/1"] {
        let a = check(&mut c, get(path).bearer(&plain).certificate(&cert)).await;
        assert_eq!(
            (a.http_status, a.reason().as_str()),
            (401, "unbound_token"),
            "{path}"
        );
    }
    // A DPoP-bound token does not satisfy an mTLS-only route.
    let key = DpopKey::generate();
    let d = bound(json!({"jkt": key.thumbprint()}));
    let proof = key.proof("GET", &format!("{URL}/mtls/1"), Some(&d));
    let a = check(&mut c, get("/mtls/1").dpop(&d, &proof)).await;
    assert_eq!(a.reason(), "unbound_token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_proofs_are_checked_point_by_point() {
    let v = Valet::in_process(CONFIG);
    let mut c = v.client().await;
    let key = DpopKey::generate();
    let t = bound(json!({"jkt": key.thumbprint()}));
    let htu = format!("{URL}/dpop/7");
    let now = now();

    // The good case, and what reaches the upstream.
    let proof = key.proof("GET", &htu, Some(&t));
    let a = check(&mut c, get("/dpop/7?x=1").dpop(&t, &proof)).await;
    assert_eq!(a.reason(), "verified", "{a:?}");
    assert!(
        a.remove.contains(&"authorization".to_string()) && a.remove.contains(&"dpop".to_string())
    );
    assert_eq!(
        a.headers.get("x-user-id").map(String::as_str),
        Some("alice")
    );
    // Ports, query and fragment of htu do not matter; scheme, host and path do.
    let p = key.proof("GET", "https://API.example.com:8443/dpop/7?q#f", Some(&t));
    assert!(check(&mut c, get("/dpop/7").dpop(&t, &p)).await.allowed());

    // The same proof twice: a replay.
    let a = check(&mut c, get("/dpop/7").dpop(&t, &proof)).await;
    assert_eq!(
        (a.http_status, a.reason().as_str()),
        (401, "invalid_dpop_proof")
    );
    assert!(
        a.challenge().starts_with("DPoP realm=\"valet\", algs=\"")
            && a.challenge().contains("error=\"invalid_dpop_proof\""),
        "{}",
        a.challenge()
    );
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .contains("already used")
    );

    let claims = |over: Value| {
        let mut c = json!({"jti": format!("j{}", rand_id()), "htm": "GET", "htu": htu, "iat": now, "ath": idp::ath(&t)});
        for (k, v) in over.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let bad: Vec<(&str, String)> = vec![
        ("another method", key.proof_with(&claims(json!({"htm": "POST"})))),
        ("another URL", key.proof_with(&claims(json!({"htu": format!("{URL}/dpop/8")})))),
        ("another URL", key.proof_with(&claims(json!({"htu": "https://evil.example/dpop/7"})))),
        ("another URL", key.proof_with(&claims(json!({"htu": "http://api.example.com/dpop/7"})))),
        ("too old", key.proof_with(&claims(json!({"iat": now - 120})))),
        ("in the future", key.proof_with(&claims(json!({"iat": now + 60})))),
        ("another access token", key.proof_with(&claims(json!({"ath": idp::ath("other")})))),
        ("another access token", key.proof_with(&claims(json!({"ath": null})))),
        ("no jti", key.proof_with(&claims(json!({"jti": null})))),
        ("typ is not", key.sign(&json!({"typ": "JWT", "alg": "ES256", "jwk": key.jwk()}), &claims(json!({})))),
        ("no jwk", key.sign(&json!({"typ": "dpop+jwt", "alg": "ES256"}), &claims(json!({})))),
        ("not a public key", key.sign(&json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": {"kty": "EC", "crv": "P-256", "x": key.jwk()["x"], "y": key.jwk()["y"], "d": "AAAA"}}), &claims(json!({})))),
        ("algorithm is not accepted", key.sign(&json!({"typ": "dpop+jwt", "alg": "none", "jwk": key.jwk()}), &claims(json!({})))),
        ("algorithm is not accepted", key.sign(&json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": key.jwk()}), &claims(json!({})))),
        ("does not fit its key", key.sign(&json!({"typ": "dpop+jwt", "alg": "RS256", "jwk": key.jwk()}), &claims(json!({})))),
        ("signature is invalid", {
            let p = key.proof_with(&claims(json!({})));
            let (head, _) = p.rsplit_once('.').unwrap();
            format!("{head}.{}", &key.proof_with(&claims(json!({}))).rsplit_once('.').unwrap().1)
        }),
        ("not a JWT", "not-a-jwt".into()),
        ("more than one", format!("{},{}", key.proof("GET", &htu, Some(&t)), key.proof("GET", &htu, Some(&t)))),
    ];
    for (why, proof) in &bad {
        let a = check(&mut c, get("/dpop/7").dpop(&t, proof)).await;
        assert_eq!(
            (a.http_status, a.reason().as_str()),
            (401, "invalid_dpop_proof"),
            "{why}: {a:?}"
        );
        let d = a.body["error_description"].as_str().unwrap();
        assert!(d.contains(why), "{why}: {d}");
    }
    let a = check(
        &mut c,
        get("/dpop/7").header("authorization", &format!("DPoP {t}")),
    )
    .await;
    assert_eq!(a.reason(), "invalid_dpop_proof", "no proof header");

    // Another key's valid proof; the bound token as a bearer token; DPoP with an unbound token.
    let other = DpopKey::generate();
    let a = check(
        &mut c,
        get("/dpop/7").dpop(&t, &other.proof("GET", &htu, Some(&t))),
    )
    .await;
    assert_eq!(a.reason(), "binding_mismatch");
    assert!(a.challenge().starts_with("DPoP "), "{}", a.challenge());
    let a = check(&mut c, get("/orders/7").bearer(&t)).await;
    assert_eq!(
        (a.http_status, a.reason().as_str()),
        (401, "binding_mismatch")
    );
    let plain = rs256("orders:read");
    let p = key.proof("GET", &format!("{URL}/orders/7"), Some(&plain));
    assert_eq!(
        check(&mut c, get("/orders/7").dpop(&plain, &p))
            .await
            .reason(),
        "binding_mismatch"
    );

    // A DPoP route without a token challenges with DPoP; a bad token there too.
    let a = check(&mut c, get("/dpop/7")).await;
    assert_eq!(a.http_status, 401);
    assert!(
        a.challenge()
            .starts_with("DPoP realm=\"valet\", algs=\"RS256"),
        "{}",
        a.challenge()
    );
    let a = check(&mut c, get("/dpop/7").bearer(&rs256("orders:read"))).await;
    assert_eq!(a.reason(), "unbound_token");
    assert!(a.challenge().starts_with("DPoP "));
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Tokens bound by the real oidc-provider (DPoP and certificate), verified by Valet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_bound_by_a_real_openid_provider() {
    let idp = Idp::shared();
    let config = format!(
        "providers:\n  - name: idp\n    issuer: {}\n    audiences: [\"{ORDERS}\"]\n    jwks: {{ discovery: true }}\nroutes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read], binding: any }}\n",
        idp.issuer
    );
    let v = Valet::in_process_ready(&config).await;
    let mut c = v.client().await;

    let key = DpopKey::generate();
    let for_idp = key.proof("POST", &idp.token_endpoint(), None);
    let t = idp.dpop_token(ORDERS, "orders:read", &for_idp).await;
    let htu = format!("{URL}/orders/1");
    let a = check(
        &mut c,
        get("/orders/1").dpop(&t, &key.proof("GET", &htu, Some(&t))),
    )
    .await;
    assert_eq!(a.reason(), "verified", "{a:?}");
    let a = check(&mut c, get("/orders/1").bearer(&t)).await;
    assert_eq!(a.reason(), "binding_mismatch");

    let m = idp.mtls_token(ORDERS, "orders:read", CLIENT_CERT_PEM).await;
    let a = check(
        &mut c,
        get("/orders/1")
            .bearer(&m)
            .certificate(&urlencode(CLIENT_CERT_PEM)),
    )
    .await;
    assert_eq!(a.reason(), "verified", "{a:?}");
    let a = check(&mut c, get("/orders/1").bearer(&m)).await;
    assert_eq!(a.reason(), "binding_mismatch");
    let plain = idp.token(ORDERS, "orders:read").await;
    assert_eq!(
        check(&mut c, get("/orders/1").bearer(&plain))
            .await
            .reason(),
        "unbound_token"
    );
}

/// A DPoP proof spent before a policy reload stays spent after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_proofs_stay_spent_across_policy_reloads() {
    let v = Valet::in_process(CONFIG);
    let mut c = v.client().await;
    let key = DpopKey::generate();
    let t = bound(json!({"jkt": key.thumbprint()}));
    let proof = key.proof("GET", &format!("{URL}/dpop/1"), Some(&t));
    assert!(
        check(&mut c, get("/dpop/1").dpop(&t, &proof))
            .await
            .allowed()
    );

    let path = v.dir.path().join("valet.yaml");
    let tmp = v.dir.path().join("valet.yaml.tmp");
    std::fs::write(&tmp, with_free_ports(&format!("{CONFIG}default: deny\n"))).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(
        v.wait_metric(
            "valet_policy_generation",
            2.0,
            std::time::Duration::from_secs(10)
        )
        .await,
        "no reload:\n{}",
        v.logs()
    );
    let a = check(&mut c, get("/dpop/1").dpop(&t, &proof)).await;
    assert_eq!(a.reason(), "invalid_dpop_proof");
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .contains("already used")
    );
}
