//! JWT verification against a provider's current keys: header, issuer, key,
//! signature, then time and audience. No fetching, no route policy.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value};

use std::sync::Arc;

use prost::bytes::Bytes;

use crate::decision::Reason;
use crate::introspection::Answer;
use crate::jwks::KeyCell;
use crate::policy::require::audience_contains;
use crate::provider::{Provider, algorithm_by_name};
use crate::stores::Snapshot;
use crate::stores::cache::{Extras, VerifiedCache};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Malformed(&'static str),
    #[error("{0}")]
    UnsupportedAlgorithm(&'static str),
    #[error("issuer not allowed")]
    IssuerNotAllowed,
    #[error("unknown key")]
    UnknownKey,
    /// No `kid`, and several keys of the set fit the algorithm.
    #[error("no kid, several keys")]
    AmbiguousKey,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("audience not allowed")]
    AudienceNotAllowed,
    #[error("keys unavailable")]
    KeysUnavailable,
    #[error("token not active")]
    Inactive,
    /// Not a JWT, and no API key of an allowed provider.
    #[error("unknown API key")]
    UnknownApiKey,
    /// Not an answer: the token must be introspected first (the service does it
    /// and decides again).
    #[error("introspection pending")]
    IntrospectionPending,
}

impl VerifyError {
    pub fn reason(self) -> Reason {
        match self {
            VerifyError::Malformed(_) => Reason::MalformedToken,
            VerifyError::UnsupportedAlgorithm(_) => Reason::UnsupportedAlgorithm,
            VerifyError::IssuerNotAllowed => Reason::IssuerNotAllowed,
            VerifyError::UnknownKey | VerifyError::AmbiguousKey => Reason::UnknownKey,
            VerifyError::BadSignature => Reason::BadSignature,
            VerifyError::Expired => Reason::Expired,
            VerifyError::NotYetValid => Reason::NotYetValid,
            VerifyError::AudienceNotAllowed => Reason::AudienceNotAllowed,
            VerifyError::KeysUnavailable => Reason::KeysUnavailable,
            VerifyError::Inactive => Reason::InactiveToken,
            VerifyError::UnknownApiKey => Reason::UnknownApiKey,
            VerifyError::IntrospectionPending => Reason::IntrospectionUnavailable,
        }
    }
}

/// What went wrong, and as far as it got: the provider and kid, for logs.
#[derive(Debug)]
pub struct Failed {
    pub error: VerifyError,
    pub provider: Option<usize>,
    pub kid: Option<Arc<str>>,
}

#[derive(Debug)]
pub struct Verified {
    /// Index into the policy's providers.
    pub provider: usize,
    pub kid: Option<Arc<str>>,
    pub claims: Arc<Map<String, Value>>,
    /// The provider's `metadata_claims` of `claims`, encoded for Envoy: once per
    /// verified token (kept in the verified-token cache), not per Check.
    pub metadata: Option<Bytes>,
    /// The provider's `claims_to_headers` of `claims`, also once per verified token.
    pub headers: Arc<[(String, String)]>,
}

/// A token that is not a JWT, as an API key of an allowed provider: its claims
/// (the digest looked up, see `api_keys`), or `UnknownApiKey` when some allowed
/// provider takes keys and none knows it and no provider introspects; `None`
/// when no allowed provider takes API keys.
fn api_key(
    token: &str,
    policy: &Snapshot,
    allowed: &[usize],
    seen_provider: &mut Option<usize>,
) -> Option<Result<Verified, VerifyError>> {
    let mut takes_keys = false;
    for (index, provider) in policy.providers.iter().enumerate() {
        if provider.api_keys.is_none() || !(allowed.is_empty() || allowed.contains(&index)) {
            continue;
        }
        takes_keys = true;
        let Some(Some(keys)) = policy.stores.api_keys.get(index) else {
            continue;
        };
        if let Some(claims) = keys.current().lookup(token) {
            *seen_provider = Some(index);
            return Some(Ok(Verified {
                provider: index,
                kid: None,
                metadata: crate::response::claims_metadata(claims, &provider.metadata_claims),
                headers: super::claim_headers(provider, claims),
                claims: claims.clone(),
            }));
        }
    }
    (takes_keys && introspecting(policy, allowed).is_none())
        .then_some(Err(VerifyError::UnknownApiKey))
}

/// The first allowed provider that introspects, for tokens that are not JWTs.
fn introspecting(policy: &Snapshot, allowed: &[usize]) -> Option<usize> {
    policy
        .providers
        .iter()
        .enumerate()
        .find(|(i, p)| p.introspection.is_some() && (allowed.is_empty() || allowed.contains(i)))
        .map(|(i, _)| i)
}

