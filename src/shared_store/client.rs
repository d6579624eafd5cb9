//! A Redis connection: where to (`Target`, from the URL), opening it (TCP,
//! TLS, AUTH, SELECT), and the multiplexed `Conn` the store's calls share.
//!
//! `Conn` is one writer task and one reader task over one socket: a call
//! queues its command and waits for the reply that comes back in its turn
//! (Redis answers in order). The first read or write error, EOF or malformed
//! reply fails every call in flight and marks the connection dead; the store
//! then opens a new one (this one is never reused).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use super::resp::{self, Value};

/// Calls queued for the writer at most; past that a call fails at once (the
/// socket is not draining: a hung Redis).
const QUEUE: usize = 4096;

/// Where to connect and how to log in.
#[derive(Clone)]
pub struct Target {
    host: String,
    port: u16,
    /// `rediss://`: the TLS settings (system roots, the process's aws-lc-rs provider).
    tls: Option<Arc<rustls::ClientConfig>>,
    user: Option<String>,
    password: Option<String>,
    db: u32,
}

impl Target {
    /// `redis[s]://[user[:password]@]host[:port][/db]`; `password` (from
    /// `password_file`) wins over one in the URL.
    pub fn parse(url: &str, password: Option<&str>) -> Result<Target, String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        let tls = match u.scheme() {
            "redis" => None,
            "rediss" => Some(Arc::new(tls_config()?)),
            other => return Err(format!("scheme {other:?}: redis:// or rediss://")),
        };
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let db = match u.path().trim_start_matches('/') {
            "" => 0,
            n => n
                .parse()
                .map_err(|_| format!("database {n:?}: not a number"))?,
        };
        let user = Some(percent_decode(u.username())).filter(|s| !s.is_empty());
        let password = password
            .map(str::to_owned)
            .or_else(|| u.password().map(percent_decode));
        Ok(Target {
            host,
            port: u.port().unwrap_or(6379),
            tls,
            user,
            password,
            db,
        })
    }

    /// Opens a connection, logged in, on its database, and answering. The
    /// error says what failed, never with the password.
    pub async fn open(&self) -> Result<Box<dyn Io>, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let mut io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("TLS: {e}"))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                Box::new(tls)
            }
        };
        let mut buf = Vec::new();
        if let Some(password) = &self.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            auth.extend(self.user.as_deref().map(str::as_bytes));
            auth.push(password.as_bytes());
            if let Value::Error(e) = command(&mut io, &mut buf, &auth).await? {
                return Err(format!("AUTH refused: {}", first_word(&e)));
            }
        }
        if self.db != 0 {
            let db = self.db.to_string();
            if let Value::Error(e) = command(&mut io, &mut buf, &[b"SELECT", db.as_bytes()]).await?
            {
                return Err(format!("SELECT {db}: {e}"));
            }
        }
        // Handed over only once Redis has answered: a server that accepts and
        // stays silent fails the connect (within its bound), not every call.
        if let Value::Error(e) = command(&mut io, &mut buf, &[b"PING"]).await? {
            return Err(format!("PING: {}", first_word(&e)));
        }
        Ok(io)
    }
}

/// A byte stream to Redis: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn tls_config() -> Result<rustls::ClientConfig, String> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth())
}

