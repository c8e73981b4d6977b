//! The `imds-agent` binary.
//!
//! Exit codes: 0 on a clean stop, 1 when the command failed (the error chain
//! is printed on one line), 2 for a bad command line (from clap).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use imds_agent::cli::{Cli, Command};
use imds_agent::signals::Signals;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Socket activation: read LISTEN_FDS before any thread exists, since
    // reading it clears LISTEN_FDS and LISTEN_PID from the environment; and
    // the names systemd gave the sockets (LISTEN_FDNAMES, which listenfd
    // leaves alone), which tell the credential socket from the container
    // endpoint's (see `imds_agent::run::Activated`).
    let listen_fd_names = std::env::var("LISTEN_FDNAMES").ok();
    let mut listen_fds = listenfd::ListenFd::from_env();
    // Then, before anything else (even the command line), the signal
    // handlers: a SIGHUP or SIGTERM during start-up must never kill the
    // agent with the kernel's default action (see `signals`).
    let (runtime, signals) = match start_runtime() {
        Ok(started) => started,
        Err(err) => {
            eprintln!("imds-agent: error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse();
    let json_logs = matches!(&cli.command, Command::Run(args) if args.log_format == "json");
    init_logging(json_logs);
    let result = runtime.block_on(run(
        cli,
        &mut listen_fds,
        listen_fd_names.as_deref(),
        signals,
    ));
    // A write stuck in the kernel (a hung file system) must not hold the
    // exit: blocking threads get a moment to finish, then are abandoned.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("imds-agent: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime, with the signal handlers already registered in it.
fn start_runtime() -> anyhow::Result<(tokio::runtime::Runtime, Signals)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // File writes and DNS-free blocking work only: a few threads, so the
        // unit's TasksMax= holds.
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let signals = {
        let _entered = runtime.enter();
        Signals::install()?
    };
    Ok((runtime, signals))
}

async fn run(
    cli: Cli,
    listen_fds: &mut listenfd::ListenFd,
    listen_fd_names: Option<&str>,
    signals: Signals,
) -> anyhow::Result<()> {
    let (shutdown, reloads) = signals.split();
    match cli.command {
        Command::Run(args) => {
            let activated = imds_agent::run::Activated::take(listen_fds, listen_fd_names)
                .context("taking the sockets passed by systemd (LISTEN_FDS)")?;
            let notifier = imds_agent::notify::Notifier::from_env()
                .context("opening systemd's notify socket (NOTIFY_SOCKET)")?;
            let inherited = imds_agent::run::Inherited {
                activated,
                notifier,
            };
            imds_agent::run::run(*args, inherited, shutdown, reloads).await
        }
        Command::Demo(args) => imds_agent::demo::run(args, shutdown, reloads).await,
        Command::MockImds(args) => imds_agent::mock_imds::run(args, shutdown).await,
        Command::ProbeConnect { authority } => {
            if interruptible(imds_agent::doctor::probe_connect(&authority), shutdown).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Doctor(args) => {
            let findings = interruptible(imds_agent::doctor::run_checks(&args), shutdown).await?;
            if imds_agent::doctor::report(&findings) {
                Ok(())
            } else {
                anyhow::bail!("some checks failed (see above)")
            }
        }
        Command::Refresh(args) => {
            let outcome =
                interruptible(imds_agent::refresh::request(&args.socket), shutdown).await??;
            println!("{outcome}");
            Ok(())
        }
        Command::CredentialProcess(args) => {
            let json = interruptible(
                imds_agent::credential_process::fetch(&args.socket),
                shutdown,
            )
            .await??;
            println!("{}", json.trim_end());
            Ok(())
        }
    }
}

/// A short command stops at the first SIGTERM or SIGINT, as it would without
/// a handler, but through the normal exit path.
async fn interruptible<T>(
    work: impl Future<Output = T>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<T> {
    tokio::select! {
        done = work => Ok(done),
        () = shutdown => anyhow::bail!("interrupted"),
    }
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
