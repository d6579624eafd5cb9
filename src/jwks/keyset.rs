//! A parsed JWKS: every usable verification key, decoded once, by `kid`.

use std::sync::OnceLock;

use aws_lc_rs::signature::{self as lc, ParsedPublicKey, RsaPublicKeyComponents};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

use crate::provider::algorithm_by_name;

#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    #[error("not a JWKS document: {0}")]
    NotJson(String),
    #[error("no `keys` array")]
    NoKeys,
    #[error("no usable key ({0} skipped)")]
    NoUsableKey(usize),
}

/// The kind of key, which decides the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
    Oct,
}

impl KeyKind {
    /// RS/PS with RSA, ES256 with P-256 only, and so on: never an RSA key as an
    /// HMAC secret, never a P-384 key for ES256.
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::P256 => alg == ES256,
            KeyKind::P384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
            KeyKind::Oct => matches!(alg, HS256 | HS384 | HS512),
        }
    }
}

pub struct Key {
    pub kid: Option<String>,
    pub kind: KeyKind,
    /// The key's own `alg`, when the JWKS pins one.
    pub alg: Option<Algorithm>,
    pub decoding: DecodingKey,
    /// Bytes of an RSA signature (the modulus' length); other kinds' follow from the algorithm.
    rsa_bytes: usize,
    /// The key as aws-lc parsed it, per algorithm (RS256 … PS512 for RSA, one for
    /// EC and Ed25519), made on first use: parsing an RSA key on every verify
    /// costs half a verification again. HMAC goes through jsonwebtoken.
    parsed: [OnceLock<Option<ParsedPublicKey>>; 6],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Key {
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }

    /// The length of every signature this key makes with `alg` (RFC 7518 §3):
    /// anything else is refused without running the crypto.
    pub fn signature_len(&self, alg: Algorithm) -> usize {
        use Algorithm::*;
        match (self.kind, alg) {
            (KeyKind::Rsa, _) => self.rsa_bytes,
            (KeyKind::P256 | KeyKind::Ed25519, _) => 64,
            (KeyKind::P384, _) => 96,
            (KeyKind::Oct, HS256) => 32,
            (KeyKind::Oct, HS384) => 48,
            (KeyKind::Oct, _) => 64,
        }
    }

    /// Checks `signature` (raw bytes) over `message` with `alg`, which the
    /// caller has checked the key accepts.
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        use Algorithm::*;
        let (slot, params): (usize, &'static dyn lc::VerificationAlgorithm) = match alg {
            RS256 => (0, &lc::RSA_PKCS1_2048_8192_SHA256),
            RS384 => (1, &lc::RSA_PKCS1_2048_8192_SHA384),
            RS512 => (2, &lc::RSA_PKCS1_2048_8192_SHA512),
            PS256 => (3, &lc::RSA_PSS_2048_8192_SHA256),
            PS384 => (4, &lc::RSA_PSS_2048_8192_SHA384),
            PS512 => (5, &lc::RSA_PSS_2048_8192_SHA512),
            ES256 => (0, &lc::ECDSA_P256_SHA256_FIXED),
            ES384 => (0, &lc::ECDSA_P384_SHA384_FIXED),
            EdDSA => (0, &lc::ED25519),
            _ => {
                let signature = URL_SAFE_NO_PAD.encode(signature);
                return jsonwebtoken::crypto::verify(&signature, message, &self.decoding, alg)
                    .unwrap_or(false);
            }
        };
        let parsed = self.parsed[slot].get_or_init(|| match self.decoding.kind() {
            jsonwebtoken::DecodingKeyKind::RsaModulusExponent { n, e } => {
                let rsa_params = match alg {
                    RS256 => &lc::RSA_PKCS1_2048_8192_SHA256,
                    RS384 => &lc::RSA_PKCS1_2048_8192_SHA384,
                    RS512 => &lc::RSA_PKCS1_2048_8192_SHA512,
                    PS256 => &lc::RSA_PSS_2048_8192_SHA256,
                    PS384 => &lc::RSA_PSS_2048_8192_SHA384,
                    _ => &lc::RSA_PSS_2048_8192_SHA512,
                };
                RsaPublicKeyComponents { n, e }
                    .to_parsed_public_key(rsa_params)
                    .ok()
            }
            jsonwebtoken::DecodingKeyKind::SecretOrDer(bytes) => {
                ParsedPublicKey::new(params, bytes).ok()
            }
        });
        parsed
            .as_ref()
            .is_some_and(|k| k.verify_sig(message, signature).is_ok())
    }
}

#[derive(Default)]
pub struct KeySet {
    /// Unique per parsed set: a cached verification is valid only with the same set.
    id: u64,
    keys: Vec<Key>,
    /// Keys left out, each with its kid (or index) and why: for the loader to log.
    pub skipped: Vec<String>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.kids().collect::<Vec<_>>())
            .finish()
    }
}

