//! The `envoy.service.auth.v3.Authorization` gRPC service, by hand rather than
//! envoy-types' generated `AuthorizationServer`, for one reason: its codec. The
//! generated one turns a message prost cannot decode (a header value that is not
//! UTF-8 in a `string` field, a truncated field) into a gRPC `INTERNAL` error,
//! which Envoy's `failure_mode_allow` may let through. Here the decoder hands
//! the service either the request or why it could not be read, and the service
//! answers the latter with a 400 `malformed_request` deny like any other. The
//! decoding itself is prost's, unchanged. Before tonic sees the message,
//! `message::read` takes it off the stream within Valet's limits (see there):
//! one copy of the bytes, the price of not letting tonic reserve what a
//! prefix declares.

use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use http_body_util::Full;
use prost::Message;
use prost::bytes::Bytes;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::codegen::{Body as HttpBody, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic_prost::ProstEncoder;

use super::CheckService;
use super::message::{self, Budget, EMPTY_MESSAGE, MessageLimits, Unread};
use crate::response::Answer;

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// What the decoder made of one request message. Not boxed: the request moves
/// once, and a box would be one more allocation on every Check.
#[allow(clippy::large_enum_variant)]
pub enum Incoming {
    Check(CheckRequest),
    /// prost's reason; never the bytes (they may hold a token).
    Undecodable(prost::DecodeError),
    /// Not read to its end: too large, incomplete, too slow, or no budget.
    Unread(Unread),
}

#[derive(Clone)]
pub struct CheckServer {
    service: Arc<CheckService>,
    limits: MessageLimits,
}

impl CheckServer {
    pub fn new(service: CheckService, limits: MessageLimits) -> Self {
        CheckServer {
            service: Arc::new(service),
            limits,
        }
    }
}

/// A connection's share of the message budget, set on each request by the
/// connection that carries it, so that one connection cannot take it all.
#[derive(Clone)]
pub struct ConnBudget(pub Arc<Budget>);

impl NamedService for CheckServer {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

impl<B> Service<http::Request<B>> for CheckServer
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CHECK_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let method = Unary(self.service.clone());
        let limits = self.limits.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let conn = parts.extensions.get::<ConnBudget>().map(|c| c.0.clone());
            // Held until the Check is answered: the decoded request lives as long.
            let (bytes, _taken) = match message::read(body, &limits, conn).await {
                Ok((bytes, taken)) => (bytes, Some(taken)),
                Err(unread) => {
                    parts.extensions.insert(unread);
                    (Bytes::from_static(EMPTY_MESSAGE), None)
                }
            };
            let req = http::Request::from_parts(parts, Full::new(bytes));
            let mut grpc =
                Grpc::new(CheckCodec).apply_max_message_size_config(Some(limits.max_bytes), None);
            Ok(grpc.unary(method, req).await)
        })
    }
}

struct Unary(Arc<CheckService>);

impl UnaryService<Incoming> for Unary {
    type Response = Answer;
    type Future = BoxFuture<tonic::Response<Answer>, Status>;

    fn call(&mut self, request: tonic::Request<Incoming>) -> Self::Future {
        let service = self.0.clone();
        let request = match request.extensions().get::<Unread>().cloned() {
            Some(unread) => {
                let (meta, ext, _) = request.into_parts();
                tonic::Request::from_parts(meta, ext, Incoming::Unread(unread))
            }
            None => request,
        };
        Box::pin(async move { Ok(service.answer(request).await) })
    }
}

struct CheckCodec;

impl Codec for CheckCodec {
    type Encode = Answer;
    type Decode = Incoming;
    type Encoder = ProstEncoder<Answer>;
    type Decoder = CheckDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckDecoder
    }
}

struct CheckDecoder;

impl Decoder for CheckDecoder {
    type Item = Incoming;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Incoming>, Status> {
        use prost::bytes::Buf;
        Ok(Some(match CheckRequest::decode(&mut *src) {
            Ok(check) => Incoming::Check(check),
            Err(e) => {
                // What prost left unread belongs to this message: drop it.
                let rest = src.remaining();
                src.advance(rest);
                Incoming::Undecodable(e)
            }
        }))
    }
}
