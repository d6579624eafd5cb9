//! A JWKS and OIDC discovery server on 127.0.0.1 that a test controls: which keys
//! it serves, and how it fails.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Clone, Debug)]
pub enum Mode {
    Ok,
    Status(u16),
    /// Answers after this long.
    Slow(Duration),
    /// Holds every answer until the gate is closed ([`release`]): a slow endpoint
    /// whose answer the test lets go, with no timing to guess.
    Held(Arc<tokio::sync::Semaphore>),
    Garbage,
    /// A body of this many bytes.
    Huge(usize),
}

pub struct State {
    pub jwks: Value,
    pub mode: Mode,
    /// `issuer` in the discovery document; None = this server's base URL.
    pub issuer: Option<String>,
    pub max_age: Option<u64>,
    pub jwks_requests: u64,
    pub not_modified: u64,
}

pub struct JwksServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    task: Option<JoinHandle<()>>,
}

impl JwksServer {
    pub async fn start(jwks: Value) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            jwks,
            mode: Mode::Ok,
            issuer: None,
            max_age: None,
            jwks_requests: 0,
            not_modified: 0,
        }));
        let task = Some(super::spawn(serve(listener, state.clone(), addr)));
        JwksServer { addr, state, task }
    }

    /// The base URL, which is also the issuer discovery reports by default.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_jwks(&self, jwks: Value) {
        self.state.lock().unwrap().jwks = jwks;
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    pub fn requests(&self) -> u64 {
        self.state.lock().unwrap().jwks_requests
    }

    /// Stops listening: connections are refused until [`JwksServer::restart`].
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.task = Some(super::spawn(serve(listener, self.state.clone(), self.addr)));
    }

    /// Waits until the server has answered `n` more JWKS requests than `from`.
    pub async fn wait_requests(&self, from: u64, n: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.requests() >= from + n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, addr: SocketAddr) {
    // Abort drops the listener; open connections end with their tasks.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        conns.spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, req, addr).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    state: &Mutex<State>,
    req: Request<Incoming>,
    addr: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/.well-known/openid-configuration" {
        let issuer = state
            .lock()
            .unwrap()
            .issuer
            .clone()
            .unwrap_or(format!("http://{addr}"));
        let doc = json!({"issuer": issuer, "jwks_uri": format!("http://{addr}/jwks")});
        return Response::new(Full::new(Bytes::from(doc.to_string())));
    }
    if path != "/jwks" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found")));
        *r.status_mut() = hyper::StatusCode::NOT_FOUND;
        return r;
    }
    let (mode, body, max_age) = {
        let mut s = state.lock().unwrap();
        s.jwks_requests += 1;
        (s.mode.clone(), s.jwks.to_string(), s.max_age)
    };
    let etag = format!("\"{:x}\"", fxhash(&body));
    let mut response = match mode {
        Mode::Ok => {
            let matches = req
                .headers()
                .get("if-none-match")
                .is_some_and(|v| v.to_str().ok() == Some(&etag));
            if matches {
                state.lock().unwrap().not_modified += 1;
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = hyper::StatusCode::NOT_MODIFIED;
                r
            } else {
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert("etag", etag.parse().unwrap());
                r
            }
        }
        Mode::Status(code) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"oops")));
            *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
            r
        }
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            Response::new(Full::new(Bytes::from(body)))
        }
        Mode::Held(gate) => {
            // Closed means released: every held answer goes, and later ones at once.
            let _ = gate.acquire().await;
            Response::new(Full::new(Bytes::from(body)))
        }
        Mode::Garbage => Response::new(Full::new(Bytes::from_static(b"<html>maintenance</html>"))),
        Mode::Huge(n) => Response::new(Full::new(Bytes::from(vec![b' '; n]))),
    };
    if let Some(age) = max_age {
        response
            .headers_mut()
            .insert("cache-control", format!("max-age={age}").parse().unwrap());
    }
    response
}

/// A gate for [`Mode::Held`]: answers wait until [`release`].
pub fn held() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(0))
}

/// Lets every answer held at `gate` go.
pub fn release(gate: &tokio::sync::Semaphore) {
    gate.close();
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}
