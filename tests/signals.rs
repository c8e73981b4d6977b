//! Signals from the first instant: a SIGHUP or SIGTERM that arrives while
//! the agent starts (a `systemctl reload`, a logrotate script or a
//! config-management run that signals early) never kills it with the
//! kernel's default action.
//!
//! Each round starts the real binary, waits until the process handles
//! SIGTERM at all (its handler shows in `/proc/PID/status`, `SigCgt`; before
//! that point, while the loader runs, nothing in a process can handle a
//! signal), checks that SIGHUP and SIGINT were handled from that same
//! instant, then signals it 0 to 5 ms later, in the middle of its start-up.

use std::time::Duration;

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{
    Running, agent_against, handles_signal, unix_get, wait_for, wait_for_served_credentials,
};

fn start(imds: &MockImds, dir: &std::path::Path) -> Running {
    let mut cmd = agent_against(imds);
    cmd.arg("--socket")
        .arg(dir.join("agent.sock"))
        .arg("--credentials-file")
        .arg(dir.join("credentials"));
    // `start` returns as soon as the agent handles SIGTERM.
    let running = Running::start(cmd);
    for signal in [Signal::HUP, Signal::INT] {
        assert!(
            handles_signal(running.pid(), signal),
            "expected the agent to handle {signal:?} from the moment it handles SIGTERM; it did not"
        );
    }
    running
}

const ROUNDS: u64 = 24;

#[tokio::test(flavor = "multi_thread")]
async fn a_sighup_during_start_up_never_kills_the_agent() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let mut running = start(&imds, dir.path());
        std::thread::sleep(Duration::from_micros(round * 5_000 / ROUNDS));
        running.signal(Signal::HUP);
        let socket = dir.path().join("agent.sock");
        wait_for(
            "the agent to serve credentials after an early SIGHUP",
            || {
                running.try_status().is_some()
                    || unix_get(&socket, "/credentials").is_ok_and(|(s, _)| s == 200)
            },
        );
        assert!(
            running.try_status().is_none(),
            "round {round}: expected the agent alive after a SIGHUP {} us into its start-up; it exited: {:?}",
            round * 5_000 / ROUNDS,
            running.try_status()
        );
        let status = running.stop_with(Signal::TERM);
        assert!(status.success(), "round {round}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigterm_during_start_up_stops_cleanly_and_removes_the_socket() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let running = start(&imds, dir.path());
        std::thread::sleep(Duration::from_micros(round * 5_000 / ROUNDS));
        let status = running.stop_with(Signal::TERM);
        assert!(
            status.success(),
            "round {round}: expected a clean stop (exit 0) after an early SIGTERM, got {status:?}"
        );
        assert!(
            !dir.path().join("agent.sock").exists(),
            "round {round}: the socket file was left behind"
        );
    }
}

/// A SIGHUP that arrives during start-up is remembered, not dropped: it
/// makes the agent ask IMDS again once it runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_sighup_during_start_up_is_answered_with_a_refresh() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = agent_against(&imds);
    let socket = dir.path().join("agent.sock");
    // A long poll interval: only the SIGHUP can cause a second fetch soon.
    cmd.arg("--socket")
        .arg(&socket)
        .args(["--poll-interval", "60"]);
    imds.reset_request_counts();
    let running = Running::start(cmd);
    running.signal(Signal::HUP);
    wait_for_served_credentials(&socket);
    let fetches = || {
        imds.request_counts()
            .by_route
            .iter()
            .filter(|(route, _)| route.contains("security-credentials") && route.ends_with("/r"))
            .map(|(_, n)| *n)
            .sum::<u64>()
    };
    wait_for(
        "a second credentials fetch, caused by the early SIGHUP",
        || fetches() >= 2,
    );
    eqnice!(200, unix_get(&socket, "/credentials").unwrap().0);
    assert!(running.stop_with(Signal::TERM).success());
}
