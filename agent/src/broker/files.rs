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
//! # Audit
//!
//! Every write of a consumer's session into one of its files is one audit
//! record (target `imds_agent::audit`, as for the socket's hand-outs, see
//! [`super::handout`]): `consumer`, `output` (`credentials_file` or
//! `json_file`), `path`, `owner_uid` (who the file is for: the consumer's
//! first uid, or the agent's own uid for a consumer matched by gids only),
//! `role`, `access_key_id`, `expiration` and `result`: `written`, or
//! `failed` with a `reason`. A failed write is retried every few seconds
//! ([`crate::outputs`]); only the first failure of each session is a
//! record, and the retries are counted, not logged: the `written` record
//! that ends them says how many tries failed (`failed_tries`). So a disk
//! that fails for a day costs one record per session, not one per retry.
//! Never a secret key or session token. A withdrawal (the instance role
//! was detached) hands nothing out and is not a record.
//!
//! One task per consumer with files polls the broker
//! ([`Broker::poll`](super::cache::Broker::poll)): at the start of the
//! session's advisory window, after a failure's backoff, and at every change
//! of the instance provider's state.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use imds_client::{ProviderState, RoleCredentials, SharedTimeSource};
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
/// Each write is audited (module docs).
pub fn sinks(consumer: &Consumer) -> anyhow::Result<Vec<Arc<dyn Sink>>> {
    let options = file_options(consumer);
    let owner_uid = options
        .owner
        .unwrap_or_else(|| rustix::process::geteuid().as_raw());
    let audited = |output, path: &PathBuf, inner: Arc<dyn Sink>| -> Arc<dyn Sink> {
        Arc::new(Audited {
            inner,
            consumer: consumer.name.clone(),
            output,
            path: path.clone(),
            owner_uid,
            failing: Mutex::new(None),
        })
    };
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    if let Some(path) = &consumer.credentials_file {
        sinks.push(audited(
            "credentials_file",
            path,
            Arc::new(CredentialsFileSink::new(
                path.clone(),
                "default".into(),
                options,
            )?),
        ));
    }
    if let Some(path) = &consumer.json_file {
        sinks.push(audited(
            "json_file",
            path,
            Arc::new(JsonFileSink::new(path.clone(), options)?),
        ));
    }
    let started = SharedTimeSource::default().now();
    for sink in &sinks {
        sink.prepare(started)
            .map_err(|e| anyhow::anyhow!("consumer {:?}: {e:#}", consumer.name))?;
    }
    Ok(sinks)
}

/// A consumer's file, each write of which is one audit record (module docs).
#[derive(Debug)]
struct Audited {
    inner: Arc<dyn Sink>,
    consumer: String,
    /// The config key: `credentials_file` or `json_file`.
    output: &'static str,
    path: PathBuf,
    owner_uid: u32,
    /// While writes fail: the session (access key id, expiry) whose first
    /// failure was recorded, and how many tries of it failed since.
    failing: Mutex<Option<((String, SystemTime), u64)>>,
}

impl Sink for Audited {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn prepare(&self, started: SystemTime) -> anyhow::Result<()> {
        self.inner.prepare(started)
    }

