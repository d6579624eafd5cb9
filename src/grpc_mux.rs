//! gRPC services side by side on one port, dispatched by the service name in the
//! path (`/<service>/<method>`), as tonic's `Routes` does, without its `router`
//! feature: that pulls axum and its kin (~9 s of every cold build) to route two
//! services. A path no service owns is answered as tonic answers it: HTTP 200,
//! `grpc-status: 12` (Unimplemented).
//!
//! [`serve`] serves one service alone (the examples' and the tests' small gRPC
//! servers); Valet's own Check port is `conn::serve_grpc`, with its limits.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

type Request = http::Request<Body>;
type Response = http::Response<Body>;
type Answer = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// `service` for its own paths, `rest` for every other.
#[derive(Debug, Clone)]
pub struct Mux<S, Rest> {
    service: S,
    rest: Rest,
}

impl<S> Mux<S, Unimplemented> {
    pub fn new(service: S) -> Self {
        Mux {
            service,
            rest: Unimplemented,
        }
    }
}

impl<S, Rest> Mux<S, Rest> {
    /// Adds `service` in front: the busiest service is best added last.
    pub fn with<T>(self, service: T) -> Mux<T, Self> {
        Mux {
            service,
            rest: self,
        }
    }
}

fn owns<S: NamedService>(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(S::NAME))
        .is_some_and(|p| p.starts_with('/'))
}

impl<S, Rest> Service<Request> for Mux<S, Rest>
where
    S: Service<Request, Response = Response, Error = Infallible> + NamedService,
    S::Future: Send + 'static,
    Rest: Service<Request, Response = Response, Error = Infallible>,
    Rest::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    /// Ready when every service is (tonic's generated ones always are).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready!(self.service.poll_ready(cx))?;
        self.rest.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Answer {
        if owns::<S>(req.uri().path()) {
            Box::pin(self.service.call(req))
        } else {
            Box::pin(self.rest.call(req))
        }
    }
}

/// The answer to a path no service owns.
#[derive(Debug, Clone, Copy)]
pub struct Unimplemented;

impl Service<Request> for Unimplemented {
    type Response = Response;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request) -> Self::Future {
        std::future::ready(Ok(tonic::Status::unimplemented("").into_http()))
    }
}

/// Serves `service` alone over HTTP/2 (TCP_NODELAY, up to 1024 streams per
/// connection) on `listener` until `stop` completes; open connections are cut then.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.max_concurrent_streams(1024);
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = &mut stop => return Ok(()),
        };
        tcp.set_nodelay(true)?;
        let service = service.clone();
        let serve = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            service.clone().call(req.map(Body::new))
        });
        let conn = h2.serve_connection(TokioIo::new(tcp), serve);
        connections.spawn(async move {
            let _ = conn.await;
        });
        // Reap the finished ones, so a long run does not keep them all.
        while connections.try_join_next().is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service named `test.Echo` that answers grpc-status 0.
    #[derive(Clone)]
    struct Echo;

    impl NamedService for Echo {
        const NAME: &'static str = "test.Echo";
    }

    impl Service<Request> for Echo {
        type Response = Response;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request) -> Self::Future {
            std::future::ready(Ok(tonic::Status::ok("").into_http()))
        }
    }

    async fn answer(path: &str) -> Response {
        let mut mux = Mux::new(Echo);
        let req = http::Request::post(path).body(Body::empty()).unwrap();
        std::future::poll_fn(|cx| mux.poll_ready(cx)).await.unwrap();
        mux.call(req).await.unwrap()
    }

    fn grpc_status(r: &Response) -> &str {
        r.headers()["grpc-status"].to_str().unwrap()
    }

    #[tokio::test]
    async fn a_service_answers_its_own_paths_only() {
        assert_eq!(grpc_status(&answer("/test.Echo/Say").await), "0");
        for other in ["/test.EchoMore/Say", "/test.Echo", "/other.Svc/Say", "/"] {
            assert_eq!(grpc_status(&answer(other).await), "12", "{other}");
        }
    }

    #[tokio::test]
    async fn an_unknown_path_is_answered_as_tonic_does() {
        let r = answer("/grpc.reflection.v1.ServerReflection/Info").await;
        assert_eq!(r.status(), http::StatusCode::OK);
        assert_eq!(grpc_status(&r), "12");
        assert_eq!(r.headers()["content-type"], "application/grpc");
    }
}
