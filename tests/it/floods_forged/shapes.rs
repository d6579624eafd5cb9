//! Forged-token shapes an attacker controls, and the policy they are sent
//! against: shared by the flood test (tests/it/floods_forged/) and the cost bench
//! (benches/forged.rs), so both speak of the same tokens.
//!
//! One provider per key set: `{alg}-{n}` holds `n` keys of one kind (kids set in
//! the JWKS, so only a kid-less token has to guess), `rsa4096-4` four RSA-4096
//! keys, `strict` allows RS256 only but publishes an ES384 key too. Forgeries
//! are tokens signed by a key of the set and then altered, so every signature
//! has the right length and shape and only the crypto can tell it is wrong.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

pub const AUDIENCE: &str = "orders-api";
pub const PATH: &str = "/orders/7";
/// Envoy's default limit on a request's headers is 60 KiB in all; the cookie
/// header takes nearly all of it.
pub const COOKIE_HEADER_BYTES: usize = 59 * 1024;

pub struct Shape {
    pub name: String,
    /// Request headers beyond the usual ones (the token's carrier).
    pub headers: Vec<(String, String)>,
    /// The deny reason once verification is bounded.
    pub reason: &'static str,
    /// Signature verifications this Check may cost, at most.
    pub max_verifications: u64,
}

fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys")
}

fn pem(name: &str) -> Vec<u8> {
    let path = keys_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rs256,
    Es256,
    Es384,
    EdDsa,
    Rsa4096,
}

impl Kind {
    pub const SMALL: [Kind; 4] = [Kind::Rs256, Kind::Es256, Kind::Es384, Kind::EdDsa];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Rs256 => "rs256",
            Kind::Es256 => "es256",
            Kind::Es384 => "es384",
            Kind::EdDsa => "eddsa",
            Kind::Rsa4096 => "rsa4096",
        }
    }

    pub fn alg(self) -> Algorithm {
        match self {
            Kind::Rs256 | Kind::Rsa4096 => Algorithm::RS256,
            Kind::Es256 => Algorithm::ES256,
            Kind::Es384 => Algorithm::ES384,
            Kind::EdDsa => Algorithm::EdDSA,
        }
    }

    /// The `i`th key (1-based) of this kind.
    pub fn key(self, i: usize) -> EncodingKey {
        let file = match (self, i) {
            (Kind::Rs256, 1) => "rsa.pem".to_string(),
            (Kind::Es256, 1) => "ec256.pem".to_string(),
            (Kind::Es384, 1) => "ec384.pem".to_string(),
            (Kind::EdDsa, 1) => "ed25519.pem".to_string(),
            (Kind::Rs256, i) => format!("flood/rsa-{i}.pem"),
            (Kind::Es256, i) => format!("flood/ec256-{i}.pem"),
            (Kind::Es384, i) => format!("flood/ec384-{i}.pem"),
            (Kind::EdDsa, i) => format!("flood/ed25519-{i}.pem"),
            (Kind::Rsa4096, i) => format!("flood/rsa4096-{i}.pem"),
        };
        // Parsed once per process: PEM decoding is slow in debug builds.
        static KEYS: OnceLock<Mutex<HashMap<String, EncodingKey>>> = OnceLock::new();
        let keys = KEYS.get_or_init(Default::default);
        if let Some(k) = keys.lock().unwrap().get(&file) {
            return k.clone();
        }
        let key = crate::common::pem_key::encoding_key(&pem(&file), self.alg()).unwrap();
        keys.lock().unwrap().insert(file, key.clone());
        key
    }

    pub fn kid(self, i: usize) -> String {
        format!("{}-k{i}", self.label())
    }
}

