//! Nothing on disk can stall the agent: with its credentials file's lock
//! held by someone else, so that no write can finish, the agent still
//! serves the socket, follows a rotation and a detach there, and stops at
//! once on SIGTERM.

use std::time::Duration;

use imds_client::mock::MockImds;
use rustix::fs::{FlockOperation, flock};
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, agent_against, unix_get, wait_for, wait_for_served_credentials};

#[tokio::test(flavor = "multi_thread")]
async fn a_held_lock_stalls_no_signal_no_poll_and_no_client() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    let socket = dir.path().join("agent.sock");
    let mut cmd = agent_against(&imds);
    cmd.arg("--credentials-file")
        .arg(&file)
        .arg("--socket")
        .arg(&socket)
        .args(["--poll-interval", "1"]);
    let running = Running::start(cmd);
    wait_for_served_credentials(&socket);
    let first = imds.current_credentials().unwrap();
    wait_for("the first write", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(first.access_key_id()))
    });

    // Someone holds the lock every writer of the file takes.
    let lock = std::fs::File::options()
        .read(true)
        .open(dir.path().join(".credentials.lock"))
        .expect("the agent's lock file beside the output");
    // (The agent takes it briefly on each write: wait for a moment it is free.)
    wait_for("the lock to be free for a moment", || {
        flock(&lock, FlockOperation::NonBlockingLockExclusive).is_ok()
    });

    // A rotation: the file cannot follow, the socket does.
    imds.rotate();
    let rotated = imds.current_credentials().unwrap();
    running.signal(Signal::HUP);
    wait_for("the rotated key on the socket", || {
        unix_get(&socket, "/credentials")
            .is_ok_and(|(s, body)| s == 200 && body.contains(rotated.access_key_id()))
    });
    assert!(
        std::fs::read_to_string(&file)
            .unwrap()
            .contains(first.access_key_id()),
        "the file keeps its last whole content while it cannot be written"
    );

    // A detach is noticed at the next poll and the socket stops serving the
    // role's keys, although the file still cannot be written.
    imds.detach_role();
    wait_for("the socket to stop serving a detached role's keys", || {
        unix_get(&socket, "/credentials").is_ok_and(|(s, _)| s == 404)
    });

    // SIGTERM stops the agent at once: the agent abandons a stuck write
    // after 0.5 s and its blocking threads 0.5 s later, so 1 s in all; the
    // bound here leaves room for a loaded machine.
    let stopped = tokio::time::Instant::now();
    let status = running.stop_with(Signal::TERM);
    let took = stopped.elapsed();
    assert!(status.success(), "expected a clean stop, got {status:?}");
    assert!(
        took < Duration::from_secs(3),
        "expected the agent to stop within about a second of SIGTERM; it took {took:?}"
    );
    eqnice!(false, socket.exists());
    drop(lock);
}
