//! Metrics and probes apart from credentials (issue 13, item 4): the
//! credential socket no longer serves `/metrics`; `--metrics-socket` (its
//! own mode and group, enforced by the kernel) and `--metrics-listen`
//! (loopback only) serve `/metrics` and `/healthz`, and `/healthz` says
//! `degraded` while an output cannot be written.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use imds_client::mock::MockImds;
use rustix::fs::{FlockOperation, flock};
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{
    Running, Stranger, agent, agent_against, http_exchange, unix_get, wait_for,
    wait_for_served_credentials,
};

/// `/healthz` as JSON, from `socket`.
fn health(socket: &Path) -> (u16, serde_json::Value) {
    let (status, body) = unix_get(socket, "/healthz").expect("GET /healthz");
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("expected JSON from /healthz, got {body:?}: {e}"));
    (status, json)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health_are_served_apart_from_credentials() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let metrics = dir.path().join("metrics.sock");
    let mut cmd = agent_against(&imds);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--metrics-socket")
        .arg(&metrics);
    let running = Running::start(cmd);
    wait_for_served_credentials(&socket);
    let key = imds
        .current_credentials()
        .unwrap()
        .access_key_id()
        .to_owned();

    // The credential socket: /metrics is gone, and says where it went.
    let (status, body) = unix_get(&socket, "/metrics").unwrap();
    assert!(
        status == 404
            && body.contains("not served on the credential socket")
            && body.contains(&metrics.display().to_string()),
        "expected 404 naming {} for /metrics on the credential socket, got {status} {body}",
        metrics.display()
    );
    serde_json::from_str::<serde_json::Value>(&body).expect("a JSON error");

    // The metrics socket: counters and health, 0600 by default, no credentials.
    eqnice!(
        0o600,
        std::fs::metadata(&metrics).unwrap().permissions().mode() & 0o777
    );
    let (status, text) = unix_get(&metrics, "/metrics").unwrap();
    assert!(
        status == 200
            && text.contains("imds_agent_refreshes_total")
            && text.contains("imds_agent_outputs_failing 0")
            && text.contains("imds_agent_outputs_stuck 0"),
        "expected 200 with the counters and the outputs' gauges, got {status}:\n{text}"
    );
    let (status, json) = health(&metrics);
    eqnice!(200, status);
    eqnice!("ok", json["status"]);
    eqnice!(
        serde_json::json!({"stuck": 0, "failing": 0}),
        json["outputs"]
    );
    let (status, body) = unix_get(&metrics, "/credentials").unwrap();
    assert!(
        status == 404 && !body.contains(&key) && !body.contains("AccessKeyId"),
        "expected 404 without credentials for /credentials on the metrics socket, got {status} {body}"
    );

    // The credential socket keeps /healthz, with the same outputs' counts.
    let (status, json) = health(&socket);
    eqnice!(200, status);
    eqnice!(
        serde_json::json!({"stuck": 0, "failing": 0}),
        json["outputs"]
    );

    let status = running.stop_with(Signal::TERM);
    assert!(status.success(), "expected a clean stop, got {status:?}");
    assert!(
        !metrics.exists(),
        "expected the metrics socket removed at a clean stop"
    );
}

