//! The requests: generated from a seed (each case from its own RNG, seeded by the
//! run's seed and the case's index, so any one case can be rebuilt alone), or read
//! from `regressions.txt`. A case is the raw head of an HTTP/1.1 request, with
//! `{token:NAME}` placeholders for tokens minted at run time (they expire).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct Case {
    /// `r3` (regression line 3), `c17` (generated case 17).
    pub id: String,
    /// The request head with placeholders, ending in the blank line; no `x-diff-id`.
    pub head: Vec<u8>,
    /// What went into it, for grouping reports.
    pub tags: Vec<&'static str>,
}

/// The tokens a case may name: `{token:NAME}`.
pub const TOKENS: &[&str] = &["admin", "read", "none", "forged", "expired"];

/// `\r`, `\n`, `\t`, `\\` and `\xNN` for anything else outside printable ASCII.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 16);
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'\\') => out.push(b'\\'),
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'x') => {
                let hex = s.get(i + 2..i + 4).ok_or("truncated \\x escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|e| format!("\\x{hex}: {e}"))?);
                i += 2;
            }
            other => return Err(format!("unknown escape \\{:?}", other.map(|c| *c as char))),
        }
        i += 2;
    }
    Ok(out)
}

/// `regressions.txt`: one escaped request head per line; `#` comments, blank lines.
pub fn regressions(text: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let head =
            unescape(line).unwrap_or_else(|e| panic!("regressions.txt:{}: {e}: {line}", n + 1));
        cases.push(Case {
            id: format!("r{}", n + 1),
            head,
            tags: vec!["regression"],
        });
    }
    cases
}

