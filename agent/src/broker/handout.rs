//! The broker in the running agent: which credentials a peer gets, the
//! audit record of each answer, and the task that tells the broker about
//! every change of the instance role.
//!
//! # Audit
//!
//! Every hand-out and every refusal of credentials to a consumer (or, with a
//! config file, to an unmatched peer) is one log record with target
//! `imds_agent::audit` (a refusal or an error, on the credential socket or
//! the container endpoint, is recorded in full at most once per peer (its
//! uid, or a bridged container's address) and reason every 10 s, the ones
//! between counted in one record, so a looping client cannot flood the
//! log; see `audit_limit`): `consumer`, `output`, the peer's `uid`/`gid`/`pid`
//! and `exe` (the target of `/proc/PID/exe`, when the agent may read it:
//! the unit's `ProtectProc=invisible` and a peer of another user usually
//! hide it, and a pid read at connect time may belong to another process
//! by the time it is read, so `exe` is a hint, the uid is the fact),
//! `role`, `access_key_id`, `expiration` and `result` (`served`, `denied`,
//! `error`) with a `reason` for anything but `served`. Secret keys and
//! session tokens are never in it. With `--log-format json` each record is
//! one JSON object a line, which journald stores as one entry; CloudTrail's
//! `AssumeRole` event for the same session carries the session name
//! `<consumer>@<instance-id>` and the same access key id. Each write of a
//! consumer's file is a record too, with the same target (see
//! [`super::files`]).
//!
//! A refusal by the config (no consumer matches, or the peer's groups lead
//! to two consumers, [`super::config`]; on the container endpoint, the
//! agent's own token under `unmatched = "deny"`) is also counted, by
//! reason, in `imds_agent_consumer_refused_requests_total`
//! ([`Consumers::render_metrics`]), every one.

use std::sync::Arc;

use imds_client::{ProviderState, RoleCredentials};
use tokio::sync::watch;

use super::assumer::StsAssumer;
use super::cache::{Broker, BrokerError};
use super::config::{Config, Match};

/// The broker as the agent runs it.
pub type AgentBroker = Broker<StsAssumer>;

/// The consumers' config and their broker, shared by the outputs.
#[derive(Debug, Clone)]
pub struct Consumers {
    /// The validated config.
    pub config: Arc<Config>,
    /// The per-consumer session cache.
    pub broker: AgentBroker,
}

/// Who asks, as the kernel reported it at connect time.
#[derive(Debug, Clone)]
pub struct PeerId {
    /// Effective uid (`SO_PEERCRED`).
    pub uid: u32,
    /// Primary gid (`SO_PEERCRED`).
    pub gid: u32,
    /// Supplementary groups (`SO_PEERGROUPS`, [`crate::peer_groups`]), only
    /// those the config or the socket's allow-list name (the others cannot
    /// change what the peer gets, and a peer may have 65,536); `None` when
    /// the kernel could not say (before Linux 4.13): the peer is then never
    /// widened to the instance role ([`Match::GroupsUnknown`]).
    pub groups: Option<Arc<[u32]>>,
    /// Pid at connect time, when known.
    pub pid: Option<u32>,
}

/// What a peer gets.
#[derive(Debug)]
pub enum Answer {
    /// Its consumer's session.
    Consumer {
        /// The consumer's name.
        name: String,
        /// The session, or why there is none.
        result: Result<RoleCredentials, BrokerError>,
    },
    /// The instance role's own credentials (`unmatched = "instance-role"`).
    InstanceRole,
    /// Nothing: no consumer matches, and `unmatched = "deny"`. The reason
    /// names the peer and the fix.
    Denied(String),
}

impl Consumers {
    /// What `peer` gets, given the instance provider's `state` now.
    pub async fn answer(&self, peer: &PeerId, state: &ProviderState) -> Answer {
        let file = || {
            self.config
                .path()
                .map_or_else(|| "the config".to_owned(), |p| p.display().to_string())
        };
        match self
            .config
            .consumer_for(peer.uid, peer.gid, peer.groups.as_deref())
        {
            Match::Consumer(consumer) => Answer::Consumer {
                name: consumer.name.clone(),
                result: self.broker.credentials(&consumer.name, state).await,
            },
            Match::InstanceRole => Answer::InstanceRole,
            Match::Denied => {
                self.broker.count_refusal(false);
                Answer::Denied(format!(
                    "uid {} (primary gid {}; no supplementary group of it is a consumer's) matches no consumer \
                     in {} and unmatched = \"deny\": \
                     add the uid or a gid to a consumer's uids/gids, or set unmatched = \"instance-role\"",
                    peer.uid,
                    peer.gid,
                    file(),
                ))
            }
            Match::GroupsUnknown => {
                self.broker.count_refusal(false);
                Answer::Denied(format!(
                    "uid {} (primary gid {}) matches no consumer in {} by uid or primary gid, and its \
                     supplementary groups could not be read (SO_PEERGROUPS needs Linux 4.13 or later), \
                     so it may be in a consumer's gids: refused rather than serving the whole instance role; \
                     list the uid or its primary gid in the consumer it belongs to",
                    peer.uid,
                    peer.gid,
                    file(),
                ))
            }
            Match::Ambiguous(pairs) => {
                self.broker.count_refusal(true);
                let pairs: Vec<String> = pairs
                    .iter()
                    .map(|(gid, name)| format!("gid {gid} of consumer \"{name}\""))
                    .collect();
                Answer::Denied(format!(
                    "uid {} (primary gid {}) is in the groups of more than one consumer in {} ({}): \
                     refused rather than picking one; list the uid in one consumer's uids, \
                     or take the user out of all but one of these groups",
                    peer.uid,
                    peer.gid,
                    file(),
                    pairs.join(", "),
                ))
            }
        }
    }
}

