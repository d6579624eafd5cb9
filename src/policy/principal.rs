//! Workload identities (`require.principals`): SPIFFE IDs, exact or a whole-segment
//! prefix, matched against the principal the proxy authenticated (Envoy's
//! `attributes.source.principal`, the client certificate's URI SAN).
//!
//! Both sides are read strictly as the SPIFFE ID spec has them
//! (`spiffe://<trust-domain>/<segment>/...`): a lower-case trust domain of
//! `[a-z0-9._-]`, segments of `[A-Za-z0-9._-]`, no empty, `.` or `..` segment, no
//! trailing slash, no percent-encoding, query, fragment, port or user info. So a
//! prefix ending at a `/` can only ever match whole segments, and no spelling of
//! an ID can climb out of it (`.../sa/../../billing-evil/...` is no ID at all).

use std::fmt;

/// The SPIFFE spec's limit on an ID's length, in bytes.
const MAX_ID_BYTES: usize = 2048;
const SCHEME: &str = "spiffe://";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Exactly this ID.
    Exact(String),
    /// `spiffe://td/ns/billing/sa/*`: any ID one or more whole segments below,
    /// stored with its trailing `/` (`spiffe://td/ns/billing/sa/`).
    Below(String),
}

impl Principal {
    /// A pattern as written in policy: a SPIFFE ID, or one followed by `/*`.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        match pattern.strip_suffix("/*") {
            Some(base) => {
                check_id(base)?;
                Ok(Principal::Below(format!("{base}/")))
            }
            None => {
                if pattern.contains('*') {
                    return Err(
                        "the only wildcard is a trailing /* (whole segments below an ID)".into(),
                    );
                }
                check_id(pattern)?;
                Ok(Principal::Exact(pattern.to_string()))
            }
        }
    }

    /// Whether the principal the proxy forwarded is this one (or below it). A
    /// principal that is not a well-formed SPIFFE ID matches nothing.
    pub fn matches(&self, principal: &str) -> bool {
        if check_id(principal).is_err() {
            return false;
        }
        match self {
            Principal::Exact(id) => id == principal,
            Principal::Below(prefix) => {
                principal.len() > prefix.len() && principal.starts_with(prefix.as_str())
            }
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Exact(id) => f.write_str(id),
            Principal::Below(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// Whether `id` is a SPIFFE ID as the spec defines it; the reason when not.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_ID_BYTES {
        return Err(format!("longer than {MAX_ID_BYTES} bytes"));
    }
    let Some(rest) = id.strip_prefix(SCHEME) else {
        return Err("a SPIFFE ID starts with spiffe:// (lower case)".into());
    };
    let (domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if domain.is_empty() {
        return Err("no trust domain".into());
    }
    if let Some(c) = domain
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "the trust domain has {c:?}: only lower-case letters, digits, '.', '-' and '_' (no port, no user info)"
        ));
    }
    if path.is_empty() {
        return Ok(());
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err("empty path segment (double or trailing slash)".into()),
            "." | ".." => return Err("dot segments are not allowed in a SPIFFE ID".into()),
            s => {
                if let Some(c) = s
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(format!(
                        "path segment {s:?} has {c:?}: only letters, digits, '.', '-' and '_' (no percent-encoding, query or fragment)"
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Principal {
        Principal::parse(s).unwrap()
    }

    #[test]
    fn a_prefix_matches_whole_segments_below_it() {
        let sa = p("spiffe://cluster.local/ns/billing/sa/*");
        assert!(sa.matches("spiffe://cluster.local/ns/billing/sa/worker"));
        assert!(sa.matches("spiffe://cluster.local/ns/billing/sa/worker/v2"));
        for no in [
            "spiffe://cluster.local/ns/billing/sa",
            "spiffe://cluster.local/ns/billing/sa/",
            "spiffe://cluster.local/ns/billing/saw/worker",
            "spiffe://cluster.local/ns/billing-evil/sa/worker",
            "spiffe://cluster.local/ns/billing/sa-evil/worker",
            "spiffe://other.local/ns/billing/sa/worker",
            "spiffe://cluster.local.evil/ns/billing/sa/worker",
            "spiffe://CLUSTER.local/ns/billing/sa/worker",
            "SPIFFE://cluster.local/ns/billing/sa/worker",
            "https://cluster.local/ns/billing/sa/worker",
            "cluster.local/ns/billing/sa/worker",
            "",
        ] {
            assert!(!sa.matches(no), "{no}");
        }
        let domain = p("spiffe://cluster.local/*");
        assert!(domain.matches("spiffe://cluster.local/ns/x/sa/y"));
        assert!(!domain.matches("spiffe://cluster.local"));
    }

    #[test]
    fn dot_segments_empty_segments_and_encodings_never_match() {
        let sa = p("spiffe://cluster.local/ns/billing/sa/*");
        for no in [
            "spiffe://cluster.local/ns/billing/sa/..",
            "spiffe://cluster.local/ns/billing/sa/../../billing-evil/sa/x",
            "spiffe://cluster.local/ns/billing/sa/./worker",
            "spiffe://cluster.local/ns/billing/sa//worker",
            "spiffe://cluster.local/ns/billing/sa/worker/",
            "spiffe://cluster.local/ns/billing/sa/%2e%2e",
            "spiffe://cluster.local/ns/billing/sa/worker%2Fx",
            "spiffe://cluster.local/ns/billing/sa/w%6frker",
            "spiffe://cluster.local/ns/billing/sa/worker?x=1",
            "spiffe://cluster.local/ns/billing/sa/worker#x",
            "spiffe://cluster.local:443/ns/billing/sa/worker",
            "spiffe://u@cluster.local/ns/billing/sa/worker",
            "spiffe://cluster.local/ns/billing/sa/wörker",
            "spiffe://cluster.local/ns/billing/sa/work er",
            "spiffe://cluster.local/ns/billing/sa/worker\n",
        ] {
            assert!(!sa.matches(no), "{no:?}");
        }
        let long = format!("spiffe://cluster.local/ns/billing/sa/{}", "a".repeat(2048));
        assert!(!sa.matches(&long));
    }

    #[test]
    fn exact_is_exact() {
        let w = p("spiffe://cluster.local/ns/billing/sa/worker");
        assert!(w.matches("spiffe://cluster.local/ns/billing/sa/worker"));
        assert!(!w.matches("spiffe://cluster.local/ns/billing/sa/worker2"));
        assert!(!w.matches("spiffe://cluster.local/ns/billing/sa/worker/x"));
        assert!(!w.matches("spiffe://cluster.local/ns/billing/sa/Worker"));
        assert_eq!(w.to_string(), "spiffe://cluster.local/ns/billing/sa/worker");
        assert_eq!(
            p("spiffe://td/ns/*").to_string(),
            "spiffe://td/ns/*",
            "displayed as written"
        );
    }

    #[test]
    fn bad_patterns_say_why() {
        for (bad, why) in [
            ("spiffe://cluster.local/ns/*/sa/x", "trailing /*"),
            ("spiffe://cluster.local/ns/billing*", "trailing /*"),
            ("spiffe://cluster.local/ns/billing/", "empty path segment"),
            ("spiffe://cluster.local/ns/../sa/*", "dot segments"),
            ("spiffe://Cluster.local/ns/x", "trust domain"),
            ("spiffe:///ns/x", "no trust domain"),
            ("spiffe://cluster.local/ns/a%20b", "percent-encoding"),
            ("cluster.local/ns/x", "starts with spiffe://"),
            ("/*", "starts with spiffe://"),
        ] {
            let e = Principal::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
