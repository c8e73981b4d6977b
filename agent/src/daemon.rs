//! The agent's core: poll the provider, fan its state out to the outputs,
//! serve the socket, stop cleanly.
//!
//! Data flows one way: the provider (the only thing that talks to IMDS)
//! publishes a [`ProviderState`]; the daemon writes it to each sink and the
//! socket server reads it. A failed refresh never replaces valid credentials
//! (the provider keeps serving them), and a failed write is tried again on
//! the next tick.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use imds_client::{ImdsCredentialsProvider, ProviderState, RoleCredentials, SharedTimeSource};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::metrics::Metrics;
use crate::server::{AccessPolicy, ServerLimits, serve};
use crate::sink::Sink;

/// Everything the daemon needs besides the provider and its outputs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// How often the role is re-checked.
    pub poll_interval: Duration,
    /// Socket access policy.
    pub access: AccessPolicy,
    /// Socket limits.
    pub limits: ServerLimits,
    /// The wall clock.
    pub clock: SharedTimeSource,
}

/// What the outputs currently hold.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Published {
    Nothing,
    Credentials(RoleCredentials),
    Withdrawn,
}

/// Runs until `shutdown` resolves. SIGHUP forces a refresh.
pub async fn run(
    provider: ImdsCredentialsProvider,
    sinks: Vec<Arc<dyn Sink>>,
    listener: Option<UnixListener>,
    config: DaemonConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut state = provider.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = listener.map(|listener| {
        let mut stop = stop_rx.clone();
        tokio::spawn(serve(
            listener,
            provider.subscribe(),
            metrics.clone(),
            config.clock.clone(),
            config.access.clone(),
            config.limits,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ))
    });
    let mut hangup = signal(SignalKind::hangup())?;
    let mut ticker = tokio::time::interval(config.poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = Published::Nothing;
    let notifier = crate::notify::Notifier::from_env()?;
    let mut last_status = None::<String>;
    let mut watchdog = crate::notify::Notifier::watchdog_interval().map(tokio::time::interval);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {
                let result = provider.poll().await;
                record(&metrics, result, &provider, &config.clock);
            }
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                notifier.send("WATCHDOG=1");
                continue;
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: refreshing credentials now");
                let result = provider.refresh_now().await;
                record(&metrics, result, &provider, &config.clock);
            }
            changed = state.changed() => {
                if changed.is_err() { break; }
            }
        }
        // Idempotent: unchanged state writes nothing; a failed write is
        // retried after the next event (at the latest the next poll tick).
        let current = state.borrow_and_update().clone();
        if fan_out(&current, &sinks, &mut published, &metrics).await {
            let status = match &current {
                ProviderState::Active { current, .. } => Some(format!(
                    "STATUS=serving credentials of role {}, expiring {}",
                    current.role,
                    current.credentials.expiration_rfc3339()
                )),
                ProviderState::NoRole => {
                    Some("STATUS=no IAM role attached; watching for one".to_owned())
                }
                _ => None,
            };
            if let Some(status) = status.filter(|s| last_status.as_ref() != Some(s)) {
                // The first known state makes the service ready.
                let message = match last_status {
                    None => format!("READY=1\n{status}"),
                    Some(_) => status.clone(),
                };
                notifier.send(&message);
                last_status = Some(status);
            }
        }
    }
    tracing::info!("shutting down");
    notifier.send("STOPPING=1");
    let _ = stop_tx.send(true);
    if let Some(server) = server {
        let _ = server.await;
    }
    Ok(())
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

/// Brings the outputs in line with `state`. Returns true when every sink
/// succeeded.
async fn fan_out(
    state: &ProviderState,
    sinks: &[Arc<dyn Sink>],
    published: &mut Published,
    metrics: &Metrics,
) -> bool {
    let wanted = match state {
        ProviderState::Active { current, .. } => {
            if let Published::Credentials(old) = &*published
                && old.role == current.role
                && (old == current
                    || current.credentials.expiration() < old.credentials.expiration())
            {
                return true;
            }
            Published::Credentials(current.clone())
        }
        ProviderState::NoRole => {
            if *published == Published::Withdrawn {
                return true;
            }
            Published::Withdrawn
        }
        // Starting, or IMDS failing: keep whatever the outputs hold.
        _ => return true,
    };
    let mut all_ok = true;
    for sink in sinks {
        let sink = sink.clone();
        let job = wanted.clone();
        let result = tokio::task::spawn_blocking(move || match &job {
            Published::Credentials(c) => sink.publish(c).map(|()| sink),
            _ => sink.withdraw().map(|()| sink),
        })
        .await;
        match result {
            Ok(Ok(sink)) => tracing::debug!(output = sink.name(), "output updated"),
            Ok(Err(e)) => {
                all_ok = false;
                metrics.sink_failed();
                tracing::error!(
                    cause = format!("{e:#}"),
                    "could not update an output; will retry"
                );
            }
            Err(e) => {
                all_ok = false;
                metrics.sink_failed();
                tracing::error!(cause = %e, "an output task failed; will retry");
            }
        }
    }
    if all_ok {
        match &wanted {
            Published::Credentials(c) => tracing::info!(
                role = %c.role,
                access_key_id = %c.credentials.access_key_id(),
                expiration = %c.credentials.expiration_rfc3339(),
                "published credentials"
            ),
            _ => tracing::info!("role detached: credentials withdrawn from every output"),
        }
        *published = wanted;
    }
    all_ok
}