/// The executable of `pid`, when `/proc` lets the agent read it.
pub fn executable(pid: Option<u32>) -> Option<String> {
    let pid = pid?;
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string())
}

/// One audit record (module docs). `credentials` only for `served`;
/// `reason` for anything else. Never logs a secret.
pub fn audit(
    consumer: &str,
    output: &str,
    peer: &PeerId,
    credentials: Option<&RoleCredentials>,
    result: &str,
    reason: Option<&str>,
) {
    audit_ids(
        consumer,
        output,
        (Some(peer.uid), Some(peer.gid), peer.pid),
        credentials,
        result,
        reason,
    );
}

/// As [`audit`], for a peer whose uid, gid or pid may be unknown (a
/// container's loopback TCP connection: uid from `sock_diag`, no gid or
/// pid); unknown ids are logged as -1.
pub fn audit_ids(
    consumer: &str,
    output: &str,
    (uid, gid, pid): (Option<u32>, Option<u32>, Option<u32>),
    credentials: Option<&RoleCredentials>,
    result: &str,
    reason: Option<&str>,
) {
    let exe = executable(pid);
    let uid = uid.map(i64::from).unwrap_or(-1);
    let gid = gid.map(i64::from).unwrap_or(-1);
    let (role, key, expiration) = match credentials {
        Some(c) => (
            c.role.as_str(),
            c.credentials.access_key_id().to_owned(),
            c.credentials.expiration_rfc3339(),
        ),
        None => ("", String::new(), String::new()),
    };
    let pid = pid.map(i64::from).unwrap_or(-1);
    let exe = exe.as_deref().unwrap_or("");
    let reason = reason.unwrap_or("");
    if result == "served" {
        tracing::info!(
            target: "imds_agent::audit",
            audit = true,
            consumer,
            output,
            uid,
            gid,
            pid,
            exe,
            role,
            access_key_id = %key,
            expiration = %expiration,
            result,
            "credentials handed out"
        );
    } else {
        tracing::warn!(
            target: "imds_agent::audit",
            audit = true,
            consumer,
            output,
            uid,
            gid,
            pid,
            exe,
            result,
            reason,
            "credentials refused"
        );
    }
}

/// Tells the broker about every change of the instance provider's state,
/// so a detach withdraws every consumer's session at once and a
/// replacement drops the old role's sessions (the next request assumes
/// again with the new role). Returns when the provider is gone or at
/// `shutdown`.
pub async fn follow(
    broker: AgentBroker,
    mut state: watch::Receiver<ProviderState>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let current = state.borrow_and_update().clone();
        let dropped = broker.observe(&current);
        if !dropped.is_empty() {
            tracing::info!(
                consumers = ?dropped,
                "the instance role changed: these consumers' sessions were withdrawn"
            );
        }
        tokio::select! {
            () = &mut shutdown => return,
            changed = state.changed() => if changed.is_err() { return },
        }
    }
}

impl Consumers {
    /// Each consumer as `/healthz` shows it: its name, whether it holds a
    /// valid session, seconds until that expires, and its last STS error.
    /// Names only, never keys.
    pub fn health(&self, now: std::time::SystemTime) -> serde_json::Value {
        let mut status = self.broker.status();
        status.sort_by(|a, b| a.name.cmp(&b.name));
        status
            .into_iter()
            .map(|c| {
                let left = c
                    .expiration
                    .and_then(|e| e.duration_since(now).ok())
                    .map(|d| d.as_secs());
                serde_json::json!({
                    "name": c.name,
                    "status": if left.is_some() { "ok" } else { "no-session" },
                    "expires_in_seconds": left,
                    "last_error": c.last_error,
                })
            })
            .collect()
    }

