//! The agent's core: poll the provider, fan its state out to the outputs,
//! run the servers, stop cleanly.
//!
//! Data flows one way: the provider (the only thing that talks to IMDS)
//! publishes a [`ProviderState`]; the daemon decides what the file outputs
//! should hold and hands it to their writers ([`Outputs`], off this loop),
//! and the servers read the state themselves. A failed refresh never
//! replaces valid credentials (the provider keeps serving them), and a
//! failed write is retried by its writer.
//!
//! The shape follows mini-redis's `server::run(listener, shutdown)`:
//! [`run`] takes everything it drives in one [`Daemon`] value and one
//! [`Shutdown`]; signals and `NOTIFY_SOCKET` come in from `main`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use imds_client::{ImdsCredentialsProvider, ProviderState, RoleCredentials, SharedTimeSource};
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::on_change::OnChange;
use crate::outputs::{Outputs, Wanted};
use crate::shutdown::Shutdown;
use crate::signals::Reloads;

/// A server task (the credential socket, the container endpoint): it serves
/// until the shutdown it was given, then returns. An error, or a return
/// before shutdown, stops the agent with an error.
pub struct Server {
    name: &'static str,
    task: Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>,
}

impl Server {
    /// A server called `name` in logs.
    pub fn new(
        name: &'static str,
        task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> Self {
        Self {
            name,
            task: Box::pin(task),
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("name", &self.name).finish()
    }
}

/// When and how the provider is asked.
#[derive(Debug)]
pub struct Refresh {
    /// The provider (the only thing that talks to IMDS).
    pub provider: ImdsCredentialsProvider,
    /// How often the role is re-checked.
    pub poll_interval: Duration,
    /// Requests to refresh now (SIGHUP, and clients' `POST /refresh`).
    pub reloads: Reloads,
}

/// Everything the daemon drives.
#[derive(Debug)]
pub struct Daemon {
    /// The file outputs' writers.
    pub outputs: Outputs,
    /// The servers to run until shutdown.
    pub servers: Vec<Server>,
    /// The provider and its schedule.
    pub refresh: Refresh,
    /// systemd's notify socket (a no-op outside systemd), and the watchdog interval.
    pub notifier: Notifier,
    /// The wall clock.
    pub clock: SharedTimeSource,
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// The `--on-change` commands, run once every output holds a change.
    pub on_change: OnChange,
}

/// How long a stop waits for servers and writers before it abandons them.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// Runs until `shutdown`. A reload (SIGHUP, `POST /refresh`) refreshes now.
pub async fn run(daemon: Daemon, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let Daemon {
        mut outputs,
        servers,
        refresh,
        notifier,
        clock,
        metrics,
        mut on_change,
    } = daemon;
    let Refresh {
        provider,
        poll_interval,
        mut reloads,
    } = refresh;
    let mut running = JoinSet::new();
    for server in servers {
        running.spawn(async move { (server.name, server.task.await) });
    }
    let mut state = provider.subscribe();
    // The first poll, before anything else: a SIGHUP remembered from
    // start-up is then answered by a refresh of what it found.
    let first = tokio::select! {
        biased;
        () = shutdown.wait() => None,
        result = provider.poll() => Some(result),
    };
    if let Some(result) = first {
        record(&metrics, result, &provider, &clock);
    }
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + poll_interval, poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = None::<String>;
    let mut watchdog = Notifier::watchdog_interval().map(tokio::time::interval);
    let failure = loop {
        tokio::select! {
            biased;
            () = shutdown.wait() => break None,
            Some(done) = running.join_next() => {
                // Servers return once shutdown started, and with two or
                // more of them one's return was seen here before the
                // shutdown branch fired (about 1 stop in 15): a clean stop.
                if shutdown.is_stopping() && matches!(done, Ok((_, Ok(())))) {
                    break None;
                }
                let failure = match done {
                    Ok((name, Ok(()))) => anyhow::anyhow!("the {name} stopped unexpectedly"),
                    Ok((name, Err(e))) => e.context(format!("the {name} failed")),
                    Err(e) => anyhow::Error::new(e).context("a server task panicked"),
                };
                tracing::error!(cause = format!("{failure:#}"), "stopping the agent");
                break Some(failure);
            }
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                notifier.send("WATCHDOG=1");
                continue;
            }
            _ = ticker.tick() => {
                tokio::select! {
                    biased;
                    () = shutdown.wait() => break None,
                    result = provider.poll() => record(&metrics, result, &provider, &clock),
                }
            }
            reload = reloads.recv() => {
                tracing::info!(origin = reload.origin(), "refreshing credentials now");
                tokio::select! {
                    biased;
                    // A waiting client is answered "stopping" (the reload is dropped).
                    () = shutdown.wait() => break None,
                    result = provider.refresh_now() => {
                        reload.answer(&result);
                        record(&metrics, result, &provider, &clock);
                    }
                }
            }
            changed = state.changed() => {
                if changed.is_err() { break None; }
            }
            all_applied = outputs.next_applied() => {
                if all_applied {
                    announce(&outputs, &notifier, &mut last_status);
                    on_change.applied(outputs.wanted());
                }
                continue;
            }
        }
        let current = state.borrow_and_update().clone();
        on_change.observe(&current);
        if let Some(wanted) = wanted(&current, outputs.wanted()) {
            outputs.set(wanted);
        }
        if outputs.all_applied() {
            announce(&outputs, &notifier, &mut last_status);
            on_change.applied(outputs.wanted());
        }
    };
    tracing::info!("shutting down");
    notifier.send("STOPPING=1");
    drop(shutdown);
    let stop_servers = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(STOP_GRACE, stop_servers)
        .await
        .is_err()
    {
        tracing::warn!("a server was still closing connections at shutdown; abandoned");
        running.abort_all();
    }
    outputs.stop(STOP_GRACE).await;
    on_change.stop(STOP_GRACE).await;
    match failure {
        Some(failure) => Err(failure).context("the agent stopped on an error"),
        None => Ok(()),
    }
}

/// What the outputs should hold for `state`, given what they were last
/// asked to hold; `None` keeps that.
///
/// The fan-out rule: within one role, credentials never go backwards. A
/// provider state that carries credentials expiring *earlier* than those the
/// outputs hold (an older response served again, a skewed clock, a retry
/// that raced a rotation) is not published, since readers of the files
/// would otherwise switch to keys that die sooner. A new role is always
/// published, and so is a detach.
fn wanted(state: &ProviderState, held: Option<&Wanted>) -> Option<Wanted> {
    match state {
        ProviderState::Active { current, .. } => {
            if let Some(Wanted::Credentials(old)) = held
                && old.role == current.role
                && (old == current
                    || current.credentials.expiration() < old.credentials.expiration())
            {
                return None;
            }
            Some(Wanted::Credentials(current.clone()))
        }
        ProviderState::NoRole => Some(Wanted::Withdrawn),
        // Starting, or IMDS failing: keep whatever the outputs hold.
        _ => None,
    }
}

/// Logs what every output now holds and tells systemd (`READY=1` the
/// first time, then `STATUS=` when it changes).
fn announce(outputs: &Outputs, notifier: &Notifier, last_status: &mut Option<String>) {
    let status = match outputs.wanted() {
        Some(Wanted::Credentials(c)) => format!(
            "STATUS=serving credentials of role {}, expiring {}",
            c.role,
            c.credentials.expiration_rfc3339()
        ),
        Some(Wanted::Withdrawn) => "STATUS=no IAM role attached; watching for one".to_owned(),
        None => return,
    };
    if last_status.as_ref() == Some(&status) {
        return;
    }
    match outputs.wanted() {
        Some(Wanted::Credentials(c)) => tracing::info!(
            role = %c.role,
            access_key_id = %c.credentials.access_key_id(),
            expiration = %c.credentials.expiration_rfc3339(),
            "published credentials"
        ),
        _ => tracing::info!("role detached: credentials withdrawn from every output"),
    }
    // The first known state makes the service ready.
    let message = match last_status {
        None => format!("READY=1\n{status}"),
        Some(_) => status.clone(),
    };
    notifier.send(&message);
    *last_status = Some(status);
}

/// Counts a poll or refresh that succeeded with IMDS answering. Failures
/// are counted where they happen, by the provider's failure observer (see
/// `run::provider`), which also sees background refreshes.
fn record(
    metrics: &Metrics,
    result: Result<RoleCredentials, imds_client::Error>,
    provider: &ImdsCredentialsProvider,
    clock: &SharedTimeSource,
) {
    let healthy = matches!(
        &*provider.subscribe().borrow(),
        ProviderState::Active {
            last_error: None,
            ..
        }
    );
    if result.is_ok() && healthy {
        metrics.refreshed(clock.now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imds_client::Credentials;
    use std::time::SystemTime;

    fn creds(role: &str, key: &str, expires: u64) -> RoleCredentials {
        RoleCredentials {
            role: role.into(),
            credentials: Arc::new(Credentials::new(
                key,
                "secret",
                "token",
                SystemTime::UNIX_EPOCH + Duration::from_secs(expires),
            )),
        }
    }

    fn active(c: &RoleCredentials) -> ProviderState {
        ProviderState::Active {
            current: c.clone(),
            last_error: None,
        }
    }

    /// The fan-out rule, as a table: (held, state) -> what is asked of the outputs.
    #[test]
    fn credentials_never_go_backwards_within_a_role() {
        let old = creds("r", "ASIAOLD", 2_000);
        let newer = creds("r", "ASIANEW", 3_000);
        let older = creds("r", "ASIAOLDER", 1_000);
        let other_role_older = creds("other", "ASIAOTHER", 1_000);
        let held = Some(Wanted::Credentials(old.clone()));
        let cases: Vec<(&str, Option<Wanted>, ProviderState, Option<Wanted>)> = vec![
            (
                "first credentials",
                None,
                active(&old),
                Some(Wanted::Credentials(old.clone())),
            ),
            (
                "a rotation",
                held.clone(),
                active(&newer),
                Some(Wanted::Credentials(newer.clone())),
            ),
            ("the same credentials", held.clone(), active(&old), None),
            (
                "older credentials of the same role",
                held.clone(),
                active(&older),
                None,
            ),
            (
                "a replacement, even with earlier expiry",
                held.clone(),
                active(&other_role_older),
                Some(Wanted::Credentials(other_role_older.clone())),
            ),
            (
                "a detach",
                held.clone(),
                ProviderState::NoRole,
                Some(Wanted::Withdrawn),
            ),
            ("starting", None, ProviderState::Starting, None),
            (
                "after a detach, the role again",
                Some(Wanted::Withdrawn),
                active(&older),
                Some(Wanted::Credentials(older.clone())),
            ),
        ];
        for (what, held, state, expected) in cases {
            assert_eq!(wanted(&state, held.as_ref()), expected, "{what}");
        }
    }
}

#[cfg(test)]
#[path = "daemon_tests.rs"]
mod in_process;
