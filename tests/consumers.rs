//! Least privilege per consumer (issue 14): the real agent with a config of
//! two consumers, against the IMDS and STS emulators, asked by throwaway
//! users over its socket.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use imds_client::mock::{FaultDuration, MockImds, MockSts, StsFault};
use rustix::process::Signal;

use crate::util::{Running, Stranger, agent, metrics_socket_of, unix_get, wait_for};

const BILLING_ACTION: &str = "s3:GetObject";
const SHIPPER_ACTION: &str = "logs:PutLogEvents";
const REPORTS_ACTION: &str = "athena:GetQueryResults";

/// The emulators, the agent, and two consumers' users plus one unmatched.
struct Host {
    imds: MockImds,
    sts: MockSts,
    agent: Option<Running>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    billing_file: PathBuf,
    shipper_file: PathBuf,
    group: u32,
    billing: Stranger,
    shipper: Stranger,
    nobody: Stranger,
}

/// The socket's group (`--socket-group`, mode 0660): every test user is a
/// member, as a host's apps would be of an `imds-consumers` group; the
/// config then decides what each gets.
fn socket_group() -> u32 {
    Stranger::new().gid
}

fn policy(action: &str) -> String {
    format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"{action}","Resource":"*"}}]}}"#
    )
}

impl Host {
    /// `files`: give billing a `credentials_file` and shipper a `json_file`
    /// (their pollers then assume at start).
    async fn start(files: bool) -> Self {
        Self::start_with(files, "").await
    }

