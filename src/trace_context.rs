//! The span a request arrives in, read from its headers: W3C `traceparent`
//! (and `tracestate`), else B3 (`b3` single header, else `x-b3-*`). Envoy
//! forwards them in the CheckRequest, so the audit trail can name the trace
//! and Valet's span can be a child of Envoy's. A malformed header is ignored
//! (no parent), never an error: tracing must not change a decision.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's sampling decision; None when B3 defers it.
    pub sampled: Option<bool>,
    /// `tracestate`, passed on as received (W3C only).
    pub state: Option<&'a str>,
}

impl<'a> Parent<'a> {
    /// The parent named by `header` (a lookup by lower-case name).
    pub fn extract(header: impl Fn(&str) -> Option<&'a str>) -> Option<Parent<'a>> {
        if let Some(tp) = header("traceparent") {
            return traceparent(tp).map(|mut p| {
                p.state = header("tracestate").filter(|s| !s.is_empty() && s.len() <= 512);
                p
            });
        }
        if let Some(b3) = header("b3") {
            return b3_single(b3);
        }
        let trace_id = trace_id(header("x-b3-traceid")?)?;
        let span_id = hex::<8>(header("x-b3-spanid")?)?;
        let sampled = match (header("x-b3-flags"), header("x-b3-sampled")) {
            (Some("1"), _) => Some(true),
            (_, Some("1" | "true")) => Some(true),
            (_, Some("0" | "false")) => Some(false),
            _ => None,
        };
        valid(trace_id, span_id, sampled, None)
    }

    pub fn trace_id_hex(&self) -> TraceId {
        TraceId(self.trace_id)
    }
}

/// A trace id written as 32 lower-case hex digits, as trace UIs search it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub [u8; 16]);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// `00-<trace id>-<span id>-<flags>`; a later version may append fields.
fn traceparent(v: &str) -> Option<Parent<'_>> {
    let v = v.trim();
    let mut parts = v.split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || hex::<1>(version).is_none() {
        return None;
    }
    if version == "00" && (parts.next().is_some() || v.len() != 55) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let flags = hex::<1>(flags)?[0];
    valid(hex(trace)?, hex(span)?, Some(flags & 1 == 1), None)
}

/// `{trace id}-{span id}[-{sampling}[-{parent span id}]]`, or a lone sampling state.
fn b3_single(v: &str) -> Option<Parent<'_>> {
    let mut parts = v.trim().split('-');
    let trace_id = trace_id(parts.next()?)?;
    let span_id = hex::<8>(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some("1" | "d") => Some(true),
        Some("0") => Some(false),
        Some(_) => return None,
    };
    valid(trace_id, span_id, sampled, None)
}

/// B3 trace ids are 64 or 128 bits; a 64-bit one is the low half.
fn trace_id(v: &str) -> Option<[u8; 16]> {
    match v.len() {
        32 => hex(v),
        16 => {
            let low = hex::<8>(v)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

fn valid(
    trace_id: [u8; 16],
    span_id: [u8; 8],
    sampled: Option<bool>,
    state: Option<&str>,
) -> Option<Parent<'_>> {
    (trace_id != [0; 16] && span_id != [0; 8]).then_some(Parent {
        trace_id,
        span_id,
        sampled,
        state,
    })
}

fn hex<const N: usize>(v: &str) -> Option<[u8; N]> {
    let b = v.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of<'a>(headers: &'a [(&'a str, &'a str)]) -> Option<Parent<'a>> {
        Parent::extract(|n| headers.iter().find(|(k, _)| *k == n).map(|(_, v)| *v))
    }

    #[test]
    fn w3c() {
        let p = of(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ])
        .unwrap();
        assert_eq!(
            p.trace_id_hex().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(p.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(p.sampled, Some(true));
        assert_eq!(p.state, Some("congo=t61rcWkgMzE"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(of(&[("traceparent", bad)]), None, "{bad}");
        }
        // A later version may add fields.
        assert!(
            of(&[(
                "traceparent",
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra"
            )])
            .is_some_and(|p| p.sampled == Some(false))
        );
    }

    #[test]
    fn b3() {
        let p = of(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]).unwrap();
        assert_eq!(
            p.trace_id_hex().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(p.sampled, Some(true));
        let short = of(&[("b3", "64fe8b2a57d3eff7-e457b5a2e4d86bd1")]).unwrap();
        assert_eq!(
            short.trace_id_hex().to_string(),
            "000000000000000064fe8b2a57d3eff7"
        );
        assert_eq!(short.sampled, None);
        assert_eq!(of(&[("b3", "0")]), None);
        let multi = of(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
        ])
        .unwrap();
        assert_eq!(multi.sampled, Some(false));
        assert_eq!(multi.span_id, hex::<8>("e457b5a2e4d86bd1").unwrap());
        // traceparent wins over B3.
        let both = of(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ])
        .unwrap();
        assert_eq!(both.trace_id[0], 0x4b);
    }
}
