//! The small view of a `CheckRequest` that the rest of the Check reads: borrowed
//! where it can be, normalised where it must be.

pub mod host;
mod path;
pub mod xfcc;

use std::collections::HashMap;
use std::fmt;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;

pub use path::{PathError, is_pchar, normalize, split_query};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// No `attributes.request.http`: not a request Envoy's HTTP filter sends.
    NoHttpAttributes,
    Path(PathError),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::NoHttpAttributes => f.write_str("no HTTP request attributes"),
            RequestError::Path(e) => e.fmt(f),
        }
    }
}

static EMPTY: std::sync::LazyLock<HashMap<String, String>> = std::sync::LazyLock::new(HashMap::new);

pub struct Request<'a> {
    pub method: &'a str,
    /// Canonical ([`host::canonical`]): lower-case, no port, no trailing dot.
    pub host: String,
    /// Canonical ([`normalize`]), without the query.
    pub path: String,
    /// Raw query string, without `?`.
    pub query: &'a str,
    headers: Headers<'a>,
    /// Envoy's per-route `context_extensions`.
    pub context: &'a HashMap<String, String>,
    /// URL-encoded PEM of the client certificate, when Envoy sends it.
    pub peer_certificate: &'a str,
    /// The peer's authenticated identity (`attributes.source.principal`: the
    /// client certificate's URI SAN, a SPIFFE ID in a mesh); empty when none.
    pub principal: &'a str,
    /// `http` or `https` as the client used it (`:scheme`), for DPoP's `htu`.
    pub scheme: &'a str,
}

/// Envoy sends headers as a map (keys lower-case, repeated headers joined by `,`),
/// or, with `encode_raw_headers`, as a list with raw byte values. Both are read in
/// place, without building a map per Check.
enum Headers<'a> {
    Map(&'a HashMap<String, String>),
    Raw(&'a [envoy_types::pb::envoy::config::core::v3::HeaderValue]),
}

impl<'a> Headers<'a> {
    fn of(http: &'a HttpRequest) -> Self {
        match &http.header_map {
            Some(map) if http.headers.is_empty() => Headers::Raw(&map.headers),
            _ => Headers::Map(&http.headers),
        }
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        match *self {
            Headers::Map(map) => map.get(name).map(String::as_str),
            Headers::Raw(list) => list
                .iter()
                .find(|h| h.key.eq_ignore_ascii_case(name))
                .and_then(|h| {
                    if h.raw_value.is_empty() {
                        Some(h.value.as_str())
                    } else {
                        std::str::from_utf8(&h.raw_value).ok()
                    }
                }),
        }
    }
}

/// A header of `check`'s request by lower-case name, without building a
/// [`Request`] (for the audit trail and tracing, which read a few).
pub fn header_of<'a>(check: &'a CheckRequest, name: &str) -> Option<&'a str> {
    let http = check.attributes.as_ref()?.request.as_ref()?.http.as_ref()?;
    Headers::of(http).get(name)
}

impl<'a> Request<'a> {
    pub fn from_check(check: &'a CheckRequest) -> Result<Self, RequestError> {
        let attributes = check.attributes.as_ref();
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .ok_or(RequestError::NoHttpAttributes)?;
        let headers = Headers::of(http);
        let mut request = Request {
            method: &http.method,
            host: String::new(),
            path: String::new(),
            query: "",
            headers,
            context: attributes.map_or(&*EMPTY, |a| &a.context_extensions),
            peer_certificate: attributes
                .and_then(|a| a.source.as_ref())
                .map_or("", |s| s.certificate.as_str()),
            principal: attributes
                .and_then(|a| a.source.as_ref())
                .map_or("", |s| s.principal.as_str()),
            scheme: &http.scheme,
        };
        let raw_path = if http.path.is_empty() {
            request.header(":path").unwrap_or("")
        } else {
            &http.path
        };
        let (path, query) = split_query(raw_path);
        request.path = normalize(path).map_err(RequestError::Path)?;
        request.query = query;
        if request.scheme.is_empty() {
            request.scheme = request.header(":scheme").unwrap_or("");
        }
        if request.method.is_empty() {
            request.method = request.header(":method").unwrap_or("");
        }
        let host = if http.host.is_empty() {
            request.header(":authority").unwrap_or("")
        } else {
            &http.host
        };
        request.host = host::canonical(host);
        Ok(request)
    }