impl KeySet {
    pub fn parse(bytes: &[u8]) -> Result<KeySet, KeySetError> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| KeySetError::NotJson(e.to_string()))?;
        let entries = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(KeySetError::NoKeys)?;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut set = KeySet {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        };
        for (i, entry) in entries.iter().enumerate() {
            let kid = entry.get("kid").and_then(Value::as_str).map(str::to_owned);
            let name = kid.clone().unwrap_or_else(|| format!("#{i}"));
            match parse_key(entry) {
                Ok(key) if key.kid.is_some() && set.get(key.kid.as_deref().unwrap()).is_some() => {
                    set.skipped.push(format!("{name}: duplicate kid"));
                }
                Ok(key) => set.keys.push(key),
                Err(why) => set.skipped.push(format!("{name}: {why}")),
            }
        }
        if set.keys.is_empty() {
            return Err(KeySetError::NoUsableKey(set.skipped.len()));
        }
        Ok(set)
    }

    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }

    /// The one key that can verify `alg`, for a token without a `kid`: `Err(n)`
    /// when `n` keys (zero, or several) could. Several are never tried in turn:
    /// each try is a full verification an attacker gets for free.
    pub fn only_key_for(&self, alg: Algorithm) -> Result<&Key, usize> {
        let mut fits = self.keys.iter().filter(|k| k.accepts(alg));
        match (fits.next(), fits.count()) {
            (Some(key), 0) => Ok(key),
            (None, _) => Err(0),
            (Some(_), more) => Err(1 + more),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().filter_map(|k| k.kid.as_deref())
    }
}

fn parse_key(entry: &Value) -> Result<Key, String> {
    let field = |name: &str| entry.get(name).and_then(Value::as_str);
    if field("use").is_some_and(|u| u != "sig") {
        return Err("not a signing key (use is not \"sig\")".into());
    }
    if let Some(ops) = entry.get("key_ops").and_then(Value::as_array)
        && !ops.iter().any(|op| op.as_str() == Some("verify"))
    {
        return Err("key_ops does not include \"verify\"".into());
    }
    let kind = match (field("kty"), field("crv")) {
        (Some("RSA"), _) => KeyKind::Rsa,
        (Some("EC"), Some("P-256")) => KeyKind::P256,
        (Some("EC"), Some("P-384")) => KeyKind::P384,
        (Some("OKP"), Some("Ed25519")) => KeyKind::Ed25519,
        (Some("oct"), _) => KeyKind::Oct,
        (Some(kty), crv) => {
            return Err(format!(
                "unsupported key type {kty}{}",
                crv.map(|c| format!(" ({c})")).unwrap_or_default()
            ));
        }
        (None, _) => return Err("no kty".into()),
    };
    let alg = match field("alg") {
        None => None,
        Some(name) => match algorithm_by_name(name) {
            Some(alg) if kind.fits(alg) => Some(alg),
            Some(_) => return Err(format!("alg {name} does not fit the key type")),
            None => return Err(format!("unsupported alg {name}")),
        },
    };
    // jsonwebtoken's Jwk type does the component decoding; it rejects what it
    // cannot read, which is what we want.
    let jwk: Jwk =
        serde_json::from_value(entry.clone()).map_err(|e| format!("invalid key: {e}"))?;
    let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| format!("invalid key: {e}"))?;
    let mut rsa_bytes = 0;
    if kind == KeyKind::Rsa
        && let jsonwebtoken::DecodingKeyKind::RsaModulusExponent { n, .. } = decoding.kind()
    {
        rsa_bytes = n.iter().skip_while(|b| **b == 0).count();
        // Shorter RSA moduli are forgeable; RFC 7518 requires at least 2048 bits.
        let bits = rsa_bytes * 8;
        if bits < 2048 {
            return Err(format!(
                "RSA key of {bits} bits is too short (2048 at least)"
            ));
        }
    }
    if kind == KeyKind::Oct
        && let jsonwebtoken::DecodingKeyKind::SecretOrDer(secret) = decoding.kind()
        && secret.len() < 32
    {
        return Err("HMAC key shorter than 256 bits".into());
    }
    Ok(Key {
        kid: field("kid").map(str::to_owned),
        kind,
        alg,
        decoding,
        rsa_bytes,
        parsed: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn oct(kid: &str, extra: Value) -> Value {
        let mut key = json!({"kty": "oct", "kid": kid, "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"});
        if let (Some(k), Some(e)) = (key.as_object_mut(), extra.as_object()) {
            k.extend(e.clone());
        }
        key
    }

    #[test]
    fn skips_unusable_keys_and_keeps_the_rest() {
        let doc = json!({"keys": [
            oct("a", json!({})),
            oct("enc", json!({"use": "enc"})),
            {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"},
            {"kty": "XYZ", "kid": "weird"},
            oct("a", json!({})),
            oct("bad-alg", json!({"alg": "RS256"})),
            {"kty": "oct", "kid": "short", "k": "c2hvcnQ"},
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.kids().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(set.skipped.len(), 6, "{:?}", set.skipped);
        assert!(
            set.skipped
                .iter()
                .any(|s| s.starts_with("enc: not a signing key"))
        );
        assert!(
            set.skipped
                .iter()
                .any(|s| s.starts_with("a: duplicate kid"))
        );
    }

    #[test]
    fn rejects_documents_without_usable_keys() {
        assert!(matches!(
            KeySet::parse(b"nope"),
            Err(KeySetError::NotJson(_))
        ));
        assert!(matches!(KeySet::parse(b"{}"), Err(KeySetError::NoKeys)));
        assert!(matches!(
            KeySet::parse(br#"{"keys":[{"kty":"oct","use":"enc","k":"AA"}]}"#),
            Err(KeySetError::NoUsableKey(1))
        ));
    }

    #[test]
    fn key_kinds_fit_only_their_algorithms() {
        assert!(KeyKind::Rsa.fits(Algorithm::PS256));
        assert!(!KeyKind::Rsa.fits(Algorithm::HS256));
        assert!(!KeyKind::P384.fits(Algorithm::ES256));
        assert!(!KeyKind::Oct.fits(Algorithm::RS256));
        assert!(KeyKind::Ed25519.fits(Algorithm::EdDSA));
    }
}