    fn publish(&self, current: &RoleCredentials) -> anyhow::Result<()> {
        let result = self.inner.publish(current);
        let path = self.path.display();
        let key = current.credentials.access_key_id();
        let expiration = current.credentials.expiration_rfc3339();
        let session = (key.to_owned(), current.credentials.expiration());
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(()) => {
                let failed_tries = failing.take().map_or(0, |(_, tries)| tries);
                tracing::info!(
                    target: "imds_agent::audit",
                    audit = true,
                    consumer = %self.consumer,
                    output = self.output,
                    %path,
                    owner_uid = self.owner_uid,
                    role = %current.role,
                    access_key_id = %key,
                    expiration = %expiration,
                    result = "written",
                    failed_tries,
                    "credentials written to a consumer's file"
                );
            }
            // A retry of a session whose failure is recorded already.
            Err(_) if failing.as_ref().is_some_and(|(s, _)| *s == session) => {
                if let Some((_, tries)) = failing.as_mut() {
                    *tries += 1;
                }
            }
            Err(e) => {
                *failing = Some((session, 1));
                tracing::warn!(
                    target: "imds_agent::audit",
                    audit = true,
                    consumer = %self.consumer,
                    output = self.output,
                    %path,
                    owner_uid = self.owner_uid,
                    role = %current.role,
                    access_key_id = %key,
                    expiration = %expiration,
                    result = "failed",
                    reason = format!("{e:#}"),
                    "credentials not written to a consumer's file (retried; \
                     further failures of this session are counted in its written record)"
                );
            }
        }
        result
    }

    fn withdraw(&self) -> anyhow::Result<()> {
        self.inner.withdraw()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use imds_client::Credentials;

    fn consumer(dir: &std::path::Path) -> Consumer {
        Consumer {
            name: "billing".into(),
            uids: vec![],
            gids: vec![],
            role_arn: None,
            session_policy: None,
            policy_arns: vec![],
            duration: Duration::from_secs(900),
            credentials_file: Some(dir.join("credentials")),
            json_file: Some(dir.join("billing.json")),
            container_token_file: None,
            source_identity: false,
            session_tags: false,
        }
    }

    fn session() -> RoleCredentials {
        RoleCredentials {
            role: "billing-role".into(),
            credentials: Arc::new(Credentials::new(
                "ASIAWRITTEN000001",
                "secret-key-never-logged-0000000000000000",
                "session-token-never-logged",
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000),
            )),
        }
    }

    /// Every write of a consumer's file is one audit record with the
    /// consumer, the file, its owner, the role, the key id and expiry; a
    /// failed write is one too, with the reason. No secret in either.
    #[test]
    #[tracing_test::traced_test]
    fn each_write_of_a_consumer_s_file_is_one_audit_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let consumer = consumer(dir.path());
        let sinks = sinks(&consumer).expect("the consumer's sinks");
        assert_eq!(sinks.len(), 2);
        let current = session();
        for sink in &sinks {
            sink.publish(&current).expect("written");
        }
        let json = std::fs::read_to_string(dir.path().join("billing.json")).expect("json file");
        assert!(json.contains("ASIAWRITTEN000001"), "{json}");
        let me = rustix::process::geteuid().as_raw();
        for (output, file) in [
            ("credentials_file", "credentials"),
            ("json_file", "billing.json"),
        ] {
            let path = dir.path().join(file);
            let wanted = [
                "imds_agent::audit".to_owned(),
                "audit=true".to_owned(),
                "consumer=billing".to_owned(),
                format!("output=\"{output}\""),
                format!("path={}", path.display()),
                format!("owner_uid={me}"),
                "role=billing-role".to_owned(),
                "access_key_id=ASIAWRITTEN000001".to_owned(),
                "expiration=2030-03-17T17:46:40Z".to_owned(),
                "result=\"written\"".to_owned(),
            ];
            logs_assert(|lines| {
                let n = lines
                    .iter()
                    .filter(|l| wanted.iter().all(|w| l.contains(w.as_str())))
                    .count();
                if n == 1 {
                    Ok(())
                } else {
                    Err(format!(
                        "expected one audit record with {wanted:?}, found {n} in {lines:#?}"
                    ))
                }
            });
        }

        // A directory where the file should be: the write fails, and that
        // is a record too.
        let json = dir.path().join("billing.json");
        std::fs::remove_file(&json).expect("removing the json file");
        std::fs::create_dir(&json).expect("a directory in its place");
        assert!(
            sinks[1].publish(&current).is_err(),
            "expected the write over a directory to fail"
        );
        logs_assert(|lines| {
            let failed: Vec<&&str> = lines
                .iter()
                .filter(|l| l.contains("imds_agent::audit") && l.contains("result=\"failed\""))
                .collect();
            match failed.as_slice() {
                [line]
                    if line.contains("output=\"json_file\"")
                        && line.contains("access_key_id=ASIAWRITTEN000001")
                        && line.contains("reason=") =>
                {
                    Ok(())
                }
                _ => Err(format!(
                    "expected one failed record for the json file with a reason, saw {failed:#?}"
                )),
            }
        });
        assert!(!logs_contain("never-logged"), "a secret in the audit log");
    }

    fn audit_lines(lines: &[&str], result: &str) -> usize {
        lines
            .iter()
            .filter(|l| l.contains("imds_agent::audit") && l.contains(result))
            .count()
    }

    /// A write that keeps failing is retried every few seconds: the first
    /// failure of a session is a record, the retries are counted in the
    /// record of the write that finally succeeds, and a new session's
    /// failure is a record again. The log stays bounded however long the
    /// disk fails.
    #[test]
    #[tracing_test::traced_test]
    fn retries_of_a_failing_write_are_one_record_not_one_each() {
        let dir = tempfile::tempdir().expect("temp dir");
        let consumer = consumer(dir.path());
        let sinks = sinks(&consumer).expect("the consumer's sinks");
        let json = dir.path().join("billing.json");
        std::fs::create_dir(&json).expect("a directory where the json file goes");
        let current = session();
        for _ in 0..100 {
            assert!(sinks[1].publish(&current).is_err(), "expected a failure");
        }
        logs_assert(|lines| match audit_lines(lines, "result=\"failed\"") {
            1 => Ok(()),
            n => Err(format!(
                "expected one failed record for 100 tries of one session, saw {n}"
            )),
        });
        std::fs::remove_dir(&json).expect("the disk is back");
        sinks[1].publish(&current).expect("written");
        logs_assert(|lines| {
            let written: Vec<&&str> = lines
                .iter()
                .filter(|l| l.contains("result=\"written\""))
                .collect();
            match written.as_slice() {
                [line] if line.contains("failed_tries=100") => Ok(()),
                _ => Err(format!(
                    "expected one written record with failed_tries=100, saw {written:#?}"
                )),
            }
        });

        // Failing again, with the next session: a record of its own.
        std::fs::remove_file(&json).expect("removing the json file");
        std::fs::create_dir(&json).expect("a directory in its place");
        let next = RoleCredentials {
            role: "billing-role".into(),
            credentials: Arc::new(Credentials::new(
                "ASIAWRITTEN000002",
                "secret-key-never-logged-0000000000000000",
                "session-token-never-logged",
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_003_600),
            )),
        };
        for _ in 0..3 {
            assert!(sinks[1].publish(&next).is_err(), "expected a failure");
        }
        logs_assert(|lines| match audit_lines(lines, "result=\"failed\"") {
            2 => Ok(()),
            n => Err(format!(
                "expected a second failed record for the next session, saw {n} in all"
            )),
        });
    }
}
