//! Path normalisation: the path a route is matched against must be the path the
//! upstream will serve, so `/healthz/../admin` can never ride a public route.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    BadPercentEncoding,
    /// `%2F`, `%5C`, `%00` and friends: servers disagree on what they mean.
    AmbiguousEncoding,
    Backslash,
    ControlCharacter,
    /// `..` above the root.
    EscapesRoot,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "path does not start with /",
            PathError::BadPercentEncoding => "invalid percent-encoding in path",
            PathError::AmbiguousEncoding => "encoded slash, backslash or control character in path",
            PathError::Backslash => "backslash in path",
            PathError::ControlCharacter => "control character in path",
            PathError::EscapesRoot => "path climbs above the root",
        })
    }
}

/// Splits Envoy's `:path` (which carries the query) into the path and the query.
pub fn split_query(raw: &str) -> (&str, &str) {
    let raw = raw.split_once('#').map_or(raw, |(p, _)| p);
    raw.split_once('?').unwrap_or((raw, ""))
}

/// RFC 3986 normalisation: decode percent-encoded unreserved characters, upper-case
/// the remaining escapes, merge repeated slashes, resolve `.` and `..`.
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = true;
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::EscapesRoot);
                }
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
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
                if value.is_ascii_alphanumeric() || b"-._~".contains(&value) {
                    out.push(value as char);
                } else if value == b'/' || value == b'\\' || value < 0x20 || value == 0x7f {
                    return Err(PathError::AmbiguousEncoding);
                } else {
                    out.push('%');
                    out.push(hex[0].to_ascii_uppercase() as char);
                    out.push(hex[1].to_ascii_uppercase() as char);
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b if b < 0x20 || b == 0x7f => return Err(PathError::ControlCharacter),
            _ => {
                // Copy the whole run up to the next special byte (keeps UTF-8 intact).
                let end = bytes[i..]
                    .iter()
                    .position(|c| *c == b'%' || *c == b'\\' || *c < 0x20 || *c == 0x7f)
                    .map_or(bytes.len(), |p| i + p);
                out.push_str(&path[i..end]);
                i = end;
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
    fn normalises_like_rfc_3986() {
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
            ("/a%3a%3A", "/a%3A%3A"),
            ("/caf\u{e9}", "/caf\u{e9}"),
            ("/a/.", "/a/"),
            ("/a/b/../../c", "/c"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_normalised_safely() {
        let cases = [
            ("orders", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("/..", PathError::EscapesRoot),
            ("/a/../../b", PathError::EscapesRoot),
            ("/%2e%2e/x", PathError::EscapesRoot),
            ("/a%2Fb", PathError::AmbiguousEncoding),
            ("/a%5cb", PathError::AmbiguousEncoding),
            ("/a%00", PathError::AmbiguousEncoding),
            ("/a%zz", PathError::BadPercentEncoding),
            ("/a%4", PathError::BadPercentEncoding),
            ("/a\\..\\admin", PathError::Backslash),
            ("/a\tb", PathError::ControlCharacter),
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
