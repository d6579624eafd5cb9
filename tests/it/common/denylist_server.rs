//! A denylist URL on 127.0.0.1 that a test controls: the body it serves (with an
//! ETag, answering `If-None-Match` with 304), or a status it fails with. It also
//! answers RFC 7662 introspection at `/introspect` (tokens starting `active-`
//! are active with `orders:read`, others inactive), counting requests, for the
//! fleet test's one IdP.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Default)]
pub struct State {
    pub body: String,
    /// Bumped with every new body: the ETag.
    pub version: u64,
    /// Answer this status instead of the list.
    pub fail: Option<u16>,
    pub requests: u64,
    pub not_modified: u64,
    pub introspections: u64,
}

pub struct DenylistServer {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl DenylistServer {
    pub async fn start(body: &str) -> DenylistServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/deny.yaml", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            body: body.into(),
            version: 1,
            ..State::default()
        }));
        let task = super::spawn(serve(listener, state.clone()));
        DenylistServer { url, state, task }
    }

    pub fn set(&self, body: &str) {
        let mut s = self.state.lock().unwrap();
        s.body = body.into();
        s.version += 1;
    }

    pub fn fail(&self, status: Option<u16>) {
        self.state.lock().unwrap().fail = status;
    }

    pub fn requests(&self) -> u64 {
        self.state.lock().unwrap().requests
    }

    /// `/introspect` requests answered so far.
    pub fn introspections(&self) -> u64 {
        self.state.lock().unwrap().introspections
    }

    /// The introspection endpoint's URL.
    pub fn introspection_url(&self) -> String {
        self.url.replace("/deny.yaml", "/introspect")
    }

    pub fn not_modified(&self) -> u64 {
        self.state.lock().unwrap().not_modified
    }
}

impl Drop for DenylistServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        conns.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    Ok::<_, Infallible>(if req.uri().path() == "/introspect" {
                        introspect(&state, req).await
                    } else {
                        answer(&state, req)
                    })
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap();
    s.requests += 1;
    let status = |code: u16, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        r
    };
    if let Some(code) = s.fail {
        return status(code, "unavailable".into());
    }
    let etag = format!("\"v{}\"", s.version);
    if req
        .headers()
        .get("if-none-match")
        .is_some_and(|v| v.to_str().ok() == Some(&etag))
    {
        s.not_modified += 1;
        return status(304, String::new());
    }
    let mut r = status(200, s.body.clone());
    r.headers_mut().insert("etag", etag.parse().unwrap());
    r
}

async fn introspect(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let form = String::from_utf8_lossy(&body).to_string();
    let token = form
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .unwrap_or("");
    state.lock().unwrap().introspections += 1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let answer = if token.starts_with("active-") {
        serde_json::json!({
            "active": true, "scope": "orders:read", "sub": "alice",
            "aud": super::AUDIENCE, "exp": now + 600, "token_type": "Bearer",
        })
    } else {
        serde_json::json!({"active": false})
    };
    let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}
