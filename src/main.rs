//! The `valet` binary: parse the command line, set up logging, hand over.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "valet",
    version,
    about = "Envoy ext_authz sidecar: OAuth 2.0 JWTs checked against route policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Envoy's ext_authz Check.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Tokio worker threads; 1 runs a single-threaded runtime (fastest per core).
        #[arg(long, env = "VALET_WORKERS", default_value_t = 1)]
        workers: usize,
        #[arg(long, env = "VALET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// After SIGTERM: not ready, but still answering, for this long.
        #[arg(long, env = "VALET_DRAIN", default_value = "5s", value_parser = duration)]
        drain: std::time::Duration,
        /// Then at most this long for in-flight Checks before exiting.
        #[arg(long, env = "VALET_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
        grace: std::time::Duration,
        /// Checks in flight before new ones are answered 503 `overloaded`.
        #[arg(long, env = "VALET_MAX_IN_FLIGHT", default_value_t = 1024)]
        max_in_flight: usize,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Validate a config file: exit 0 if valid, else print every error as
    /// file:line:column and exit 1.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Explain how one request is decided: the route that matches and why the
    /// earlier ones do not, what it requires, the decision and its reason.
    Explain {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long)]
        path: String,
        #[arg(long, default_value = "")]
        host: String,
        /// A request header, NAME:VALUE (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// An Envoy context extension, KEY=VALUE (repeatable).
        #[arg(long = "context")]
        context: Vec<String>,
        /// A token, verified against the provider's keys (sent as a Bearer token).
        #[arg(long, conflicts_with = "claims")]
        token: Option<String>,
        /// Claims as JSON, taken as verified: the policy logic alone.
        #[arg(long)]
        claims: Option<String>,
        /// The caller's workload identity as the proxy forwards it
        /// (`source.principal`, a SPIFFE ID), for `require.principals`.
        #[arg(long)]
        principal: Option<String>,
    },
    /// Print the proxy side generated from the policy: an Envoy bootstrap (routes
    /// mirrored in order, ext_authz off on anonymous routes, the Valet route named
    /// per route), or with --format istio an AuthorizationPolicy (CUSTOM) and an
    /// EnvoyFilter for Istio's sidecar.
    EnvoyConfig {
        #[arg(long, short)]
        config: PathBuf,
        /// bootstrap: a whole Envoy bootstrap; istio: AuthorizationPolicy + EnvoyFilter.
        #[arg(long, value_enum, default_value_t = EnvoyFormat::Bootstrap)]
        format: EnvoyFormat,
        /// Where Envoy listens for clients (bootstrap).
        #[arg(long, default_value = "0.0.0.0:8000")]
        listen: std::net::SocketAddr,
        /// The application Envoy forwards to (bootstrap).
        #[arg(long, default_value = "127.0.0.1:8080")]
        upstream: std::net::SocketAddr,
        /// Valet's Check port (istio: only its port is used, with --valet-service).
        #[arg(long, default_value = "127.0.0.1:9001")]
        valet: std::net::SocketAddr,
        /// Envoy's admin address (bootstrap).
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: std::net::SocketAddr,
        /// ext_authz timeout.
        #[arg(long, default_value = "250ms", value_parser = duration)]
        timeout: std::time::Duration,
        /// istio: metadata.name of the AuthorizationPolicy and the EnvoyFilter.
        #[arg(long, default_value = "orders-valet")]
        name: String,
        /// istio: metadata.namespace (default: none, i.e. `kubectl apply -n`).
        #[arg(long)]
        namespace: Option<String>,
        /// istio: the extension provider, as in meshConfig.extensionProviders[].name.
        #[arg(long, default_value = "valet")]
        provider: String,
        /// istio: a pod label of the workload, KEY=VALUE (repeatable).
        #[arg(
            long = "selector",
            default_value = "app.kubernetes.io/name=orders",
            value_parser = valet::envoy_config::parse_label
        )]
        selector: Vec<(String, String)>,
        /// istio: the host the sidecar reaches Valet at (ServiceEntry host or Service name),
        /// for the meshConfig snippet.
        #[arg(long, default_value = "valet.local")]
        valet_service: String,
    },
    /// Print the metric contract as JSON: every metric Valet exports, its type,
    /// its labels (with their values where bounded) and its help text.
    Metrics,
    /// Run policy test suites (YAML files of cases); exit 1 if any case fails.
    Test {
        /// The policy under test; default: each suite's `config:`.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Make an API key: print it once, and the entry for a provider's
    /// `api_keys.file` (its SHA-256 and claims; the file holds no usable key).
    ApiKey {
        /// The claims the key stands for, as a JSON object (e.g. `{"sub":"acme"}`).
        #[arg(long, default_value = "{}")]
        claims: String,
    },
}