/// An error code only (`WRONGPASS`, `NOAUTH`...): the rest is Redis's prose.
fn first_word(e: &str) -> &str {
    e.split_whitespace().next().unwrap_or_default()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes one command and reads its reply (before the connection is shared,
/// and for the subscriber, which only reads).
pub async fn command(
    io: &mut Box<dyn Io>,
    buf: &mut Vec<u8>,
    args: &[&[u8]],
) -> Result<Value, String> {
    let mut out = Vec::new();
    resp::encode(args, &mut out);
    io.write_all(&out).await.map_err(|e| e.to_string())?;
    io.flush().await.map_err(|e| e.to_string())?;
    read_reply(io, buf).await
}

/// The next reply; `buf` keeps what arrived after it.
pub async fn read_reply(io: &mut Box<dyn Io>, buf: &mut Vec<u8>) -> Result<Value, String> {
    loop {
        if let Some((v, n)) = resp::parse(buf).map_err(|e| e.to_string())? {
            buf.drain(..n);
            return Ok(v);
        }
        buf.reserve(4096);
        match io.read_buf(buf).await {
            Ok(0) => return Err("closed by the store".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

struct Request {
    bytes: Vec<u8>,
    reply: oneshot::Sender<Value>,
}

/// What the writer and the reader share: the calls waiting for a reply, in
/// the order they were written.
#[derive(Default)]
struct Shared {
    waiting: Mutex<VecDeque<oneshot::Sender<Value>>>,
    dead: AtomicBool,
}

impl Shared {
    /// Queues a reply's recipient; false (and it is dropped: the call fails)
    /// once the connection is dead.
    fn wait_for(&self, reply: oneshot::Sender<Value>) -> bool {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if self.dead.load(Ordering::Relaxed) {
            return false;
        }
        w.push_back(reply);
        true
    }

    /// Dead: every call in flight fails now (its sender dropped), and no
    /// other is queued (`wait_for` reads `dead` under the same lock).
    fn kill(&self) {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        self.dead.store(true, Ordering::Relaxed);
        w.clear();
    }
}

/// A multiplexed connection.
pub struct Conn {
    queue: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    reader: tokio::task::AbortHandle,
}

impl Drop for Conn {
    /// The writer ends when `queue` closes; the reader would wait on the socket.
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    pub async fn connect(target: &Target) -> Result<Conn, String> {
        let io = target.open().await?;
        let (mut rd, mut wr) = tokio::io::split(io);
        let shared = Arc::new(Shared::default());
        let (queue, mut requests) = mpsc::channel::<Request>(QUEUE);

        let s = shared.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            while let Some(first) = requests.recv().await {
                // What is queued goes out in one write.
                out.clear();
                let mut next = Some(first);
                while let Some(r) = next {
                    if !s.wait_for(r.reply) {
                        return;
                    }
                    out.extend_from_slice(&r.bytes);
                    next = match out.len() < 64 << 10 {
                        true => requests.try_recv().ok(),
                        false => None,
                    };
                }
                if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
            }
            s.kill();
        });

        let s = shared.clone();
        let reader = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            'read: loop {
                buf.reserve(4096);
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                loop {
                    match resp::parse(&buf) {
                        Ok(Some((v, n))) => {
                            buf.drain(..n);
                            let next = s
                                .waiting
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .pop_front();
                            // A reply nobody asked for: the stream is out of step.
                            let Some(reply) = next else { break 'read };
                            let _ = reply.send(v);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("store connection closed: {e}");
                            break 'read;
                        }
                    }
                }
            }
            s.kill();
        })
        .abort_handle();
        Ok(Conn {
            queue,
            shared,
            reader,
        })
    }

    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::Relaxed)
    }

    /// Sends a command and waits for its reply: `Unavailable` if the
    /// connection is (or dies) before it, `Error` for an error reply.
    pub async fn call(&self, args: &[&[u8]]) -> Result<Value, StoreError> {
        if self.is_dead() {
            return Err(StoreError::Unavailable);
        }
        let mut bytes = Vec::new();
        resp::encode(args, &mut bytes);
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Request { bytes, reply })
            .map_err(|_| StoreError::Unavailable)?;
        match answer.await {
            Ok(Value::Error(_)) => Err(StoreError::Error),
            Ok(v) => Ok(v),
            Err(_) => Err(StoreError::Unavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("redis://127.0.0.1:7000/3", Some("pw")).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 7000, 3));
        assert_eq!(t.password.as_deref(), Some("pw"));
        assert!(t.user.is_none() && t.tls.is_none());
        let t = Target::parse("redis://valet%40x:p%3Aw@[::1]", None).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("::1", 6379, 0));
        assert_eq!(t.user.as_deref(), Some("valet@x"));
        assert_eq!(t.password.as_deref(), Some("p:w"));
        assert!(Target::parse("redis://r/x", None).is_err());
        assert!(Target::parse("http://r", None).is_err());
    }
}
