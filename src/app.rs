//! Wiring: metrics, key tasks, the gRPC and admin servers, shutdown. Makes no
//! decisions.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;

use crate::admin::{self, Admin};
use crate::clock::Clock;
use crate::conn::{self, Gate, Limits};
use crate::grpc_mux::Mux;
use crate::http_authz;
use crate::jwks::Supervisor;
use crate::load::Loaded;
use crate::observe::Observer;
use crate::reload::{self, Reloader};
use crate::service::message::{Budget, MessageLimits};
use crate::service::{CheckServer, CheckService};
use crate::state::State;
use crate::stores::{Snapshot, Stores};
use crate::telemetry::{self, Telemetry};

/// The service name Envoy's gRPC health checks and grpc_health_probe ask about.
const CHECK_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// The binary's entry: binds the addresses of `listen:` and stops on SIGTERM/SIGINT.
pub async fn serve(config: Loaded, shutdown: Shutdown, limits: Limits) -> std::io::Result<()> {
    let listeners = Listeners::bind(&config).await?;
    serve_with(
        config,
        shutdown,
        limits,
        listeners,
        shutdown_signal(),
        Clock::system(),
    )
    .await
}

/// The listeners Valet serves on, bound before it starts: by [`serve`] from the
/// config's addresses, or by a caller that wants the ports first (a test on
/// `127.0.0.1:0` running Valet in its own process).
#[derive(Debug, Default)]
pub struct Listeners {
    pub grpc: Option<TcpListener>,
    pub admin: Option<TcpListener>,
    pub http: Option<TcpListener>,
}

impl Listeners {
    /// Binds every address `listen:` names.
    pub async fn bind(config: &Loaded) -> std::io::Result<Listeners> {
        async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
            match addr {
                Some(addr) => TcpListener::bind(addr).await.map(Some),
                None => Ok(None),
            }
        }
        Ok(Listeners {
            admin: bind(config.listen.admin).await?,
            http: bind(config.listen.http).await?,
            grpc: bind(config.listen.grpc).await?,
        })
    }
}

/// Serves on `listeners` until `stop` completes, then drains and stops as on
/// SIGTERM (`shutdown.drain`, then `shutdown.grace`): the same path as [`serve`],
/// on a given time source (an in-process test passes `Clock::tokio()` and moves
/// time with `tokio::time::advance` instead of sleeping). Its metrics are its own
/// (see [`Telemetry`]): everything it runs, and every task it starts, is polled
/// under its recorder, so several Valets in one process keep apart.
pub async fn serve_with(
    config: Loaded,
    shutdown: Shutdown,
    limits: Limits,
    listeners: Listeners,
    stop: impl Future<Output = ()> + Send + 'static,
    clock: Clock,
) -> std::io::Result<()> {
    let telemetry = Telemetry::new();
    // The first Valet of a process also takes events emitted outside any scope.
    telemetry.install_global();
    let run = serve_scoped(
        telemetry.clone(),
        config,
        shutdown,
        limits,
        listeners,
        stop,
        clock,
    );
    telemetry.scope(run).await
}

