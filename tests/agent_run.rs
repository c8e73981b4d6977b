//! `imds-agent run`: the real binary against the emulator.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use imds_client::mock::{Fault, FaultDuration, MockImds};
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, agent, agent_against, unix_get, wait_for};

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        Self { _dir: dir, root }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    fn start(&self, imds: &MockImds, extra: &[&str]) -> Running {
        Running::start(self.command(imds, extra))
    }
    fn command(&self, imds: &MockImds, extra: &[&str]) -> std::process::Command {
        let mut cmd = agent_against(imds);
        cmd.arg("--credentials-file")
            .arg(self.path("credentials"))
            .arg("--json-file")
            .arg(self.path("credentials.json"))
            .arg("--socket")
            .arg(self.path("agent.sock"))
            .arg("--metrics-socket")
            .arg(self.path("metrics.sock"))
            .args(["--poll-interval", "1"])
            .args(extra);
        cmd
    }
}

fn key_in_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("aws_access_key_id = ").map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_follow_attach_replace_and_detach() {
    let imds = MockImds::builder().start().await.unwrap();
    let setup = Setup::new();
    let running = setup.start(&imds, &[]);
    let socket = setup.path("agent.sock");
    let creds_file = setup.path("credentials");

    // Started with no role: keeps running, says so, writes nothing.
    wait_for("the socket", || socket.exists());
    wait_for("no-role health", || {
        unix_get(&socket, "/healthz").is_ok_and(|(s, b)| s == 503 && b.contains("no-role"))
    });
    eqnice!(404, unix_get(&socket, "/credentials").unwrap().0);
    assert!(!creds_file.exists());

    // Attach.
    imds.attach_role("first-role");
    let first = imds.current_credentials().unwrap();
    wait_for("the attached role's credentials", || {
        key_in_file(&creds_file).as_deref() == Some(first.access_key_id())
    });
    let text = std::fs::read_to_string(&creds_file).unwrap();
    assert!(text.contains(&format!(
        "aws_secret_access_key = {}",
        first.secret_access_key()
    )));
    assert!(text.contains(&format!("aws_session_token = {}", first.session_token())));
    eqnice!(
        0o600,
        std::fs::metadata(&creds_file).unwrap().permissions().mode() & 0o777
    );
    // Each output has its own writer: the JSON file may land a moment later.
    wait_for("the attached role's credentials in the JSON file", || {
        std::fs::read_to_string(setup.path("credentials.json"))
            .is_ok_and(|t| t.contains(first.access_key_id()))
    });
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(setup.path("credentials.json")).unwrap())
            .unwrap();
    eqnice!(serde_json::json!(1), json["Version"]);
    eqnice!(
        serde_json::json!(first.access_key_id()),
        json["AccessKeyId"]
    );
    eqnice!(
        serde_json::json!(first.expiration_rfc3339()),
        json["Expiration"]
    );
    let (status, body) = unix_get(&socket, "/credentials").unwrap();
    eqnice!(200, status);
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    eqnice!(
        serde_json::json!(first.session_token()),
        served["SessionToken"]
    );
    let (status, health) = unix_get(&socket, "/healthz").unwrap();
    eqnice!(200, status);
    assert!(health.contains("first-role"), "{health}");
    let (status, metrics) = unix_get(&setup.path("metrics.sock"), "/metrics").unwrap();
    eqnice!(200, status);
    assert!(
        metrics.contains("imds_agent_credentials_expiry_seconds"),
        "{metrics}"
    );

    // credential-process reads the socket.
    let out = agent()
        .arg("credential-process")
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eqnice!(serde_json::json!(first.access_key_id()), doc["AccessKeyId"]);

    // Replace: the new role's credentials everywhere.
    imds.replace_role("second-role");
    let second = imds.current_credentials().unwrap();
    wait_for("the replacement role's credentials", || {
        key_in_file(&creds_file).as_deref() == Some(second.access_key_id())
    });
    wait_for("the socket to follow", || {
        unix_get(&socket, "/credentials").is_ok_and(|(_, b)| b.contains(second.access_key_id()))
    });

    // Detach: every output withdrawn.
    imds.detach_role();
    wait_for("the credentials file to go", || !creds_file.exists());
    wait_for("the JSON file to go", || {
        !setup.path("credentials.json").exists()
    });
    eqnice!(404, unix_get(&socket, "/credentials").unwrap().0);
    let out = agent()
        .arg("credential-process")
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    eqnice!(Some(1), out.status.code());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no IAM role"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Clean stop: the socket file is removed.
    let status = running.stop_with(Signal::TERM);
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_keeps_the_last_good_credentials_and_recovers() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let setup = Setup::new();
    let running = setup.start(&imds, &["--attempts", "1"]);
    let creds_file = setup.path("credentials");
    let socket = setup.path("agent.sock");
    let good = imds.current_credentials().unwrap();
    wait_for("first credentials", || {
        key_in_file(&creds_file).as_deref() == Some(good.access_key_id())
    });

    imds.inject(Fault::Status { status: 503 }, FaultDuration::Forever);
    imds.rotate();
    std::thread::sleep(std::time::Duration::from_secs(3));
    eqnice!(
        Some(good.access_key_id().to_owned()),
        key_in_file(&creds_file)
    );
    let (status, body) = unix_get(&socket, "/credentials").unwrap();
    eqnice!(200, status);
    assert!(body.contains(good.access_key_id()));
    let (status, health) = unix_get(&socket, "/healthz").unwrap();
    eqnice!(200, status);
    assert!(health.contains("degraded"), "{health}");
    let (_, metrics) = unix_get(&setup.path("metrics.sock"), "/metrics").unwrap();
    assert!(
        metrics.contains("imds_agent_refresh_failures_total{kind=\"ServerError\"}"),
        "{metrics}"
    );

    imds.clear_faults();
    // A SIGHUP makes the agent ask at once.
    let pid = rustix::process::Pid::from_raw(running.pid() as i32).unwrap();
    rustix::process::kill_process(pid, Signal::HUP).unwrap();
    let fresh = imds.current_credentials().unwrap();
    assert_ne!(fresh.access_key_id(), good.access_key_id());
    wait_for("recovery", || {
        key_in_file(&creds_file).as_deref() == Some(fresh.access_key_id())
    });
    assert!(running.stop_with(Signal::INT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_not_on_the_allow_list_gets_403() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let setup = Setup::new();
    // Only uid 65534 (nobody) may ask; the test runs as someone else.
    assert_ne!(rustix::process::getuid().as_raw(), 65534);
    let mut cmd = setup.command(&imds, &["--allow-uid", "65534"]);
    cmd.env("IMDS_AGENT_LOG", "trace");
    let log = setup.path("agent.log");
    let running = Running::start_logging_to(cmd, &log);
    let socket = setup.path("agent.sock");
    wait_for("the socket", || socket.exists());
    wait_for("a 403", || {
        unix_get(&socket, "/credentials").is_ok_and(|(s, _)| s == 403)
    });
    let (status, body) = unix_get(&socket, "/credentials").unwrap();
    eqnice!(403, status);
    assert!(!body.contains("Secret"), "{body}");
    assert!(running.stop_with(Signal::TERM).success());
    // Logged with who asked, and without the secret it withheld.
    let log = std::fs::read_to_string(&log).unwrap();
    let me = rustix::process::getuid().as_raw();
    assert!(
        log.lines()
            .any(|l| l.contains("not on the allow-list") && l.contains(&format!("peer_uid={me}"))),
        "{log}"
    );
    let issued = imds.current_credentials().unwrap();
    assert!(!log.contains(issued.secret_access_key()));
    assert!(!log.contains(issued.session_token()));
}

#[test]
fn bad_combinations_are_refused_before_anything_starts() {
    let out = agent().arg("run").output().unwrap();
    eqnice!(Some(1), out.status.code());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least one output"));
    let out = agent()
        .args(["run", "--socket", "/tmp/x.sock", "--file-mode", "0644"])
        .output()
        .unwrap();
    eqnice!(Some(2), out.status.code());
    assert!(String::from_utf8_lossy(&out.stderr).contains("every user"));
    let out = agent()
        .args(["credential-process", "--socket", "/nonexistent/agent.sock"])
        .output()
        .unwrap();
    eqnice!(Some(1), out.status.code());
    let stderr = String::from_utf8_lossy(&out.stderr);
    eqnice!(1, stderr.lines().count());
    assert!(stderr.contains("not running"), "{stderr}");
}

// The profile-file types are re-exported from aws-runtime under deprecated
// names; using them keeps aws-runtime out of our direct dependencies.
#[allow(deprecated)]
#[tokio::test(flavor = "multi_thread")]
async fn aws_sdk_reads_our_file_and_runs_our_credential_process() {
    use aws_credential_types::provider::ProvideCredentials;
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let setup = Setup::new();
    let running = setup.start(&imds, &["--profile", "from-agent"]);
    let creds_file = setup.path("credentials");
    let socket = setup.path("agent.sock");
    let issued = imds.current_credentials().unwrap();
    wait_for("credentials", || key_in_file(&creds_file).is_some());

    let config_file = setup.path("config");
    std::fs::write(
        &config_file,
        format!(
            "[profile via-process]\ncredential_process = {} credential-process --socket {}\n",
            env!("CARGO_BIN_EXE_imds-agent"),
            socket.display()
        ),
    )
    .unwrap();
    let files = |profile: &str| {
        aws_config::profile::ProfileFileCredentialsProvider::builder()
            .profile_files(
                aws_config::profile::profile_file::ProfileFiles::builder()
                    .with_file(
                        aws_config::profile::profile_file::ProfileFileKind::Credentials,
                        &creds_file,
                    )
                    .with_file(
                        aws_config::profile::profile_file::ProfileFileKind::Config,
                        &config_file,
                    )
                    .build(),
            )
            .profile_name(profile)
            .build()
    };
    let from_file = files("from-agent").provide_credentials().await.unwrap();
    eqnice!(issued.access_key_id(), from_file.access_key_id());
    eqnice!(issued.secret_access_key(), from_file.secret_access_key());
    let from_process = files("via-process").provide_credentials().await.unwrap();
    eqnice!(issued.access_key_id(), from_process.access_key_id());
    eqnice!(Some(issued.session_token()), from_process.session_token());
    assert!(running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn imds_unreachable_at_start_keeps_the_agent_waiting_not_exiting() {
    // A loopback port where nothing listens yet (early boot).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let setup = Setup::new();
    let mut cmd = agent();
    cmd.arg("run")
        .arg("--imds-endpoint")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--credentials-file")
        .arg(setup.path("credentials"))
        .arg("--socket")
        .arg(setup.path("agent.sock"))
        .args(["--poll-interval", "1"]);
    let mut running = Running::start(cmd);
    let socket = setup.path("agent.sock");
    wait_for("an unavailable health report", || {
        unix_get(&socket, "/healthz").is_ok_and(|(s, b)| s == 503 && b.contains("unavailable"))
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        running.try_status().is_none(),
        "the agent must keep running"
    );

    // IMDS comes up: the agent delivers at its next poll (it keeps no memo
    // of the unreachable endpoint).
    let imds = MockImds::builder()
        .role("late-role")
        .listen(([127, 0, 0, 1], port).into())
        .start()
        .await
        .unwrap();
    let issued = imds.current_credentials().unwrap();
    wait_for("delivery within a few polls", || {
        key_in_file(&setup.path("credentials")).as_deref() == Some(issued.access_key_id())
    });
    assert!(running.stop_with(Signal::TERM).success());
}

/// A bad command line exits 2, and the unit does not restart on exit 2, so a
/// typo in /etc/default/imds-agent does not restart the agent in a loop.
#[test]
fn a_bad_command_line_exits_2_and_the_unit_does_not_restart_on_it() {
    let out = agent().args(["run", "--no-such-flag"]).output().unwrap();
    eqnice!(Some(2), out.status.code());
    let unit = include_str!("../agent/systemd/imds-agent.service");
    let prevented: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("RestartPreventExitStatus="))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(
        prevented.contains(&"2"),
        "expected RestartPreventExitStatus= to list 2 in the unit, got {prevented:?}"
    );
}