/// Connects to `socket` as `who` (a thread of this root process that has
/// become that user: Linux credentials are per thread) and GETs `/metrics`.
fn get_metrics_as(who: Stranger, socket: &Path) -> std::io::Result<u16> {
    let socket = socket.to_owned();
    std::thread::spawn(move || {
        use rustix::fs::{Gid, Uid};
        let (uid, gid) = (Uid::from_raw(who.uid), Gid::from_raw(who.gid));
        rustix::thread::set_thread_groups(&[]).expect("dropping groups");
        rustix::thread::set_thread_res_gid(gid, gid, gid).expect("setresgid");
        rustix::thread::set_thread_res_uid(uid, uid, uid).expect("setresuid");
        assert_eq!(rustix::process::geteuid().as_raw(), who.uid);
        let stream = std::os::unix::net::UnixStream::connect(&socket)?;
        http_exchange(stream, "GET", "/metrics", crate::util::PATIENCE).map(|a| a.status)
    })
    .join()
    .expect("the stranger's thread")
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn the_metrics_socket_admits_its_group_and_the_kernel_refuses_other_users() {
    let (member, outsider) = (Stranger::new(), Stranger::new());
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("agent.sock");
    let metrics = dir.path().join("metrics.sock");
    let mut cmd = agent_against(&imds);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--metrics-socket")
        .arg(&metrics)
        .arg("--metrics-socket-group")
        .arg(member.gid.to_string());
    let running = Running::start(cmd);
    wait_for_served_credentials(&socket);

    let meta = std::fs::metadata(&metrics).unwrap();
    eqnice!((0o660, member.gid), (meta.mode() & 0o777, meta.gid()));
    let got = get_metrics_as(member, &metrics);
    assert!(
        matches!(got, Ok(200)),
        "expected the group's member to read /metrics, got {got:?}"
    );
    let got = get_metrics_as(outsider, &metrics);
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied),
        "expected the kernel to refuse another user's connect (EACCES), got {got:?}"
    );
    // Neither may use the credential socket (0600, root's).
    let got = get_metrics_as(member, &socket);
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied),
        "expected the metrics group to have no access to the credential socket, got {got:?}"
    );
    let status = running.stop_with(Signal::TERM);
    assert!(status.success(), "expected a clean stop, got {status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_is_degraded_while_an_output_is_failing_and_ok_once_it_is_written() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    let socket = dir.path().join("agent.sock");
    let metrics = dir.path().join("metrics.sock");
    let mut cmd = agent_against(&imds);
    cmd.env("IMDS_AGENT_LOG", "error")
        .arg("--credentials-file")
        .arg(&file)
        .arg("--socket")
        .arg(&socket)
        .arg("--metrics-socket")
        .arg(&metrics);
    let running = Running::start(cmd);
    let first = imds.current_credentials().unwrap();
    wait_for("the first write", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(first.access_key_id()))
    });
    wait_for("/healthz ok", || health(&metrics).1["status"] == "ok");

    // Someone holds the lock every writer of the file takes: the next write
    // fails (after the agent's bounded wait for the lock), and is retried.
    let lock = std::fs::File::options()
        .read(true)
        .open(dir.path().join(".credentials.lock"))
        .expect("the agent's lock file beside the output");
    wait_for("the lock to be free for a moment", || {
        flock(&lock, FlockOperation::NonBlockingLockExclusive).is_ok()
    });
    imds.rotate();
    let rotated = imds.current_credentials().unwrap();
    running.signal(Signal::HUP);
    let mut seen = serde_json::Value::Null;
    wait_for("/healthz degraded with a failing output", || {
        let (status, json) = health(&metrics);
        seen = json.clone();
        status == 200 && json["status"] == "degraded" && json["outputs"]["failing"] == 1
    });
    eqnice!(0, seen["outputs"]["stuck"].as_u64().unwrap());
    eqnice!(
        Some(1),
        crate::util::metric(&metrics, "imds_agent_outputs_failing")
    );
    eqnice!("degraded", health(&socket).1["status"]);

    // The lock is released: the retry succeeds, and health is ok again.
    flock(&lock, FlockOperation::Unlock).unwrap();
    wait_for("the rotated key in the file", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(rotated.access_key_id()))
    });
    wait_for("/healthz ok again", || {
        let (status, json) = health(&metrics);
        status == 200
            && json["status"] == "ok"
            && json["outputs"] == serde_json::json!({"stuck": 0, "failing": 0})
    });
    eqnice!(
        Some(0),
        crate::util::metric(&metrics, "imds_agent_outputs_failing")
    );
    let status = running.stop_with(Signal::TERM);
    assert!(status.success(), "expected a clean stop, got {status:?}");
}

/// GETs `path` from `addr` over TCP.
fn tcp_get(addr: &str, path: &str) -> (u16, String) {
    let stream = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("expected the metrics listener on {addr}: {e}"));
    let answer = http_exchange(stream, "GET", path, crate::util::PATIENCE).unwrap();
    (answer.status, answer.body)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_listen_serves_on_loopback_and_refuses_other_addresses() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let log = dir.path().join("agent.log");
    let mut cmd = agent_against(&imds);
    cmd.env("IMDS_AGENT_LOG", "info")
        .arg("--socket")
        .arg(&socket)
        .args(["--metrics-listen", "127.0.0.1:0"]);
    let running = Running::start_logging_to(cmd, &log);
    let mut addr = None;
    wait_for("the metrics listener's address in the log", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        addr = text
            .split("metrics listener ready: http://")
            .nth(1)
            .and_then(|rest| rest.split_once("/metrics"))
            .map(|(addr, _)| addr.to_owned());
        addr.is_some()
    });
    let addr = addr.unwrap();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    wait_for_served_credentials(&socket);
    let (status, text) = tcp_get(&addr, "/metrics");
    assert!(
        status == 200 && text.contains("imds_agent_refreshes_total"),
        "expected the counters on {addr}, got {status}:\n{text}"
    );
    let (status, body) = tcp_get(&addr, "/healthz");
    assert!(
        status == 200 && body.contains("\"ok\""),
        "expected health ok on {addr}, got {status} {body}"
    );
    let (status, body) = tcp_get(&addr, "/credentials");
    assert!(
        status == 404 && !body.contains("AccessKeyId"),
        "expected no credentials on the metrics listener, got {status} {body}"
    );
    let status = running.stop_with(Signal::TERM);
    assert!(status.success(), "expected a clean stop, got {status:?}");

    // Nor may the metrics socket take the credential socket's path.
    let same = dir.path().join("same.sock");
    let out = agent()
        .arg("run")
        .arg("--socket")
        .arg(&same)
        .arg("--metrics-socket")
        .arg(&same)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("are the same path") && !same.exists(),
        "expected one path for both sockets refused, got {:?}: {stderr}",
        out.status
    );

    for bad in ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464"] {
        let out = agent()
            .arg("run")
            .arg("--socket")
            .arg(dir.path().join("other.sock"))
            .args(["--metrics-listen", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && stderr.contains("not a loopback address"),
            "expected --metrics-listen {bad} refused (exit 2, \"not a loopback address\"), got {:?}: {stderr}",
            out.status
        );
    }
}