    /// As [`Host::start`], with `more` (further `[[consumer]]` tables)
    /// appended to the config.
    async fn start_with(files: bool, more: &str) -> Self {
        let imds = MockImds::builder()
            .role("instance-role")
            .start()
            .await
            .unwrap();
        let sts = MockSts::for_imds(&imds).start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (billing, shipper, nobody) = (Stranger::new(), Stranger::new(), Stranger::new());
        let config = dir.path().join("agent.toml");
        let billing_file = billing.home(dir.path()).join("credentials");
        let shipper_file = dir.path().join("shipper.json");
        std::fs::write(
            &config,
            format!(
                r#"unmatched = "deny"

[[consumer]]
name = "billing"
uids = [{}]
session_policy = '{}'
duration_seconds = 900
{}

[[consumer]]
name = "shipper"
uids = [{}]
session_policy = '{}'
policy_arns = ["arn:aws:iam::aws:policy/CloudWatchLogsFullAccess"]
duration_seconds = 1800
{}

{more}
"#,
                billing.uid,
                policy(BILLING_ACTION),
                if files {
                    format!("credentials_file = \"{}\"", billing_file.display())
                } else {
                    String::new()
                },
                shipper.uid,
                policy(SHIPPER_ACTION),
                if files {
                    format!("json_file = \"{}\"", shipper_file.display())
                } else {
                    String::new()
                },
            ),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let socket = dir.path().join("agent.sock");
        let log = dir.path().join("agent.log");
        let group = socket_group();
        let mut cmd = agent();
        cmd.arg("run")
            .arg("--imds-endpoint")
            .arg(imds.endpoint())
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .args([
                "--socket-mode",
                "0660",
                "--log-format",
                "json",
                "--poll-interval",
                "1",
            ])
            .arg("--metrics-socket")
            .arg(metrics_socket_of(&socket))
            .arg("--socket-group")
            .arg(group.to_string())
            .env("IMDS_AGENT_LOG", "trace")
            .env("AWS_ENDPOINT_URL_STS", sts.endpoint())
            .env_remove("AWS_REGION");
        let agent = Running::start_logging_to(cmd, &log);
        wait_for("the agent's socket", || {
            unix_get(&socket, "/healthz").is_ok_and(|(s, _)| s == 200)
        });
        Self {
            billing_file,
            shipper_file,
            group,
            imds,
            sts,
            agent: Some(agent),
            dir,
            socket,
            log,
            billing,
            shipper,
            nobody,
        }
    }

    fn stop(&mut self) -> String {
        if let Some(agent) = self.agent.take() {
            let status = agent.stop_with(Signal::TERM);
            assert!(status.success(), "the agent's exit status: {status}");
        }
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// `GET /credentials` on `socket` as `user`: (status, body). Runs on a
/// thread of this root process that has become the user (credentials are
/// per thread on Linux), so `SO_PEERCRED` reports the user's uid.
fn get_as(host: &Host, user: Stranger) -> (u16, String) {
    get_in(host, user, &[host.group])
}

/// As [`get_as`], with `groups` as the user's supplementary groups.
fn get_in(host: &Host, user: Stranger, groups: &[u32]) -> (u16, String) {
    let socket = host.socket.clone();
    as_user_in(user, groups.to_vec(), move || {
        unix_get(&socket, "/credentials").expect("a socket answer")
    })
}

fn as_user<T: Send + 'static>(
    user: Stranger,
    group: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    as_user_in(user, vec![group], f)
}

fn as_user_in<T: Send + 'static>(
    user: Stranger,
    groups: Vec<u32>,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    use rustix::fs::{Gid, Uid};
    std::thread::spawn(move || {
        let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
        let groups: Vec<Gid> = groups.into_iter().map(Gid::from_raw).collect();
        rustix::thread::set_thread_groups(&groups).expect("setting groups");
        rustix::thread::set_thread_res_gid(gid, gid, gid).expect("setresgid");
        rustix::thread::set_thread_res_uid(uid, uid, uid).expect("setresuid");
        f()
    })
    .join()
    .expect("the user's thread")
}

fn key_of(body: &str) -> String {
    let doc: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    doc["AccessKeyId"]
        .as_str()
        .unwrap_or_else(|| panic!("no AccessKeyId in {body}"))
        .to_owned()
}

/// `imds-agent credential-process` run as `user` (setpriv): its stdout, or
/// its stderr as the error.
fn credential_process_as(host: &Host, user: &Stranger) -> Result<String, String> {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg(format!("--groups={}", host.group))
        .arg("--inh-caps=-all")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_imds-agent"))
        .arg("credential-process")
        .arg("--socket")
        .arg(&host.socket)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
#[tokio::test(flavor = "multi_thread")]
async fn two_uids_get_their_own_consumers_sessions_and_an_unmatched_uid_gets_403() {
    let mut host = Host::start(true).await;
    let instance_key = host
        .imds
        .current_credentials()
        .unwrap()
        .access_key_id()
        .to_owned();

    let billing = credential_process_as(&host, &host.billing)
        .expect("credential-process works for the billing consumer");
    let shipper = credential_process_as(&host, &host.shipper)
        .expect("credential-process works for the shipper consumer");
    let (billing_key, shipper_key) = (key_of(&billing), key_of(&shipper));
    assert_ne!(billing_key, shipper_key, "two consumers, two sessions");
    for (name, key) in [("billing", &billing_key), ("shipper", &shipper_key)] {
        assert_ne!(
            key, &instance_key,
            "{name} got the instance role's own credentials"
        );
        assert!(
            host.sts.issued_credentials(key).is_some(),
            "{name}'s key {key} was not issued by STS"
        );
    }

    let calls = host.sts.assume_role_calls();
    assert_eq!(
        calls.len(),
        2,
        "one AssumeRole per consumer, saw {calls:#?}"
    );
    for (name, key, action, duration) in [
        ("billing", &billing_key, BILLING_ACTION, "900"),
        ("shipper", &shipper_key, SHIPPER_ACTION, "1800"),
    ] {
        let call = calls
            .iter()
            .find(|c| c.outcome.as_ref().ok() == Some(key))
            .unwrap_or_else(|| panic!("no AssumeRole issued {name}'s key; calls: {calls:#?}"));
        let session = call.role_session_name.as_deref().unwrap_or("");
        assert!(
            session.starts_with(&format!("{name}@i-")),
            "{name}'s session name should be {name}@<instance-id>, saw {session:?}"
        );
        let sent = call.policy.as_deref().unwrap_or("");
        assert!(
            sent.contains(action) && sent.len() < 200,
            "{name}'s session policy should allow {action} only, saw {sent:?}"
        );
        assert_eq!(call.duration_seconds.as_deref(), Some(duration), "{name}");
        assert_eq!(
            call.caller_access_key_id.as_deref(),
            Some(instance_key.as_str()),
            "signed with the instance credentials"
        );
        let role = call.role_arn.as_deref().unwrap_or("");
        assert!(
            role.ends_with(":role/instance-role"),
            "no role_arn: the instance role itself, saw {role}"
        );
    }
    let shipper_call = calls
        .iter()
        .find(|c| c.outcome.as_ref().ok() == Some(&shipper_key))
        .unwrap();
    assert_eq!(
        shipper_call.policy_arns,
        vec!["arn:aws:iam::aws:policy/CloudWatchLogsFullAccess".to_owned()]
    );

    let (status, body) = get_as(&host, host.nobody);
    assert_eq!(
        status, 403,
        "an unmatched uid is refused, got {status}: {body}"
    );
    assert!(
        body.contains(&host.nobody.uid.to_string()) && body.contains("unmatched"),
        "the refusal names the uid and the setting: {body}"
    );
    assert!(!body.contains("AccessKeyId"), "{body}");

    // A second request is served from the cache.
    let (status, again) = get_as(&host, host.billing);
    assert_eq!((status, key_of(&again)), (200, billing_key.clone()));
    assert_eq!(
        host.sts.assume_role_calls().len(),
        2,
        "served from the cache"
    );

    // Each consumer's own files: its session, owned by its uid, mode 0600.
    use std::os::unix::fs::MetadataExt;
    for (file, user, key) in [
        (&host.billing_file, host.billing, &billing_key),
        (&host.shipper_file, host.shipper, &shipper_key),
    ] {
        wait_for("the consumer's file", || {
            std::fs::read_to_string(file).is_ok_and(|t| t.contains(key.as_str()))
        });
        let meta = std::fs::metadata(file).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (user.uid, 0o600),
            "{} should be the consumer's, mode 0600",
            file.display()
        );
    }
    let text = std::fs::read_to_string(&host.billing_file).unwrap();
    assert!(
        text.starts_with("[default]") && !text.contains(&instance_key),
        "billing's credentials file holds its session only: {}",
        text.lines().next().unwrap_or("")
    );

    // Health and metrics name each consumer, never a key.
    let metrics = metrics_socket_of(&host.socket);
    let (_, health) = unix_get(&metrics, "/healthz").unwrap();
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    let consumers = health["consumers"]
        .as_array()
        .unwrap_or_else(|| panic!("/healthz should list the consumers: {health}"));
    let names: Vec<&str> = consumers
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["billing", "shipper"], "{health}");
    for c in consumers {
        assert_eq!(c["status"], "ok", "{health}");
        assert!(
            c["expires_in_seconds"]
                .as_u64()
                .is_some_and(|s| s > 0 && s <= 1800),
            "{health}"
        );
    }
    let (_, text) = unix_get(&metrics, "/metrics").unwrap();
    for name in ["billing", "shipper"] {
        let line = format!("imds_agent_consumer_session_valid{{consumer=\"{name}\"}} 1");
        assert!(text.contains(&line), "expected {line} in /metrics:\n{text}");
    }
    for key in [&billing_key, &shipper_key] {
        assert!(!text.contains(key.as_str()), "a key in /metrics");
    }

