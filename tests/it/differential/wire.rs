//! Raw HTTP/1.1 on both sides of the proxy: a recording upstream (keep-alive,
//! answers 200) and a client that writes request heads byte for byte.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub request_line: String,
    /// In arrival order, names as received.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn all(&self, lower_name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(lower_name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Requests by `x-diff-id` (a request without one, or with several, is kept
/// under its raw value).
pub type Record = Arc<Mutex<HashMap<String, Vec<Seen>>>>;

pub async fn upstream() -> (SocketAddr, Record) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record: Record = Arc::default();
    let r = record.clone();
    crate::common::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let r = r.clone();
            crate::common::spawn(async move {
                let _ = serve(stream, r).await;
            });
        }
    });
    (addr, record)
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until `buf` holds a whole head; returns the head (without the blank line)
/// and leaves what follows in `buf`.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = buf[..end].to_vec();
            buf.drain(..end + 4);
            return Ok(head);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
    let mut chunk = [0u8; 8192];
    while buf.len() < want {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// Reads a body framed by `content-length` or `transfer-encoding: chunked`.
async fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    headers: &[(String, String)],
) -> std::io::Result<Vec<u8>> {
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.trim())
    };
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let eol = loop {
                if let Some(e) = find(buf, b"\r\n") {
                    break e;
                }
                let have = buf.len();
                fill(stream, buf, have + 1).await?;
            };
            let line = String::from_utf8_lossy(&buf[..eol]).to_string();
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            buf.drain(..eol + 2);
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    let e = loop {
                        if let Some(e) = find(buf, b"\r\n") {
                            break e;
                        }
                        let have = buf.len();
                        fill(stream, buf, have + 1).await?;
                    };
                    buf.drain(..e + 2);
                    if e == 0 {
                        return Ok(body);
                    }
                }
            }
            fill(stream, buf, size + 2).await?;
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    let len: usize = get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    fill(stream, buf, len).await?;
    Ok(buf.drain(..len).collect())
}

fn parse_headers(head: &str) -> (String, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    (first, headers)
}

async fn serve(mut stream: TcpStream, record: Record) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let head = read_head(&mut stream, &mut buf).await?;
        let (request_line, headers) = parse_headers(&String::from_utf8_lossy(&head));
        read_body(&mut stream, &mut buf, &headers).await?;
        let seen = Seen {
            request_line,
            headers,
        };
        let key = seen.all("x-diff-id").join(",");
        let head_only = seen.request_line.starts_with("HEAD ");
        record.lock().unwrap().entry(key).or_default().push(seen);
        let response: &[u8] = if head_only {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        };
        stream.write_all(response).await?;
    }
}

/// What the client got back.
#[derive(Debug, Clone)]
pub enum Reply {
    Response {
        status: u16,
        body: Vec<u8>,
    },
    /// The connection closed or errored before a whole response arrived.
    Closed(String),
    /// Nothing within the read timeout (not an assertion: counted and reported).
    NoAnswer,
}

impl Reply {
    /// `401`, `closed (why)`, `no answer`.
    pub fn summary(&self) -> String {
        match self {
            Reply::Response { status, .. } => status.to_string(),
            Reply::Closed(why) => format!("closed ({why})"),
            Reply::NoAnswer => "no answer".into(),
        }
    }
    /// The `error` of a JSON body: a denial written by Valet.
    pub fn valet_error(&self) -> Option<String> {
        match self {
            Reply::Response { body, .. } => serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string)),
            _ => None,
        }
    }
}

/// A keep-alive client connection that reconnects when the proxy closes it.
pub struct Client {
    addr: SocketAddr,
    conn: Option<(TcpStream, Vec<u8>)>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client { addr, conn: None }
    }

    /// Writes `request` as is and reads one response.
    pub async fn send(&mut self, request: &[u8], head_method: bool) -> Reply {
        // A stale keep-alive connection may be closed under us: one retry on a fresh one.
        for attempt in 0..2 {
            let fresh = self.conn.is_none();
            if fresh {
                match TcpStream::connect(self.addr).await {
                    Ok(s) => self.conn = Some((s, Vec::new())),
                    Err(e) => return Reply::Closed(format!("connect: {e}")),
                }
            }
            let (stream, buf) = self.conn.as_mut().unwrap();
            buf.clear();
            if let Err(e) = stream.write_all(request).await {
                self.conn = None;
                if fresh || attempt == 1 {
                    return Reply::Closed(format!("write: {e}"));
                }
                continue;
            }
            let read = async {
                let head = read_head(stream, buf).await?;
                let (status_line, headers) = parse_headers(&String::from_utf8_lossy(&head));
                let status: u16 = status_line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let body = if head_only(head_method, status) {
                    Vec::new()
                } else {
                    read_body(stream, buf, &headers).await?
                };
                std::io::Result::Ok((status, headers, body))
            };
            match tokio::time::timeout(Duration::from_secs(10), read).await {
                Err(_) => {
                    self.conn = None;
                    return Reply::NoAnswer;
                }
                Ok(Err(e)) => {
                    self.conn = None;
                    // Closed before a byte of the response: a stale connection, unless
                    // it was fresh (then the proxy closed on this request).
                    if !fresh && attempt == 0 && e.kind() == std::io::ErrorKind::UnexpectedEof {
                        continue;
                    }
                    return Reply::Closed(e.to_string());
                }
                Ok(Ok((status, headers, body))) => {
                    let close = headers.iter().any(|(k, v)| {
                        k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close")
                    });
                    if close || !buf.is_empty() {
                        self.conn = None;
                    }
                    return Reply::Response { status, body };
                }
            }
        }
        unreachable!()
    }
}

fn head_only(head_method: bool, status: u16) -> bool {
    head_method || status == 204 || status == 304 || (100..200).contains(&status)
}
