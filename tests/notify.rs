//! The systemd notify protocol, through a NOTIFY_SOCKET of our own.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::util::{Running, agent};

fn receive(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification within 10 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// An agent writing a credentials file in a temp dir, notifying a datagram
/// socket of ours; `env` adds variables (such as `WATCHDOG_USEC`).
struct Notified {
    dir: tempfile::TempDir,
    socket: UnixDatagram,
    running: Running,
}

impl Notified {
    fn start(imds: &MockImds, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let notify_path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&notify_path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut cmd = agent();
        cmd.env("NOTIFY_SOCKET", &notify_path)
            .envs(env.iter().copied())
            .arg("run")
            .arg("--imds-endpoint")
            .arg(imds.endpoint())
            .arg("--credentials-file")
            .arg(dir.path().join("credentials"))
            .args(["--poll-interval", "1"]);
        let running = Running::start(cmd);
        Self {
            dir,
            socket,
            running,
        }
    }

    fn file(&self) -> std::path::PathBuf {
        self.dir.path().join("credentials")
    }

    fn receive(&self) -> String {
        receive(&self.socket)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_comes_only_after_the_first_write_or_after_imds_says_no_role() {
    let imds = MockImds::builder().start().await.unwrap();
    let agent = Notified::start(&imds, &[]);

    // No role: ready all the same, saying so.
    let first = agent.receive();
    assert!(first.starts_with("READY=1\n"), "{first}");
    assert!(first.contains("no IAM role"), "{first}");
    assert!(!agent.file().exists());

    // An attach: a new status, and the file is there by the time it is sent.
    imds.attach_role("r");
    let second = agent.receive();
    assert!(
        second.contains("STATUS=serving credentials of role r"),
        "{second}"
    );
    assert!(!second.contains("READY=1"), "READY is sent once: {second}");
    assert!(agent.file().exists(), "the status follows the write");

    assert!(agent.running.stop_with(Signal::TERM).success());
    assert_eq!(receive(&agent.socket), "STOPPING=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_role_ready_follows_the_first_write() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let agent = Notified::start(&imds, &[]);
    let first = agent.receive();
    assert!(first.starts_with("READY=1\n"), "{first}");
    let text = std::fs::read_to_string(agent.file()).expect("the file exists when READY=1 arrives");
    assert!(text.contains(imds.current_credentials().unwrap().access_key_id()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watchdog_is_fed_when_systemd_asks_for_it() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let agent = Notified::start(&imds, &[("WATCHDOG_USEC", "200000")]);
    let watchdogs = (0..10).filter(|_| agent.receive() == "WATCHDOG=1").count();
    assert!(
        watchdogs >= 5,
        "expected regular WATCHDOG=1, got {watchdogs} in 10 messages"
    );
}
