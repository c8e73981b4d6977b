//! Misbehaving local clients do not starve well-behaved ones or crash the agent.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use imds_client::mock::{Fault, FaultDuration, MockImds};
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, agent, agent_against, unix_get, wait_for, wait_for_served_credentials};

#[tokio::test(flavor = "multi_thread")]
async fn idle_slow_huge_and_garbage_clients_do_not_block_a_good_one() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut cmd = agent_against(&imds);
    cmd.arg("--socket")
        .arg(&socket)
        .args(["--socket-mode", "0660", "--log-format", "json"]);
    let mut running = Running::start(cmd);
    wait_for_served_credentials(&socket);
    eqnice!(
        0o660,
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777
    );

    let mut hostile = Vec::new();
    // 100 clients that connect and send nothing.
    for _ in 0..100 {
        hostile.push(UnixStream::connect(&socket).unwrap());
    }
    // Half a request, then silence.
    let mut slow = UnixStream::connect(&socket).unwrap();
    slow.write_all(b"GET /credentials HTTP/1.1\r\nHo").unwrap();
    hostile.push(slow);
    // A 1 MiB header.
    let mut huge = UnixStream::connect(&socket).unwrap();
    let _ = huge
        .write_all(format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(1 << 20)).as_bytes());
    hostile.push(huge);
    // Bytes that are not HTTP.
    let mut garbage = UnixStream::connect(&socket).unwrap();
    let _ = garbage.write_all(&[0xff, 0x00, 0x13, 0x37, b'\n', b'\n']);
    hostile.push(garbage);

    // A well-behaved client is still served, at once.
    for _ in 0..20 {
        let (status, body) = unix_get(&socket, "/credentials").unwrap();
        eqnice!(200, status);
        assert!(body.contains("AccessKeyId"));
    }
    drop(hostile);
    let (status, _) = unix_get(&socket, "/healthz").unwrap();
    eqnice!(200, status);

    // The agent is alive, and its logs are JSON lines.
    assert!(running.try_status().is_none(), "the agent must not exit");
    let status = running.stop_with(Signal::TERM);
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_and_hold_no_secret() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    let socket = dir.path().join("agent.sock");
    let child = agent()
        .env("IMDS_AGENT_LOG", "trace")
        .arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint())
        .arg("--credentials-file")
        .arg(&file)
        .arg("--socket")
        .arg(&socket)
        .arg("--metrics-socket")
        .arg(crate::util::metrics_socket_of(&socket))
        .args(["--log-format", "json", "--poll-interval", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let mut secrets = Vec::new();
    let mut issued = |imds: &MockImds| {
        let c = imds.current_credentials().unwrap();
        secrets.push(c.secret_access_key().to_owned());
        secrets.push(c.session_token().to_owned());
        c.access_key_id().to_owned()
    };
    let in_file = |key: &str| std::fs::read_to_string(&file).is_ok_and(|t| t.contains(key));

    // Start.
    let key = issued(&imds);
    wait_for("credentials", || in_file(&key));
    // Rotations, served on the socket too.
    for _ in 0..3 {
        imds.rotate();
        let key = issued(&imds);
        rustix::process::kill_process(pid, Signal::HUP).unwrap();
        wait_for("a rotation", || in_file(&key));
        eqnice!(200, unix_get(&socket, "/credentials").unwrap().0);
    }
    // Replacement.
    imds.replace_role("other");
    let key = issued(&imds);
    wait_for("the replacement", || in_file(&key));
    // Faults: IMDS failing, then garbage in the credentials document.
    for fault in [Fault::Status { status: 503 }, Fault::MalformedJson] {
        let before = crate::util::metric_sum(
            &crate::util::metrics_socket_of(&socket),
            "imds_agent_refresh_failures_total",
        );
        imds.rotate();
        issued(&imds);
        imds.inject(fault, FaultDuration::Forever);
        rustix::process::kill_process(pid, Signal::HUP).unwrap();
        wait_for("a failure", || {
            crate::util::metric_sum(
                &crate::util::metrics_socket_of(&socket),
                "imds_agent_refresh_failures_total",
            ) > before
        });
        imds.clear_faults();
    }
    // Detach.
    imds.detach_role();
    wait_for("the withdrawal", || !file.exists());

    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let logs = String::from_utf8(out.stderr).unwrap();
    assert!(logs.lines().count() > 10, "{logs}");
    for line in logs.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value["level"].is_string(), "{line}");
        for secret in &secrets {
            assert!(
                !line.contains(secret.as_str()),
                "a secret in the logs: {line}"
            );
        }
    }
    assert!(logs.contains("published credentials"));
    assert!(logs.contains("\"level\":\"TRACE\"") || logs.contains("\"level\":\"DEBUG\""));
    assert!(logs.contains("withdrawn"), "{logs}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// The agent's memory bound under 1,000 hostile connections (see README,
/// "Failure behaviour"): at most this much above its resting size.
const HOSTILE_MEMORY_BOUND_KIB: u64 = 32 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_hostile_connections_keep_memory_bounded_and_good_clients_served() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut cmd = agent_against(&imds);
    cmd.arg("--socket").arg(&socket);
    let mut running = Running::start(cmd);
    wait_for_served_credentials(&socket);
    let resting = rss_kib(running.pid());

    let mut hostile = Vec::new();
    for i in 0..1000 {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.set_nonblocking(true).unwrap();
        // Writes may stop short when the agent stops reading: that is the point.
        let _ = match i % 4 {
            0 => Ok(()),                                                 // nothing
            1 => stream.write_all(b"GET /credentials HTTP/1.1\r\nHost"), // slow
            2 => stream.write_all(
                format!("GET / HTTP/1.1\r\nX-Big: {}\r\n", "a".repeat(15 * 1024)).as_bytes(),
            ), // a head just under the limit, never finished
            _ => stream.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, b'\r', b'\n']), // not HTTP
        };
        hostile.push(stream);
    }
    // Served at once while all 1,000 are held.
    for _ in 0..50 {
        let (status, body) = unix_get(&socket, "/credentials").unwrap();
        eqnice!(200, status);
        assert!(body.contains("AccessKeyId"));
    }
    let loaded = rss_kib(running.pid());
    let growth = loaded.saturating_sub(resting);
    eprintln!(
        "agent RSS: {resting} KiB resting, {loaded} KiB with 1,000 hostile connections (+{growth} KiB)"
    );
    assert!(
        growth < HOSTILE_MEMORY_BOUND_KIB,
        "memory grew by {growth} KiB under 1,000 connections"
    );
    drop(hostile);
    eqnice!(200, unix_get(&socket, "/healthz").unwrap().0);
    assert!(running.try_status().is_none(), "the agent must not exit");
    assert!(running.stop_with(Signal::TERM).success());
}

/// The harness the hostile-user tests stand on: a stranger made by
/// `util::Stranger` is really unprivileged (it cannot read root's 0600 file,
/// and cannot write where root alone may), and can use its own home.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
fn a_stranger_is_an_unprivileged_user() {
    let stranger = crate::util::Stranger::new();
    let dir = tempfile::tempdir().unwrap();
    let home = stranger.home(dir.path());
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let read = stranger.command("cat").arg(&secret).output().unwrap();
    assert!(!read.status.success(), "a stranger read root's 0600 file");
    let write = stranger
        .command("touch")
        .arg(dir.path().join("planted"))
        .status()
        .unwrap();
    assert!(!write.success(), "a stranger wrote in root's directory");
    stranger.sh(&format!("echo mine > {}/file", home.display()));
    use std::os::unix::fs::MetadataExt;
    eqnice!(
        stranger.uid,
        std::fs::metadata(home.join("file")).unwrap().uid()
    );
}