pub fn issuer(provider: &str) -> String {
    format!("https://idp.flood/{provider}/")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwk(kind: Kind, i: usize, kid: &str) -> Value {
    let mut jwk = Jwk::from_encoding_key(&kind.key(i), kind.alg()).unwrap();
    jwk.common.key_id = Some(kid.into());
    serde_json::to_value(jwk).unwrap()
}

/// Writes the policy and its JWKS files into `dir`; returns the policy's YAML
/// (no `listen:` section).
pub fn lay_out(dir: &Path) -> String {
    let mut providers = Vec::new();
    let mut sets: Vec<(String, Vec<Value>)> = Vec::new();
    for kind in Kind::SMALL {
        for n in 1..=4 {
            let keys = (1..=n).map(|i| jwk(kind, i, &kind.kid(i))).collect();
            sets.push((format!("{}-{n}", kind.label()), keys));
        }
    }
    let big = Kind::Rsa4096;
    sets.push((
        "rsa4096-4".into(),
        (1..=4).map(|i| jwk(big, i, &big.kid(i))).collect(),
    ));
    sets.push((
        "strict".into(),
        vec![
            jwk(Kind::Rs256, 1, "strict-rsa"),
            jwk(Kind::Es384, 1, "strict-es384"),
        ],
    ));
    for (name, keys) in &sets {
        std::fs::write(
            dir.join(format!("{name}.json")),
            json!({ "keys": keys }).to_string(),
        )
        .unwrap();
        let algorithms = if name == "strict" {
            "\n    algorithms: [RS256]"
        } else {
            ""
        };
        providers.push(format!(
            "  - name: {name}\n    issuer: {}\n    audiences: [{AUDIENCE}]\n    \
             jwks: {{ file: {name}.json }}{algorithms}\n    tokens_from:\n      \
             - {{ header: authorization, prefix: \"Bearer \" }}\n      \
             - {{ cookie: access_token }}\n",
            issuer(name)
        ));
    }
    format!(
        "providers:\n{}routes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n\
         default: deny\n",
        providers.concat()
    )
}

pub fn claims(provider: &str) -> Value {
    let now = now();
    json!({
        "iss": issuer(provider),
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 3600,
        "scope": "orders:read",
    })
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A correctly signed token.
pub fn signed(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64(header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{sig}")
}

/// Signed by `key`, then its claims swapped for `claims`: a well-formed token
/// whose signature only the crypto refuses.
pub fn forged(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let mut original = claims.clone();
    original["sub"] = json!("mallory-original");
    let token = signed(header, &original, key, alg);
    let sig = token.rsplit('.').next().unwrap();
    format!("{}.{}.{sig}", b64(header), b64(claims))
}

fn header(alg: Algorithm, kid: Option<&str>) -> Value {
    let name = serde_json::to_value(alg).unwrap();
    match kid {
        Some(kid) => json!({ "alg": name, "typ": "JWT", "kid": kid }),
        None => json!({ "alg": name, "typ": "JWT" }),
    }
}

fn bearer(token: &str) -> Vec<(String, String)> {
    vec![("authorization".into(), format!("Bearer {token}"))]
}

/// A legitimate token of provider `{kind}-4` (with its kid), and a kid-less one
/// of `{kind}-1` (one key: no guessing needed).
pub fn legit(kind: Kind, with_kid: bool) -> String {
    let (provider, kid) = if with_kid {
        (format!("{}-4", kind.label()), Some(kind.kid(1)))
    } else {
        (format!("{}-1", kind.label()), None)
    };
    signed(
        &header(kind.alg(), kid.as_deref()),
        &claims(&provider),
        &kind.key(1),
        kind.alg(),
    )
}

/// Every forged shape, with what it must come to.
pub fn shapes() -> Vec<Shape> {
    let mut out = Vec::new();
    let shape = |name: String, headers, reason, max: u64| Shape {
        name,
        headers,
        reason,
        max_verifications: max,
    };
    // No kid: with one key of the kind it is tried; with several, refused unread.
    for kind in Kind::SMALL {
        for n in 1..=4 {
            let provider = format!("{}-{n}", kind.label());
            let t = forged(
                &header(kind.alg(), None),
                &claims(&provider),
                &kind.key(1),
                kind.alg(),
            );
            let (reason, max) = if n == 1 {
                ("bad_signature", 1)
            } else {
                ("unknown_key", 0)
            };
            out.push(shape(
                format!("nokid_{}_{n}keys", kind.label()),
                bearer(&t),
                reason,
                max,
            ));
        }
    }
    let rs = Kind::Rs256;
    let rs_key = rs.key(1);
    // A kid the set does not have.
    let t = forged(
        &header(rs.alg(), Some("no-such-kid")),
        &claims("rs256-4"),
        &rs_key,
        rs.alg(),
    );
    out.push(shape("wrong_kid".into(), bearer(&t), "unknown_key", 0));
    // The usual forgery: a real kid, a signature that does not match.
    let t = forged(
        &header(rs.alg(), Some(&rs.kid(1))),
        &claims("rs256-4"),
        &rs_key,
        rs.alg(),
    );
    out.push(shape(
        "bad_signature_rs256".into(),
        bearer(&t),
        "bad_signature",
        1,
    ));
    // 700 claims (just under the 16 KiB token limit once encoded).
    let mut big = claims("rs256-4");
    for i in 0..700 {
        big[format!("c{i}")] = json!(i);
    }
    let t = forged(&header(rs.alg(), Some(&rs.kid(1))), &big, &rs_key, rs.alg());
    assert!(t.len() < 16 * 1024, "700 claims fit the token limit");
    out.push(shape(
        "claims700_rs256".into(),
        bearer(&t),
        "bad_signature",
        1,
    ));
    let es = Kind::Es384;
    let mut big = claims("es384-4");
    for i in 0..700 {
        big[format!("c{i}")] = json!(i);
    }
    let t = forged(&header(es.alg(), None), &big, &es.key(1), es.alg());
    out.push(shape(
        "claims700_nokid_es384_4keys".into(),
        bearer(&t),
        "unknown_key",
        0,
    ));
    // Four RSA-4096 keys: without a kid, and with one.
    let r4 = Kind::Rsa4096;
    let t = forged(
        &header(r4.alg(), None),
        &claims("rsa4096-4"),
        &r4.key(1),
        r4.alg(),
    );
    out.push(shape(
        "nokid_rsa4096_4keys".into(),
        bearer(&t),
        "unknown_key",
        0,
    ));
    let t = forged(
        &header(r4.alg(), Some(&r4.kid(2))),
        &claims("rsa4096-4"),
        &r4.key(2),
        r4.alg(),
    );
    out.push(shape(
        "bad_signature_rsa4096".into(),
        bearer(&t),
        "bad_signature",
        1,
    ));
    // The token last in a cookie header as large as Envoy lets through.
    let t = forged(
        &header(rs.alg(), Some(&rs.kid(1))),
        &claims("rs256-4"),
        &rs_key,
        rs.alg(),
    );
    let mut cookie = String::with_capacity(COOKIE_HEADER_BYTES);
    let mut i = 0;
    while cookie.len() + t.len() + 32 < COOKIE_HEADER_BYTES {
        write!(cookie, "c{i}=v{i}; ").unwrap();
        i += 1;
    }
    write!(cookie, "access_token={t}").unwrap();
    out.push(shape(
        "cookie_60k_token_last".into(),
        vec![("cookie".into(), cookie)],
        "bad_signature",
        1,
    ));
    // Garbage signatures: random bytes of the right length, and of a wrong one.
    let message = format!(
        "{}.{}",
        b64(&header(rs.alg(), Some(&rs.kid(1)))),
        b64(&claims("rs256-4"))
    );
    let noise: Vec<u8> = (0..256u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let t = format!("{message}.{}", URL_SAFE_NO_PAD.encode(&noise));
    out.push(shape(
        "garbage_signature_rs256".into(),
        bearer(&t),
        "bad_signature",
        1,
    ));
    let t = format!("{message}.{}", URL_SAFE_NO_PAD.encode(&noise[..200]));
    out.push(shape(
        "garbage_signature_wrong_length".into(),
        bearer(&t),
        "bad_signature",
        0,
    ));
    let es_message = format!(
        "{}.{}",
        b64(&header(es.alg(), Some(&es.kid(1)))),
        b64(&claims("es384-4"))
    );
    let t = format!("{es_message}.{}", URL_SAFE_NO_PAD.encode(&noise[..96]));
    out.push(shape(
        "garbage_signature_es384".into(),
        bearer(&t),
        "bad_signature",
        1,
    ));
    // ES384 where the issuer allows RS256 only: refused before any crypto.
    let t = forged(
        &header(es.alg(), Some("strict-es384")),
        &claims("strict"),
        &es.key(1),
        es.alg(),
    );
    out.push(shape(
        "alg_not_allowed_es384".into(),
        bearer(&t),
        "unsupported_algorithm",
        0,
    ));
    let mut big = claims("strict");
    for i in 0..700 {
        big[format!("c{i}")] = json!(i);
    }
    let t = forged(
        &header(es.alg(), Some("strict-es384")),
        &big,
        &es.key(1),
        es.alg(),
    );
    out.push(shape(
        "alg_not_allowed_claims700".into(),
        bearer(&t),
        "unsupported_algorithm",
        0,
    ));
    // An issuer nobody configured, and `alg: none`.
    let t = forged(
        &header(rs.alg(), Some(&rs.kid(1))),
        &claims("nobody"),
        &rs_key,
        rs.alg(),
    );
    out.push(shape(
        "unknown_issuer".into(),
        bearer(&t),
        "issuer_not_allowed",
        0,
    ));
    let t = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("rs256-4"))
    );
    out.push(shape(
        "alg_none".into(),
        bearer(&t),
        "unsupported_algorithm",
        0,
    ));
    out
}