    // The audit trail, at trace level, in JSON: one record per hand-out
    // and refusal, and no secret anywhere in the log.
    let log = host.stop();
    let audit: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["target"] == "imds_agent::audit")
        .collect();
    let served = |uid: u32, key: &str| {
        audit.iter().any(|r| {
            r["fields"]["result"] == "served"
                && r["fields"]["uid"] == uid
                && r["fields"]["access_key_id"] == key
                && r["fields"]["output"] == "socket"
        })
    };
    assert!(served(host.billing.uid, &billing_key), "audit: {audit:#?}");
    assert!(served(host.shipper.uid, &shipper_key), "audit: {audit:#?}");
    assert!(
        audit
            .iter()
            .any(|r| r["fields"]["result"] == "denied" && r["fields"]["uid"] == host.nobody.uid),
        "a refusal is audited too: {audit:#?}"
    );
    let socket_records = audit
        .iter()
        .filter(|r| r["fields"]["output"] == "socket")
        .count();
    assert_eq!(socket_records, 4, "one record per answer: {audit:#?}");
    // One record per write of a consumer's file, with who it is for.
    for (output, file, user, key) in [
        (
            "credentials_file",
            &host.billing_file,
            host.billing,
            &billing_key,
        ),
        ("json_file", &host.shipper_file, host.shipper, &shipper_key),
    ] {
        let written: Vec<&serde_json::Value> = audit
            .iter()
            .filter(|r| r["fields"]["output"] == output)
            .collect();
        let [record] = written.as_slice() else {
            panic!("expected one audit record for the {output} write, saw {written:#?}")
        };
        let f = &record["fields"];
        assert!(
            f["result"] == "written"
                && f["path"] == file.display().to_string()
                && f["owner_uid"] == user.uid
                && f["access_key_id"] == key.as_str()
                && f["role"]
                    .as_str()
                    .is_some_and(|r| r.contains("instance-role"))
                && f["expiration"].as_str().is_some_and(|e| e.ends_with('Z')),
            "expected a `written` record of {} for uid {} with key {key}, saw {record:#}",
            file.display(),
            user.uid
        );
    }
    assert_eq!(audit.len(), 6, "socket answers and file writes: {audit:#?}");
    let mut secrets = Vec::new();
    for doc in [&billing, &shipper] {
        let doc: serde_json::Value = serde_json::from_str(doc).unwrap();
        secrets.push(doc["SecretAccessKey"].as_str().unwrap().to_owned());
        secrets.push(doc["SessionToken"].as_str().unwrap().to_owned());
    }
    let instance = host.imds.current_credentials().unwrap();
    secrets.push(instance.secret_access_key().to_owned());
    secrets.push(instance.session_token().to_owned());
    for secret in secrets {
        assert!(
            !log.contains(&secret),
            "a secret ({}...) is in the trace-level log",
            &secret[..4]
        );
    }
    drop(host.dir);
}

