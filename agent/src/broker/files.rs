//! Each consumer's own files: its `credentials_file` and `json_file`,
//! kept current with its session.
//!
//! They go through the same sinks as the instance-role outputs (atomic
//! replace, the trust rules of [`crate::trust`], a writer per file off the
//! daemon's loop, see [`crate::outputs`]), owned by the consumer's first uid
//! with mode 0600; a consumer matched by gids only gets files owned by the
//! agent, group its first gid, mode 0640. A detach of the instance role
//! withdraws them, as it does the instance-role files.
//!
//! One task per consumer with files polls the broker
//! ([`Broker::poll`](super::cache::Broker::poll)): at the start of the
//! session's advisory window, after a failure's backoff, and at every change
//! of the instance provider's state.

use std::sync::Arc;
use std::time::Duration;

use imds_client::{ProviderState, SharedTimeSource};
use tokio::sync::watch;

use super::cache::BrokerError;
use super::config::Consumer;
use super::handout::AgentBroker;
use crate::daemon::Server;
use crate::metrics::Metrics;
use crate::outputs::{Outputs, Wanted, WriteLimits};
use crate::sink::{CredentialsFileSink, FileOptions, JsonFileSink, Sink};

/// How long a stop waits for a consumer's write in progress.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The file options of `consumer`'s outputs (module docs).
pub fn file_options(consumer: &Consumer) -> FileOptions {
    match (consumer.uids.first(), consumer.gids.first()) {
        (Some(&uid), _) => FileOptions {
            mode: 0o600,
            owner: Some(uid),
            ..FileOptions::default()
        },
        (None, Some(&gid)) => FileOptions {
            mode: 0o640,
            group: Some(gid),
            ..FileOptions::default()
        },
        (None, None) => FileOptions::default(),
    }
}

/// The sinks of `consumer`'s files, prepared (directories checked, stale
/// temp files removed): an error stops the agent at start, naming the file.
pub fn sinks(consumer: &Consumer) -> anyhow::Result<Vec<Arc<dyn Sink>>> {
    let options = file_options(consumer);
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    if let Some(path) = &consumer.credentials_file {
        sinks.push(Arc::new(CredentialsFileSink::new(
            path.clone(),
            "default".into(),
            options,
        )?));
    }
    if let Some(path) = &consumer.json_file {
        sinks.push(Arc::new(JsonFileSink::new(path.clone(), options)?));
    }
    let started = SharedTimeSource::default().now();
    for sink in &sinks {
        sink.prepare(started)
            .map_err(|e| anyhow::anyhow!("consumer {:?}: {e:#}", consumer.name))?;
    }
    Ok(sinks)
}

/// One task per consumer with files, each a [`Server`] of the daemon.
pub fn tasks(
    broker: &AgentBroker,
    state: &watch::Receiver<ProviderState>,
    metrics: &Arc<Metrics>,
    shutdown: &crate::shutdown::Shutdown,
) -> anyhow::Result<Vec<Server>> {
    let mut servers = Vec::new();
    for consumer in broker.consumers() {
        let sinks = sinks(consumer)?;
        if sinks.is_empty() {
            continue;
        }
        let outputs = Outputs::start(sinks, WriteLimits::default(), metrics.clone());
        let task = keep_current(
            broker.clone(),
            consumer.name.clone(),
            outputs,
            state.clone(),
            shutdown.clone().wait_owned(),
        );
        servers.push(Server::new("consumer files", async move {
            task.await;
            Ok(())
        }));
    }
    Ok(servers)
}

async fn keep_current(
    broker: AgentBroker,
    name: String,
    mut outputs: Outputs,
    mut state: watch::Receiver<ProviderState>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut last_error = None::<String>;
    loop {
        let current = state.borrow_and_update().clone();
        if let ProviderState::Starting = current {
            // Nothing to assume with yet: wait for the first load.
            tokio::select! {
                () = &mut shutdown => break,
                changed = state.changed() => if changed.is_err() { break },
            }
            continue;
        }
        let polled = tokio::select! {
            () = &mut shutdown => break,
            polled = broker.poll(&name, &current) => polled,
        };
        match polled {
            Ok(session) => {
                last_error = None;
                outputs.set(Wanted::Credentials(session));
            }
            Err(BrokerError::NoInstanceRole) => outputs.set(Wanted::Withdrawn),
            Err(e) => {
                // The files keep the last session; it expires on its own.
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::warn!(consumer = %name, error = %message, "the consumer's files were not refreshed");
                    last_error = Some(message);
                }
            }
        }
        let wait = broker.poll_interval(&name);
        tokio::select! {
            () = &mut shutdown => break,
            changed = state.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(wait) => {}
        }
    }
    outputs.stop(STOP_GRACE).await;
}
