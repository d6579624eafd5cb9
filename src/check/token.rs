//! Finding the token in a request. The token is borrowed, never copied, never logged.

use std::fmt;

use super::binding::Scheme;
use crate::provider::TokenSource;
use crate::request::Request;

pub use crate::policy::MAX_TOKEN_BYTES;

#[derive(Clone, Copy)]
pub struct Token<'a> {
    pub value: &'a str,
    pub source: &'a TokenSource,
    /// `DPoP` when it came as `Authorization: DPoP …` (a proof must go with it).
    pub scheme: Scheme,
}

impl fmt::Debug for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("source", self.source)
            .field("scheme", &self.scheme)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token")]
    Missing,
    #[error("{0}")]
    Malformed(&'static str),
}

/// The first token found, trying `sources` in order.
pub fn extract<'a>(
    req: &Request<'a>,
    sources: impl IntoIterator<Item = &'a TokenSource>,
    max_bytes: usize,
) -> Result<Token<'a>, TokenError> {
    for source in sources {
        let mut scheme = Scheme::Bearer;
        let raw = match source {
            TokenSource::Header { name, prefix } => match req.header(name) {
                Some(value) => match strip_prefix(value, prefix) {
                    Some(rest) => rest.trim(),
                    // Where a bearer token may come, so may a DPoP-bound one (RFC 9449 §7.1).
                    None => match strip_prefix(value, "DPoP ")
                        .filter(|_| prefix.eq_ignore_ascii_case("bearer "))
                    {
                        Some(rest) => {
                            scheme = Scheme::Dpop;
                            rest.trim()
                        }
                        // "Bearer" alone: the scheme is ours but the token is missing.
                        None if value.trim().eq_ignore_ascii_case(prefix.trim())
                            && !prefix.trim().is_empty() =>
                        {
                            ""
                        }
                        // Another scheme (Basic…): not ours.
                        None => continue,
                    },
                },
                None => continue,
            },
            TokenSource::Cookie(name) => match req.cookie(name) {
                Some(v) => v,
                None => continue,
            },
            TokenSource::Query(name) => match req.query_param(name) {
                Some(v) => v,
                None => continue,
            },
        };
        return check_shape(raw, max_bytes).map(|value| Token {
            value,
            source,
            scheme,
        });
    }
    Err(TokenError::Missing)
}

/// Case-insensitive, as HTTP auth schemes are; never slices inside a character.
fn strip_prefix<'v>(value: &'v str, prefix: &str) -> Option<&'v str> {
    let head = value.as_bytes().get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix.as_bytes()) {
        value.get(prefix.len()..)
    } else {
        None
    }
}

/// The bytes of RFC 6750's b64token, as a table: every token byte is looked up
/// (a chain of comparisons per byte was 3% of a cached Check).
static B64TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~' | b'+' | b'/');
        b += 1;
    }
    t
};

fn check_shape(raw: &str, max_bytes: usize) -> Result<&str, TokenError> {
    if raw.is_empty() {
        return Err(TokenError::Malformed("empty token"));
    }
    if raw.len() > max_bytes {
        return Err(TokenError::Malformed("token too large"));
    }
    // RFC 6750 §2.1 b64token: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    // (opaque tokens may be standard base64; a JWT never has the extra characters).
    let body = raw.trim_end_matches('=');
    if body.is_empty() || !body.bytes().all(|b| B64TOKEN[usize::from(b)]) {
        return Err(TokenError::Malformed(
            "token has characters outside base64url",
        ));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::CheckRequest;

    fn check(path: &str, headers: &[(&str, &str)]) -> CheckRequest {
        crate::explain::RequestSpec {
            method: "GET".into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
        .to_check()
    }

    fn found(c: &CheckRequest, sources: &[TokenSource]) -> Result<String, TokenError> {
        let r = Request::from_check(c).unwrap();
        extract(&r, sources, MAX_TOKEN_BYTES).map(|t| t.value.to_string())
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let bearer = [TokenSource::bearer()];
        for h in ["Bearer a.b.c", "bearer a.b.c", "BEARER   a.b.c "] {
            assert_eq!(
                found(&check("/", &[("authorization", h)]), &bearer),
                Ok("a.b.c".into()),
                "{h}"
            );
        }
        assert_eq!(
            found(&check("/", &[("authorization", "Basic dXNlcg==")]), &bearer),
            Err(TokenError::Missing)
        );
        assert_eq!(
            found(&check("/", &[("authorization", "Bearer")]), &bearer),
            Err(TokenError::Malformed("empty token"))
        );
        assert_eq!(
            found(&check("/", &[("authorization", "Bearer ")]), &bearer),
            Err(TokenError::Malformed("empty token"))
        );
        assert_eq!(
            found(&check("/", &[("authorization", "é")]), &bearer),
            Err(TokenError::Missing)
        );
        assert_eq!(found(&check("/", &[]), &bearer), Err(TokenError::Missing));
    }

    #[test]
    fn sources_are_tried_in_order() {
        let sources = [
            TokenSource::Header {
                name: "x-token".into(),
                prefix: String::new(),
            },
            TokenSource::Cookie("access_token".into()),
            TokenSource::Query("access_token".into()),
        ];
        let c = check("/?access_token=q.q.q", &[("cookie", "access_token=c.c.c")]);
        assert_eq!(found(&c, &sources), Ok("c.c.c".into()));
        let c = check("/?access_token=q.q.q", &[]);
        assert_eq!(found(&c, &sources), Ok("q.q.q".into()));
        let c = check(
            "/",
            &[("x-token", "h.h.h"), ("cookie", "access_token=c.c.c")],
        );
        assert_eq!(found(&c, &sources), Ok("h.h.h".into()));
    }

    #[test]
    fn odd_shapes_are_malformed() {
        let bearer = [TokenSource::bearer()];
        let big = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(
            found(&check("/", &[("authorization", &big)]), &bearer),
            Err(TokenError::Malformed("token too large"))
        );
        let two = "Bearer a.b.c,Bearer d.e.f";
        assert!(matches!(
            found(&check("/", &[("authorization", two)]), &bearer),
            Err(TokenError::Malformed(_))
        ));
        // RFC 6750 b64token: standard base64 with padding is a token (opaque tokens).
        let padded = "Bearer ab+c/d~e==";
        assert_eq!(
            found(&check("/", &[("authorization", padded)]), &bearer),
            Ok("ab+c/d~e==".into())
        );
        for bad in ["Bearer a=b", "Bearer ==", "Bearer a b", "Bearer a\"b"] {
            assert!(
                matches!(
                    found(&check("/", &[("authorization", bad)]), &bearer),
                    Err(TokenError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let source = TokenSource::bearer();
        let t = Token {
            value: "secret.token.value",
            source: &source,
            scheme: Scheme::Bearer,
        };
        assert!(!format!("{t:?}").contains("secret"));
    }
}
