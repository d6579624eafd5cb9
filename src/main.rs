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
    },
    /// Validate a config file: exit 0 if valid, else print every error as
    /// file:line:column and exit 1.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// BSD sysexits EX_USAGE: the configuration is unusable.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Serve {
            config,
            workers,
            log_format,
        } => {
            init_logging(log_format);
            let config = match valet::config::load(&config) {
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
            let result = runtime.and_then(|rt| rt.block_on(valet::app::serve(config)));
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
    match valet::config::load(path) {
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
