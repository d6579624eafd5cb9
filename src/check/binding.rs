//! Sender-constrained tokens: a token whose `cnf` names a client certificate
//! (RFC 8705, `x5t#S256`) or a DPoP key (RFC 9449, `jkt`) is accepted only from
//! the holder of that certificate or key. Runs after verification, per request
//! (the verified-token cache holds claims, never a binding decision).

use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::Jwk;
use serde::Deserialize;
use serde_json::{Map, Value};

pub use crate::policy::{Binding, Dpop};
use crate::provider::is_hmac;
use crate::request::{Request, normalize, split_query};
use crate::stores::replay::{ProofId, ReplayCache, Spend};

/// How the token was presented: `Authorization: Bearer` (or any non-DPoP source)
/// or `Authorization: DPoP` with a `DPoP` proof header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Bearer,
    Dpop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The token is bound, and the request does not prove possession (or proves
    /// another key); or a DPoP scheme carries an unbound token.
    #[error("{0}")]
    Mismatch(&'static str),
    /// The route wants a bound token; this one is a plain bearer token.
    #[error("{0}")]
    Unbound(&'static str),
    /// The DPoP proof is missing, malformed, stale, replayed or for another request.
    #[error("{0}")]
    InvalidProof(&'static str),
    /// The proof is good, and the replay cache has no room to spend it.
    #[error("{0}")]
    ReplayFull(&'static str),
}

impl BindingError {
    pub fn reason(self) -> crate::decision::Reason {
        use crate::decision::Reason;
        match self {
            BindingError::Mismatch(_) => Reason::BindingMismatch,
            BindingError::Unbound(_) => Reason::UnboundToken,
            BindingError::InvalidProof(_) => Reason::InvalidDpopProof,
            BindingError::ReplayFull(_) => Reason::DpopReplayFull,
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            BindingError::Mismatch(s)
            | BindingError::Unbound(s)
            | BindingError::InvalidProof(s)
            | BindingError::ReplayFull(s) => s,
        }
    }
}

/// Checks the binding of verified `claims` against the request. `now` is Unix
/// seconds. A DPoP proof that passes is spent in `replay` (this replica), and
/// its id returned, for the fleet's store to spend too when there is one.
#[allow(clippy::too_many_arguments)]
pub fn check(
    req: &Request,
    token: &str,
    scheme: Scheme,
    claims: &Map<String, Value>,
    required: Option<Binding>,
    dpop: &Dpop,
    replay: &ReplayCache,
    now: u64,
) -> Result<Option<ProofId>, BindingError> {
    let cnf = claims.get("cnf").and_then(Value::as_object);
    let x5t = cnf.and_then(|c| c.get("x5t#S256")).and_then(Value::as_str);
    let jkt = cnf.and_then(|c| c.get("jkt")).and_then(Value::as_str);
    let mut spend = None;

    match (scheme, jkt) {
        (Scheme::Dpop, None) => {
            return Err(BindingError::Mismatch(
                "the DPoP scheme needs a DPoP-bound token",
            ));
        }
        (Scheme::Bearer, Some(_)) => {
            // RFC 9449 §7.1: a DPoP-bound token presented as a bearer token is refused.
            return Err(BindingError::Mismatch(
                "a DPoP-bound token must be presented with the DPoP scheme and a proof",
            ));
        }
        (Scheme::Dpop, Some(jkt)) => {
            let proved = proof(req, token, dpop, now)?;
            if proved.thumbprint != jkt {
                return Err(BindingError::Mismatch(
                    "the DPoP proof is signed by another key than the token is bound to",
                ));
            }
            spend = Some(proved);
        }
        (Scheme::Bearer, None) => {}
    }
    if let Some(x5t) = x5t {
        let Some(presented) = certificate_thumbprint(req.peer_certificate) else {
            return Err(BindingError::Mismatch(
                "the token is bound to a client certificate and none was presented",
            ));
        };
        if presented != x5t {
            return Err(BindingError::Mismatch(
                "the token is bound to another client certificate",
            ));
        }
    }
    satisfied(required, claims)?;
    // Last: only a proof whose request passed every binding check uses up its jti.
    if let Some(proved) = spend {
        let id = ReplayCache::id(&proved.thumbprint, &proved.jti);
        match replay.spend(id, now) {
            Spend::Fresh => return Ok(Some(id)),
            Spend::Replayed => {
                return Err(BindingError::InvalidProof(
                    "the DPoP proof was already used",
                ));
            }
            Spend::Full => {
                // Forgetting a spent proof would allow its replay: refuse instead.
                crate::telemetry::dpop_replay_full();
                return Err(BindingError::ReplayFull(
                    "too many DPoP proofs inside their window; try again shortly",
                ));
            }
        }
    }
    Ok(None)
}

/// Whether verified `claims` are bound as `required` asks (`require.binding`); the
/// binding itself is proved by [`check`].
pub fn satisfied(
    required: Option<Binding>,
    claims: &Map<String, Value>,
) -> Result<(), BindingError> {
    let cnf = claims.get("cnf").and_then(Value::as_object);
    let x5t = cnf.is_some_and(|c| c.get("x5t#S256").is_some_and(Value::is_string));
    let jkt = cnf.is_some_and(|c| c.get("jkt").is_some_and(Value::is_string));
    let ok = match required {
        None => true,
        Some(Binding::Any) => x5t || jkt,
        Some(Binding::Mtls) => x5t,
        Some(Binding::Dpop) => jkt,
    };
    if ok {
        return Ok(());
    }
    Err(BindingError::Unbound(match required {
        Some(Binding::Mtls) => "this route needs a certificate-bound token",
        Some(Binding::Dpop) => "this route needs a DPoP-bound token",
        _ => "this route needs a sender-constrained token",
    }))
}

/// SHA-256 of the DER of the first certificate in Envoy's URL-encoded PEM, base64url.
pub fn certificate_thumbprint(url_encoded_pem: &str) -> Option<String> {
    if url_encoded_pem.is_empty() {
        return None;
    }
    let pem = percent_decode(url_encoded_pem)?;
    let body = pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)?
        .split("-----END CERTIFICATE-----")
        .next()?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let der = STANDARD.decode(b64).ok()?;
    Some(URL_SAFE_NO_PAD.encode(digest(&SHA256, &der)))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

struct Proved {
    thumbprint: String,
    jti: String,
}

#[derive(Deserialize)]
struct ProofHeader {
    typ: Option<String>,
    alg: String,
    jwk: Option<Value>,
}

#[derive(Deserialize)]
struct ProofClaims {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    iat: Option<f64>,
    ath: Option<String>,
}

/// RFC 9449 §4.3: one well-formed proof, signed by the public key it carries,
/// for this method and URL, fresh, and for this access token.
fn proof(req: &Request, token: &str, dpop: &Dpop, now: u64) -> Result<Proved, BindingError> {
    use BindingError::InvalidProof as Bad;
    if req.header_count("dpop") != 1 {
        return Err(Bad(if req.header_count("dpop") == 0 {
            "the DPoP scheme needs a DPoP proof header"
        } else {
            "more than one DPoP proof header"
        }));
    }
    let proof = req.header("dpop").unwrap_or("").trim();
    if proof.len() > 8 * 1024 {
        return Err(Bad("the DPoP proof is too large"));
    }
    let mut parts = proof.split('.');
    let (Some(h), Some(c), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Bad("the DPoP proof is not a JWT"));
    };
    let json = |part: &str| URL_SAFE_NO_PAD.decode(part).ok();
    let header: ProofHeader = json(h)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Bad("the DPoP proof's header is not JSON"))?;
    if header.typ.as_deref() != Some("dpop+jwt") {
        return Err(Bad("the DPoP proof's typ is not dpop+jwt"));
    }
    let alg = crate::provider::algorithm_by_name(&header.alg)
        .filter(|a| !is_hmac(*a) && dpop.algorithms.contains(a))
        .ok_or(Bad("the DPoP proof's algorithm is not accepted"))?;
    let jwk_value = header.jwk.ok_or(Bad("the DPoP proof has no jwk"))?;
    let jwk_obj = jwk_value
        .as_object()
        .ok_or(Bad("the DPoP proof's jwk is not an object"))?;
    if ["d", "p", "q", "dp", "dq", "qi", "k"]
        .iter()
        .any(|k| jwk_obj.contains_key(*k))
    {
        return Err(Bad("the DPoP proof's jwk is not a public key"));
    }
    let thumbprint =
        thumbprint(jwk_obj).ok_or(Bad("the DPoP proof's jwk is not a supported public key"))?;
    let kind_fits = match (
        jwk_obj.get("kty").and_then(Value::as_str),
        jwk_obj.get("crv").and_then(Value::as_str),
    ) {
        (Some("RSA"), _) => matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        (Some("EC"), Some("P-256")) => alg == Algorithm::ES256,
        (Some("EC"), Some("P-384")) => alg == Algorithm::ES384,
        (Some("OKP"), Some("Ed25519")) => alg == Algorithm::EdDSA,
        _ => false,
    };
    if !kind_fits {
        return Err(Bad("the DPoP proof's algorithm does not fit its key"));
    }
    let jwk: Jwk = serde_json::from_value(jwk_value.clone())
        .map_err(|_| Bad("the DPoP proof's jwk does not parse"))?;
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk)
        .map_err(|_| Bad("the DPoP proof's jwk does not parse"))?;
    let message = &proof[..h.len() + 1 + c.len()];
    if !jsonwebtoken::crypto::verify(sig, message.as_bytes(), &key, alg).unwrap_or(false) {
        return Err(Bad("the DPoP proof's signature is invalid"));
    }
    let claims: ProofClaims = json(c)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Bad("the DPoP proof's claims are not JSON"))?;
    let jti = claims
        .jti
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or(Bad("the DPoP proof has no jti"))?;
    if claims.htm.as_deref() != Some(req.method) {
        return Err(Bad("the DPoP proof is for another method"));
    }
    if !htu_matches(claims.htu.as_deref().unwrap_or(""), req) {
        return Err(Bad("the DPoP proof is for another URL"));
    }
    let iat = claims.iat.ok_or(Bad("the DPoP proof has no iat"))?;
    let now = now as f64;
    if iat > now + dpop.skew.as_secs_f64() {
        return Err(Bad("the DPoP proof is issued in the future"));
    }
    if iat < now - dpop.max_age.as_secs_f64() - dpop.skew.as_secs_f64() {
        return Err(Bad("the DPoP proof is too old"));
    }
    let ath = URL_SAFE_NO_PAD.encode(digest(&SHA256, token.as_bytes()));
    if claims.ath.as_deref() != Some(ath.as_str()) {
        return Err(Bad("the DPoP proof is for another access token"));
    }
    Ok(Proved { thumbprint, jti })
}

