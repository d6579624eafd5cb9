//! The canonical form of a request's host: what `match.hosts` is compared with.
//! Lower-case, without the port, without one trailing dot (`Admin.Test.:443` is
//! `admin.test`); an IPv6 literal keeps its brackets (`[::1]:8080` is `[::1]`).

/// The canonical form of a `Host`/`:authority` value.
pub fn canonical(authority: &str) -> String {
    let host = if authority.starts_with('[') {
        // [v6] or [v6]:port: everything up to the closing bracket.
        match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        }
    } else {
        match authority.rsplit_once(':') {
            Some((name, port))
                if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name
            }
            _ => authority,
        }
    };
    let host = match host.strip_suffix('.') {
        Some(h) if !h.is_empty() && !h.ends_with('.') => h,
        _ => host,
    };
    host.to_ascii_lowercase()
}

/// Why a `match.hosts` literal can never be what [`canonical`] makes of a
/// request, and the spelling to write instead, if there is one.
pub fn literal_problem(literal: &str) -> Option<String> {
    let (wildcard, name) = match literal.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    if let Some(inner) = name.strip_prefix('[') {
        let ok = !wildcard
            && inner
                .strip_suffix(']')
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        return (!ok)
            .then(|| "an IPv6 address is written in brackets, without a port: [::1]".into());
    }
    if name.parse::<std::net::Ipv6Addr>().is_ok() {
        return Some(format!(
            "an IPv6 address is written in brackets: write \"[{name}]\""
        ));
    }
    if !name.is_ascii() {
        return Some("write the name in its ASCII (punycode, xn--) form".into());
    }
    if let Some((n, port)) = name.rsplit_once(':')
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        return Some(format!(
            "hosts are matched without a port: write \"{}{n}\"",
            if wildcard { "*." } else { "" }
        ));
    }
    if let Some(n) = name.strip_suffix('.') {
        return Some(format!(
            "a trailing dot is removed before matching: write \"{}{n}\"",
            if wildcard { "*." } else { "" }
        ));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(format!(
            "hosts are matched in lower case: write \"{}{}\"",
            if wildcard { "*." } else { "" },
            name.to_ascii_lowercase()
        ));
    }
    if name.is_empty()
        || name.split('.').any(str::is_empty)
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Some("not a host name (letters, digits, '-' and '.', no empty label)".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_per_host() {
        let cases = [
            ("a.example:80", "a.example"),
            ("a.example", "a.example"),
            ("A.Example.", "a.example"),
            ("admin.test.:8443", "admin.test"),
            ("a.example:", "a.example"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
            ("[::A]", "[::a]"),
            ("::1", "::1"),
            ("", ""),
            (".", "."),
            ("a..", "a.."),
        ];
        for (raw, want) in cases {
            assert_eq!(canonical(raw), want, "{raw}");
        }
    }

    #[test]
    fn literals_that_no_request_can_match_say_what_to_write() {
        assert_eq!(literal_problem("admin.test"), None);
        assert_eq!(literal_problem("*.example.com"), None);
        assert_eq!(literal_problem("[::1]"), None);
        for (bad, hint) in [
            ("admin.test.", "write \"admin.test\""),
            ("*.example.com.", "write \"*.example.com\""),
            ("::1", "write \"[::1]\""),
            ("[::1]:80", "in brackets, without a port"),
            ("a.test:80", "write \"a.test\""),
            ("caf\u{e9}.test", "punycode"),
            ("Admin.test", "write \"admin.test\""),
            ("a..b", "not a host name"),
            ("a/b", "not a host name"),
        ] {
            let got = literal_problem(bad).unwrap_or_default();
            assert!(got.contains(hint), "{bad}: {got}");
        }
    }
}
