//! Misbehaving local clients do not starve well-behaved ones or crash the agent.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, agent, unix_get, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn idle_slow_huge_and_garbage_clients_do_not_block_a_good_one() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut cmd = agent();
    cmd.arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint())
        .arg("--socket")
        .arg(&socket)
        .args(["--socket-mode", "0660", "--log-format", "json"]);
    let mut running = Running::start(cmd);
    wait_for("credentials on the socket", || {
        unix_get(&socket, "/credentials").is_ok_and(|(s, _)| s == 200)
    });
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
    let child = agent()
        .env("IMDS_AGENT_LOG", "trace")
        .arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint())
        .arg("--credentials-file")
        .arg(&file)
        .args(["--log-format", "json", "--poll-interval", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("credentials", || file.exists());
    imds.replace_role("other");
    let replaced = imds.current_credentials().unwrap();
    wait_for("the replacement", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(replaced.access_key_id()))
    });
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let logs = String::from_utf8(out.stderr).unwrap();
    assert!(logs.lines().count() > 3, "{logs}");
    for line in logs.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value["level"].is_string(), "{line}");
    }
    assert!(
        !logs.contains(replaced.secret_access_key()),
        "secret key in the logs"
    );
    assert!(
        !logs.contains(replaced.session_token()),
        "session token in the logs"
    );
    assert!(logs.contains("published credentials"));
}
