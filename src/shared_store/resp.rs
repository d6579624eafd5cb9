//! RESP2, the Redis wire format: a command out (an array of bulk strings), a
//! reply in (parsed incrementally, as bytes arrive). Bounded: a Redis that
//! answers garbage gets the connection closed, never an allocation it chose.

use std::io::Write;

/// The longest bulk string accepted (Redis's own default `proto-max-bulk-len`
/// is 512 MiB; nothing Valet reads is over a few KiB).
pub const MAX_BULK: usize = 16 << 20;
/// The most elements an array may declare.
pub const MAX_ARRAY: usize = 1 << 20;
/// The longest header or simple-string line.
const MAX_LINE: usize = 64 << 10;
/// Arrays within arrays: a recursion bound (Valet reads at most two levels).
const MAX_DEPTH: usize = 8;

/// A reply. A null bulk string and a null array are both `Nil`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
    Nil,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("a reply's {0} is over the cap")]
    TooLarge(&'static str),
    #[error("a malformed reply: {0}")]
    Malformed(&'static str),
}

/// Appends `args` as one command.
pub fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// The first reply in `buf` and the bytes it took; `None` while incomplete.
/// Allocates only for what has arrived (a declared length is checked, never
/// reserved), so a caller may call it again on each read.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, ParseError> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Value, usize)>, ParseError> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some((line, next)) = line(buf, at + 1)? else {
        return Ok(None);
    };
    let text = || String::from_utf8_lossy(line).into_owned();
    Ok(Some(match kind {
        b'+' => (Value::Simple(text()), next),
        b'-' => (Value::Error(text()), next),
        b':' => (Value::Int(int(line)?), next),
        b'$' => {
            let Some(n) = length(line, MAX_BULK, "bulk string")? else {
                return Ok(Some((Value::Nil, next)));
            };
            let end = next + n;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ParseError::Malformed("a bulk string longer than declared"));
            }
            (Value::Bulk(buf[next..end].to_vec()), end + 2)
        }
        b'*' => {
            let Some(n) = length(line, MAX_ARRAY, "array")? else {
                return Ok(Some((Value::Nil, next)));
            };
            if depth >= MAX_DEPTH {
                return Err(ParseError::TooLarge("nesting"));
            }
            let mut items = Vec::with_capacity(n.min(16));
            let mut at = next;
            for _ in 0..n {
                let Some((v, after)) = parse_at(buf, at, depth + 1)? else {
                    return Ok(None);
                };
                items.push(v);
                at = after;
            }
            (Value::Array(items), at)
        }
        _ => return Err(ParseError::Malformed("an unknown type byte")),
    }))
}

/// The line starting at `at` (without its CRLF) and where the next one starts.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, ParseError> {
    let rest = buf.get(at..).unwrap_or_default();
    let scan = &rest[..rest.len().min(MAX_LINE + 2)];
    match scan.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some((&rest[..i], at + i + 2))),
        None if rest.len() >= MAX_LINE + 2 => Err(ParseError::TooLarge("line")),
        None => Ok(None),
    }
}

fn int(line: &[u8]) -> Result<i64, ParseError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ParseError::Malformed("not an integer"))
}

