//! The credential socket's long-poll (issue 16): a client that asks
//! `GET /credentials?wait=SECONDS&since=ETAG` is answered the moment a
//! rotation (or a consumer's new session) changes what it is served, not
//! when its wait ends; bad parameters are refused; a stopping agent
//! answers its waiting clients.
//!
//! "Waiting" is observed, not assumed: the agent counts a request in
//! `imds_agent_requests_total` when it starts handling it, and a long-poll
//! whose `since` is current then waits. A change made after that count
//! rose can only reach the client by waking it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use imds_client::mock::{MockImds, MockSts};
use rustix::process::Signal;

use crate::util::{
    Answer, Running, Stranger, agent, agent_against, metric, metrics_socket_of, unix_request,
    wait_for, wait_for_served_credentials,
};

fn key_of(body: &str) -> String {
    let doc: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    doc["AccessKeyId"]
        .as_str()
        .unwrap_or_else(|| panic!("no AccessKeyId in {body}"))
        .to_owned()
}

/// The answer's `ETag`, without its quotes (as a query carries it).
fn etag_of(answer: &Answer) -> String {
    answer
        .header("etag")
        .unwrap_or_else(|| panic!("expected an ETag in {answer:?}"))
        .trim_matches('"')
        .to_owned()
}

/// `imds_agent_requests_total` of the agent whose socket is `socket`.
fn requests(socket: &Path) -> u64 {
    metric(&metrics_socket_of(socket), "imds_agent_requests_total")
        .expect("imds_agent_requests_total on the metrics socket")
}

/// Sends `GET path` on a thread of its own (as `user`, when given), and
/// returns once the agent has started handling it.
fn waiting(socket: &Path, path: &str, user: Option<(Stranger, u32)>) -> JoinHandle<Answer> {
    let before = requests(socket);
    let (socket_path, path) = (socket.to_owned(), path.to_owned());
    let request = std::thread::spawn(move || {
        if let Some((user, group)) = user {
            become_user(user, group);
        }
        unix_request(&socket_path, "GET", &path).expect("an answer on the socket")
    });
    wait_for("the agent to receive the long-poll", || {
        requests(socket) > before
    });
    request
}

/// Makes this thread `user`, with `group` as its one supplementary group
/// (credentials are per thread on Linux, so `SO_PEERCRED` reports them).
fn become_user(user: Stranger, group: u32) {
    use rustix::fs::{Gid, Uid};
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    rustix::thread::set_thread_groups(&[Gid::from_raw(group)]).expect("setting groups");
    rustix::thread::set_thread_res_gid(gid, gid, gid).expect("setresgid");
    rustix::thread::set_thread_res_uid(uid, uid, uid).expect("setresuid");
}

