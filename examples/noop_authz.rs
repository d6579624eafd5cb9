//! A no-op ext_authz server: answers OK to every Check without reading it. The
//! floor a real Check is measured against (scripts/bench.sh), served with Valet's
//! own settings: current_thread runtime, TCP_NODELAY, at most 1024 streams per
//! connection, 4 MiB messages.
//!
//!   cargo run --release --example noop_authz -- --addr 127.0.0.1:9101

use std::net::SocketAddr;

use clap::Parser;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9101")]
    addr: SocketAddr,
}

struct Noop;

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse {
            status: Some(RpcStatus {
                code: 0,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            ..Default::default()
        }))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(args.addr).await?;
            eprintln!("noop_authz listening grpc={}", listener.local_addr()?);
            let service = AuthorizationServer::new(Noop).max_decoding_message_size(4 * 1024 * 1024);
            valet::grpc_mux::serve(listener, service, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            Ok(())
        })
}
