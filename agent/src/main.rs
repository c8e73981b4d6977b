//! The `imds-agent` binary.
//!
//! Exit codes: 0 on a clean stop, 1 when the command failed (the error chain
//! is printed on one line), 2 for a bad command line (from clap).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use imds_agent::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = matches!(&cli.command, Command::Run(args) if args.log_format == "json");
    init_logging(json_logs);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("imds-agent: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Socket activation: take the listening socket systemd passed (fd 3,
    // LISTEN_FDS), before any thread exists, since reading it clears the
    // LISTEN_* variables from the environment.
    let activated = if matches!(cli.command, Command::Run(_)) {
        listenfd::ListenFd::from_env()
            .take_unix_listener(0)
            .context("taking the socket passed by systemd (LISTEN_FDS)")?
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // File writes and DNS-free blocking work only: a few threads, so the
        // unit's TasksMax= holds.
        .max_blocking_threads(8)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::MockImds(args) => imds_agent::mock_imds::run(args).await,
            Command::Run(args) => {
                let shutdown = imds_agent::signals::shutdown_signals()?;
                imds_agent::run::run(*args, activated, shutdown).await
            }
            Command::Demo(args) => imds_agent::demo::run(args).await,
            Command::ProbeConnect { authority } => {
                if imds_agent::doctor::probe_connect(&authority).await {
                    Ok(())
                } else {
                    std::process::exit(1)
                }
            }
            Command::Doctor(args) => {
                let findings = imds_agent::doctor::run_checks(&args).await;
                if imds_agent::doctor::report(&findings) {
                    Ok(())
                } else {
                    anyhow::bail!("some checks failed (see above)")
                }
            }
            Command::CredentialProcess(args) => {
                let json = imds_agent::credential_process::fetch(&args.socket).await?;
                println!("{}", json.trim_end());
                Ok(())
            }
        }
    })
}

/// Logs go to stderr, filtered by `IMDS_AGENT_LOG` or `RUST_LOG` (default `info`).
fn init_logging(json: bool) {
    let filter = std::env::var("IMDS_AGENT_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colours only on a terminal: the journal and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
