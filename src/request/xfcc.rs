//! Envoy's `x-forwarded-client-cert` (XFCC), read strictly for the one thing
//! HTTP mode takes from it: the client certificate's URI SAN (the SPIFFE ID),
//! as `attributes.source.principal` carries it over gRPC.
//!
//! Envoy with `forward_client_cert_details: SANITIZE_SET` drops a client's own
//! XFCC and writes one element for the certificate it verified:
//! `By=...;Hash=...;Subject="...";URI=spiffe://td/ns/a/sa/b`. Anything else (two
//! elements, i.e. a hop appended to a client's header; a bad quote; a key twice)
//! is refused, never guessed at.

/// The URI SAN of the one certificate described: `Ok(None)` when it has none or
/// several (an X.509-SVID has exactly one), `Err` when the header is malformed.
pub fn uri(header: &str) -> Result<Option<String>, &'static str> {
    let mut uri = None;
    let mut uris = 0;
    let mut rest = header.trim();
    if rest.is_empty() {
        return Err("x-forwarded-client-cert is empty");
    }
    loop {
        let eq = rest
            .find('=')
            .ok_or("x-forwarded-client-cert has a field without '='")?;
        let key = &rest[..eq];
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("x-forwarded-client-cert has a bad field name");
        }
        let (value, after) = value(&rest[eq + 1..])?;
        if key.eq_ignore_ascii_case("uri") {
            uris += 1;
            uri = Some(value);
        }
        match after.as_bytes().first() {
            None => break,
            Some(b';') => rest = &after[1..],
            // A second element: a proxy appended to a header the client sent.
            Some(b',') => {
                return Err("x-forwarded-client-cert describes more than one certificate");
            }
            Some(_) => return Err("x-forwarded-client-cert has text after a quoted value"),
        }
    }
    Ok(uri.filter(|u| uris == 1 && !u.is_empty()))
}

/// One value, quoted (`"..."`, `\` escaping the next character) or plain (up to
/// `;` or `,`), and what follows it.
fn value(s: &str) -> Result<(String, &str), &'static str> {
    let Some(quoted) = s.strip_prefix('"') else {
        let end = s.find([';', ',']).unwrap_or(s.len());
        let v = &s[..end];
        if v.contains(['"', '=']) || v.chars().any(char::is_control) {
            return Err("x-forwarded-client-cert has a bad unquoted value");
        }
        return Ok((v.to_string(), &s[end..]));
    };
    let mut out = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &quoted[i + 1..])),
            '\\' => match chars.next() {
                Some((_, e)) => out.push(e),
                None => break,
            },
            c if c.is_control() => break,
            c => out.push(c),
        }
    }
    Err("x-forwarded-client-cert has an unterminated quoted value")
}

#[cfg(test)]
mod tests {
    use super::uri;

    #[test]
    fn the_uri_of_the_one_certificate() {
        let id = "spiffe://cluster.local/ns/billing/sa/worker";
        let ok = [
            format!(
                "By=spiffe://cluster.local/ns/app/sa/app;Hash=abc;Subject=\"CN=w,O=x\";URI={id}"
            ),
            format!("Hash=abc;URI={id};DNS=w.local"),
            format!("uri=\"{id}\""),
            format!("Subject=\"a\\\"b;c\";URI={id}"),
        ];
        for h in &ok {
            assert_eq!(uri(h).unwrap().as_deref(), Some(id), "{h}");
        }
        assert_eq!(uri("Hash=abc;DNS=a.local").unwrap(), None, "no URI SAN");
        assert_eq!(
            uri("URI=spiffe://a/x;URI=spiffe://a/y").unwrap(),
            None,
            "several URI SANs: not an SVID"
        );
        assert_eq!(uri("Hash=a;URI=").unwrap(), None);
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "Hash=a;URI=spiffe://a/x,URI=spiffe://a/y",
            "URI=spiffe://a/forged,By=x;Hash=y;URI=spiffe://a/real",
            "URI=\"spiffe://a/x",
            "URI=\"spiffe://a/x\"junk",
            "URI",
            "Hash=a;;URI=spiffe://a/x",
            "U RI=spiffe://a/x",
            "URI=spiffe://a/x=y",
            "URI=spiffe://a/\"x\"",
        ] {
            assert!(uri(bad).is_err(), "{bad:?}");
        }
    }
}
