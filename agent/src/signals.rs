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
//!
//! Clients' `POST /refresh` (see [`crate::refresh`]) join SIGHUP in the same
//! [`Reloads`], so the daemon has one source of "refresh now".

use std::future::Future;

use anyhow::Context;
use imds_client::RoleCredentials;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use crate::refresh::Pending;

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
        (shutdown, Reloads::from(ReloadSource::Signal(hup)))
    }
}

/// Requests to refresh now: SIGHUP (a channel in tests), and clients'
/// `POST /refresh` once [`Reloads::with_requests`] added them.
#[derive(Debug)]
pub struct Reloads {
    source: ReloadSource,
    requests: Option<mpsc::UnboundedReceiver<Pending>>,
}

#[derive(Debug)]
enum ReloadSource {
    Signal(Signal),
    Channel(mpsc::UnboundedReceiver<()>),
    Never,
}

/// One request to refresh now.
#[derive(Debug)]
pub enum Reload {
    /// SIGHUP (or a test's channel): nobody waits for the outcome.
    Signal,
    /// A client's `POST /refresh`, waiting for the outcome.
    Request(Pending),
}

impl Reload {
    /// Where the request came from, for the log.
    pub fn origin(&self) -> &'static str {
        match self {
            Self::Signal => "SIGHUP",
            Self::Request(_) => "POST /refresh",
        }
    }

    /// Hands the refresh's result to whoever waits for it.
    pub fn answer(self, result: &Result<RoleCredentials, imds_client::Error>) {
        if let Self::Request(pending) = self {
            pending.answer(result);
        }
    }
}

impl Reloads {
    /// Reloads sent through the returned sender (for tests and embedders).
    pub fn channel() -> (mpsc::UnboundedSender<()>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Self::from(ReloadSource::Channel(rx)))
    }

    /// No reloads ever.
    pub fn never() -> Self {
        Self::from(ReloadSource::Never)
    }

    fn from(source: ReloadSource) -> Self {
        Self {
            source,
            requests: None,
        }
    }

    /// These reloads, and clients' requests (see [`crate::refresh::channel`]).
    pub fn with_requests(mut self, requests: mpsc::UnboundedReceiver<Pending>) -> Self {
        self.requests = Some(requests);
        self
    }

    /// Waits for the next reload request. A request made before the first
    /// call (during start-up) is returned at once. Pends forever once every
    /// source is gone.
    pub async fn recv(&mut self) -> Reload {
        enum Got {
            Signal(Option<()>),
            Request(Option<Pending>),
        }
        loop {
            let Self { source, requests } = self;
            let signal = async {
                match source {
                    ReloadSource::Signal(signal) => signal.recv().await,
                    ReloadSource::Channel(rx) => rx.recv().await,
                    ReloadSource::Never => std::future::pending().await,
                }
            };
            let request = async {
                match requests {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let got = tokio::select! {
                got = signal => Got::Signal(got),
                got = request => Got::Request(got),
            };
            match got {
                Got::Signal(Some(())) => return Reload::Signal,
                Got::Signal(None) => self.source = ReloadSource::Never,
                Got::Request(Some(pending)) => return Reload::Request(pending),
                Got::Request(None) => self.requests = None,
            }
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