/// A consumer's `gids` match a peer's supplementary groups (read with
/// `SO_PEERGROUPS` at connect), not only its primary group; a peer whose
/// groups lead to two consumers is refused, audited and counted.
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
#[tokio::test(flavor = "multi_thread")]
async fn a_supplementary_group_gets_its_consumer_and_groups_of_two_consumers_get_403() {
    // Two groups of their own, each a consumer's; `member`'s primary group is neither.
    let (reports, ops) = (Stranger::new().gid, Stranger::new().gid);
    let more = format!(
        "[[consumer]]\nname = \"reports\"\ngids = [{reports}]\nsession_policy = '{}'\n\n\
         [[consumer]]\nname = \"ops\"\ngids = [{ops}]\n",
        policy(REPORTS_ACTION)
    );
    let mut host = Host::start_with(false, &more).await;
    let member = host.nobody;
    assert!(member.gid != reports && member.gid != ops);

    let (status, body) = get_in(&host, member, &[host.group, reports]);
    assert_eq!(
        status, 200,
        "uid {} with supplementary group {reports} should get consumer reports, got {status}: {body}",
        member.uid
    );
    let key = key_of(&body);
    let calls = host.sts.assume_role_calls();
    let call = calls
        .iter()
        .find(|c| c.outcome.as_ref().ok() == Some(&key))
        .unwrap_or_else(|| panic!("the key {key} was not issued by STS: {calls:#?}"));
    assert!(
        call.role_session_name
            .as_deref()
            .is_some_and(|s| s.starts_with("reports@i-"))
            && call
                .policy
                .as_deref()
                .is_some_and(|p| p.contains(REPORTS_ACTION)),
        "expected reports' session and policy, saw {call:?}"
    );

    // The same uid without the group: nothing.
    let (status, body) = get_in(&host, member, &[host.group]);
    assert_eq!(status, 403, "without group {reports}: {body}");
    assert!(!body.contains("AccessKeyId"), "{body}");

    // In both consumers' groups: refused, naming both, rather than one picked.
    let (status, body) = get_in(&host, member, &[host.group, reports, ops]);
    assert_eq!(status, 403, "in the groups of two consumers: {body}");
    assert!(
        body.contains("more than one consumer")
            && body.contains(&format!("gid {reports} of consumer \\\"reports\\\""))
            && body.contains(&format!("gid {ops} of consumer \\\"ops\\\"")),
        "the refusal names each group and consumer: {body}"
    );
    assert!(!body.contains("AccessKeyId"), "{body}");

    let metrics = metrics_socket_of(&host.socket);
    let (_, text) = unix_get(&metrics, "/metrics").unwrap();
    for (reason, count) in [("ambiguous_groups", 1), ("no_consumer", 1)] {
        let line =
            format!("imds_agent_consumer_refused_requests_total{{reason=\"{reason}\"}} {count}");
        assert!(text.contains(&line), "expected {line} in /metrics:\n{text}");
    }

    let log = host.stop();
    let audit: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["target"] == "imds_agent::audit" && r["fields"]["uid"] == member.uid)
        .collect();
    let results: Vec<(&str, &str)> = audit
        .iter()
        .map(|r| {
            (
                r["fields"]["result"].as_str().unwrap_or(""),
                r["fields"]["consumer"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        results,
        [("served", "reports"), ("denied", ""), ("denied", "")],
        "one audit record per answer: {audit:#?}"
    );
    assert!(
        audit[2]["fields"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("more than one consumer")),
        "{audit:#?}"
    );
}

#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
#[tokio::test(flavor = "multi_thread")]
async fn a_detach_withdraws_every_consumer_and_a_replacement_re_assumes() {
    let mut host = Host::start(true).await;
    let (status, body) = get_as(&host, host.billing);
    assert_eq!(status, 200, "{body}");
    let before = key_of(&body);
    assert_eq!(get_as(&host, host.shipper).0, 200);

    wait_for("the consumers' files", || {
        host.billing_file.exists() && host.shipper_file.exists()
    });
    host.imds.detach_role();
    wait_for("the consumers' files to be withdrawn", || {
        !host.billing_file.exists() && !host.shipper_file.exists()
    });
    for user in [host.billing, host.shipper] {
        wait_for("the consumer's credentials to be withdrawn", || {
            let (status, _) = get_as(&host, user);
            status == 404 || status == 403
        });
    }

    host.imds.attach_role("other-role");
    wait_for("billing to be served again after the new role", || {
        get_as(&host, host.billing).0 == 200
    });
    let (_, body) = get_as(&host, host.billing);
    let after = key_of(&body);
    assert_ne!(after, before, "a new session after the replacement");
    let last = host
        .sts
        .assume_role_calls()
        .into_iter()
        .rfind(|c| c.outcome.as_ref().ok() == Some(&after))
        .expect("the new session came from AssumeRole");
    assert!(
        last.role_arn
            .as_deref()
            .is_some_and(|r| r.ends_with(":role/other-role")),
        "re-assumed with the new instance role: {last:?}"
    );
    wait_for("billing's file to hold the new session", || {
        std::fs::read_to_string(&host.billing_file).is_ok_and(|t| t.contains(&after))
    });
    host.stop();
}

#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
#[tokio::test(flavor = "multi_thread")]
async fn an_sts_outage_keeps_valid_sessions() {
    let mut host = Host::start(false).await;
    let (status, body) = get_as(&host, host.billing);
    assert_eq!(status, 200, "{body}");
    let key = key_of(&body);

    host.sts.inject(
        StsFault::ServerError { status: 503 },
        FaultDuration::Forever,
    );
    // The outage is real: a consumer without a session gets none.
    let (status, body) = get_as(&host, host.shipper);
    assert_eq!(status, 503, "shipper during the outage: {body}");
    // The valid session is kept.
    let (status, body) = get_as(&host, host.billing);
    assert_eq!(status, 200, "billing during the outage: {body}");
    assert_eq!(key_of(&body), key, "the same, still-valid session");

    host.sts.clear_faults();
    wait_for("shipper to be served once STS is back", || {
        get_as(&host, host.shipper).0 == 200
    });
    host.stop();
}

#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_requests_of_one_consumer_cause_one_assume_role() {
    let mut host = Host::start(false).await;
    // 50 connections at a time (under the per-uid cap of 64), 20 each.
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let (user, group, socket) = (host.billing, host.group, host.socket.clone());
            std::thread::spawn(move || {
                as_user(user, group, move || {
                    (0..20)
                        .map(|_| unix_get(&socket, "/credentials").expect("an answer"))
                        .collect::<Vec<_>>()
                })
            })
        })
        .collect();
    let mut keys = std::collections::HashSet::new();
    let mut answers = 0;
    for thread in threads {
        for (status, body) in thread.join().unwrap() {
            assert_eq!(status, 200, "{body}");
            keys.insert(key_of(&body));
            answers += 1;
        }
    }
    assert_eq!(answers, 1000);
    assert_eq!(keys.len(), 1, "one session for all: {keys:?}");
    let calls = host.sts.assume_role_calls();
    assert_eq!(
        calls.len(),
        1,
        "one AssumeRole for 1,000 requests: {calls:#?}"
    );
    host.stop();
}

