//! Signing keys from PEM files, decoded here rather than by jsonwebtoken's `use_pem`
//! feature: its ASN.1 and date crates were ~13 s of every cold test build, for a
//! few fixture keys. One file, shared by path with the examples and the benches.

use jsonwebtoken::{Algorithm, EncodingKey};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// The private key in `pem` as a signing key for `alg`, in the DER form
/// jsonwebtoken takes for it: PKCS#1 for RSA (a PKCS#8 file is unwrapped, as
/// `EncodingKey::from_rsa_pem` did), PKCS#8 for EC and Ed25519.
pub fn encoding_key(pem: &[u8], alg: Algorithm) -> Result<EncodingKey, String> {
    use Algorithm::*;
    let der =
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("not a PEM private key: {e}"))?;
    match (alg, &der) {
        (RS256 | RS384 | RS512 | PS256 | PS384 | PS512, PrivateKeyDer::Pkcs1(k)) => {
            Ok(EncodingKey::from_rsa_der(k.secret_pkcs1_der()))
        }
        (RS256 | RS384 | RS512 | PS256 | PS384 | PS512, PrivateKeyDer::Pkcs8(k)) => {
            let pkcs1 = pkcs8_private_key(k.secret_pkcs8_der()).ok_or("malformed PKCS#8 key")?;
            Ok(EncodingKey::from_rsa_der(pkcs1))
        }
        (ES256 | ES384, PrivateKeyDer::Pkcs8(k)) => {
            Ok(EncodingKey::from_ec_der(k.secret_pkcs8_der()))
        }
        (EdDSA, PrivateKeyDer::Pkcs8(k)) => Ok(EncodingKey::from_ed_der(k.secret_pkcs8_der())),
        (HS256 | HS384 | HS512, _) => Err("HMAC keys are secrets, not PEM files".into()),
        (alg, _) => Err(format!("{alg:?} needs a PKCS#8 key (BEGIN PRIVATE KEY)")),
    }
}

/// The `privateKey` OCTET STRING of a PKCS#8 `PrivateKeyInfo`
/// (SEQUENCE { version INTEGER, algorithm SEQUENCE, privateKey OCTET STRING, .. }).
fn pkcs8_private_key(der: &[u8]) -> Option<&[u8]> {
    let (0x30, info, _) = element(der)? else {
        return None;
    };
    let (0x02, _, rest) = element(info)? else {
        return None;
    };
    let (0x30, _, rest) = element(rest)? else {
        return None;
    };
    let (0x04, key, _) = element(rest)? else {
        return None;
    };
    Some(key)
}

/// The DER element at the start of `der`: its tag, its contents, what follows.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | usize::from(b));
        (len, rest)
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}
