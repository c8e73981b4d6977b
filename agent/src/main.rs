//! The `imds-agent` binary.
//!
//! Exit codes: 0 on a clean stop, 1 when the command failed (the error chain
//! is printed on one line), 2 for a bad command line (from clap).

use std::process::ExitCode;

use clap::Parser;
use imds_agent::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("imds-agent: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::MockImds(args) => imds_agent::mock_imds::run(args).await,
        }
    })
}

/// Logs go to stderr, filtered by `IMDS_AGENT_LOG` or `RUST_LOG` (default `info`).
fn init_logging() {
    let filter = std::env::var("IMDS_AGENT_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