#[allow(clippy::too_many_arguments)]
async fn serve_scoped(
    telemetry: Telemetry,
    config: Loaded,
    shutdown: Shutdown,
    limits: Limits,
    listeners: Listeners,
    stop: impl Future<Output = ()> + Send + 'static,
    clock: Clock,
) -> std::io::Result<()> {
    let metrics = telemetry.handle().clone();
    telemetry::spawn(telemetry::upkeep(metrics.clone()));
    for w in &config.warnings {
        tracing::warn!("{w}");
    }

    let policy = config.policy;
    // The key tasks belong to the reloader from here on: a reload adds and removes providers.
    let mut keys = Supervisor::new().with_clock(clock.clone());
    let cells = keys.adopt(&policy.providers);
    let stores = Stores::new(&policy, cells, config.revocation).with_api_keys(
        &policy,
        config.api_keys,
        None,
    );
    tracing::info!(
        config = %config.path.display(),
        routes = policy.routes.len(),
        providers = policy.providers.len(),
        default = ?policy.default,
        "policy loaded"
    );
    if let Some(r) = stores.revocation.as_ref().filter(|r| r.is_loaded()) {
        telemetry::revocation_loaded(&r.source, r.current().entries);
    }
    for k in stores.api_key_files() {
        telemetry::api_keys_loaded(&k.provider, &k.path, k.current().len());
    }
    let status = reload::initial_status(&config.path, clock.unix());
    telemetry::policy_loaded(status.generation, status.loaded_at);
    let observer = Arc::new(Observer::new(&policy, clock.clone()));
    let state = Arc::new(
        State::new(Snapshot::new(policy, stores), status)
            .with_clock(clock)
            .with_max_in_flight(shutdown.max_in_flight)
            .with_telemetry(telemetry),
    );
    let reloader = Reloader::new(
        config.path.clone(),
        config.listen.clone(),
        state.clone(),
        keys,
    );
    telemetry::spawn(reloader.run());
    {
        let (state, pushed) = (state.clone(), state.clone());
        let clock = state.clock().clone();
        telemetry::spawn(crate::revocation::watch(
            move || state.snapshot().stores.revocation.clone(),
            move || {
                let snap = pushed.snapshot();
                Some(snap.stores.shared.as_ref()?.denylist_changed.clone())
            },
            clock,
        ));
    }
    {
        let state = state.clone();
        telemetry::spawn(crate::shared_store::watch(move || {
            state.snapshot().stores.shared.clone()
        }));
    }
    {
        let state = state.clone();
        telemetry::spawn(crate::api_keys::watch(move || {
            state.snapshot().stores.api_key_files()
        }));
    }

    // Each Check listener's connection cap, below the descriptor limit with room
    // kept for the admin port and everything else.
    let fds = conn::fd_limit();
    let check_listeners =
        usize::from(listeners.grpc.is_some()) + usize::from(listeners.http.is_some());
    let cap = conn::connection_cap(limits.max_connections, check_listeners, fds);
    if cap < limits.max_connections {
        tracing::warn!(
            wanted = limits.max_connections,
            cap,
            fd_limit = fds.unwrap_or(0),
            "--max-connections lowered to fit the open-file limit (raise `ulimit -n` for more)"
        );
    }
    limits.log(cap, fds);

    if let Some(listener) = listeners.admin {
        tracing::info!(admin = %listener.local_addr()?, "listening");
        let admin = Arc::new(Admin {
            state: state.clone(),
            observer: observer.clone(),
            metrics,
        });
        let gate = Gate::new("admin", conn::ADMIN_MAX_CONNECTIONS);
        telemetry::spawn(admin::serve(listener, admin, gate));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    telemetry::spawn(report_health(state.clone(), health));

    // SIGTERM: not ready at once, keep answering for `drain` (Envoy in the same pod
    // is draining too and still asks), then stop accepting and let in-flight
    // Checks finish within `grace`.
    let (stop_tx, stop_rx) = watch::channel(false);
    {
        let state = state.clone();
        let drain = shutdown.drain;
        telemetry::spawn(async move {
            stop.await;
            state.start_draining();
            tracing::info!(
                drain_secs = drain.as_secs_f64(),
                "draining: not ready, still answering"
            );
            tokio::time::sleep(drain).await;
            let _ = stop_tx.send(true);
        });
    }

    if let Some(listener) = listeners.http {
        tracing::info!(http = %listener.local_addr()?, "listening");
        let http = http_authz::serve(
            listener,
            state.clone(),
            observer.clone(),
            config.listen.http_proxy,
            config.listen.http_xfcc,
            Gate::new("http", cap),
        );
        let stop = stopped(stop_rx.clone());
        telemetry::spawn(async move {
            tokio::select! {
                _ = http => {}
                _ = stop => {}
            }
        });
    }

    let server = async {
        match listeners.grpc {
            Some(listener) => {
                tracing::info!(grpc = %listener.local_addr()?, "listening");
                let messages = MessageLimits {
                    max_bytes: limits.max_message_bytes,
                    timeout: limits.message_timeout,
                    budget: Arc::new(Budget::new(limits.message_budget_bytes)),
                };
                let service =
                    CheckServer::new(CheckService::new(state.clone(), observer.clone()), messages);
                let routes = Mux::new(health_service).with(service);
                let gate = Gate::new("grpc", cap);
                conn::serve_grpc(listener, routes, limits.clone(), gate, stop_rx.clone()).await;
                Ok::<(), std::io::Error>(())
            }
            None => {
                stopped(stop_rx.clone()).await;
                Ok::<(), std::io::Error>(())
            }
        }
    };
    let grace = shutdown.grace;
    tokio::select! {
        result = server => result?,
        _ = async { stopped(stop_rx.clone()).await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_secs = grace.as_secs_f64(), "grace period over: exiting with Checks in flight");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Shutdown timing, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Shutdown {
    pub drain: Duration,
    pub grace: Duration,
    /// Checks in flight before new ones are answered `overloaded`.
    pub max_in_flight: usize,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            drain: Duration::from_secs(5),
            grace: Duration::from_secs(10),
            max_in_flight: crate::state::DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// gRPC health follows readiness: SERVING once every provider a route uses has keys.
async fn report_health(state: Arc<State>, reporter: tonic_health::server::HealthReporter) {
    let mut last = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let ready = state.is_ready();
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter.set_service_status(CHECK_SERVICE, status).await;
            tracing::info!(ready, "readiness changed");
            last = Some(ready);
        }
    }
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