    /// Per-consumer gauges in the Prometheus text format, appended to
    /// `/metrics`: `imds_agent_consumer_session_valid{consumer}` (1 while
    /// it holds a valid session) and
    /// `imds_agent_consumer_session_expiry_seconds{consumer}` (0 without one),
    /// and `imds_agent_consumer_refused_requests_total{reason}`: requests
    /// refused because the peer matches no consumer (`no_consumer`, also
    /// counting a peer whose groups could not be read,
    /// [`Match::GroupsUnknown`], and a container presenting the agent's own
    /// token under `unmatched = "deny"`) or because its groups lead to two
    /// or more consumers (`ambiguous_groups`).
    pub fn render_metrics(&self, now: std::time::SystemTime) -> String {
        let mut status = self.broker.status();
        status.sort_by(|a, b| a.name.cmp(&b.name));
        let left: Vec<(String, Option<u64>)> = status
            .into_iter()
            .map(|c| {
                let left = c
                    .expiration
                    .and_then(|e| e.duration_since(now).ok())
                    .map(|d| d.as_secs());
                (c.name, left)
            })
            .collect();
        let mut out = String::from(
            "# HELP imds_agent_consumer_session_valid 1 while the consumer holds a valid STS session.\n\
             # TYPE imds_agent_consumer_session_valid gauge\n",
        );
        for (name, left) in &left {
            out.push_str(&format!(
                "imds_agent_consumer_session_valid{{consumer=\"{name}\"}} {}\n",
                u8::from(left.is_some())
            ));
        }
        out.push_str(
            "# HELP imds_agent_consumer_session_expiry_seconds Seconds until the consumer's STS session expires (0 without one).\n\
             # TYPE imds_agent_consumer_session_expiry_seconds gauge\n",
        );
        for (name, left) in &left {
            out.push_str(&format!(
                "imds_agent_consumer_session_expiry_seconds{{consumer=\"{name}\"}} {}\n",
                left.unwrap_or(0)
            ));
        }
        let (no_consumer, ambiguous) = self.broker.refusals();
        out.push_str(&format!(
            "# HELP imds_agent_consumer_refused_requests_total Requests refused by the config: the peer matches no consumer (no_consumer; on the container endpoint, the agent's own token under unmatched = deny), or its groups lead to two or more consumers (ambiguous_groups).\n\
             # TYPE imds_agent_consumer_refused_requests_total counter\n\
             imds_agent_consumer_refused_requests_total{{reason=\"no_consumer\"}} {no_consumer}\n\
             imds_agent_consumer_refused_requests_total{{reason=\"ambiguous_groups\"}} {ambiguous}\n"
        ));
        out
    }
}

