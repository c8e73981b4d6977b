//! Shutdown and reload signals.
//!
//! systemd stops services with SIGTERM; a person at a terminal sends SIGINT.
//! Handlers are registered before anything is announced (a printed address,
//! a bound socket), so a signal sent the moment a caller sees the agent ready
//! is never lost to the default action.

use std::future::Future;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

/// Registers SIGTERM and SIGINT handlers now; the returned future resolves on
/// the first of them.
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