/// A declared length: `None` for -1 (null), at most `cap`.
fn length(line: &[u8], cap: usize, what: &'static str) -> Result<Option<usize>, ParseError> {
    match int(line)? {
        -1 => Ok(None),
        n if n < 0 => Err(ParseError::Malformed("a negative length")),
        n if n as u64 > cap as u64 => Err(ParseError::TooLarge(what)),
        n => Ok(Some(n as usize)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> Value {
        let (v, n) = parse(bytes).unwrap().unwrap();
        assert_eq!(
            n,
            bytes.len(),
            "took all of {:?}",
            String::from_utf8_lossy(bytes)
        );
        v
    }

    #[test]
    fn a_command_is_an_array_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&[b"SET", b"k", b"a\r\nb", b""], &mut out);
        assert_eq!(
            out,
            b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n$0\r\n\r\n"
        );
        // What we write, we read back (a bulk may hold CRLF).
        let Value::Array(items) = whole(&out) else {
            panic!()
        };
        assert_eq!(items[2], Value::Bulk(b"a\r\nb".to_vec()));
        assert_eq!(items[3], Value::Bulk(vec![]));
    }

    #[test]
    fn each_kind_of_reply() {
        assert_eq!(whole(b"+OK\r\n"), Value::Simple("OK".into()));
        assert_eq!(
            whole(b"-WRONGPASS invalid\r\n"),
            Value::Error("WRONGPASS invalid".into())
        );
        assert_eq!(whole(b":-42\r\n"), Value::Int(-42));
        assert_eq!(whole(b"$3\r\nabc\r\n"), Value::Bulk(b"abc".to_vec()));
        assert_eq!(whole(b"$-1\r\n"), Value::Nil);
        assert_eq!(whole(b"*-1\r\n"), Value::Nil);
        assert_eq!(whole(b"*0\r\n"), Value::Array(vec![]));
        assert_eq!(
            whole(b"*3\r\n$7\r\nmessage\r\n$-1\r\n*1\r\n:1\r\n"),
            Value::Array(vec![
                Value::Bulk(b"message".to_vec()),
                Value::Nil,
                Value::Array(vec![Value::Int(1)]),
            ])
        );
    }

    /// Every split of a stream of replies: nothing is returned before it is
    /// whole, and the rest parses once it has arrived.
    #[test]
    fn a_reply_split_at_every_byte_is_read_once_whole() {
        let stream: &[u8] =
            b"+PONG\r\n$-1\r\n*3\r\n$7\r\nmessage\r\n$4\r\nx:dl\r\n$2\r\n\r\n\r\n-ERR no\r\n:7\r\n$5\r\nhello\r\n";
        let mut expected = Vec::new();
        let mut at = 0;
        while let Some((v, n)) = parse(&stream[at..]).unwrap() {
            expected.push(v);
            at += n;
        }
        assert_eq!(at, stream.len());
        assert_eq!(expected.len(), 6);
        for cut in 0..=stream.len() {
            let mut got = Vec::new();
            let mut buf = stream[..cut].to_vec();
            let mut feed = vec![&stream[cut..]];
            loop {
                while let Some((v, n)) = parse(&buf).unwrap() {
                    got.push(v);
                    buf.drain(..n);
                }
                match feed.pop() {
                    Some(more) => buf.extend_from_slice(more),
                    None => break,
                }
            }
            assert!(buf.is_empty(), "cut at {cut}");
            assert_eq!(got, expected, "cut at {cut}");
        }
        // Byte by byte.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in stream {
            buf.push(*b);
            if let Some((v, n)) = parse(&buf).unwrap() {
                got.push(v);
                buf.drain(..n);
            }
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn declared_lengths_over_the_caps_are_refused_before_any_allocation() {
        let big = format!("${}\r\n", MAX_BULK + 1);
        assert_eq!(
            parse(big.as_bytes()),
            Err(ParseError::TooLarge("bulk string"))
        );
        assert_eq!(
            parse(b"$99999999999999999999999\r\n"),
            Err(ParseError::Malformed("not an integer"))
        );
        let many = format!("*{}\r\n", MAX_ARRAY + 1);
        assert_eq!(parse(many.as_bytes()), Err(ParseError::TooLarge("array")));
        // At the cap: accepted, and waits for the bytes.
        assert_eq!(parse(format!("${MAX_BULK}\r\n").as_bytes()), Ok(None));
        assert_eq!(parse(format!("*{MAX_ARRAY}\r\n").as_bytes()), Ok(None));
        // A line that never ends, and arrays nested without end.
        assert_eq!(
            parse(&vec![b'+'; MAX_LINE + 3]),
            Err(ParseError::TooLarge("line"))
        );
        assert_eq!(
            parse("*1\r\n".repeat(100).as_bytes()),
            Err(ParseError::TooLarge("nesting"))
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(
            parse(b"HTTP/1.1 400\r\n"),
            Err(ParseError::Malformed("an unknown type byte"))
        );
        assert_eq!(
            parse(b"$-2\r\n"),
            Err(ParseError::Malformed("a negative length"))
        );
        assert_eq!(
            parse(b"$1\r\nabc\r\n"),
            Err(ParseError::Malformed("a bulk string longer than declared"))
        );
        assert_eq!(
            parse(b":x\r\n"),
            Err(ParseError::Malformed("not an integer"))
        );
    }
}