/// Connection and message limits (README "Limits and floods").
#[derive(clap::Args)]
struct LimitArgs {
    /// Largest CheckRequest read (KiB/MiB suffixes); larger ones are denied 413
    /// `request_too_large`. Envoy's default header limit is 60 KiB.
    #[arg(long, env = "VALET_MAX_MESSAGE_BYTES", default_value = "256KiB", value_parser = size)]
    max_message_bytes: usize,
    /// CheckRequest bytes held at once, all connections together (a quarter per
    /// connection); past it, Checks are denied 503 `overloaded`.
    #[arg(long, env = "VALET_MESSAGE_BUFFER_BYTES", default_value = "16MiB", value_parser = size)]
    message_buffer_bytes: usize,
    /// Time for a CheckRequest's message to arrive whole; then 400 `malformed_request`.
    #[arg(long, env = "VALET_MESSAGE_TIMEOUT", default_value = "10s", value_parser = duration)]
    message_timeout: std::time::Duration,
    /// Connections per Check port, lowered to fit the open-file limit; more are closed on accept.
    #[arg(long, env = "VALET_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Concurrent Checks (HTTP/2 streams) per gRPC connection.
    #[arg(long, env = "VALET_MAX_STREAMS", default_value_t = 128)]
    max_streams_per_connection: u32,
    /// A gRPC connection that has not sent the HTTP/2 preface by then is closed.
    #[arg(long, env = "VALET_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = duration)]
    handshake_timeout: std::time::Duration,
    /// A gRPC connection with no Check in flight for this long gets GOAWAY.
    #[arg(long, env = "VALET_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    idle_timeout: std::time::Duration,
    /// A gRPC connection older than this gets GOAWAY (Envoy reconnects).
    #[arg(long, env = "VALET_MAX_CONNECTION_AGE", default_value = "30m", value_parser = duration)]
    max_connection_age: std::time::Duration,
}

