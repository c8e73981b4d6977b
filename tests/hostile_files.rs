//! A local user turns the agent's file outputs against the host (issue 11,
//! rows 1, 2, 6, 9, 10 and 11): symlinks to root's files, a file held open
//! for `--in-place`, a lock held for ever, a FIFO or `/dev/zero` at an
//! output path, look-alike temp files, a credentials file with a BOM, CR
//! line endings, stray bytes or a hidden header, and settings that make one
//! file two outputs.
//!
//! Each test runs the real binary as root against the emulator, with a
//! throwaway unprivileged user (`util::Stranger`) doing what the row says,
//! and shows the agent refusing, with a clear error, while the host's files
//! stay as they were and the agent keeps serving and stopping on signals.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, Stranger, agent, agent_against, metric, unix_get, wait_for};

/// A root-owned directory layout the stranger can reach: `base` (0755),
/// `base/etc` (0755, root's files such as `shadow`), and `base/shared`
/// (1777, like `/tmp`).
struct Host {
    _tmp: tempfile::TempDir,
    base: PathBuf,
}

impl Host {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().to_owned();
        chmod(&base, 0o755);
        for (dir, mode) in [("etc", 0o755), ("shared", 0o1777), ("out", 0o755)] {
            std::fs::create_dir(base.join(dir)).unwrap();
            chmod(&base.join(dir), mode);
        }
        Self { _tmp: tmp, base }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.base.join(rel)
    }

    /// A root file standing in for `/etc/shadow`: mode 0600, owned by root.
    fn shadow(&self, name: &str) -> RootFile {
        let path = self.path(&format!("etc/{name}"));
        std::fs::write(
            &path,
            format!("root:$6$salt$hash-of-{name}:19000:0:99999:7:::\n"),
        )
        .unwrap();
        chmod(&path, 0o600);
        RootFile::snapshot(path)
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A root file's content, mode and owner, to show they did not change.
#[derive(Debug, PartialEq, Eq)]
struct RootFile {
    path: PathBuf,
    content: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
}

impl RootFile {
    fn snapshot(path: PathBuf) -> Self {
        let meta = std::fs::metadata(&path).unwrap();
        Self {
            content: std::fs::read(&path).unwrap(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            path,
        }
    }

    fn assert_unchanged(&self) {
        eqnice!(*self, Self::snapshot(self.path.clone()));
    }
}

/// The agent, logging to a file, with its socket in the root-only part.
struct Agent {
    running: Running,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(imds: &MockImds, host: &Host, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Self {
        let socket = host.path("agent.sock");
        let log = host.path("agent.log");
        let mut cmd = agent_against(imds);
        cmd.env("IMDS_AGENT_LOG", "info")
            .arg("--socket")
            .arg(&socket)
            .arg("--metrics-socket")
            .arg(crate::util::metrics_socket_of(&socket))
            .args(["--poll-interval", "1"]);
        for arg in args {
            cmd.arg(arg.as_ref());
        }
        let running = Running::start_logging_to(cmd, &log);
        let agent = Self {
            running,
            socket,
            log,
        };
        crate::util::wait_for_served_credentials(&agent.socket);
        agent
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    fn failures(&self) -> u64 {
        metric(
            &crate::util::metrics_socket_of(&self.socket),
            "imds_agent_output_failures_total",
        )
        .unwrap_or(0)
    }

    /// Waits until a failed output write is counted and logged with `cause`.
    fn expect_refusal(&self, cause: &str) {
        wait_for(
            &format!("a counted output failure logging {cause:?}"),
            || self.failures() > 0 && self.logs().contains(cause),
        );
        let logs = self.logs();
        assert!(
            logs.contains("could not update an output"),
            "expected the failure logged, got: {logs}"
        );
    }

    /// Waits for one more counted failure (a retry, or the withdrawal).
    fn expect_another_failure(&self) {
        let before = self.failures();
        wait_for("one more counted output failure", || {
            self.failures() > before
        });
    }

    /// SIGTERM stops it cleanly within the bound of `stop_with` (5 s).
    fn stop(self) {
        let status = self.running.stop_with(Signal::TERM);
        assert!(status.success(), "expected a clean stop, got {status}");
    }
}

/// A helper process a test started (the stranger holding a file or a lock),
/// killed by its pid when dropped.
struct Background(Child);

impl Background {
    /// Runs `script` with `sh -c` in `cmd`'s identity and waits for its
    /// first line of output, which says it is ready.
    fn start(mut cmd: Command, script: &str) -> Self {
        let mut child = cmd
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the helper `{script}` did not start");
        Self(child)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion, bounded: a refusal must come before the agent
/// starts, so one that keeps running is killed and reported.
fn refused(mut cmd: Command) -> (Option<i32>, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..400 {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            return (status.code(), stderr);
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("expected a refusal before start, but the agent was still running after 10 s");
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Row 1, `--file-mode 0640 --file-group G`: a stranger plants
/// `credentials -> <root's 0600 file>` in a sticky, world-writable directory.
/// The agent does not follow it: root's file keeps its content, mode and
/// owner, and the refusal is logged and counted while the socket serves.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_planted_symlink_to_a_root_file_is_not_followed_with_a_file_group() {
    let stranger = Stranger::new();
    let host = Host::new();
    let shadow = host.shadow("shadow");
    let link = host.path("shared/credentials");
    stranger.sh(&format!(
        "ln -s {} {}",
        shadow.path.display(),
        link.display()
    ));
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let group = stranger.gid.to_string();
    let agent = Agent::start(
        &imds,
        &host,
        &[
            &"--credentials-file",
            &link,
            &"--file-mode",
            &"0640",
            &"--file-group",
            &group,
        ],
    );
    agent.expect_refusal("refusing to follow the symlink");
    let logs = agent.logs();
    assert!(
        logs.contains(&link.display().to_string())
            && logs.contains(&format!("owned by uid {}", stranger.uid)),
        "expected the link and its owner named, got: {logs}"
    );
    agent.expect_another_failure();
    shadow.assert_unchanged();
    assert!(is_symlink(&link), "the planted link is left as it is");
    eqnice!(200, unix_get(&agent.socket, "/credentials").unwrap().0);
    agent.stop();
}

/// Row 1, `--file-owner UID`: the output directory is the stranger's own
/// (accepted: the credentials are for that user), and it plants
/// `credentials -> <root file>` and `creds.json -> <root file>`. Neither is
/// followed: root's files keep their owner (the stranger never owns them),
/// mode and content; a file the stranger has not touched is written and
/// given to it; and on detach the planted `creds.json` link and its target
/// are neither overwritten nor deleted.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_planted_symlink_is_not_followed_with_a_file_owner_and_survives_detach() {
    let stranger = Stranger::new();
    let host = Host::new();
    let home = stranger.home(&host.path("out"));
    let shadow = host.shadow("shadow");
    let gshadow = host.shadow("gshadow");
    let (creds, json) = (home.join("credentials"), home.join("creds.json"));
    stranger.sh(&format!(
        "ln -s {} {} && ln -s {} {}",
        shadow.path.display(),
        creds.display(),
        gshadow.path.display(),
        json.display()
    ));
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let owner = stranger.uid.to_string();
    let agent = Agent::start(
        &imds,
        &host,
        &[
            &"--credentials-file",
            &creds,
            &"--json-file",
            &json,
            &"--file-owner",
            &owner,
        ],
    );
    agent.expect_refusal(&format!(
        "refusing to follow the symlink {} -> {}",
        creds.display(),
        shadow.path.display()
    ));
    wait_for("the JSON link refused too", || {
        agent.logs().contains(&format!(
            "refusing to follow the symlink {}",
            json.display()
        ))
    });
    shadow.assert_unchanged();
    gshadow.assert_unchanged();

    // The stranger removes its credentials link: the agent writes a file
    // of its own there and gives it to the stranger, as asked.
    stranger.sh(&format!("rm {}", creds.display()));
    let key = imds
        .current_credentials()
        .unwrap()
        .access_key_id()
        .to_owned();
    wait_for("the credentials file written", || {
        std::fs::read_to_string(&creds).is_ok_and(|t| t.contains(&key))
    });
    let meta = std::fs::symlink_metadata(&creds).unwrap();
    eqnice!(
        (true, stranger.uid, 0o600),
        (meta.is_file(), meta.uid(), meta.mode() & 0o7777)
    );

    // Detach: the planted JSON link is not the agent's file; it and its
    // target stay as they are.
    imds.detach_role();
    wait_for("the detach noticed on the socket", || {
        unix_get(&agent.socket, "/credentials").is_ok_and(|(s, _)| s == 404)
    });
    agent.expect_another_failure();
    assert!(is_symlink(&json), "the planted creds.json link is left");
    gshadow.assert_unchanged();
    shadow.assert_unchanged();
    wait_for("our own credentials file withdrawn", || !creds.exists());
    agent.stop();
}

/// Row 2: with `--in-place`, the stranger pre-creates the output file
/// (world-writable, in a sticky directory) and keeps it open. The agent
/// refuses the file: nothing is written into the stranger's inode.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn in_place_never_writes_into_a_file_a_stranger_holds_open() {
    let stranger = Stranger::new();
    let host = Host::new();
    let file = host.path("shared/credentials");
    let holder = Background::start(
        {
            let mut cmd = stranger.command("sh");
            cmd.env("F", &file);
            cmd
        },
        "umask 000; exec 3<>\"$F\"; echo ready; exec sleep 600",
    );
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let agent = Agent::start(&imds, &host, &[&"--credentials-file", &file, &"--in-place"]);
    agent.expect_refusal(&format!("owned by uid {}", stranger.uid));
    agent.expect_another_failure();
    let meta = std::fs::metadata(&file).unwrap();
    eqnice!((0, stranger.uid), (meta.len(), meta.uid()));
    // What the stranger's open descriptor sees: still nothing.
    let seen = std::fs::read(format!("/proc/{}/fd/3", holder.0.id())).unwrap();
    eqnice!(0, seen.len());
    drop(holder);
    agent.stop();
}

/// Row 6, a lock the agent refuses: the stranger creates
/// `.credentials.lock` in a sticky directory and holds an `flock` on it for
/// ever. The agent does not wait on it (the lock file is not its own): each
/// write fails at once, the socket keeps answering, and SIGTERM stops it.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_strangers_lock_file_is_refused_without_waiting() {
    let stranger = Stranger::new();
    let host = Host::new();
    let file = host.path("shared/credentials");
    let lock = host.path("shared/.credentials.lock");
    let _holder = Background::start(
        {
            let mut cmd = stranger.command("sh");
            cmd.env("L", &lock);
            cmd
        },
        "exec 9>>\"$L\"; flock -n 9 || exit 1; echo ready; exec sleep 600",
    );
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let agent = Agent::start(&imds, &host, &[&"--credentials-file", &file]);
    agent.expect_refusal(&format!(
        "refusing the lock file {}: it is owned by uid {}",
        lock.display(),
        stranger.uid
    ));
    assert!(!file.exists(), "nothing written without the lock");
    eqnice!(200, unix_get(&agent.socket, "/healthz").unwrap().0);
    agent.stop();
}

/// Row 6, a lock the agent accepts, held for ever by another root process
/// (this test): every write gives up after a bounded wait with an error
/// naming the lock file and its holder; meanwhile the socket serves, a
/// detach is noticed, and SIGTERM stops the agent.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_lock_held_for_ever_does_not_stall_the_agent() {
    let host = Host::new();
    let file = host.path("out/credentials");
    let lock = std::fs::File::create(host.path("out/.credentials.lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let agent = Agent::start(&imds, &host, &[&"--credentials-file", &file]);
    agent.expect_refusal(&format!(
        "the lock file {} has been held by process {}",
        host.path("out/.credentials.lock").display(),
        std::process::id()
    ));
    assert!(!file.exists(), "nothing written without the lock");
    eqnice!(200, unix_get(&agent.socket, "/credentials").unwrap().0);
    imds.detach_role();
    wait_for("the detach noticed on the socket", || {
        unix_get(&agent.socket, "/credentials").is_ok_and(|(s, _)| s == 404)
    });
    agent.stop();
    drop(lock);
}

/// Row 6, a FIFO and a `/dev/zero` link: the stranger makes `creds.json` a
/// FIFO and `credentials` a link to `/dev/zero` in a sticky directory. The
/// agent never opens or reads them (nothing blocks, nothing is allocated):
/// each write is refused at once, the socket serves, SIGTERM stops it.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_fifo_or_a_dev_zero_link_at_an_output_path_never_blocks() {
    let stranger = Stranger::new();
    let host = Host::new();
    let (creds, json) = (
        host.path("shared/credentials"),
        host.path("shared/creds.json"),
    );
    stranger.sh(&format!(
        "mkfifo -m 666 {} && ln -s /dev/zero {}",
        json.display(),
        creds.display()
    ));
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let agent = Agent::start(
        &imds,
        &host,
        &[&"--credentials-file", &creds, &"--json-file", &json],
    );
    agent.expect_refusal("a FIFO (named pipe), not a regular file");
    wait_for("the /dev/zero link refused", || {
        agent.logs().contains(&format!(
            "refusing to follow the symlink {} -> /dev/zero",
            creds.display()
        ))
    });
    agent.expect_another_failure();
    imds.detach_role();
    wait_for("the detach noticed on the socket", || {
        unix_get(&agent.socket, "/credentials").is_ok_and(|(s, _)| s == 404)
    });
    assert!(
        std::fs::symlink_metadata(&json)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(is_symlink(&creds));
    agent.stop();
}

/// Row 9: a run killed mid-write left a temp file holding full secrets. The
/// next start removes it; a stranger's look-alike (same name pattern, in a
/// sticky directory) is not touched.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_killed_runs_temp_files_are_removed_at_start_and_a_strangers_are_not() {
    let stranger = Stranger::new();
    let host = Host::new();
    let file = host.path("shared/credentials");
    let ours = [
        host.path("shared/.credentials.tmp.4242.00000000deadbeef"),
        host.path("shared/.creds.json.tmp.4242.0123456789abcdef"),
    ];
    for path in &ours {
        std::fs::write(path, "aws_secret_access_key = secret-of-a-killed-run\n").unwrap();
        chmod(path, 0o600);
    }
    let theirs = host.path("shared/.credentials.tmp.99.00000000cafebabe");
    stranger.sh(&format!("echo theirs > {}", theirs.display()));
    // All of them last modified an hour before this start.
    let stamp = Command::new("touch")
        .args(["-d", "1 hour ago"])
        .args(&ours)
        .arg(&theirs)
        .status()
        .unwrap();
    assert!(stamp.success());
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let agent = Agent::start(
        &imds,
        &host,
        &[
            &"--credentials-file",
            &file,
            &"--json-file",
            &host.path("shared/creds.json"),
        ],
    );
    let key = imds
        .current_credentials()
        .unwrap()
        .access_key_id()
        .to_owned();
    wait_for("the credentials file written", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(&key))
    });
    for path in &ours {
        assert!(!path.exists(), "{} should be removed", path.display());
    }
    eqnice!("theirs\n", std::fs::read_to_string(&theirs).unwrap());
    let logs = agent.logs();
    assert!(
        logs.contains("removed a temp file left by an earlier run"),
        "{logs}"
    );
    agent.stop();
}

/// Row 11a: the same file given as `--credentials-file X` and, spelled
/// another way, as `--json-file`: refused before anything starts, and no
/// file is created.
#[test]
fn one_file_given_as_two_outputs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("X", dir.path().join("link")).unwrap();
    let x = dir.path().join("X");
    for other in [
        dir.path().join("sub/../X"),
        dir.path().join("./X"),
        dir.path().join("link"),
        dir.path().join("missing/../X"),
    ] {
        let mut cmd = agent();
        cmd.arg("run")
            .args(["--imds-endpoint", "http://127.0.0.1:9"])
            .arg("--credentials-file")
            .arg(&x)
            .arg("--json-file")
            .arg(&other);
        let (code, stderr) = refused(cmd);
        eqnice!(Some(1), code);
        assert!(
            stderr.contains("are the same file"),
            "{}: expected a refusal naming both flags, got: {stderr}",
            other.display()
        );
        assert!(!x.exists());
    }
}

/// Row 11b: a group- or other-writable `--file-mode` (flag or environment)
/// is refused by the command-line parser, with the fix.
#[test]
fn a_group_or_other_writable_file_mode_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    for (flag, env) in [
        (Some("0660"), None),
        (None, Some("0620")),
        (Some("0606"), None),
    ] {
        let mut cmd = agent();
        cmd.arg("run").arg("--credentials-file").arg(&file);
        if let Some(mode) = flag {
            cmd.args(["--file-mode", mode]);
        }
        if let Some(mode) = env {
            cmd.env("IMDS_AGENT_FILE_MODE", mode);
        }
        cmd.args(["--imds-endpoint", "http://127.0.0.1:9"]);
        let (code, stderr) = refused(cmd);
        eqnice!(Some(2), code);
        assert!(
            stderr.contains("--file-mode") && stderr.contains("use 0600 or 0640"),
            "{flag:?}/{env:?}: {stderr}"
        );
        assert!(!file.exists());
    }
}

