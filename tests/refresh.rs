//! A refresh that does not need a signal (issue 13, item 6): `POST /refresh`
//! on the credential socket asks IMDS at once and answers with what it
//! brought; it is allowed to the socket's peers only, and bounded (one at a
//! time, at most one per 5 s); `imds-agent refresh` calls it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{
    Answer, Running, Stranger, agent, agent_against, http_exchange, unix_get, unix_request,
    wait_for, wait_for_served_credentials,
};

/// How many times the emulator has handed out role `r`'s credentials.
fn fetches(imds: &MockImds) -> u64 {
    imds.request_counts()
        .by_route
        .iter()
        .filter(|(route, _)| route.contains("security-credentials") && route.ends_with("/r"))
        .map(|(_, n)| *n)
        .sum()
}

/// The agent on `dir/agent.sock`, polling only every 60 s, so that only a
/// refresh request can cause a fetch during a test.
fn start(imds: &MockImds, dir: &Path, extra: &[&str]) -> Running {
    let socket = dir.join("agent.sock");
    let mut cmd = agent_against(imds);
    cmd.arg("--socket")
        .arg(&socket)
        .args(["--poll-interval", "60"])
        .args(extra);
    let running = Running::start(cmd);
    wait_for_served_credentials(&socket);
    running
}

fn access_key(answer: &Answer) -> String {
    let json: serde_json::Value = serde_json::from_str(&answer.body)
        .unwrap_or_else(|e| panic!("expected JSON, got {answer:?}: {e}"));
    json["AccessKeyId"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn post_refresh_fetches_at_once_and_answers_with_the_new_credentials() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let running = start(&imds, dir.path(), &[]);
    let before = fetches(&imds);

    imds.rotate();
    let rotated = imds.current_credentials().unwrap();
    let answer = unix_request(&socket, "POST", "/refresh").unwrap();
    assert!(
        answer.status == 200 && access_key(&answer) == rotated.access_key_id(),
        "expected 200 with the rotated key {}, got {answer:?}",
        rotated.access_key_id()
    );
    eqnice!(before + 1, fetches(&imds));
    let (status, body) = unix_get(&socket, "/credentials").unwrap();
    assert!(
        status == 200 && body.contains(rotated.access_key_id()),
        "expected /credentials to serve the rotated key at once, got {status}"
    );

    // Right after, another request is refused: IMDS has nothing newer.
    let again = unix_request(&socket, "POST", "/refresh").unwrap();
    let retry_after: Option<u64> = again.header("retry-after").and_then(|v| v.parse().ok());
    assert!(
        again.status == 429 && matches!(retry_after, Some(1..=5)),
        "expected 429 with Retry-After 1-5 s right after a refresh, got {again:?}"
    );
    eqnice!(before + 1, fetches(&imds));
    // Not a GET.
    eqnice!(405, unix_get(&socket, "/refresh").unwrap().0);
    assert!(running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_refresh_requests_causes_one_fetch() {
    const CLIENTS: usize = 16;
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let running = start(&imds, dir.path(), &[]);
    let before = fetches(&imds);
    imds.rotate();
    let rotated = imds.current_credentials().unwrap();

    let start = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (socket, start) = (socket.clone(), start.clone());
            std::thread::spawn(move || {
                let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
                start.wait();
                http_exchange(stream, "POST", "/refresh", crate::util::PATIENCE).unwrap()
            })
        })
        .collect();
    let answers: Vec<Answer> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let refreshed = answers.iter().filter(|a| a.status == 200).count();
    assert!(
        refreshed >= 1
            && answers.iter().all(|a| (a.status == 200
                && access_key(a) == rotated.access_key_id())
                || a.status == 429),
        "expected every answer 200 with {} (the burst shares one refresh) or 429, got {answers:#?}",
        rotated.access_key_id()
    );
    eqnice!(before + 1, fetches(&imds));
    assert!(running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_peer_off_the_allow_list_may_not_refresh() {
    let stranger = Stranger::new();
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("agent.sock");
    // The stranger may connect (the socket's group), but is not on the allow-list.
    let gid = stranger.gid.to_string();
    let running = start(
        &imds,
        dir.path(),
        &[
            "--socket-mode",
            "0660",
            "--socket-group",
            &gid,
            "--allow-uid",
            "0",
        ],
    );
    let before = fetches(&imds);
    // The stranger runs a copy of the binary in the 0755 test dir (it may
    // not be able to reach the build directory).
    let bin = dir.path().join("imds-agent");
    std::fs::hard_link(env!("CARGO_BIN_EXE_imds-agent"), &bin)
        .or_else(|_| std::fs::copy(env!("CARGO_BIN_EXE_imds-agent"), &bin).map(drop))
        .unwrap();
    let out = stranger
        .command(bin.to_str().unwrap())
        .arg("refresh")
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("may not use this socket"),
        "expected the stranger's refresh refused (exit 1, 403), got {:?}: {stderr}",
        out.status
    );
    eqnice!(before, fetches(&imds));
    // An allowed peer (root) may.
    let answer = unix_request(&socket, "POST", "/refresh").unwrap();
    eqnice!(200, answer.status);
    eqnice!(before + 1, fetches(&imds));
    assert!(running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn imds_agent_refresh_prints_the_outcome() {
    let help = agent().args(["refresh", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("ExpiredToken") && help.contains("POST /refresh"),
        "expected `refresh --help` to say when to use it, got:\n{help}"
    );

    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let refresh = || {
        agent()
            .arg("refresh")
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap()
    };
    let out = refresh();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("cannot connect"),
        "expected exit 1 without an agent, got {:?}: {stderr}",
        out.status
    );

    let running = start(&imds, dir.path(), &[]);
    let before = fetches(&imds);
    imds.rotate();
    let rotated = imds.current_credentials().unwrap();
    let out = refresh();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("refreshed")
            && stdout.contains(rotated.access_key_id()),
        "expected exit 0 naming the key {}, got {:?}: {stdout}{}",
        rotated.access_key_id(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains(rotated.secret_access_key()) && !stdout.contains(rotated.session_token()),
        "the secret key or session token was printed"
    );
    eqnice!(before + 1, fetches(&imds));

    // The role is detached: asked again at once, the command waits out the
    // agent's 5 s between refreshes, then reports what IMDS says.
    imds.detach_role();
    let out = refresh();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("no IAM role"),
        "expected exit 1 saying no role is attached, got {:?}: {stderr}",
        out.status
    );
    wait_for("the socket to stop serving the detached role", || {
        unix_get(&socket, "/credentials").is_ok_and(|(s, _)| s == 404)
    });
    assert!(running.stop_with(Signal::TERM).success());
}