/// The cached introspection answer, checked like a JWT's claims: time, issuer,
/// audience. A miss is `IntrospectionPending`: the service introspects and asks again.
fn introspected(
    token: &str,
    policy: &Snapshot,
    index: usize,
    now: u64,
    given: Option<&Answer>,
) -> Result<Verified, VerifyError> {
    let provider = &policy.providers[index];
    if provider.introspection.is_none() {
        return Err(VerifyError::Malformed(
            "not a JWT (three dot-separated parts)",
        ));
    }
    let Some(introspector) = &policy.stores.introspectors[index] else {
        return Err(VerifyError::IntrospectionPending);
    };
    let answer = match given {
        Some(a) => Some(a.clone()),
        None => introspector.cached(token),
    };
    let claims = match answer {
        None => return Err(VerifyError::IntrospectionPending),
        Some(Answer::Inactive) => return Err(VerifyError::Inactive),
        Some(Answer::Active(claims)) => claims,
    };
    let time = |name: &str| claims.get(name).and_then(Value::as_f64);
    let skew = provider.clock_skew_secs as f64;
    if time("exp").is_some_and(|exp| exp <= now as f64) {
        return Err(VerifyError::Expired);
    }
    if time("nbf").is_some_and(|nbf| nbf > now as f64 + skew) {
        return Err(VerifyError::NotYetValid);
    }
    if claims.get("iss").and_then(Value::as_str) != Some(provider.issuer.as_str()) {
        return Err(VerifyError::IssuerNotAllowed);
    }
    if !provider.audiences.is_empty() && !audience_contains(&claims, &provider.audiences) {
        return Err(VerifyError::AudienceNotAllowed);
    }
    let metadata = crate::response::claims_metadata(&claims, &provider.metadata_claims);
    let headers = super::claim_headers(provider, &claims);
    Ok(Verified {
        provider: index,
        kid: None,
        claims,
        metadata,
        headers,
    })
}

/// The JOSE header, as far as Valet reads it. Fields that ask the verifier to
/// fetch or trust a key from the token itself, or to understand extensions, are
/// recorded only to refuse them. Duplicate known fields fail to parse.
#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    crit: Option<IgnoredAny>,
    jku: Option<IgnoredAny>,
    jwk: Option<IgnoredAny>,
    x5u: Option<IgnoredAny>,
    x5c: Option<IgnoredAny>,
    enc: Option<IgnoredAny>,
    zip: Option<IgnoredAny>,
}

/// Verifies `token` for one of `allowed` providers (indices; empty means any).
pub fn verify(
    token: &str,
    policy: &Snapshot,
    allowed: &[usize],
    now: u64,
    introspected: Option<&Answer>,
) -> Result<Verified, Failed> {
    let mut provider = None;
    let mut kid = None;
    verify_inner(
        token,
        policy,
        allowed,
        now,
        introspected,
        &mut provider,
        &mut kid,
    )
    .map_err(|error| Failed {
        error,
        provider,
        kid,
    })
}