/// Row 10: the app user's own credentials file (`--file-owner`) holds what
/// other tools write: a BOM, CR-only line endings, non-UTF-8 bytes, or an
/// indented `[default]` that the SDKs read as part of a value. The first
/// three are kept byte for byte around our one `[default]`; the last is
/// refused with an error naming the line, the file left as it was, and once
/// the user fixes it the next write goes through (a refusal never blocks
/// later writes).
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn what_other_tools_write_in_a_credentials_file_is_kept_or_refused_never_hidden() {
    let stranger = Stranger::new();
    let host = Host::new();
    let home = stranger.home(&host.path("out"));
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let owner = stranger.uid.to_string();
    // (case, what the user wrote (printf format), the bytes kept around ours)
    let kept: [(&str, &str, &[u8]); 3] = [
        (
            "bom",
            r"\357\273\277[default]\naws_access_key_id = OLD-KEY\n[dev]\naws_access_key_id = DEV\n",
            b"[dev]\naws_access_key_id = DEV\n",
        ),
        (
            "cr-only",
            r"[dev]\raws_access_key_id = DEV\r[default]\raws_access_key_id = OLD-KEY\r",
            b"[dev]\raws_access_key_id = DEV\r",
        ),
        (
            "non-utf8",
            r"[dev]\naws_access_key_id = D\377EV\n[default]\naws_access_key_id = OLD-KEY\n",
            b"[dev]\naws_access_key_id = D\xffEV\n",
        ),
    ];
    for (case, written, around) in kept {
        let file = home.join(case);
        stranger.sh(&format!("printf '{written}' > {}", file.display()));
        let agent = Agent::start(
            &imds,
            &host,
            &[&"--credentials-file", &file, &"--file-owner", &owner],
        );
        let key = imds
            .current_credentials()
            .unwrap()
            .access_key_id()
            .to_owned();
        wait_for(&format!("{case}: our credentials written"), || {
            std::fs::read(&file).is_ok_and(|b| contains(&b, key.as_bytes()))
        });
        let bytes = std::fs::read(&file).unwrap();
        let shown = String::from_utf8_lossy(&bytes);
        assert!(
            contains(&bytes, around),
            "{case}: expected the user's other profile kept byte for byte, got {shown:?}"
        );
        assert!(
            !contains(&bytes, b"OLD-KEY"),
            "{case}: expected the old [default] replaced, got {shown:?}"
        );
        eqnice!(1, count(&bytes, b"[default]"));
        if case == "bom" {
            assert!(bytes.starts_with("\u{feff}".as_bytes()), "{shown:?}");
        }
        if case == "cr-only" {
            assert!(!bytes.contains(&b'\n'), "{case}: a LF added: {shown:?}");
        }
        // A rotation is written over our own output: never refused.
        imds.rotate();
        let rotated = imds.current_credentials().unwrap();
        agent.running.signal(Signal::HUP);
        wait_for(&format!("{case}: the rotation written"), || {
            std::fs::read(&file).is_ok_and(|b| {
                contains(&b, rotated.access_key_id().as_bytes()) && count(&b, b"[default]") == 1
            })
        });
        agent.stop();
    }

    // An indented `[default]` under an option: refused, file untouched.
    let file = home.join("indented");
    stranger.sh(&format!(
        r"printf '[dev]\naws_access_key_id = DEV\n    [default]\n' > {}",
        file.display()
    ));
    let before = std::fs::read(&file).unwrap();
    let agent = Agent::start(
        &imds,
        &host,
        &[&"--credentials-file", &file, &"--file-owner", &owner],
    );
    agent.expect_refusal("line 3");
    eqnice!(before, std::fs::read(&file).unwrap());
    // The user removes the line; the agent's retry goes through.
    stranger.sh(&format!(
        r"printf '[dev]\naws_access_key_id = DEV\n' > {}",
        file.display()
    ));
    let key = imds
        .current_credentials()
        .unwrap()
        .access_key_id()
        .to_owned();
    wait_for("the write after the fix", || {
        std::fs::read(&file).is_ok_and(|b| contains(&b, key.as_bytes()))
    });
    agent.stop();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    count(haystack, needle) > 0
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// An agent without `CAP_CHOWN` (as under the packaged unit) asked to give
/// its file to a group it is not in: the refusal names the file, the reason
/// and the fix (`SupplementaryGroups=`, `SystemCallFilter=@chown`), instead of
/// a bare "Operation not permitted".
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_file_group_the_agent_is_not_in_is_refused_with_the_fix() {
    let stranger = Stranger::new();
    let host = Host::new();
    let home = stranger.home(&host.path("out"));
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let credentials = home.join("credentials");
    let socket = home.join("agent.sock");
    let mut cmd = stranger.command(env!("CARGO_BIN_EXE_imds-agent"));
    cmd.arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint())
        .arg("--socket")
        .arg(&socket)
        .arg("--credentials-file")
        .arg(&credentials)
        .args(["--file-mode", "0640", "--file-group", "0"]);
    let log = host.path("agent.log");
    let running = Running::start_logging_to(cmd, &log);
    wait_for("the refused change of group in the log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("changing the owner of"))
    });
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains(&credentials.display().to_string())
            && logs.contains("a group it is a member of")
            && logs.contains("SupplementaryGroups=")
            && logs.contains("SystemCallFilter=@chown"),
        "expected the file, the reason and the fix named, got: {logs}"
    );
    assert!(
        !credentials.exists(),
        "no file was left with the wrong group"
    );
    drop(running);
}
