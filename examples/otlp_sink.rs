//! An OTLP/gRPC trace receiver that counts and drops what it is sent: the
//! collector for scripts/bench-tracing.sh, so that "tracing on, sampling 1"
//! pays for a real export.
//!
//!   cargo run --release --example otlp_sink -- --addr 127.0.0.1:4317

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:4317")]
    addr: SocketAddr,
}

static SPANS: AtomicU64 = AtomicU64::new(0);

struct Sink;

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        let total = SPANS.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        eprintln!("otlp_sink: {total} spans");
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.addr).await.unwrap();
    let forever = std::future::pending();
    valet::grpc_mux::serve(listener, TraceServiceServer::new(Sink), forever)
        .await
        .unwrap();
}
