//! The output directory fills up, turns read-only, or disappears while the
//! agent runs: the old file stays whole, the failure is logged and counted,
//! the write is retried, and the agent recovers once the fault clears.
//!
//! The full and read-only cases need a small tmpfs, so they need the
//! privilege to mount (root, as in `.ci/run`); without it they say so and
//! pass. The removed-directory case runs everywhere.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, agent_against, metric, wait_for};

/// A small tmpfs, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `path` (needs root).
    fn mount(path: &Path, size: &str) -> Self {
        crate::util::require_root();
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "expected to mount a tmpfs at {}: {status}",
            path.display()
        );
        Self {
            path: path.to_owned(),
        }
    }

    fn remount(&self, option: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{option}")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(status.success(), "remount,{option}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The `default` profile's access key id, when the file is a whole profile.
fn whole_key(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k));
    get("aws_secret_access_key = ")?;
    get("aws_session_token = ")?;
    get("aws_access_key_id = ").map(str::to_owned)
}

/// Files in `dir` other than the ones named: temp files left behind.
fn leftovers(dir: &Path, expected: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !expected.contains(&n.as_str()) && !n.ends_with(".lock"))
        .collect()
}

struct Scenario {
    imds: MockImds,
    running: Running,
    socket: PathBuf,
    log: PathBuf,
}

impl Scenario {
    async fn start(dir: &Path, credentials_file: &Path) -> Self {
        let imds = MockImds::builder().role("r").start().await.unwrap();
        let socket = dir.join("agent.sock");
        let log = dir.join("agent.log");
        let mut cmd = agent_against(&imds);
        cmd.env("IMDS_AGENT_LOG", "info")
            .arg("--credentials-file")
            .arg(credentials_file)
            .arg("--socket")
            .arg(&socket)
            .arg("--metrics-socket")
            .arg(crate::util::metrics_socket_of(&socket))
            .args(["--poll-interval", "1"]);
        let running = Running::start_logging_to(cmd, &log);
        let first = imds.current_credentials().unwrap();
        wait_for("the first write", || {
            whole_key(credentials_file).as_deref() == Some(first.access_key_id())
        });
        Self {
            imds,
            running,
            socket,
            log,
        }
    }

    fn failures(&self) -> u64 {
        metric(
            &crate::util::metrics_socket_of(&self.socket),
            "imds_agent_output_failures_total",
        )
        .unwrap_or(0)
    }

    /// Rotates the role's keys and asks the agent to fetch them now; returns
    /// the new access key id.
    fn rotate(&self) -> String {
        self.imds.rotate();
        self.running.signal(Signal::HUP);
        self.imds
            .current_credentials()
            .unwrap()
            .access_key_id()
            .to_owned()
    }

    /// Waits until the agent has failed to write at least once more, while
    /// the file keeps `old` whole.
    fn expect_failed_write(&self, file: &Path, old: &str) {
        let before = self.failures();
        wait_for("a counted output failure", || self.failures() > before);
        // Retried on the next ticks: still failing, still the old file.
        let after = self.failures();
        wait_for("a retry", || self.failures() > after);
        eqnice!(Some(old.to_owned()), whole_key(file));
        let log = std::fs::read_to_string(&self.log).unwrap();
        assert!(
            log.contains("could not update an output; will retry"),
            "{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_full_then_read_only_directory_keeps_the_old_file_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("out"), "256k");
    let file = fs.path.join("credentials");
    let s = Scenario::start(dir.path(), &file).await;
    let first = whole_key(&file).unwrap();

    // Full: a filler takes every free block.
    let filler = fs.path.join("filler");
    let status = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "dd stops at ENOSPC");
    let second = s.rotate();
    s.expect_failed_write(&file, &first);
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.contains("No space left on device"), "{log}");
    eqnice!(
        Vec::<String>::new(),
        leftovers(&fs.path, &["credentials", "filler"])
    );

    // Space comes back: the next retry writes the new keys.
    std::fs::remove_file(&filler).unwrap();
    wait_for("recovery from a full disk", || {
        whole_key(&file).as_deref() == Some(second.as_str())
    });

    // Read-only.
    fs.remount("ro");
    let third = s.rotate();
    s.expect_failed_write(&file, &second);
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.contains("Read-only file system"), "{log}");
    fs.remount("rw");
    wait_for("recovery from a read-only directory", || {
        whole_key(&file).as_deref() == Some(third.as_str())
    });
    eqnice!(
        0o600,
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777
    );
    eqnice!(Vec::<String>::new(), leftovers(&fs.path, &["credentials"]));

    // No secret reached the log on any of these paths.
    let log = std::fs::read_to_string(&s.log).unwrap();
    let current = s.imds.current_credentials().unwrap();
    assert!(!log.contains(current.secret_access_key()));
    assert!(!log.contains(current.session_token()));
    assert!(s.running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_directory_is_recreated_private_on_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let file = out.join("credentials");
    let s = Scenario::start(dir.path(), &file).await;

    std::fs::remove_dir_all(&out).unwrap();
    let second = s.rotate();
    wait_for("the directory and file written again", || {
        whole_key(&file).as_deref() == Some(second.as_str())
    });
    eqnice!(
        0o700,
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777
    );
    eqnice!(
        0o600,
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777
    );

    // Removed and replaced by a file: the write fails, is counted and
    // retried, and succeeds once the directory is back.
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::write(&out, "not a directory").unwrap();
    let third = s.rotate();
    let before = s.failures();
    wait_for("a counted output failure", || s.failures() > before);
    std::fs::remove_file(&out).unwrap();
    wait_for("recovery", || {
        whole_key(&file).as_deref() == Some(third.as_str())
    });
    assert!(s.running.stop_with(Signal::TERM).success());
}
