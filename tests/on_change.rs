//! `--on-change` and `--reload-unit`: a command told of every change in what
//! the outputs hold, with no secret in its environment, coalesced, bounded
//! by a timeout, and never able to stop the agent.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use imds_client::mock::{Fault, FaultDuration, MockImds};
use rustix::process::Signal;

use crate::util::{Running, agent_against, metric, metrics_socket_of, unix_get, wait_for};

/// The variables a command may see, and no other.
const DOCUMENTED: [&str; 5] = [
    "PATH",
    "IMDS_AGENT_EVENT",
    "IMDS_AGENT_ROLE",
    "IMDS_AGENT_ACCESS_KEY_ID",
    "IMDS_AGENT_EXPIRATION",
];

/// One run of the recording hook: its environment as the agent passed it
/// (`/proc/PID/environ` of the shell, before the shell adds anything), and
/// the access key id each output held when it ran.
#[derive(Debug, Clone)]
struct Run {
    env: BTreeMap<String, String>,
    file_key: String,
    json_key: String,
}

impl Run {
    fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }
}

/// A test's directory (open to nobody else), its outputs and a hook script
/// that appends one record per run to `runs.log`.
struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    credentials: PathBuf,
    json: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        Self {
            credentials: path.join("credentials"),
            json: path.join("credentials.json"),
            socket: path.join("agent.sock"),
            log: path.join("runs.log"),
            dir: path,
            _dir: dir,
        }
    }

    /// Writes an executable `name` in the test's directory.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A hook recording each run; with `gate`, each run then waits until
    /// the file `gate` exists.
    fn recorder(&self, gate: Option<&Path>) -> PathBuf {
        let wait = gate
            .map(|g| format!("while [ ! -e '{}' ]; do sleep 0.05; done\n", g.display()))
            .unwrap_or_default();
        self.script(
            "record.sh",
            &format!(
                "{{ echo '--- run'; tr '\\0' '\\n' < /proc/$$/environ; \
                 echo \"file-key=$(sed -n 's/^aws_access_key_id = //p' '{cred}' 2>/dev/null)\"; \
                 echo \"json-key=$(sed -n 's/.*\"AccessKeyId\": *\"\\([^\"]*\\)\".*/\\1/p' '{json}' 2>/dev/null)\"; \
                 }} >> '{log}.tmp' && cat '{log}.tmp' > '{log}.new' && mv '{log}.new' '{log}'\n{wait}",
                cred = self.credentials.display(),
                json = self.json.display(),
                log = self.log.display(),
            ),
        )
    }

    /// The agent with both file outputs, the socket and the metrics socket.
    fn agent(&self, imds: &MockImds) -> Command {
        let mut cmd = agent_against(imds);
        cmd.arg("--credentials-file")
            .arg(&self.credentials)
            .arg("--json-file")
            .arg(&self.json)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--metrics-socket")
            .arg(metrics_socket_of(&self.socket))
            .args(["--poll-interval", "1"]);
        cmd
    }

    /// The runs recorded so far (the log is replaced whole, so never torn).
    fn runs(&self) -> Vec<Run> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.split("--- run\n")
            .filter(|r| !r.is_empty())
            .map(|record| {
                let mut run = Run {
                    env: BTreeMap::new(),
                    file_key: String::new(),
                    json_key: String::new(),
                };
                for line in record.lines() {
                    if let Some(k) = line.strip_prefix("file-key=") {
                        run.file_key = k.to_owned();
                    } else if let Some(k) = line.strip_prefix("json-key=") {
                        run.json_key = k.to_owned();
                    } else if let Some((name, value)) = line.split_once('=') {
                        run.env.insert(name.to_owned(), value.to_owned());
                    }
                }
                run
            })
            .collect()
    }

    /// Waits for a run with `event` and (unless `None`) access key `key`;
    /// returns it.
    fn wait_for_run(&self, event: &str, key: Option<&str>) -> Run {
        let mut found = None;
        wait_for(
            &format!("a run with IMDS_AGENT_EVENT={event} and access key {key:?}"),
            || {
                found = self.runs().into_iter().find(|r| {
                    r.var("IMDS_AGENT_EVENT") == Some(event)
                        && r.var("IMDS_AGENT_ACCESS_KEY_ID") == key
                });
                found.is_some()
            },
        );
        found.unwrap()
    }

    /// `imds_agent_on_change_runs_total{result="RESULT"}`.
    fn runs_counted(&self, result: &str) -> u64 {
        metric(
            &metrics_socket_of(&self.socket),
            &format!("imds_agent_on_change_runs_total{{result=\"{result}\"}}"),
        )
        .unwrap_or(0)
    }

    /// Waits until the credentials file holds access key `key`.
    fn wait_for_file_key(&self, key: &str) {
        wait_for(&format!("the credentials file to hold {key}"), || {
            std::fs::read_to_string(&self.credentials).is_ok_and(|t| t.contains(key))
        });
    }
}

