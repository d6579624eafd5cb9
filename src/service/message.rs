//! One Check message, read before tonic decodes it. tonic reserves the length a
//! message's 5-byte prefix declares as soon as it reads the prefix
//! (`codec/decode.rs`, `self.buf.reserve(len)`), and keeps every byte that then
//! arrives until the message is whole: a stream that declares a large message and
//! stops one byte short holds all of it. Here memory is taken as bytes arrive,
//! from a process-wide budget and the connection's share of it, and a message
//! Valet will not read (over the cap, incomplete, too slow, no budget left) is
//! answered with a deny, never a gRPC error.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use prost::bytes::{Buf, Bytes, BytesMut};
use tonic::codegen::{Body as HttpBody, StdError};

use crate::decision::{Deny, DenyKind, Reason};

/// gRPC's length prefix: a compression flag and a big-endian u32 length.
const PREFIX: usize = 5;

/// What tonic is handed in place of a message Valet did not read: an empty
/// message, which the service replaces by the deny.
pub const EMPTY_MESSAGE: &[u8] = &[0, 0, 0, 0, 0];

/// Bytes of Check messages held at once, across the process or one connection.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.limit).then_some(u + n)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The budget one message holds, given back when it is dropped (the Check has
/// been answered).
pub struct Taken {
    global: Arc<Budget>,
    conn: Option<Arc<Budget>>,
    bytes: usize,
}

impl Taken {
    fn new(global: Arc<Budget>, conn: Option<Arc<Budget>>) -> Self {
        Taken {
            global,
            conn,
            bytes: 0,
        }
    }

    /// Holds `total` bytes in all, taking the difference from both budgets.
    fn hold(&mut self, total: usize) -> bool {
        let n = total.saturating_sub(self.bytes);
        if n == 0 {
            return true;
        }
        if !self.global.take(n) {
            return false;
        }
        if let Some(conn) = &self.conn
            && !conn.take(n)
        {
            self.global.give(n);
            return false;
        }
        self.bytes += n;
        true
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.global.give(self.bytes);
        if let Some(conn) = &self.conn {
            conn.give(self.bytes);
        }
    }
}

/// How much Valet reads of one Check message, and for how long.
#[derive(Debug, Clone)]
pub struct MessageLimits {
    /// The largest message read (the gRPC prefix aside).
    pub max_bytes: usize,
    /// From the request's headers to the message's last byte.
    pub timeout: Duration,
    /// Shared by every message in flight in the process.
    pub budget: Arc<Budget>,
}

/// Why a message was not read to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unread {
    /// Its prefix declares more than `--max-message-bytes`: refused before reading.
    TooLarge { declared: usize, limit: usize },
    /// The stream ended (or broke) before the message did.
    Truncated { got: usize, declared: Option<usize> },
    /// Not whole within `--message-timeout`.
    Timeout(Duration),
    /// Taking its bytes would pass the message budget (the process's or the
    /// connection's share).
    NoBudget,
}

impl Unread {
    /// The denial, and whether dry-run may turn it into an allow: an unreadable
    /// request may, a shed one is never decided.
    pub fn deny(&self) -> (Deny, bool) {
        match self {
            Unread::TooLarge { declared, limit } => (
                Deny::new(
                    Reason::RequestTooLarge,
                    DenyKind::TooLarge,
                    format!(
                        "CheckRequest of {declared} bytes is over the {limit}-byte limit (--max-message-bytes)"
                    ),
                ),
                true,
            ),
            Unread::Truncated { got, declared } => (
                Deny::new(
                    Reason::MalformedRequest,
                    DenyKind::BadRequest,
                    match declared {
                        Some(d) => format!("CheckRequest ended after {got} of {d} bytes"),
                        None => "CheckRequest ended before its length prefix".to_string(),
                    },
                ),
                true,
            ),
            Unread::Timeout(t) => (
                Deny::new(
                    Reason::MalformedRequest,
                    DenyKind::BadRequest,
                    format!(
                        "CheckRequest not received whole within {} s (--message-timeout)",
                        t.as_secs_f64()
                    ),
                ),
                true,
            ),
            Unread::NoBudget => (
                Deny::new(
                    Reason::Overloaded,
                    DenyKind::Unavailable,
                    "too many CheckRequest bytes in flight",
                ),
                false,
            ),
        }
    }
}

/// Reads one gRPC message (its prefix included) from `body`, taking budget as
/// bytes arrive. Stops at the message's last byte: what follows is not read.
pub async fn read<B>(
    body: B,
    limits: &MessageLimits,
    conn: Option<Arc<Budget>>,
) -> Result<(Bytes, Taken), Unread>
where
    B: HttpBody,
    B::Error: Into<StdError>,
{
    let mut taken = Taken::new(limits.budget.clone(), conn);
    match tokio::time::timeout(
        limits.timeout,
        read_body(body, limits.max_bytes, &mut taken),
    )
    .await
    {
        Ok(Ok(bytes)) => Ok((bytes, taken)),
        Ok(Err(unread)) => Err(unread),
        Err(_) => Err(Unread::Timeout(limits.timeout)),
    }
}