/// A config with a mistake stops the agent before it starts, naming the
/// file, line and key.
#[test]
fn an_invalid_config_is_refused_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[[consumer]]\nname = \"billing\"\nuids = [1001]\nduration_seconds = 7200\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imds-agent"))
        .args(["run", "--socket"])
        .arg(dir.path().join("agent.sock"))
        .env("IMDS_AGENT_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:4:", config.display());
    assert!(
        stderr.contains(&want) && stderr.contains("duration_seconds"),
        "expected {want} and the key in: {stderr}"
    );
    assert!(!dir.path().join("agent.sock").exists(), "nothing started");
}

/// `doctor --config` assumes each consumer's role once and names the fix
/// for the one whose trust policy refuses the instance role.
#[tokio::test(flavor = "multi_thread")]
async fn doctor_assumes_each_consumer_once_and_names_the_fix() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let sts = MockSts::for_imds(&imds).start().await.unwrap();
    let denied = "arn:aws:iam::123456789012:role/web-app";
    sts.deny_assume_role(denied);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[[consumer]]\nname = \"billing\"\nuids = [1001]\nsession_policy = '{}'\n\n\
             [[consumer]]\nname = \"web\"\nuids = [1002]\nrole_arn = \"{denied}\"\n",
            policy(BILLING_ACTION)
        ),
    )
    .unwrap();
    let (endpoint, sts_endpoint) = (imds.endpoint(), sts.endpoint());
    let out = std::thread::spawn(move || {
        agent()
            .args(["doctor", "--imds-endpoint", &endpoint, "--config"])
            .arg(&config)
            .env("AWS_ENDPOINT_URL_STS", sts_endpoint)
            .output()
            .unwrap()
    })
    .join()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "a consumer fails: {text}");
    assert!(
        text.contains("[ok  ] consumer billing: assumed") && text.contains("billing@i-"),
        "{text}"
    );
    assert!(
        text.contains("[FAIL] consumer web") && text.contains("trust policy"),
        "{text}"
    );
    let calls = sts.assume_role_calls();
    assert_eq!(calls.len(), 2, "one AssumeRole per consumer: {calls:#?}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn container_get(port: u16, token: &str) -> (u16, String) {
    crate::util::container_request(
        port,
        &format!("Host: 127.0.0.1:{port}\r\nAuthorization: {token}\r\n"),
    )
}