/// RFC 7638: SHA-256 over the required members in lexicographic order, base64url.
pub fn thumbprint(jwk: &Map<String, Value>) -> Option<String> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    let canonical = match s("kty")? {
        "RSA" => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, s("e")?, s("n")?),
        "EC" => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            s("crv")?,
            s("x")?,
            s("y")?
        ),
        "OKP" => format!(r#"{{"crv":"{}","kty":"OKP","x":"{}"}}"#, s("crv")?, s("x")?),
        _ => return None,
    };
    // The members are base64url or curve names: nothing to escape, but refuse what would need it.
    if canonical.contains('\\') {
        return None;
    }
    Some(URL_SAFE_NO_PAD.encode(digest(&SHA256, canonical.as_bytes())))
}

/// `htu` without query and fragment, compared on scheme, host and normalised path
/// (RFC 9449 §4.3 point 9). Ports are not compared: behind a proxy Envoy often
/// sees another port than the client used.
fn htu_matches(htu: &str, req: &Request) -> bool {
    let Some((scheme, rest)) = htu.split_once("://") else {
        return false;
    };
    let rest = rest.split('#').next().unwrap_or("");
    // The authority ends at the first '/', '?' or '#' (RFC 3986 §3.2).
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], "/"),
        None => (rest, "/"),
    };
    let (path, _) = split_query(path);
    let authority = authority.rsplit('@').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    let scheme_ok = scheme.eq_ignore_ascii_case(req.scheme)
        || req
            .header("x-forwarded-proto")
            .is_some_and(|p| scheme.eq_ignore_ascii_case(p.trim()));
    let host_ok = host.eq_ignore_ascii_case(req.host.trim_start_matches('[').trim_end_matches(']'));
    scheme_ok && host_ok && normalize(path).is_ok_and(|p| p == req.path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn thumbprint_matches_rfc_7638_example() {
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(
            thumbprint(jwk.as_object().unwrap()).as_deref(),
            Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
        );
    }

    #[test]
    fn percent_decoding_and_bad_pem() {
        assert_eq!(percent_decode("a%20b%0A").as_deref(), Some("a b\n"));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%+1"), None);
        assert_eq!(certificate_thumbprint(""), None);
        assert_eq!(certificate_thumbprint("not a pem"), None);
    }
}