    /// A request header by lower-case name.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers.get(name)
    }

    /// The first header name (lower-case in a map, as sent in a raw list) for
    /// which `f` holds.
    pub fn find_header_name(&self, mut f: impl FnMut(&str) -> bool) -> Option<&'a str> {
        match self.headers {
            Headers::Map(map) => map.keys().map(String::as_str).find(|n| f(n)),
            Headers::Raw(list) => list.iter().map(|h| h.key.as_str()).find(|n| f(n)),
        }
    }

    /// How many times a header was sent: a map joins repeats with `,`, a raw
    /// list has one entry each. For headers whose values never contain commas.
    pub fn header_count(&self, name: &str) -> usize {
        match self.headers {
            Headers::Map(map) => map.get(name).map_or(0, |v| v.split(',').count()),
            Headers::Raw(list) => list
                .iter()
                .filter(|h| h.key.eq_ignore_ascii_case(name))
                .map(|h| {
                    let v = if h.raw_value.is_empty() {
                        h.value.as_bytes()
                    } else {
                        &h.raw_value
                    };
                    v.split(|b| *b == b',').count()
                })
                .sum(),
        }
    }

    /// A cookie by name, from the `cookie` header. Pairs are separated by `;`
    /// only (Envoy joins repeated cookie headers with `; `): a comma belongs to
    /// a value.
    ///
    /// One pass over the header's bytes, no allocation: a 60 KiB header of
    /// thousands of pairs costs a byte scan, not a search per pair.
    pub fn cookie(&self, name: &str) -> Option<&'a str> {
        let header = self.header("cookie")?;
        let bytes = header.as_bytes();
        let mut start = 0;
        while start <= bytes.len() {
            let end = bytes[start..]
                .iter()
                .position(|&b| b == b';')
                .map_or(bytes.len(), |i| start + i);
            // `;` is ASCII, so both ends are character boundaries.
            let pair = header[start..end].trim_start();
            if let Some(value) = pair.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                return Some(value.trim_end().trim_matches('"'));
            }
            start = end + 1;
        }
        None
    }

    /// A query parameter by name, undecoded (tokens never need escaping).
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path: &str, host: &str, headers: &[(&str, &str)]) -> CheckRequest {
        crate::explain::RequestSpec {
            method: "GET".into(),
            path: path.into(),
            host: host.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
        .to_check()
    }

    #[test]
    fn view_splits_query_strips_port_and_reads_tokens() {
        let c = check(
            "/orders//7?access_token=abc&x=1",
            "API.Example.com:8443",
            &[("cookie", "a=1; access_token=xyz; b=2")],
        );
        let r = Request::from_check(&c).unwrap();
        assert_eq!(r.path, "/orders/7");
        assert_eq!(r.host, "api.example.com");
        assert_eq!(r.query_param("access_token"), Some("abc"));
        assert_eq!(r.query_param("missing"), None);
        assert_eq!(r.cookie("access_token"), Some("xyz"));
        assert_eq!(r.cookie("c"), None);
    }

    #[test]
    fn cookie_scan_finds_what_a_split_per_pair_finds() {
        let reference = |header: &str, name: &str| {
            header
                .split(';')
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.trim_matches('"').to_string())
        };
        let headers = [
            "a=1; access_token=xyz; b=2",
            "access_token=\"q\" ;x=1",
            "  access_token = no; access_token=yes ",
            "x=1;;access_token=;access_token=late",
            "access_tokenx=1; access_token=t",
            "=e; access_token",
            "",
            ";",
            "caf\u{e9}=1;\u{a0}access_token=nbsp",
        ];
        for h in headers {
            for name in ["access_token", "x", "", "caf\u{e9}"] {
                let c = check("/", "h", &[("cookie", h)]);
                let r = Request::from_check(&c).unwrap();
                assert_eq!(
                    r.cookie(name).map(str::to_string),
                    reference(h, name),
                    "{h:?} {name:?}"
                );
            }
        }
    }

    #[test]
    fn missing_attributes_and_bad_paths_are_errors() {
        assert_eq!(
            Request::from_check(&CheckRequest::default()).err(),
            Some(RequestError::NoHttpAttributes)
        );
        let c = check("/a%2f..", "h", &[]);
        assert_eq!(
            Request::from_check(&c).err(),
            Some(RequestError::Path(PathError::AmbiguousEncoding))
        );
    }
}
