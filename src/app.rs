//! Wiring: initial key load, the gRPC server, shutdown. Makes no decisions.

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::policy::Policy;
use crate::provider::JwksSource;
use crate::service::CheckService;
use crate::state::State;
use crate::{jwks, telemetry};

/// Bounds the streams one connection (Envoy) may open; tonic's default is unlimited.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Largest CheckRequest accepted. Envoy's are a few KiB, but an oversized token must
/// still arrive to be denied with a reason rather than fail as a gRPC error.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Loads every provider's keys once; a provider whose keys fail to load answers
/// `keys_unavailable` until they do.
pub fn load_keys(policy: &Policy) {
    for provider in &policy.providers {
        match &provider.jwks {
            JwksSource::File(path) => match jwks::read_file(path) {
                Ok(set) => {
                    for skipped in &set.skipped {
                        tracing::warn!(provider = %provider.name, key = %skipped, "jwks key skipped");
                    }
                    tracing::info!(
                        provider = %provider.name,
                        keys = set.len(),
                        kids = ?set.kids().collect::<Vec<_>>(),
                        "jwks loaded"
                    );
                    provider.keys.store(set);
                }
                Err(e) => {
                    tracing::error!(provider = %provider.name, error = %e, "jwks load failed")
                }
            },
        }
    }
}

pub async fn serve(config: Config) -> std::io::Result<()> {
    telemetry::describe();
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    load_keys(&config.policy);
    tracing::info!(
        config = %config.path.display(),
        routes = config.policy.routes.len(),
        providers = config.policy.providers.len(),
        default = ?config.policy.default,
        "policy loaded"
    );
    let state = Arc::new(State::new(config.policy));

    let listener = TcpListener::bind(config.listen.grpc).await?;
    let addr = listener.local_addr()?;
    tracing::info!(grpc = %addr, "listening");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    let service = AuthorizationServer::new(CheckService::new(state))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await
        .map_err(std::io::Error::other)?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
