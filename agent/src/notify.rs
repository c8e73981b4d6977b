//! The systemd notify protocol (`Type=notify`): `READY=1`, `STATUS=...`,
//! `STOPPING=1`, sent as datagrams to `$NOTIFY_SOCKET` (a path, or an
//! abstract address written with a leading `@`).
//!
//! The agent says `READY=1` only once its first state is known: credentials
//! delivered to every output, or IMDS saying that no role is attached. A
//! service that depends on it therefore starts with credentials in place.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// A connection to systemd's notify socket, or nothing when not under systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a no-op when it is unset.
    pub fn from_env() -> io::Result<Self> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(path) => Self::to(&path.to_string_lossy()),
            None => Ok(Self { target: None }),
        }
    }

    /// Notifies nothing (not under systemd; tests).
    pub fn none() -> Self {
        Self { target: None }
    }

    /// Notifies the socket at `path` (`@name` for an abstract address).
    pub fn to(path: &str) -> io::Result<Self> {
        let address = match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => SocketAddr::from_pathname(path)?,
        };
        Ok(Self {
            target: Some((UnixDatagram::unbound()?, address)),
        })
    }

    /// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when systemd
    /// set it for this process (`WatchdogSec=`).
    pub fn watchdog_interval() -> Option<std::time::Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Some(pid) = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            && pid != std::process::id()
        {
            return None;
        }
        (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
    }

    /// Sends `state` (e.g. `READY=1\nSTATUS=...`). Failures are logged, not fatal.
    pub fn send(&self, state: &str) {
        if let Some((socket, address)) = &self.target
            && let Err(e) = socket.send_to_addr(state.as_bytes(), address)
        {
            tracing::warn!(error = %e, "could not notify systemd");
        }
    }
}
