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

#[tokio::test(flavor = "multi_thread")]
async fn ready_comes_only_after_the_first_write_or_after_imds_says_no_role() {
    let imds = MockImds::builder().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let file = dir.path().join("credentials");
    let mut cmd = agent();
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint())
        .arg("--credentials-file")
        .arg(&file)
        .args(["--poll-interval", "1"]);
    let running = Running::start(cmd);

    // No role: ready all the same, saying so.
    let first = receive(&notify);
    assert!(first.starts_with("READY=1\n"), "{first}");
    assert!(first.contains("no IAM role"), "{first}");
    assert!(!file.exists());

    // An attach: a new status, and the file is there by the time it is sent.
    imds.attach_role("r");
    let second = receive(&notify);
    assert!(
        second.contains("STATUS=serving credentials of role r"),
        "{second}"
    );
    assert!(!second.contains("READY=1"), "READY is sent once: {second}");
    assert!(file.exists(), "the status follows the write");

    assert!(running.stop_with(Signal::TERM).success());
    assert_eq!(receive(&notify), "STOPPING=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_role_ready_follows_the_first_write() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let file = dir.path().join("credentials");
    let mut cmd = agent();
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint())
        .arg("--credentials-file")
        .arg(&file);
    let running = Running::start(cmd);
    let first = receive(&notify);
    assert!(first.starts_with("READY=1\n"), "{first}");
    let text = std::fs::read_to_string(&file).expect("the file exists when READY=1 arrives");
    assert!(text.contains(imds.current_credentials().unwrap().access_key_id()));
    drop(running);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watchdog_is_fed_when_systemd_asks_for_it() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut cmd = agent();
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint())
        .arg("--credentials-file")
        .arg(dir.path().join("credentials"));
    let running = Running::start(cmd);
    let mut watchdogs = 0;
    for _ in 0..10 {
        if receive(&notify) == "WATCHDOG=1" {
            watchdogs += 1;
        }
    }
    assert!(
        watchdogs >= 5,
        "expected regular WATCHDOG=1, got {watchdogs} in 10 messages"
    );
    drop(running);
}
