//! The canonical form of a request path: the one spelling that route matching,
//! `check-config`, `explain`, `valet test` and the generated proxy configs agree
//! on, whatever spelling the client sent.
//!
//! - Escapes of characters a path segment may carry as they are (RFC 3986
//!   `pchar`: unreserved, sub-delims, `:` and `@`) are decoded: `/%61dmin` is
//!   `/admin`, `/v1/users%3Asearch` is `/v1/users:search`. Upstreams that decode
//!   before routing serve both spellings as one resource, so Valet matches them
//!   as one.
//! - Every other byte outside `pchar` (non-ASCII, space, `"`, `<`, `>`, `[`, `]`,
//!   `^`, `` ` ``, `{`, `|`, `}`, `%` itself) is percent-encoded with upper-case
//!   hex, whether it came raw or escaped in either case: `/café`, `/caf%c3%a9`
//!   and `/caf%C3%A9` are all `/caf%C3%A9`.
//! - Escaped `/` and `\`, a backslash, and control characters (raw or escaped,
//!   `%00`-`%1F`, `%7F`) are refused: servers disagree on what they mean.
//! - Repeated slashes merge; `.` and `..` segments (escaped or not) are removed
//!   as RFC 3986 section 5.2.4 does (`..` at the root stays at the root).
//!
//! The result is ASCII, and a canonical path is its own canonical form.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    BadPercentEncoding,
    /// `%2F`, `%5C`, `%00` and friends: servers disagree on what they mean.
    AmbiguousEncoding,
    Backslash,
    ControlCharacter,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "path does not start with /",
            PathError::BadPercentEncoding => "invalid percent-encoding in path",
            PathError::AmbiguousEncoding => "encoded slash, backslash or control character in path",
            PathError::Backslash => "backslash in path",
            PathError::ControlCharacter => "control character in path",
        })
    }
}

/// Splits Envoy's `:path` (which carries the query) into the path and the query.
pub fn split_query(raw: &str) -> (&str, &str) {
    let raw = raw.split_once('#').map_or(raw, |(p, _)| p);
    raw.split_once('?').unwrap_or((raw, ""))
}

/// A byte a path segment carries as it is (RFC 3986 `pchar` without escapes).
pub fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)
}

/// The canonical form of `path` (see the module's documentation).
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = canonical_bytes(path)?;
    // RFC 3986 5.2.4 first, with empty segments counted as segments (as Envoy's
    // normalize_path does: `/admin//..` is `/admin/`), then repeated slashes
    // merged (Envoy's merge_slashes).
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        match segment {
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            s => {
                segments.push(s);
                trailing_slash = s.is_empty();
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in segments.iter().filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escaped(out: &mut String, b: u8) {
    out.push('%');
    out.push(HEX[usize::from(b >> 4)] as char);
    out.push(HEX[usize::from(b & 0xf)] as char);
}

/// Escapes decoded or encoded as the canonical form says; segments untouched.
fn canonical_bytes(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .ok_or(PathError::BadPercentEncoding)?;
                let value = hex_value(hex[0])
                    .zip(hex_value(hex[1]))
                    .map(|(h, l)| h << 4 | l)
                    .ok_or(PathError::BadPercentEncoding)?;
                if value == b'/' || value == b'\\' || value < 0x20 || value == 0x7f {
                    return Err(PathError::AmbiguousEncoding);
                } else if is_pchar(value) {
                    out.push(value as char);
                } else {
                    push_escaped(&mut out, value);
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b if b < 0x20 || b == 0x7f => return Err(PathError::ControlCharacter),
            b'/' => {
                out.push('/');
                i += 1;
            }
            b if is_pchar(b) => {
                // Copy the whole run of plain bytes at once.
                let end = bytes[i..]
                    .iter()
                    .position(|c| !(is_pchar(*c) || *c == b'/'))
                    .map_or(bytes.len(), |p| i + p);
                out.push_str(&path[i..end]);
                i = end;
            }
            _ => {
                push_escaped(&mut out, b);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_to_one_spelling() {
        let cases = [
            ("/", "/"),
            ("/orders", "/orders"),
            ("/orders/", "/orders/"),
            ("//orders///7", "/orders/7"),
            ("/orders/./7", "/orders/7"),
            ("/orders/7/..", "/orders/"),
            ("/healthz/../admin", "/admin"),
            ("/healthz/%2e%2e/admin", "/admin"),
            ("/healthz/%2E%2e/admin", "/admin"),
            ("/%6Frders", "/orders"),
            ("/a%7e", "/a~"),
            // Reserved characters a segment may carry: decoded.
            ("/a%3a%3A", "/a::"),
            ("/v1/users%3Asearch", "/v1/users:search"),
            ("/%21%24%26%27%28%29%2A%2B%2C%3B%3D%40", "/!$&'()*+,;=@"),
            // Everything else: encoded, upper-case hex, raw or not.
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/men%c3%bc/x", "/men%C3%BC/x"),
            ("/a%25b", "/a%25b"),
            ("/a%3fb%23c", "/a%3Fb%23c"),
            ("/users/a[b]/secret", "/users/a%5Bb%5D/secret"),
            ("/a b", "/a%20b"),
            ("/a%20b", "/a%20b"),
            ("/{x}", "/%7Bx%7D"),
            ("/a/.", "/a/"),
            ("/a/b/../../c", "/c"),
            // Empty segments count before slashes merge, as in Envoy.
            ("/admin//..", "/admin/"),
            ("/public/x///../../orders/7/", "/public/x/orders/7/"),
            ("/other///../v2/users%3asearch", "/other/v2/users:search"),
            ("//healthz/..//orders", "/orders"),
            // RFC 3986 5.2.4: `..` at the root stays at the root.
            ("/..", "/"),
            ("/../healthz", "/healthz"),
            ("/a/../../b", "/b"),
            ("/%2e%2e/x", "/x"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn canonical_paths_are_fixed_points() {
        for raw in [
            "/caf\u{e9}/x",
            "/a%3a/%7e",
            "/men%c3%bc/%2e%2e/x",
            "/a//b/./c/",
            "/users/a[b]",
            "/%25%2525",
        ] {
            let once = normalize(raw).unwrap();
            assert_eq!(normalize(&once).as_deref(), Ok(once.as_str()), "{raw}");
            assert!(once.is_ascii(), "{once}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_normalised_safely() {
        let cases = [
            ("orders", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("/a%2Fb", PathError::AmbiguousEncoding),
            ("/a%2fb", PathError::AmbiguousEncoding),
            ("/a%5cb", PathError::AmbiguousEncoding),
            ("/a%00", PathError::AmbiguousEncoding),
            ("/admin%09", PathError::AmbiguousEncoding),
            ("/admin%0a", PathError::AmbiguousEncoding),
            ("/admin%01", PathError::AmbiguousEncoding),
            ("/admin%7f", PathError::AmbiguousEncoding),
            ("/a%zz", PathError::BadPercentEncoding),
            ("/a%4", PathError::BadPercentEncoding),
            ("/a\\..\\admin", PathError::Backslash),
            ("/a\tb", PathError::ControlCharacter),
            ("/a\u{7f}", PathError::ControlCharacter),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn query_and_fragment_are_split_off() {
        assert_eq!(split_query("/orders?x=1&y"), ("/orders", "x=1&y"));
        assert_eq!(split_query("/orders#frag?no"), ("/orders", ""));
        assert_eq!(split_query("/orders"), ("/orders", ""));
    }
}