/// The head as sent: placeholders replaced, `x-diff-id` added as the last header.
pub fn render(head: &[u8], diff_id: &str, token: impl Fn(&str) -> String) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 1024);
    let mut i = 0;
    'outer: while i < head.len() {
        if head[i..].starts_with(b"{token:") {
            for name in TOKENS {
                let ph = format!("{{token:{name}}}");
                if head[i..].starts_with(ph.as_bytes()) {
                    out.extend_from_slice(token(name).as_bytes());
                    i += ph.len();
                    continue 'outer;
                }
            }
        }
        out.push(head[i]);
        i += 1;
    }
    let id = format!("x-diff-id: {diff_id}\r\n");
    match find_last(&out, b"\r\n\r\n") {
        Some(end) => {
            out.splice(end + 2..end + 2, id.bytes());
        }
        None => {
            // Not a well-formed head (a regression may be): add the id at the end.
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

fn find_last(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

// === Generation ===

const METHODS: &[(&str, u32)] = &[
    ("GET", 40),
    ("HEAD", 4),
    ("POST", 8),
    ("PUT", 4),
    ("DELETE", 14),
    ("PATCH", 3),
    ("OPTIONS", 3),
    ("delete", 2),
    ("Delete", 1),
    ("get", 1),
    ("PURGE", 1),
];

/// Paths built from the route literals of the differential policy, and some that
/// no route names.
const BASES: &[&str] = &[
    "/",
    "/healthz",
    "/healthz/x",
    "/men%C3%BC",
    "/men%c3%bc",
    "/men%C3%BC/x",
    "/menü/x",
    "/men%C3%bc/x",
    "/v2/users:search",
    "/v2/users%3asearch",
    "/v2/users%3Asearch",
    "/v2/users",
    "/users/alice/secret",
    "/users/a[b]/secret",
    "/users/%7Bid%7D/secret",
    "/users/alice/secret/x",
    "/orders",
    "/orders/7",
    "/ordersx",
    "/admin",
    "/admin/settings",
    "/adminx",
    "/public",
    "/public/docs",
    "/public/private",
    "/public/private/x",
    "/reports/12",
    "/reports/12/x",
    "/reports/x",
    "/other/thing",
];

/// Path atoms by kind (the kind becomes a tag).
/// Kinds Envoy rejects outright (400) weigh less: they rarely reach the upstream.
const ATOM_WEIGHTS: &[(&str, u32)] = &[
    ("unreserved", 5),
    ("reserved", 5),
    ("escape-reserved", 4),
    ("escape-unreserved", 3),
    ("escape-dot", 2),
    ("escape-slash", 1),
    ("escape-percent", 2),
    ("escape-ctl", 1),
    ("escape-nonascii", 3),
    ("escape-bad", 1),
    ("raw-ctl", 1),
    ("raw-nonascii", 1),
    ("raw-other", 2),
];

const ATOMS: &[(&str, &[&str])] = &[
    ("unreserved", &["a", "x1", "-_.~", "Zz9", "secret", "admin"]),
    (
        "reserved",
        &[
            ":", "@", "!", "$", "&", "'", "(", ")", "*", "+", ",", ";", "=", ":search",
        ],
    ),
    (
        "escape-reserved",
        &[
            "%3a", "%3A", "%40", "%21", "%24", "%26", "%27", "%28", "%29", "%2a", "%2B", "%2c",
            "%3b", "%3D", "%3f", "%23", "%20",
        ],
    ),
    (
        "escape-unreserved",
        &["%61", "%41", "%2d", "%5f", "%7e", "%7E", "%30"],
    ),
    ("escape-dot", &["%2e", "%2E", "%2e%2e", "%2E%2e", ".%2e"]),
    ("escape-slash", &["%2F", "%2f", "%5C", "%5c"]),
    ("escape-percent", &["%25", "%252F", "%2525"]),
    (
        "escape-ctl",
        &[
            "%00", "%09", "%0a", "%0A", "%0d", "%01", "%1f", "%7f", "%7F",
        ],
    ),
    (
        "escape-nonascii",
        &[
            "%C3%BC",
            "%c3%bc",
            "%C3%bc",
            "%E6%97%A5",
            "%e6%97%a5",
            "%ff",
            "%C3",
        ],
    ),
    ("escape-bad", &["%zz", "%", "%4", "%G0"]),
    ("raw-ctl", &["\x01", "\t", "\x7f", "\x1f"]),
    ("raw-nonascii", &["ü", "日", "\u{a0}"]),
    (
        "raw-other",
        &[
            "[", "]", "{", "}", "\"", "<", ">", "|", "^", "`", "\\", "[b]", "{id}",
        ],
    ),
];

const HOSTS: &[(&str, &str)] = &[
    ("api.example.com", "host"),
    ("api.example.com", "host"),
    ("admin.test", "host"),
    ("admin.test", "host"),
    ("ADMIN.TEST", "host-case"),
    ("Admin.Test", "host-case"),
    ("admin.test.", "host-trailing-dot"),
    ("ADMIN.test.", "host-trailing-dot"),
    ("admin.test:8080", "host-port"),
    ("admin.test:", "host-empty-port"),
    ("admin.test.:443", "host-trailing-dot"),
    ("admin.test..", "host-trailing-dot"),
    ("xadmin.test", "host"),
    ("admin.test.evil", "host"),
    ("[::1]", "host-ipv6"),
    ("[::1]:8080", "host-ipv6"),
    ("127.0.0.1", "host-ip"),
    ("admin%2etest", "host-escape"),
    ("", "host-empty"),
];

const TOKEN_HEADERS: &[(&str, &str)] = &[
    ("authorization: Bearer {token:admin}", "token-admin"),
    ("authorization: Bearer {token:admin}", "token-admin"),
    ("Authorization: Bearer {token:admin}", "token-admin"),
    ("authorization: Bearer {token:read}", "token-read"),
    ("authorization: Bearer {token:none}", "token-noscope"),
    ("authorization: Bearer {token:forged}", "token-forged"),
    ("authorization: Bearer {token:expired}", "token-expired"),
    ("AUTHORIZATION: bearer {token:admin}", "token-admin"),
    ("authorization: Bearer junk", "token-junk"),
    ("authorization: Basic YWRtaW46YWRtaW4=", "token-basic"),
];

const IDENTITY_TWINS: &[&str] = &[
    "x-user-id: mallory",
    "X-User-Id: mallory",
    "x_user_id: mallory",
    "x-user_id: mallory",
    "X_USER_ID: mallory",
    "x-user-scope: admin",
    "x_user_scope: admin",
    "X-User_Scope: admin",
];

const FORWARDED: &[&str] = &[
    "x-forwarded-uri: /admin",
    "x-forwarded-method: DELETE",
    "x-forwarded-host: admin.test",
    "x-forwarded-proto: https",
    "x-forwarded-for: 10.0.0.1",
    "x-original-uri: /admin",
    "x-original-method: DELETE",
    "x-original-url: /admin",
    "x-envoy-original-path: /admin",
];

const QUERIES: &[&str] = &[
    "?a=b",
    "?",
    "?x=%2F..%2Fadmin",
    "?/admin",
    "#frag",
    "?q=1#f",
    "?a=%00",
    "??",
];

fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

fn atom(rng: &mut StdRng, tags: &mut Vec<&'static str>) -> String {
    let kind = weighted(rng, ATOM_WEIGHTS);
    let (kind, atoms) = *ATOMS.iter().find(|(k, _)| *k == kind).unwrap();
    tags.push(kind);
    pick(rng, atoms).to_string()
}

/// One to three atoms.
fn segment(rng: &mut StdRng, tags: &mut Vec<&'static str>) -> String {
    let n = rng.random_range(1..=3);
    (0..n).map(|_| atom(rng, tags)).collect()
}

fn hex_escape(b: u8, upper: bool) -> String {
    if upper {
        format!("%{b:02X}")
    } else {
        format!("%{b:02x}")
    }
}

/// Byte offsets of the `/` in `path`, the first excluded.
fn slashes(path: &str) -> Vec<usize> {
    path.match_indices('/').map(|(i, _)| i).skip(1).collect()
}

fn mutate(rng: &mut StdRng, path: &mut String, tags: &mut Vec<&'static str>) {
    match rng.random_range(0..13) {
        0 => {
            // Escape one ASCII character that is not already part of an escape.
            let bytes = path.as_bytes();
            let candidates: Vec<usize> = (1..bytes.len())
                .filter(|&i| {
                    bytes[i].is_ascii()
                        && bytes[i] != b'%'
                        && bytes[i - 1] != b'%'
                        && (i < 2 || bytes[i - 2] != b'%')
                })
                .collect();
            if let Some(&i) = candidates.get(rng.random_range(0..candidates.len().max(1))) {
                let b = path.as_bytes()[i];
                path.replace_range(i..i + 1, &hex_escape(b, rng.random_bool(0.5)));
                tags.push(if b == b'/' {
                    "escape-slash"
                } else {
                    "escape-char"
                });
            }
        }
        1 => {
            // Flip the hex case of the escapes.
            let lower = rng.random_bool(0.5);
            let mut out = String::with_capacity(path.len());
            let mut rest = path.as_str();
            while let Some(p) = rest.find('%') {
                out.push_str(&rest[..p]);
                let esc = rest.get(p..p + 3).unwrap_or("%");
                out.push_str(&if lower {
                    esc.to_ascii_lowercase()
                } else {
                    esc.to_ascii_uppercase()
                });
                rest = &rest[p + esc.len()..];
            }
            out.push_str(rest);
            *path = out;
            tags.push("escape-case");
        }
        2 | 3 | 11 | 12 => {
            let s = segment(rng, tags);
            if !path.ends_with('/') {
                path.push('/');
            }
            path.push_str(&s);
        }
        4 => {
            // A dot segment somewhere.
            let dots = [
                "/.",
                "/x/..",
                "/..",
                "/%2e",
                "/%2E",
                "/x/%2e%2e",
                "/x/.%2E",
                "/%2e%2e",
            ];
            let d = pick(rng, &dots);
            let at = pick(rng, &[slashes(path), vec![path.len()]].concat());
            path.insert_str(at, d);
            tags.push("dots");
        }
        5 => {
            let s = slashes(path);
            let at = if s.is_empty() || rng.random_bool(0.3) {
                0
            } else {
                pick(rng, &s)
            };
            path.insert_str(at, pick(rng, &["/", "//"]));
            tags.push("slashes");
        }
        6 => {
            path.push('/');
            tags.push("trailing-slash");
        }
        7 => {
            // Something stuck to the last segment: `/admin%09`, `/admin;x`.
            let suffix = [
                "%09", "%0a", "%01", "%7f", "%00", "%20", ";x", ".", "%2e", "~", "%2F", "%5C",
            ];
            path.push_str(pick(rng, &suffix));
            tags.push("suffix");
        }
        8 => {
            // Ride an anonymous route up and back down.
            let up = [
                "/public/..",
                "/healthz/..",
                "/public/%2e%2e",
                "/public/x/../..",
                "/public%2F..",
                "/other/..",
            ];
            path.insert_str(0, pick(rng, &up));
            tags.push("traversal");
        }
        9 => {
            // An encoded or raw separator instead of a `/`.
            let s = slashes(path);
            if !s.is_empty() {
                let at = pick(rng, &s);
                path.replace_range(at..at + 1, pick(rng, &["%2F", "%2f", "%5C", "\\"]));
                tags.push("escape-slash");
            }
        }
        _ => {
            // Replace one segment.
            let s = slashes(path);
            let start = if s.is_empty() || rng.random_bool(0.3) {
                0
            } else {
                pick(rng, &s)
            };
            let end = path[start + 1..]
                .find('/')
                .map_or(path.len(), |p| start + 1 + p);
            let seg = segment(rng, tags);
            path.replace_range(start + 1..end, &seg);
            tags.push("segment");
        }
    }
}

fn weighted(rng: &mut StdRng, xs: &[(&'static str, u32)]) -> &'static str {
    let total: u32 = xs.iter().map(|(_, w)| w).sum();
    let mut r = rng.random_range(0..total);
    for (x, w) in xs {
        if r < *w {
            return x;
        }
        r -= w;
    }
    xs[0].0
}

pub fn generate(seed: u64, index: u64) -> Case {
    let mut rng = StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03),
    );
    let mut tags = Vec::new();
    let method = weighted(&mut rng, METHODS);
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        tags.push("method-case");
    }
    let mut path = pick(&mut rng, BASES).to_string();
    for _ in 0..rng.random_range(0..=3) {
        mutate(&mut rng, &mut path, &mut tags);
    }
    if rng.random_bool(0.15) {
        path.push_str(pick(&mut rng, QUERIES));
        tags.push("query");
    }
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if rng.random_bool(0.99) {
        let (host, tag) = pick(&mut rng, HOSTS);
        if tag != "host" {
            tags.push(tag);
        }
        head.push_str(&format!("host: {host}\r\n"));
    } else {
        tags.push("host-missing");
    }
    if rng.random_bool(0.75) {
        let (h, tag) = pick(&mut rng, TOKEN_HEADERS);
        tags.push(tag);
        head.push_str(h);
        head.push_str("\r\n");
    }
    if rng.random_bool(0.12) {
        for _ in 0..rng.random_range(1..=2) {
            head.push_str(pick(&mut rng, IDENTITY_TWINS));
            head.push_str("\r\n");
        }
        tags.push("identity-twin");
    }
    if rng.random_bool(0.15) {
        for _ in 0..rng.random_range(1..=2) {
            head.push_str(pick(&mut rng, FORWARDED));
            head.push_str("\r\n");
        }
        tags.push("forwarded");
    }
    head.push_str("\r\n");
    tags.sort_unstable();
    tags.dedup();
    Case {
        id: format!("c{index}"),
        head: head.into_bytes(),
        tags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips() {
        let b = b"GET /a%09\x01\x7f\\\xc3\xbc HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(unescape(&escape(b)).unwrap(), b);
    }
}
