//! Shutdown and reload signals, handled from the first instant.
//!
//! systemd stops services with SIGTERM, a person at a terminal sends SIGINT,
//! and `systemctl reload`, logrotate or a config-management run send SIGHUP.
//! The kernel's default for all three is to kill the process, so a handler
//! installed late (after start-up work) leaves a window in which a reload
//! kills the agent (exit 129) and a stop skips the clean-up. `main`
//! therefore calls [`Signals::install`] before anything else; from then on:
//!
//! - SIGTERM or SIGINT resolves the shutdown future, even when it arrived
//!   during start-up: the agent stops cleanly at the next point it checks.
//! - SIGHUP is remembered: a SIGHUP during start-up is answered by a refresh
//!   as soon as the daemon runs, and never kills.

use std::future::Future;

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

/// The process's SIGTERM, SIGINT and SIGHUP handlers.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Registers the handlers now. Call it first thing, inside a Tokio
    /// runtime: signals that arrive from here on are never lost to the
    /// default action. SIGTERM's handler is registered last, so a process
    /// that shows it (`SigCgt` in `/proc/PID/status`) handles all three.
    pub fn install() -> anyhow::Result<Self> {
        let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        Ok(Self { term, int, hup })
    }

    /// Splits into the shutdown future (the first SIGTERM or SIGINT) and the
    /// stream of reload requests (SIGHUP).
    pub fn split(self) -> (impl Future<Output = ()> + Send + 'static, Reloads) {
        let Self {
            mut term,
            mut int,
            hup,
        } = self;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("received SIGTERM"),
                _ = int.recv() => tracing::info!("received SIGINT"),
            }
        };
        (shutdown, Reloads(ReloadSource::Signal(hup)))
    }
}

/// Requests to refresh now: SIGHUP in the binary, a channel in tests.
#[derive(Debug)]
pub struct Reloads(ReloadSource);

#[derive(Debug)]
enum ReloadSource {
    Signal(Signal),
    Channel(mpsc::UnboundedReceiver<()>),
    Never,
}

impl Reloads {
    /// Reloads sent through the returned sender (for tests and embedders).
    pub fn channel() -> (mpsc::UnboundedSender<()>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Self(ReloadSource::Channel(rx)))
    }

    /// No reloads ever.
    pub fn never() -> Self {
        Self(ReloadSource::Never)
    }

    /// Waits for the next reload request. A request made before the first
    /// call (during start-up) is returned at once. Pends forever once the
    /// source is gone.
    pub async fn recv(&mut self) {
        let got = match &mut self.0 {
            ReloadSource::Signal(signal) => signal.recv().await,
            ReloadSource::Channel(rx) => rx.recv().await,
            ReloadSource::Never => None,
        };
        if got.is_none() {
            self.0 = ReloadSource::Never;
            std::future::pending::<()>().await;
        }
    }
}

/// Registers SIGTERM and SIGINT handlers now; the returned future resolves on
/// the first of them. For the subcommands that have no reload (the emulator).
pub fn shutdown_signals() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("received SIGTERM"),
            _ = int.recv() => tracing::info!("received SIGINT"),
        }
    })
}