impl LimitArgs {
    fn limits(&self) -> valet::conn::Limits {
        valet::conn::Limits {
            max_connections: self.max_connections,
            max_streams: self.max_streams_per_connection.max(1),
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            max_connection_age: self.max_connection_age,
            max_message_bytes: self.max_message_bytes,
            message_budget_bytes: self.message_buffer_bytes.max(self.max_message_bytes),
            message_timeout: self.message_timeout,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum EnvoyFormat {
    Bootstrap,
    Istio,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// BSD sysexits EX_USAGE: the configuration is unusable.
const EX_USAGE: u8 = 64;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Explain {
            config,
            method,
            path,
            host,
            headers,
            context,
            token,
            claims,
            principal,
        } => explain(
            &config,
            valet::explain::RequestSpec {
                method,
                path,
                host,
                principal: principal.unwrap_or_default(),
                ..Default::default()
            },
            &headers,
            &context,
            token,
            claims,
        ),
        Command::Test { config, files } => run_tests(config.as_deref(), &files),
        Command::ApiKey { claims } => api_key(&claims),
        Command::Metrics => {
            println!("{:#}", valet::metrics_contract::to_json());
            ExitCode::SUCCESS
        }
        Command::EnvoyConfig {
            config,
            format,
            listen,
            upstream,
            valet,
            admin,
            timeout,
            name,
            namespace,
            provider,
            selector,
            valet_service,
        } => {
            let loaded = match load_or_exit(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let timeout_ms = timeout.as_millis() as u64;
            let source = config.display().to_string();
            match format {
                EnvoyFormat::Bootstrap => {
                    let options = valet::envoy_config::Options {
                        listen,
                        upstream,
                        valet,
                        admin,
                        timeout_ms,
                    };
                    let v = valet::envoy_config::bootstrap(&loaded.policy, &options);
                    print!("{}", valet::envoy_config::to_yaml(&source, &v));
                }
                EnvoyFormat::Istio => {
                    let options = valet::envoy_config::IstioOptions {
                        name,
                        namespace,
                        provider,
                        selector,
                        valet_service,
                        valet_port: valet.port(),
                        timeout_ms,
                    };
                    let istio = valet::envoy_config::istio(&loaded.policy, &options);
                    print!(
                        "{}",
                        valet::envoy_config::istio_yaml(&source, &istio, &options)
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Command::Serve {
            config,
            workers,
            log_format,
            drain,
            grace,
            max_in_flight,
            limits,
        } => {
            init_logging(log_format);
            let config = match valet::load::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("invalid configuration:\n{e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            let runtime = if workers <= 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .enable_all()
                    .build()
            };
            let shutdown = valet::app::Shutdown {
                drain,
                grace,
                max_in_flight,
            };
            let limits = limits.limits();
            let result =
                runtime.and_then(|rt| rt.block_on(valet::app::serve(config, shutdown, limits)));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "valet stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match valet::load::load(path) {
        Ok(config) => {
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            let mut ok = true;
            // Local key files are checked too; remote ones are not fetched here.
            for provider in &config.policy.providers {
                if let valet::provider::JwksSource::File(file) = &provider.jwks
                    && let Err(e) = valet::jwks::read_file(file)
                {
                    eprintln!("{}: provider {}: {e}", path.display(), provider.name);
                    ok = false;
                }
            }
            if ok {
                println!(
                    "{}: ok ({} routes, {} providers)",
                    path.display(),
                    config.policy.routes.len(),
                    config.policy.providers.len()
                );
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn size(text: &str) -> Result<usize, String> {
    valet::conn::parse_size(text)
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    valet::config::parse_duration(text)
}

fn load_or_exit(path: &std::path::Path) -> Result<valet::load::Loaded, ExitCode> {
    valet::load::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EX_USAGE)
    })
}

/// Loads every provider's keys once (a fetch for remote ones), reporting failures.
fn load_keys(snap: &valet::stores::Snapshot) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    if let Ok(rt) = runtime {
        for problem in rt.block_on(valet::jwks::load_once(
            &snap.providers,
            &snap.stores.keys,
            &valet::clock::Clock::system(),
        )) {
            eprintln!("warning: {problem}");
        }
    }
}

fn api_key(claims: &str) -> ExitCode {
    let claims = match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(claims) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("--claims is not a JSON object: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let Ok((key, sha256)) = valet::api_keys::generate() else {
        eprintln!("no randomness available");
        return ExitCode::FAILURE;
    };
    // JSON is YAML: the claims go in the entry as a flow mapping.
    let claims = serde_json::Value::Object(claims);
    println!("# The key, shown this once: give it to the client, keep no copy.");
    println!("key: {key}");
    println!("# Its entry, for the provider's api_keys file (under `keys:`):");
    println!("  - sha256: {sha256}");
    println!("    claims: {claims}");
    ExitCode::SUCCESS
}

#[allow(clippy::too_many_arguments)]
fn explain(
    config: &std::path::Path,
    mut spec: valet::explain::RequestSpec,
    headers: &[String],
    context: &[String],
    token: Option<String>,
    claims: Option<String>,
) -> ExitCode {
    let snap = match load_or_exit(config) {
        Ok(c) => c.into_snapshot(),
        Err(code) => return code,
    };
    for h in headers {
        let Some((k, v)) = h.split_once(':') else {
            eprintln!("--header takes NAME:VALUE, not {h:?}");
            return ExitCode::from(EX_USAGE);
        };
        spec.headers
            .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    for c in context {
        let Some((k, v)) = c.split_once('=') else {
            eprintln!("--context takes KEY=VALUE, not {c:?}");
            return ExitCode::from(EX_USAGE);
        };
        spec.context.insert(k.to_string(), v.to_string());
    }
    let mode = match claims {
        Some(json) => {
            match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&json) {
                Ok(map) => valet::explain::Mode::Claims(map),
                Err(e) => {
                    eprintln!("--claims is not a JSON object: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            }
        }
        None => {
            if let Some(t) = token {
                spec.headers
                    .insert("authorization".into(), format!("Bearer {t}"));
            }
            if spec.headers.contains_key("authorization") || !snap.providers.is_empty() {
                load_keys(&snap);
            }
            valet::explain::Mode::Token {
                now: valet::clock::Clock::system().unix(),
            }
        }
    };
    print!("{}", valet::explain::explain(&snap, &spec, mode));
    ExitCode::SUCCESS
}

/// An opaque token: ask the provider's introspection endpoint once, as the server
/// would, so that the explanation decides from its answer.
fn run_tests(config_flag: Option<&std::path::Path>, files: &[PathBuf]) -> ExitCode {
    let (mut passed, mut failed) = (0, 0);
    for file in files {
        let suite = match valet::policy_test::read_suite(file) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EX_USAGE);
            }
        };
        let config_path = match valet::policy_test::config_path(file, &suite, config_flag) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EX_USAGE);
            }
        };
        let snap = match load_or_exit(&config_path) {
            Ok(c) => c.into_snapshot(),
            Err(code) => return code,
        };
        if valet::policy_test::needs_keys(&suite) {
            load_keys(&snap);
        }
        println!("{} (policy {})", file.display(), config_path.display());
        let (report, p, f) =
            valet::policy_test::run(&snap, &suite, valet::clock::Clock::system().unix());
        print!("{report}");
        passed += p;
        failed += f;
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VALET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