struct Agent {
    running: Option<Running>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start(imds: &MockImds) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut cmd = agent_against(imds);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--metrics-socket")
            .arg(metrics_socket_of(&socket));
        let running = Running::start(cmd);
        wait_for_served_credentials(&socket);
        Self {
            running: Some(running),
            socket,
            _dir: dir,
        }
    }

    fn get(&self, path: &str) -> Answer {
        unix_request(&self.socket, "GET", path).expect("an answer on the socket")
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_poll_client_is_woken_by_a_rotation() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let agent = Agent::start(&imds);
    let first = agent.get("/credentials");
    assert_eq!(first.status, 200, "{first:?}");
    let (old_key, old_tag) = (key_of(&first.body), etag_of(&first));
    let secret = imds.current_credentials().unwrap();
    for secret in [secret.secret_access_key(), secret.session_token()] {
        assert!(
            !first.head.contains(secret),
            "a secret in the head: {}",
            first.head
        );
    }

    let poll = waiting(
        &agent.socket,
        &format!("/credentials?wait=60&since={old_tag}"),
        None,
    );
    assert!(
        !poll.is_finished(),
        "expected the long-poll to wait while nothing changed"
    );
    imds.rotate();
    let new_key = imds
        .current_credentials()
        .unwrap()
        .access_key_id()
        .to_owned();
    assert_ne!(new_key, old_key);
    agent.running().signal(Signal::HUP);

    let woken = poll.join().expect("the long-poll's thread");
    // The new key exists only since the rotation above, and a poll that
    // ended with its wait would be a 304 without a body.
    assert_eq!(woken.status, 200, "{woken:?}");
    assert_eq!(key_of(&woken.body), new_key, "{woken:?}");
    assert_ne!(etag_of(&woken), old_tag, "a new ETag after the rotation");
    // A plain GET now serves what the long-poll announced, with its tag.
    assert_eq!(etag_of(&agent.get("/credentials")), etag_of(&woken));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_or_malformed_since_is_answered_at_once_and_bad_waits_are_400() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let agent = Agent::start(&imds);
    let current = agent.get("/credentials");
    let key = key_of(&current.body);
    // Held, these would end in a 304 after 60 s.
    for since in ["not-a-tag", "%22%22", "0000000000000000"] {
        let got = agent.get(&format!("/credentials?wait=60&since={since}"));
        assert_eq!(got.status, 200, "since={since}: {got:?}");
        assert_eq!(key_of(&got.body), key, "since={since}");
        assert_eq!(etag_of(&got), etag_of(&current), "since={since}");
    }
    // `since` alone, current: a conditional GET.
    let got = agent.get(&format!("/credentials?since={}", etag_of(&current)));
    assert_eq!((got.status, got.body.as_str()), (304, ""), "{got:?}");

    let tag = etag_of(&current);
    for wait in ["0", "abc", "100000", "-1", "1.5"] {
        let got = agent.get(&format!("/credentials?wait={wait}&since={tag}"));
        assert_eq!(got.status, 400, "wait={wait}: {got:?}");
        assert!(
            got.body.contains("wait") && got.body.contains("from 1 to 300"),
            "expected the message to name wait and its range; wait={wait}: {}",
            got.body
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_answers_a_waiting_long_poll_and_the_agent_exits() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let mut agent = Agent::start(&imds);
    let tag = etag_of(&agent.get("/credentials"));
    let poll = waiting(
        &agent.socket,
        &format!("/credentials?wait=300&since={tag}"),
        None,
    );
    // stop_with waits for the exit at most 60 s: far less than the wait.
    let status = agent.running.take().unwrap().stop_with(Signal::TERM);
    assert!(status.success(), "the agent's exit status: {status}");
    let got = poll.join().expect("the long-poll's thread");
    assert_eq!(got.status, 503, "{got:?}");
    assert!(got.body.contains("stopping"), "{got:?}");
}

/// With a config file, a consumer's long-poll follows its own session: the
/// instance role is replaced, the session assumed with the old role is
/// dropped, and the waiting consumer is answered with the new session.
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
#[tokio::test(flavor = "multi_thread")]
async fn a_consumers_long_poll_is_woken_by_its_new_session() {
    let imds = MockImds::builder()
        .role("instance-role")
        .start()
        .await
        .unwrap();
    let sts = MockSts::for_imds(&imds).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (user, group) = (Stranger::new(), Stranger::new().gid);
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "unmatched = \"deny\"\n\n[[consumer]]\nname = \"app\"\nuids = [{}]\n\
             session_policy = '{{\"Version\":\"2012-10-17\",\"Statement\":[{{\"Effect\":\"Allow\",\"Action\":\"s3:GetObject\",\"Resource\":\"*\"}}]}}'\n\
             duration_seconds = 900\n",
            user.uid
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let socket = dir.path().join("agent.sock");
    let mut cmd = agent();
    cmd.arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint())
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .args(["--socket-mode", "0660", "--socket-group"])
        .arg(group.to_string())
        .arg("--metrics-socket")
        .arg(metrics_socket_of(&socket))
        .env("AWS_ENDPOINT_URL_STS", sts.endpoint())
        .env_remove("AWS_REGION");
    let running = Running::start(cmd);
    wait_for("the agent's socket", || {
        unix_request(&socket, "GET", "/healthz").is_ok_and(|a| a.status == 200)
    });
    let get_as_user = |path: &str| {
        let (socket, path) = (socket.clone(), path.to_owned());
        std::thread::spawn(move || {
            become_user(user, group);
            unix_request(&socket, "GET", &path).expect("an answer on the socket")
        })
        .join()
        .expect("the user's thread")
    };
    let first = get_as_user("/credentials");
    assert_eq!(first.status, 200, "{first:?}");
    let (old_key, old_tag) = (key_of(&first.body), etag_of(&first));
    assert_eq!(
        get_as_user(&format!("/credentials?since={old_tag}")).status,
        304,
        "the consumer's own session is what its tag names"
    );

    let poll = waiting(
        &socket,
        &format!("/credentials?wait=60&since={old_tag}"),
        Some((user, group)),
    );
    imds.replace_role("second-role");
    running.signal(Signal::HUP);
    let woken = poll.join().expect("the long-poll's thread");
    assert_eq!(woken.status, 200, "{woken:?}");
    let new_key = key_of(&woken.body);
    assert_ne!(new_key, old_key, "a new session after the replacement");
    assert_ne!(etag_of(&woken), old_tag);
    let assumed = sts
        .assume_role_calls()
        .into_iter()
        .rfind(|c| c.outcome.as_ref().ok() == Some(&new_key))
        .expect("the new session came from AssumeRole");
    assert!(
        assumed
            .role_arn
            .as_deref()
            .is_some_and(|r| r.ends_with(":role/second-role")),
        "assumed with the new instance role: {assumed:?}"
    );
    let status = running.stop_with(Signal::TERM);
    assert!(status.success(), "the agent's exit status: {status}");
}

/// Long-polls hold connections like any other request: a user's waiting
/// long-polls count against its share (64 connections per uid), its next
/// connection is refused at once (503), and another user is still served.
/// So a user cannot take more than its share by waiting, nor starve others.
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
#[tokio::test(flavor = "multi_thread")]
async fn a_users_long_polls_count_against_its_share_and_others_are_still_served() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("agent.sock");
    let group = Stranger::new().gid;
    let mut cmd = agent_against(&imds);
    cmd.arg("--socket")
        .arg(&socket)
        .args(["--socket-mode", "0660", "--socket-group"])
        .arg(group.to_string())
        .arg("--metrics-socket")
        .arg(metrics_socket_of(&socket));
    let running = Running::start(cmd);
    wait_for_served_credentials(&socket);
    let tag = etag_of(&unix_request(&socket, "GET", "/credentials").unwrap());
    let share = 64;

    let (flooder, other) = (Stranger::new(), Stranger::new());
    let before = requests(&socket);
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let flood = {
        let (socket, tag) = (socket.clone(), tag.clone());
        std::thread::spawn(move || {
            become_user(flooder, group);
            let polls: Vec<UnixStream> = (0..share)
                .map(|_| {
                    let mut s = UnixStream::connect(&socket).expect("connect");
                    write!(
                        s,
                        "GET /credentials?wait=300&since={tag} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    )
                    .expect("writing a long-poll");
                    s
                })
                .collect();
            held_tx.send(()).unwrap();
            // One more, while the share is held by waiting long-polls.
            let more = unix_request(&socket, "GET", "/credentials").expect("an answer");
            release_rx.recv().unwrap();
            (polls, more)
        })
    };
    held_rx.recv().unwrap();
    wait_for("the agent to be handling every long-poll", || {
        requests(&socket) >= before + share
    });
    let other_got = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            become_user(other, group);
            unix_request(&socket, "GET", "/credentials").expect("an answer")
        })
    };
    let other_got = other_got.join().expect("the other user's thread");
    release_tx.send(()).unwrap();
    let (polls, more) = flood.join().expect("the flooder's thread");
    assert_eq!(
        more.status, 503,
        "expected the connection past the user's share of {share} to be refused, got {more:?}"
    );
    assert!(
        more.body.contains("too many connections from this user"),
        "{more:?}"
    );
    assert_eq!(
        other_got.status, 200,
        "expected another user to be served while the flooder waits, got {other_got:?}"
    );

    // The long-polls were waiting all along: SIGTERM answers each one.
    let status = running.stop_with(Signal::TERM);
    assert!(status.success(), "the agent's exit status: {status}");
    for mut poll in polls {
        poll.set_read_timeout(Some(crate::util::PATIENCE)).unwrap();
        let mut raw = String::new();
        let _ = poll.read_to_string(&mut raw);
        assert!(
            raw.starts_with("HTTP/1.1 503"),
            "expected a waiting long-poll to be answered 503 at shutdown, got {raw:?}"
        );
    }
}