/// Each consumer's container token gets its session on the container
/// endpoint; the agent's own token gets nothing under `unmatched = "deny"`.
#[tokio::test(flavor = "multi_thread")]
async fn each_container_token_gets_its_consumers_session() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let sts = MockSts::for_imds(&imds).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[[consumer]]\nname = \"billing\"\nuids = [1001]\ncontainer_token_file = \"{}\"\n\n\
             [[consumer]]\nname = \"web\"\nuids = [1002]\ncontainer_token_file = \"{}\"\n",
            tokens.join("billing").display(),
            tokens.join("web").display()
        ),
    )
    .unwrap();
    let port = free_port();
    let mut cmd = agent();
    cmd.arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint())
        .arg("--config")
        .arg(&config)
        .arg("--container-endpoint")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--container-token-file")
        .arg(dir.path().join("agent-token"))
        .env("AWS_ENDPOINT_URL_STS", sts.endpoint());
    let running = Running::start(cmd);
    let read = |name: &str| std::fs::read_to_string(tokens.join(name)).unwrap_or_default();
    wait_for("the consumers' tokens and the endpoint", || {
        !read("billing").is_empty()
            && !read("web").is_empty()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    wait_for("the instance credentials (billing served)", || {
        container_get(port, &read("billing")).0 == 200
    });
    let (status, billing) = container_get(port, &read("billing"));
    assert_eq!(status, 200, "{billing}");
    let (status, web) = container_get(port, &read("web"));
    assert_eq!(status, 200, "{web}");
    let (billing_key, web_key) = (key_of(&billing), key_of(&web));
    assert_ne!(billing_key, web_key, "two consumers, two sessions");
    let calls = sts.assume_role_calls();
    for (name, key) in [("billing", &billing_key), ("web", &web_key)] {
        let call = calls
            .iter()
            .find(|c| c.outcome.as_ref().ok() == Some(key))
            .unwrap_or_else(|| panic!("{name}'s key was not issued by STS: {calls:#?}"));
        assert!(
            call.role_session_name
                .as_deref()
                .is_some_and(|s| s.starts_with(&format!("{name}@"))),
            "{call:?}"
        );
    }
    let own = std::fs::read_to_string(dir.path().join("agent-token")).unwrap();
    let (status, body) = container_get(port, &own);
    assert_eq!(
        status, 403,
        "the agent's own token under unmatched = deny: {body}"
    );
    assert!(
        !body.contains("AccessKeyId") && body.contains("unmatched"),
        "{body}"
    );
    let status = running.stop_with(Signal::TERM);
    assert!(status.success(), "{status}");
}