async fn read_body<B>(body: B, max: usize, taken: &mut Taken) -> Result<Bytes, Unread>
where
    B: HttpBody,
    B::Error: Into<StdError>,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    let mut declared = None;
    loop {
        let truncated = |buf: &BytesMut, declared| Unread::Truncated {
            got: buf.len().saturating_sub(PREFIX),
            declared,
        };
        let Some(Ok(frame)) = body.frame().await else {
            return Err(truncated(&buf, declared));
        };
        let Ok(mut data) = frame.into_data() else {
            continue; // trailers before the message is whole: it never will be
        };
        while data.has_remaining() {
            let want = match declared {
                Some(len) => PREFIX + len - buf.len(),
                None => PREFIX - buf.len(),
            };
            let chunk = data.chunk();
            let n = chunk.len().min(want);
            // Grows with what arrived, never to what was declared; the capacity,
            // which is what the allocator handed out, is what the budget holds.
            buf.extend_from_slice(&chunk[..n]);
            data.advance(n);
            if !taken.hold(buf.capacity()) {
                return Err(Unread::NoBudget);
            }
            if declared.is_none() && buf.len() == PREFIX {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if len > max {
                    return Err(Unread::TooLarge {
                        declared: len,
                        limit: max,
                    });
                }
                declared = Some(len);
            }
            if declared.is_some_and(|len| buf.len() == PREFIX + len) {
                return Ok(buf.freeze());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Frame;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    fn limits(max: usize, budget: usize) -> MessageLimits {
        MessageLimits {
            max_bytes: max,
            timeout: Duration::from_secs(5),
            budget: Arc::new(Budget::new(budget)),
        }
    }

    fn frame(declared: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&declared.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// These chunks; `open` leaves the body unfinished (a client that stops).
    struct Chunks {
        chunks: VecDeque<Bytes>,
        open: bool,
    }

    impl HttpBody for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            match self.chunks.pop_front() {
                Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
                None if self.open => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn body(chunks: Vec<Vec<u8>>, open: bool) -> Chunks {
        Chunks {
            chunks: chunks.into_iter().map(Bytes::from).collect(),
            open,
        }
    }

    #[tokio::test]
    async fn a_whole_message_is_read_and_its_budget_given_back() {
        let l = limits(1024, 4096);
        let msg = frame(3, b"abc");
        let (bytes, taken) = read(
            body(vec![msg[..2].to_vec(), msg[2..].to_vec()], true),
            &l,
            None,
        )
        .await
        .unwrap();
        assert_eq!(&bytes[..], &msg[..]);
        assert!(l.budget.used() > 0);
        drop(taken);
        assert_eq!(l.budget.used(), 0);
    }

    #[tokio::test]
    async fn an_oversize_declaration_is_refused_before_its_bytes() {
        let l = limits(1024, 1 << 20);
        let r = read(body(vec![frame(4 << 20, b"x")], true), &l, None).await;
        assert_eq!(
            r.err(),
            Some(Unread::TooLarge {
                declared: 4 << 20,
                limit: 1024
            })
        );
        assert_eq!(l.budget.used(), 0);
    }

    #[tokio::test]
    async fn memory_follows_what_arrived_not_what_was_declared() {
        let l = limits(1 << 20, 1 << 20);
        let conn = Arc::new(Budget::new(1 << 20));
        // Declares 1 MiB, sends 10 bytes, stops: holds tens of bytes, not a MiB.
        let reading = read(
            body(vec![frame(1 << 20, &[7; 10])], true),
            &l,
            Some(conn.clone()),
        );
        let r = tokio::time::timeout(Duration::from_millis(100), reading).await;
        assert!(r.is_err(), "still waiting for the rest");
        assert_eq!(l.budget.used(), 0, "given back when the read is dropped");
        let l = limits(1 << 20, 64);
        let r = read(body(vec![frame(1000, &[7; 100])], false), &l, None).await;
        assert_eq!(r.err(), Some(Unread::NoBudget));
        assert_eq!(l.budget.used(), 0);
    }

    #[tokio::test]
    async fn truncated_and_slow_messages_are_named() {
        let l = limits(1024, 4096);
        let r = read(body(vec![frame(10, b"abc")], false), &l, None).await;
        assert_eq!(
            r.err(),
            Some(Unread::Truncated {
                got: 3,
                declared: Some(10)
            })
        );
        let l = MessageLimits {
            timeout: Duration::from_millis(50),
            ..limits(1024, 4096)
        };
        let r = read(body(vec![frame(10, b"abc")], true), &l, None).await;
        assert_eq!(r.err(), Some(Unread::Timeout(Duration::from_millis(50))));
        assert_eq!(
            Unread::Timeout(Duration::ZERO).deny().0.reason,
            Reason::MalformedRequest
        );
        assert_eq!(Unread::NoBudget.deny().0.reason, Reason::Overloaded);
    }
}