/// The secret key and session token the emulator issues now.
fn secrets_of(imds: &MockImds) -> Vec<String> {
    let c = imds.current_credentials().expect("a role is attached");
    vec![
        c.secret_access_key().to_owned(),
        c.session_token().to_owned(),
    ]
}

fn key_of(imds: &MockImds) -> String {
    imds.current_credentials()
        .expect("a role is attached")
        .access_key_id()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_receives_every_event_after_every_output_is_written_and_no_secret() {
    let imds = MockImds::builder()
        .role("first-role")
        .start()
        .await
        .unwrap();
    let setup = Setup::new();
    let hook = setup.recorder(None);
    let mut cmd = setup.agent(&imds);
    // The agent's own environment holds secrets the hook must not inherit.
    cmd.arg("--on-change")
        .arg(format!("/bin/sh {}", hook.display()))
        .env("AWS_SECRET_ACCESS_KEY", "the-agents-own-secret")
        .env("IMDS_AGENT_PRIVATE", "the-agents-own-secret");
    let running = Running::start(cmd);
    let mut secrets = secrets_of(&imds);
    let mut expected = Vec::new();

    // First delivery: after both files hold the keys.
    let key = key_of(&imds);
    let run = setup.wait_for_run("first-delivery", Some(&key));
    assert_eq!(run.var("IMDS_AGENT_ROLE"), Some("first-role"));
    expected.push(("first-delivery", Some(key)));

    // Rotation.
    imds.rotate();
    secrets.extend(secrets_of(&imds));
    running.signal(Signal::HUP);
    let key = key_of(&imds);
    setup.wait_for_run("rotation", Some(&key));
    expected.push(("rotation", Some(key)));

    // Replacement.
    imds.replace_role("second-role");
    secrets.extend(secrets_of(&imds));
    running.signal(Signal::HUP);
    let key = key_of(&imds);
    let run = setup.wait_for_run("replacement", Some(&key));
    assert_eq!(run.var("IMDS_AGENT_ROLE"), Some("second-role"));
    expected.push(("replacement", Some(key)));

    // Detach: the role detached, and no key.
    imds.detach_role();
    running.signal(Signal::HUP);
    let run = setup.wait_for_run("detach", None);
    assert_eq!(run.var("IMDS_AGENT_ROLE"), Some("second-role"));
    assert_eq!(run.var("IMDS_AGENT_EXPIRATION"), None);
    assert_eq!(
        (run.file_key.as_str(), run.json_key.as_str()),
        ("", ""),
        "the hook ran after the keys were withdrawn from both files"
    );
    expected.push(("detach", None));

    // Attached again: credentials where there were none.
    imds.attach_role("third-role");
    secrets.extend(secrets_of(&imds));
    running.signal(Signal::HUP);
    let key = key_of(&imds);
    setup.wait_for_run("first-delivery", Some(&key));
    expected.push(("first-delivery", Some(key.clone())));

    // An outage (IMDS answers 503), seen by the agent, then the recovery.
    imds.inject(Fault::Status { status: 503 }, FaultDuration::Forever);
    running.signal(Signal::HUP);
    let metrics = metrics_socket_of(&setup.socket);
    wait_for("/healthz to report IMDS failing", || {
        unix_get(&metrics, "/healthz").is_ok_and(|(_, body)| body.contains("degraded"))
    });
    imds.clear_faults();
    running.signal(Signal::HUP);
    let run = setup.wait_for_run("recovery", Some(&key));
    assert_eq!(run.var("IMDS_AGENT_ROLE"), Some("third-role"));
    expected.push(("recovery", Some(key)));

    let runs = setup.runs();
    let seen: Vec<(String, Option<String>)> = runs
        .iter()
        .map(|r| {
            (
                r.var("IMDS_AGENT_EVENT").unwrap_or_default().to_owned(),
                r.var("IMDS_AGENT_ACCESS_KEY_ID").map(str::to_owned),
            )
        })
        .collect();
    let expected: Vec<(String, Option<String>)> = expected
        .into_iter()
        .map(|(e, k)| (e.to_owned(), k))
        .collect();
    assert_eq!(seen, expected, "one run per change, in order");
    for run in &runs {
        // Only the documented variables, and the expiry in RFC 3339.
        for name in run.env.keys() {
            assert!(
                DOCUMENTED.contains(&name.as_str()),
                "the hook's environment holds {name}, which is not documented; it held {:?}",
                run.env.keys().collect::<Vec<_>>()
            );
        }
        if let Some(expiration) = run.var("IMDS_AGENT_EXPIRATION") {
            assert!(
                time::OffsetDateTime::parse(
                    expiration,
                    &time::format_description::well_known::Rfc3339
                )
                .is_ok(),
                "IMDS_AGENT_EXPIRATION is RFC 3339: {expiration}"
            );
        }
        // Every output held the keys the hook was told of.
        if let Some(key) = run.var("IMDS_AGENT_ACCESS_KEY_ID") {
            assert_eq!(
                (run.file_key.as_str(), run.json_key.as_str()),
                (key, key),
                "the hook ran before every output held {key}"
            );
        }
    }
    let log = std::fs::read_to_string(&setup.log).unwrap();
    for secret in secrets
        .iter()
        .map(String::as_str)
        .chain(["the-agents-own-secret"])
    {
        assert!(
            !log.contains(secret),
            "a secret reached the hook's environment"
        );
    }
    assert!(running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_rotations_gives_one_more_run_with_the_last_key() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let setup = Setup::new();
    let gate = setup.dir.join("gate");
    let hook = setup.recorder(Some(&gate));
    let mut cmd = setup.agent(&imds);
    cmd.arg("--on-change").arg(hook);
    let running = Running::start(cmd);
    // The first run records, then holds until the gate opens.
    setup.wait_for_run("first-delivery", Some(&key_of(&imds)));
    let rotations = 5;
    for _ in 0..rotations {
        imds.rotate();
        running.signal(Signal::HUP);
        setup.wait_for_file_key(&key_of(&imds));
    }
    std::fs::write(&gate, "").unwrap();
    let last = key_of(&imds);
    setup.wait_for_run("rotation", Some(&last));
    let runs = setup.runs();
    assert_eq!(
        runs.len(),
        2,
        "{rotations} rotations while a run was under way give one more run, not a queue; saw {:?}",
        runs.iter()
            .map(|r| r.var("IMDS_AGENT_ACCESS_KEY_ID"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        runs[1].var("IMDS_AGENT_ACCESS_KEY_ID"),
        Some(last.as_str()),
        "the coalesced run sees the last key"
    );
    assert!(running.stop_with(Signal::TERM).success());
}

/// True while process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_past_its_timeout_is_killed_with_its_group_and_the_agent_goes_on() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let setup = Setup::new();
    let pids = setup.dir.join("pids");
    // The shell starts a child in the background and both hang.
    let hook = setup.script(
        "hang.sh",
        &format!(
            "sleep 600 &\necho \"$$ $!\" > '{pids}.tmp' && mv '{pids}.tmp' '{pids}'\nwait\n",
            pids = pids.display()
        ),
    );
    let log = setup.dir.join("agent.log");
    let mut cmd = setup.agent(&imds);
    cmd.arg("--on-change")
        .arg(hook)
        .args(["--on-change-timeout", "1"]);
    let mut running = Running::start_logging_to(cmd, &log);
    wait_for("the hook to start", || pids.exists());
    let started: Vec<u32> = std::fs::read_to_string(&pids)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    wait_for("the run to be counted as a timeout", || {
        setup.runs_counted("timeout") == 1
    });
    for pid in &started {
        wait_for(
            &format!("process {pid} of the hook's group to be killed"),
            || !alive(*pid),
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("past its timeout") && text.contains("hang.sh"),
        "the log names the program that timed out: {text}"
    );
    // The agent goes on: a rotation is written and runs the hook again.
    std::fs::remove_file(&pids).unwrap();
    imds.rotate();
    running.signal(Signal::HUP);
    setup.wait_for_file_key(&key_of(&imds));
    wait_for("the hook to run again", || pids.exists());
    wait_for("the second timeout", || setup.runs_counted("timeout") == 2);
    assert!(running.try_status().is_none(), "the agent is still running");
    assert!(running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_command_is_logged_and_counted_and_the_agent_goes_on() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let setup = Setup::new();
    let log = setup.dir.join("agent.log");
    let mut cmd = setup.agent(&imds);
    cmd.args(["--on-change", "/bin/sh -c 'exit 3'"]).args([
        "--on-change",
        "/nonexistent/notify-app --token 's3cr3t-arg'",
    ]);
    let mut running = Running::start_logging_to(cmd, &log);
    wait_for("a failed run and a spawn error to be counted", || {
        setup.runs_counted("failed") == 1 && setup.runs_counted("spawn_error") == 1
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("exit status: 3") && text.contains("/nonexistent/notify-app"),
        "the log says which command failed and how: {text}"
    );
    assert!(
        !text.contains("s3cr3t-arg"),
        "the log names the program, never its arguments: {text}"
    );
    imds.rotate();
    running.signal(Signal::HUP);
    setup.wait_for_file_key(&key_of(&imds));
    wait_for("both commands to run again", || {
        setup.runs_counted("failed") == 2 && setup.runs_counted("spawn_error") == 2
    });
    assert!(running.try_status().is_none(), "the agent is still running");
    assert!(running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_unit_runs_systemctl_try_reload_or_restart() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let setup = Setup::new();
    // A stand-in systemctl, found on the PATH the agent passes on.
    let bin = setup.dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    // One file per call (the two units' runs may overlap).
    let calls = setup.dir.join("calls");
    std::fs::create_dir(&calls).unwrap();
    let fake = setup.script(
        "systemctl",
        &format!(
            "echo \"$IMDS_AGENT_EVENT $*\" > '{calls}'/.$$ && mv '{calls}'/.$$ '{calls}'/call-$$\n",
            calls = calls.display()
        ),
    );
    std::fs::rename(&fake, bin.join("systemctl")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = setup.agent(&imds);
    cmd.args(["--reload-unit", "app.service,other.service"])
        .env("PATH", path);
    let running = Running::start(cmd);
    let read_calls = || -> Vec<String> {
        std::fs::read_dir(&calls)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("call-")
            })
            .map(|p| std::fs::read_to_string(p).unwrap().trim_end().to_owned())
            .collect()
    };
    wait_for("systemctl to be run for both units", || {
        read_calls().len() == 2
    });
    let mut lines = read_calls();
    lines.sort();
    assert_eq!(
        lines,
        [
            "first-delivery --no-ask-password try-reload-or-restart app.service",
            "first-delivery --no-ask-password try-reload-or-restart other.service",
        ]
    );
    assert!(running.stop_with(Signal::TERM).success());
}

#[test]
fn a_command_that_does_not_split_is_refused_at_start() {
    let out = crate::util::agent()
        .args(["run", "--socket", "/nonexistent/agent.sock"])
        .args(["--on-change", "/bin/notify \"unbalanced"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--on-change") && stderr.contains("unbalanced quoting"),
        "the error names the flag and the problem: {stderr}"
    );
}