fn verify_inner(
    token: &str,
    policy: &Snapshot,
    allowed: &[usize],
    now: u64,
    given: Option<&Answer>,
    seen_provider: &mut Option<usize>,
    seen_kid: &mut Option<Arc<str>>,
) -> Result<Verified, VerifyError> {
    // A token seen before, verified by the key set in force, under this policy.
    let hash = policy
        .stores
        .verified
        .enabled()
        .then(|| VerifiedCache::hash(token));
    if let Some(hash) = &hash
        && let Some(hit) = policy.stores.verified.get(hash, now)
        && (allowed.is_empty() || allowed.contains(&hit.provider))
        && policy
            .stores
            .keys
            .get(hit.provider)
            .and_then(|k| k.load())
            .is_some_and(|k| k.id() == hit.keyset)
    {
        *seen_provider = Some(hit.provider);
        seen_kid.clone_from(&hit.kid);
        return Ok(Verified {
            provider: hit.provider,
            kid: hit.kid.clone(),
            claims: hit.claims.clone(),
            metadata: hit.metadata.clone(),
            headers: hit.headers.clone(),
        });
    }
    // A JWS is three base64url parts without padding (RFC 7515 §2) and a JSON
    // header. Anything else is an opaque token (the wider RFC 6750 alphabet), for
    // an allowed provider that can introspect it.
    let mut split = token.split('.');
    let parts = match (split.next(), split.next(), split.next(), split.next()) {
        (Some(h), Some(p), Some(s), None) => Some((h, p, s)),
        _ => None,
    };
    let base64url = |p: &str| {
        p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let clean = parts.is_some_and(|(h, p, s)| base64url(h) && base64url(p) && base64url(s));
    let jws = parts
        .filter(|_| clean)
        .and_then(|(h, p, s)| Some((decode_json::<Header>(h)?, p, s)));
    let Some((header, payload_b64, signature_b64)) = jws else {
        if let Some(found) = api_key(token, policy, allowed, seen_provider) {
            return found;
        }
        if let Some(index) = introspecting(policy, allowed) {
            *seen_provider = Some(index);
            return introspected(token, policy, index, now, given);
        }
        return Err(VerifyError::Malformed(match parts {
            None if token.split('.').count() == 5 => "encrypted tokens (JWE) are not accepted",
            None => "not a JWT (three dot-separated parts)",
            Some(_) if !clean => "token has characters outside base64url",
            Some(_) => "unreadable header",
        }));
    };
    let kid: Option<Arc<str>> = header.kid.as_deref().map(Arc::from);
    seen_kid.clone_from(&kid);
    if header.alg.eq_ignore_ascii_case("none") {
        return Err(VerifyError::UnsupportedAlgorithm(
            "unsigned tokens are not accepted",
        ));
    }
    let Some(alg) = algorithm_by_name(&header.alg) else {
        return Err(VerifyError::UnsupportedAlgorithm("unsupported algorithm"));
    };
    if header.crit.is_some() {
        return Err(VerifyError::Malformed(
            "crit header parameters are not supported",
        ));
    }
    if header.jku.is_some() || header.jwk.is_some() || header.x5u.is_some() || header.x5c.is_some()
    {
        return Err(VerifyError::Malformed(
            "keys named by the token are never trusted",
        ));
    }
    if header.enc.is_some() || header.zip.is_some() {
        return Err(VerifyError::Malformed(
            "encrypted tokens (JWE) are not accepted",
        ));
    }

    // Refused unread when no provider the route takes could accept this `alg`.
    let takes = |p: &Provider| {
        p.algorithms.contains(&alg) || p.introspection.as_ref().is_some_and(|i| i.jwts)
    };
    let any_takes = policy
        .providers
        .iter()
        .enumerate()
        .any(|(i, p)| (allowed.is_empty() || allowed.contains(&i)) && takes(p));
    if !any_takes {
        return Err(VerifyError::UnsupportedAlgorithm(
            "algorithm not allowed for this issuer",
        ));
    }

    // Only `iss` is read before the signature (it names the keys): no claim is
    // built, whatever the token carries, until the signature holds.
    let Some(iss) = decode_issuer(payload_b64) else {
        return Err(VerifyError::Malformed("unreadable claims"));
    };
    let Some(iss) = iss else {
        return Err(VerifyError::IssuerNotAllowed);
    };
    let found = policy
        .providers
        .iter()
        .enumerate()
        .find(|(i, p)| p.issuer == iss && (allowed.is_empty() || allowed.contains(i)));
    let Some((index, provider)) = found else {
        return Err(VerifyError::IssuerNotAllowed);
    };
    *seen_provider = Some(index);
    // The issuer asked for its JWTs to be introspected too (e.g. to see revocations).
    if provider.introspection.as_ref().is_some_and(|i| i.jwts) {
        return introspected(token, policy, index, now, given);
    }

    if !provider.algorithms.contains(&alg) {
        return Err(VerifyError::UnsupportedAlgorithm(
            "algorithm not allowed for this issuer",
        ));
    }

    let keyset = check_signature(
        provider,
        &policy.stores.keys[index],
        header.kid.as_deref(),
        alg,
        token,
        signature_b64,
    )?;
    let claims: Map<String, Value> = match decode_json(payload_b64) {
        Some(c) => c,
        None => return Err(VerifyError::Malformed("unreadable claims")),
    };
    let exp = check_time(&claims, provider.clock_skew_secs, now)?;
    if !provider.audiences.is_empty() && !audience_contains(&claims, &provider.audiences) {
        return Err(VerifyError::AudienceNotAllowed);
    }
    let metadata = crate::response::claims_metadata(&claims, &provider.metadata_claims);
    let headers = super::claim_headers(provider, &claims);
    let claims = Arc::new(claims);
    if let Some(hash) = hash {
        // Until exp exactly (fractions dropped), and never for more than a day.
        let until = (exp.max(0.0) as u64).min(now + 86_400);
        policy.stores.verified.insert(
            hash,
            token.len(),
            index,
            keyset,
            kid.clone(),
            claims.clone(),
            Extras {
                metadata: metadata.clone(),
                headers: headers.clone(),
            },
            until,
            now,
        );
    }
    Ok(Verified {
        provider: index,
        kid,
        claims,
        metadata,
        headers,
    })
}

/// The `iss` of a JWT payload, without building the claims: `None` when the
/// payload is not a JSON object, `Some(None)` when it has no string `iss`. Like
/// a full parse, the last `iss` wins.
fn decode_issuer(b64: &str) -> Option<Option<String>> {
    struct Issuer(Option<String>);
    struct IsIss(bool);
    impl<'de> Deserialize<'de> for IsIss {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = IsIss;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a claim name")
                }
                fn visit_str<E>(self, v: &str) -> Result<IsIss, E> {
                    Ok(IsIss(v == "iss"))
                }
            }
            d.deserialize_str(V)
        }
    }
    impl<'de> Deserialize<'de> for Issuer {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Issuer;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Issuer, A::Error> {
                    let mut iss = None;
                    while let Some(IsIss(is)) = map.next_key()? {
                        if is {
                            iss = match map.next_value::<Value>()? {
                                Value::String(s) => Some(s),
                                _ => None,
                            };
                        } else {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                    Ok(Issuer(iss))
                }
            }
            d.deserialize_map(V)
        }
    }
    decode_json::<Issuer>(b64).map(|i| i.0)
}

