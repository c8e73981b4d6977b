//! Socket activation: the agent serves a listening socket passed as fd 3
//! with `LISTEN_FDS=1`, as systemd's `imds-agent.socket` does.

use std::os::fd::OwnedFd;

use command_fds::{CommandFdExt, FdMapping};
use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, agent, unix_get, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_serves_a_socket_passed_by_systemd() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut cmd = agent();
    cmd.env("LISTEN_FDS", "1")
        .env_remove("LISTEN_PID")
        .arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint());
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: OwnedFd::from(listener),
        child_fd: 3,
    }])
    .unwrap();
    let running = Running::start(cmd);
    wait_for("credentials on the passed socket", || {
        unix_get(&path, "/credentials").is_ok_and(|(s, _)| s == 200)
    });
    let (_, body) = unix_get(&path, "/credentials").unwrap();
    assert!(body.contains(imds.current_credentials().unwrap().access_key_id()));
    assert!(running.stop_with(Signal::TERM).success());
    eqnice!(true, path.exists());
}