/// For tests: consumers parsed from `text` whose STS is never reached (port 9
/// on loopback), for tests that only refuse or match peers.
#[cfg(test)]
impl Consumers {
    pub(crate) fn with_unreachable_sts(text: &str) -> Self {
        use crate::broker::assumer::StsAssumer;
        use crate::broker::cache::Broker;
        use crate::broker::config::Config;
        use crate::broker::sts::StsClient;
        let config = Config::parse(text, std::path::Path::new("/etc/imds-agent/agent.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let imds = imds_client::ImdsClient::builder()
            .endpoint("http://127.0.0.1:9")
            .unwrap()
            .build()
            .unwrap();
        let assumer = StsAssumer::new(imds, || {
            StsClient::builder().env(imds_client::config::Env::from_pairs([(
                "AWS_ENDPOINT_URL_STS",
                "http://127.0.0.1:9".to_owned(),
            )]))
        })
        .unwrap();
        let broker = Broker::builder(assumer).config(&config).build();
        Consumers {
            config: std::sync::Arc::new(config),
            broker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Consumers whose STS is never reached (a refusal asks nothing).
    fn consumers(text: &str) -> Consumers {
        Consumers::with_unreachable_sts(text)
    }

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> PeerId {
        PeerId {
            uid,
            gid,
            groups: Some(groups.into()),
            pid: None,
        }
    }

    fn refused(render: &str, reason: &str) -> u64 {
        let prefix = format!("imds_agent_consumer_refused_requests_total{{reason=\"{reason}\"}} ");
        render
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} line in:\n{render}"))
    }

    /// A peer whose supplementary groups lead to two consumers is refused
    /// with a reason naming the groups, the consumers and the fix, and the
    /// refusal is counted apart from peers that match no consumer.
    #[tokio::test]
    async fn groups_of_two_consumers_are_refused_named_and_counted() {
        let consumers = consumers(
            "[[consumer]]\nname = \"billing\"\ngids = [3000]\n\n\
             [[consumer]]\nname = \"shipper\"\ngids = [2000]\n",
        );
        let state = ProviderState::Starting;
        let answer = consumers
            .answer(&peer(1500, 100, &[2000, 3000]), &state)
            .await;
        let Answer::Denied(reason) = answer else {
            panic!("expected a refusal, got {answer:?}")
        };
        assert_eq!(
            reason,
            "uid 1500 (primary gid 100) is in the groups of more than one consumer in \
             /etc/imds-agent/agent.toml (gid 2000 of consumer \"shipper\", gid 3000 of consumer \"billing\"): \
             refused rather than picking one; list the uid in one consumer's uids, \
             or take the user out of all but one of these groups"
        );
        let answer = consumers.answer(&peer(1500, 100, &[7]), &state).await;
        let Answer::Denied(reason) = answer else {
            panic!("expected a refusal, got {answer:?}")
        };
        assert!(
            reason.starts_with(
                "uid 1500 (primary gid 100; no supplementary group of it is a consumer's) matches no consumer"
            ),
            "{reason}"
        );
        let render = consumers.render_metrics(std::time::SystemTime::UNIX_EPOCH);
        assert_eq!(refused(&render, "ambiguous_groups"), 1, "{render}");
        assert_eq!(refused(&render, "no_consumer"), 1, "{render}");
    }

    /// A peer with as many groups as Linux allows: its refusal (the 403's
    /// body, and the audit record of every request) stays short instead of
    /// listing 65,536 groups each time.
    #[tokio::test]
    async fn a_refusal_of_a_peer_with_65536_groups_is_short() {
        let consumers = consumers("[[consumer]]\nname = \"billing\"\ngids = [3000]\n");
        let many: Vec<u32> = (100_000..100_000 + 65_536).collect();
        let answer = consumers
            .answer(&peer(1500, 100, &many), &ProviderState::Starting)
            .await;
        let Answer::Denied(reason) = answer else {
            panic!("expected a refusal, got {answer:?}")
        };
        assert!(
            reason.len() < 1024,
            "expected a refusal under 1 KiB, got {} bytes: {}…",
            reason.len(),
            &reason[..200]
        );
    }

    /// Unknown supplementary groups with `unmatched = "instance-role"`: a
    /// 403 that says why, never the whole role.
    #[tokio::test]
    async fn a_peer_whose_groups_are_unknown_is_refused_not_widened() {
        let consumers = consumers(
            "unmatched = \"instance-role\"\n[[consumer]]\nname = \"billing\"\ngids = [3000]\n",
        );
        let unknown = PeerId {
            groups: None,
            ..peer(1500, 100, &[])
        };
        let answer = consumers.answer(&unknown, &ProviderState::Starting).await;
        let Answer::Denied(reason) = answer else {
            panic!("expected a refusal for unknown groups, got {answer:?}")
        };
        assert!(
            reason.contains("could not be read") && reason.contains("list the uid"),
            "{reason}"
        );
    }
}

#[cfg(test)]
mod exe_tests {
    //! The peer's executable name is the one field of an audit record a
    //! peer chooses freely: it names its binary. A newline in that name
    //! must not start a forged record, in text or in JSON.

    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The log of one audit record of `peer`, in text or JSON.
    fn logged(json: bool, peer: &PeerId) -> String {
        let buffer = Buffer::default();
        let writer = {
            let buffer = buffer.clone();
            move || buffer.clone()
        };
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(writer);
        let record = || audit("billing", "socket", peer, None, "denied", Some("r"));
        if json {
            tracing::subscriber::with_default(builder.json().finish(), record);
        } else {
            tracing::subscriber::with_default(builder.finish(), record);
        }
        String::from_utf8(buffer.0.lock().unwrap().clone()).expect("UTF-8 log")
    }

    #[test]
    fn a_newline_in_the_peer_s_executable_cannot_forge_a_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exe = dir
            .path()
            .join("app\nFORGED imds_agent::audit: credentials handed out result=\"served\"");
        std::fs::copy("/bin/sleep", &exe).expect("a copy of sleep with a newline in its name");
        let mut child = std::process::Command::new(&exe)
            .arg("30")
            .spawn()
            .expect("running it");
        let peer = PeerId {
            uid: 1500,
            gid: 1500,
            groups: Some(Arc::from([])),
            pid: Some(child.id()),
        };
        let seen = executable(peer.pid);
        let text = logged(false, &peer);
        let json = logged(true, &peer);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            seen.as_deref().is_some_and(|e| e.contains("app\nFORGED")),
            "expected the agent to read the executable's name, read {seen:?}"
        );
        for (format, log) in [("text", &text), ("json", &json)] {
            assert_eq!(
                log.lines().count(),
                1,
                "expected one {format} line for one record, got:\n{log}"
            );
            assert!(
                log.contains("app\\nFORGED"),
                "expected the newline escaped in {format}: {log}"
            );
        }
        let record: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON object");
        assert!(
            record["fields"]["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with(
                    "app\nFORGED imds_agent::audit: credentials handed out result=\"served\""
                )),
            "{record}"
        );
    }
}