fn decode_json<T: serde::de::DeserializeOwned>(b64: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(b64).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn check_signature(
    provider: &Provider,
    cell: &KeyCell,
    kid: Option<&str>,
    alg: Algorithm,
    token: &str,
    signature_b64: &str,
) -> Result<u64, VerifyError> {
    let keys = cell.load().ok_or(VerifyError::KeysUnavailable)?;
    if keys.is_empty() {
        return Err(VerifyError::KeysUnavailable);
    }
    let key = match kid {
        Some(kid) => keys.get(kid).ok_or(VerifyError::UnknownKey)?,
        None => keys.only_key_for(alg).map_err(|n| match n {
            0 => VerifyError::UnknownKey,
            _ => VerifyError::AmbiguousKey,
        })?,
    };
    if !key.accepts(alg) {
        return Err(VerifyError::UnsupportedAlgorithm(
            "algorithm does not fit the key",
        ));
    }
    // Unpadded base64url of exactly the signature's length; anything else
    // cannot verify, so the crypto is not run for it.
    if signature_b64.len() != (key.signature_len(alg) * 4).div_ceil(3) {
        return Err(VerifyError::BadSignature);
    }
    // The signed message is everything before the last dot.
    let message = &token.as_bytes()[..token.len() - signature_b64.len() - 1];
    // The length was checked above, so this decodes into a fixed buffer.
    let mut signature = [0u8; 1032];
    let valid = match URL_SAFE_NO_PAD.decode_slice(signature_b64, &mut signature) {
        Ok(n) => key.verify(alg, message, &signature[..n]),
        Err(_) => false,
    };
    cell.count_signature(&provider.name, valid);
    if valid {
        Ok(keys.id())
    } else {
        Err(VerifyError::BadSignature)
    }
}

/// `exp` is required, `nbf` honoured, both with the provider's skew. NumericDate
/// may be fractional (RFC 7519 §2).
/// Returns `exp`.
fn check_time(claims: &Map<String, Value>, skew: u64, now: u64) -> Result<f64, VerifyError> {
    let number = |name: &str| match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(VerifyError::Malformed("exp, nbf and iat must be numbers")),
    };
    let now = now as f64;
    let skew = skew as f64;
    let exp = number("exp")?.ok_or(VerifyError::Malformed("exp claim is required"))?;
    if now >= exp + skew {
        return Err(VerifyError::Expired);
    }
    if let Some(nbf) = number("nbf")?
        && nbf > now + skew
    {
        return Err(VerifyError::NotYetValid);
    }
    number("iat")?;
    Ok(exp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn time_checks_honour_skew() {
        let now = 1_000_000;
        assert!(check_time(&claims(json!({"exp": now + 10})), 0, now).is_ok());
        assert_eq!(
            check_time(&claims(json!({"exp": now})), 0, now),
            Err(VerifyError::Expired)
        );
        assert!(check_time(&claims(json!({"exp": now - 30})), 60, now).is_ok());
        assert_eq!(
            check_time(&claims(json!({"exp": now - 60})), 60, now),
            Err(VerifyError::Expired)
        );
        assert!(check_time(&claims(json!({"exp": now as f64 + 0.5})), 0, now).is_ok());
        assert!(check_time(&claims(json!({"exp": 1e300})), 0, now).is_ok());
        assert!(check_time(&claims(json!({"exp": now + 100, "nbf": now + 30})), 60, now).is_ok());
        assert_eq!(
            check_time(&claims(json!({"exp": now + 100, "nbf": now + 61})), 60, now),
            Err(VerifyError::NotYetValid)
        );
        assert!(matches!(
            check_time(&claims(json!({})), 60, now),
            Err(VerifyError::Malformed(_))
        ));
        assert!(matches!(
            check_time(&claims(json!({"exp": "tomorrow"})), 60, now),
            Err(VerifyError::Malformed(_))
        ));
        assert!(matches!(
            check_time(&claims(json!({"exp": now + 100, "iat": [1]})), 60, now),
            Err(VerifyError::Malformed(_))
        ));
    }
}
