//! A local user against the agent's socket and container token (issue 11,
//! rows 3, 4 and 7): it races the socket's birth, swaps it for a symlink, or
//! plants the token file, and never gets credentials or changes a root file.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::eqnice;
use crate::util::{Running, Stranger, unix_get};

/// Runs `f` on a thread of this (root) test process that has become
/// `stranger`: its uid, gid and no supplementary groups, and so no
/// capabilities (Linux credentials are per thread). The races below last
/// microseconds, which only a compiled loop can hit often; `SO_PEERCRED`
/// reports the stranger's uid for its connections.
fn as_stranger<T: Send + 'static>(
    stranger: Stranger,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    use rustix::fs::{Gid, Uid};
    std::thread::spawn(move || {
        let (uid, gid) = (Uid::from_raw(stranger.uid), Gid::from_raw(stranger.gid));
        rustix::thread::set_thread_groups(&[]).expect("dropping groups");
        rustix::thread::set_thread_res_gid(gid, gid, gid).expect("setresgid");
        rustix::thread::set_thread_res_uid(uid, uid, uid).expect("setresuid");
        assert_eq!(rustix::process::geteuid().as_raw(), stranger.uid);
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(
            status.contains("CapEff:\t0000000000000000"),
            "the stranger thread kept capabilities: {status}"
        );
        f()
    })
}

/// The agent started under `umask 000` (the worst a user's shell may have).
fn agent_under_umask_000(imds: &MockImds) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"umask 000 && exec "$@""#)
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_imds-agent"))
        .env_remove("RUST_LOG")
        .env("IMDS_AGENT_LOG", "error")
        .arg("run")
        .arg("--imds-endpoint")
        .arg(imds.endpoint());
    cmd
}

/// A root-owned directory every user may traverse but only root may write.
fn open_root_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Waits (bounded: 60 s) until `check` holds, looking every 2 ms: these
/// tests start the agent a hundred times.
fn poll_until(what: &str, mut check: impl FnMut() -> bool) {
    const POLLS: u32 = 30_000;
    for _ in 0..POLLS {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("timed out after 60 s waiting for {what}");
}

/// Asks for credentials again and again on one connection, as long as the
/// agent keeps it open; true as soon as an answer holds credentials.
fn ask_for_credentials(mut stream: UnixStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if stream
            .write_all(b"GET /credentials HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if seen.windows(11).any(|w| w == b"AccessKeyId") {
            return true;
        }
        let keep = seen.len().saturating_sub(16);
        seen.drain(..keep);
    }
}

/// Row 3: under umask 000 a socket bound at its final path is 0777 until the
/// agent's chmod, and a stranger spinning on `connect()` gets in. Born in a
/// private directory, it is never reachable with a mode other than its own.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_stranger_spinning_on_connect_during_start_never_gets_credentials() {
    const STARTS: usize = 60;
    let stranger = Stranger::new();
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = open_root_dir();
    let socket = dir.path().join("agent.sock");

    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicUsize::new(0));
    let leaked = Arc::new(AtomicUsize::new(0));
    let attempts = Arc::new(AtomicUsize::new(0));
    let spinner = {
        let (socket, stop) = (socket.clone(), stop.clone());
        let (connected, leaked, attempts) = (connected.clone(), leaked.clone(), attempts.clone());
        as_stranger(stranger, move || {
            while !stop.load(Ordering::Relaxed) {
                attempts.fetch_add(1, Ordering::Relaxed);
                if let Ok(stream) = UnixStream::connect(&socket) {
                    connected.fetch_add(1, Ordering::Relaxed);
                    if ask_for_credentials(stream) {
                        leaked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    let mut starts = 0;
    while starts < STARTS && leaked.load(Ordering::Relaxed) == 0 {
        let mut cmd = agent_under_umask_000(&imds);
        // A group-readable socket, for a group the stranger is not in.
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--socket-mode", "0660", "--socket-group", "0"]);
        let running = Running::start(cmd);
        poll_until("credentials on the socket", || {
            unix_get(&socket, "/credentials").is_ok_and(|(s, _)| s == 200)
        });
        eqnice!(0o140660, std::fs::symlink_metadata(&socket).unwrap().mode());
        assert!(running.stop_with(Signal::TERM).success());
        starts += 1;
    }
    stop.store(true, Ordering::Relaxed);
    spinner.join().unwrap();
    let (connected, leaked) = (
        connected.load(Ordering::Relaxed),
        leaked.load(Ordering::Relaxed),
    );
    assert!(
        attempts.load(Ordering::Relaxed) > STARTS,
        "the stranger barely tried"
    );
    assert!(
        connected == 0 && leaked == 0,
        "expected the stranger (uid {}) never to connect to the 0660 root:root socket; \
         over {starts} starts under umask 000 it connected {connected} times and got credentials {leaked} times",
        stranger.uid
    );
}

/// Row 4: a stranger who can write the socket's directory swaps the socket
/// for a symlink to a root-owned file between `bind` and a path-based
/// `chown`/`chmod`, which then land on that file. The agent refuses such a
/// directory, and never sets a mode or group through the path.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_stranger_swapping_the_socket_for_a_symlink_changes_no_root_file() {
    const STARTS: usize = 300;
    let stranger = Stranger::new();
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let root = open_root_dir();
    let precious = root.path().join("precious");
    std::fs::write(&precious, "root's").unwrap();
    std::fs::set_permissions(&precious, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = std::fs::metadata(&precious).unwrap();
    // The point of this test: the socket's directory is the stranger's.
    let home = stranger.home(root.path());
    let socket = home.join("agent.sock");

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    let swapper = {
        let (socket, precious, stop, swaps) = (
            socket.clone(),
            precious.clone(),
            stop.clone(),
            swaps.clone(),
        );
        let link = home.join("link");
        as_stranger(stranger, move || {
            use std::os::unix::fs::FileTypeExt;
            // The link is made beforehand, so that the swap is one rename
            // the moment the socket appears.
            let mut ready = false;
            while !stop.load(Ordering::Relaxed) {
                if !ready {
                    let _ = std::fs::remove_file(&link);
                    std::os::unix::fs::symlink(&precious, &link).unwrap();
                    ready = true;
                }
                let is_socket =
                    std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket());
                if is_socket && std::fs::rename(&link, &socket).is_ok() {
                    swaps.fetch_add(1, Ordering::Relaxed);
                    ready = false;
                }
            }
        })
    };

    let changed = || {
        let now = std::fs::metadata(&precious).unwrap();
        (now.mode(), now.uid(), now.gid()) != (before.mode(), before.uid(), before.gid())
    };
    let mut refusals = Vec::new();
    let mut starts = 0;
    while starts < STARTS && !changed() {
        let _ = std::fs::remove_file(&socket);
        let mut cmd = agent_under_umask_000(&imds);
        cmd.arg("--socket").arg(&socket).args([
            "--socket-mode",
            "0660",
            "--socket-group",
            &stranger.gid.to_string(),
        ]);
        let log = root.path().join("agent.log");
        let mut running = Running::start_logging_to(cmd, &log);
        // Bounded for the old code, where the swap can leave the agent
        // serving on no path: 1,000 polls (2 s) is plenty to start.
        let mut polls = 0;
        poll_until("the agent to serve, exit, or change the file", || {
            running.try_status().is_some()
                || changed()
                || unix_get(&socket, "/healthz").is_ok()
                || std::fs::symlink_metadata(&socket).is_ok_and(|m| m.is_symlink())
                || {
                    polls += 1;
                    polls > 1_000
                }
        });
        if running.try_status().is_some() {
            refusals.push(std::fs::read_to_string(&log).unwrap());
        } else {
            running.stop_with(Signal::TERM);
        }
        starts += 1;
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    let now = std::fs::metadata(&precious).unwrap();
    assert_eq!(
        (before.mode(), before.uid(), before.gid()),
        (now.mode(), now.uid(), now.gid()),
        "expected root's 0600 file unchanged; after {starts} starts and {} swaps by the stranger it is not",
        swaps.load(Ordering::Relaxed)
    );
    eqnice!("root's", std::fs::read_to_string(&precious).unwrap());
    assert_eq!(
        STARTS,
        refusals.len(),
        "expected every start refused: {refusals:?}"
    );
    let home_name = home.display().to_string();
    for refusal in &refusals {
        assert!(
            refusal.contains(&home_name)
                && refusal.contains(&format!("owned by uid {}", stranger.uid)),
            "expected the refusal to name {home_name} and why: {refusal}"
        );
    }
}

/// `GET /credentials` on the container endpoint with `token`: the status,
/// or `None` when nothing listens.
fn container_get(port: u16, token: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /credentials HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, raw))
}

/// Row 7: a token file the agent did not make is a token someone else may
/// know. A symlink to the stranger's file, a file the stranger owns (both in
/// a sticky shared directory like `/tmp`, where anyone may create files), a
/// root file every user may read, and a guessable short token: each time the
/// agent refuses to start, says why and how to fix it, and the stranger,
/// asking with the token it knows, never gets credentials.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn a_token_file_a_stranger_planted_or_can_read_stops_the_agent() {
    let stranger = Stranger::new();
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let root = open_root_dir();
    let home = stranger.home(root.path());
    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let closed = root.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).unwrap();
    let planted = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );

    let cases: [(String, PathBuf, String); 4] = [
        ("a symlink".into(), shared.join("link-token"), {
            stranger.sh(&format!(
                "printf %s {planted} > {home}/mine && ln -s {home}/mine {shared}/link-token",
                home = home.display(),
                shared = shared.display()
            ));
            planted.clone()
        }),
        (
            format!("owned by uid {}", stranger.uid),
            shared.join("own-token"),
            {
                stranger.sh(&format!(
                    "printf %s {planted} > {}/own-token && chmod 600 {}/own-token",
                    shared.display(),
                    shared.display()
                ));
                planted.clone()
            },
        ),
        (
            "lets every user read it".into(),
            closed.join("readable-token"),
            {
                let path = closed.join("readable-token");
                std::fs::write(&path, format!("{planted}x")).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
                let out = stranger.command("cat").arg(&path).output().unwrap();
                assert!(out.status.success(), "the stranger reads the 0644 file");
                String::from_utf8(out.stdout).unwrap()
            },
        ),
        ("fewer than 32".into(), closed.join("short-token"), {
            let path = closed.join("short-token");
            std::fs::write(&path, "letmein").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            "letmein".to_owned() // guessed
        }),
    ];
    let mut failures = Vec::new();
    for (why, token_file, known) in cases {
        let mut cmd = crate::util::agent_against(&imds);
        cmd.args(["--container-endpoint", "127.0.0.1:0"])
            .arg("--container-token-file")
            .arg(&token_file);
        let log = root.path().join("agent.log");
        let mut running = Running::start_logging_to(cmd, &log);
        let pid = running.pid();
        let mut port = None;
        poll_until("the agent to exit or serve the endpoint", || {
            port = crate::util::listening_ports(pid).first().copied();
            port.is_some() || running.try_status().is_some()
        });
        if let Some(port) = port {
            failures.push(format!(
                "{}: the agent listened on the container endpoint (port {port}) before refusing the token file ({why})",
                token_file.display()
            ));
        }
        // The stranger asks with the token it knows, until credentials are
        // loaded (200) or nothing listens.
        let got = port.and_then(|port| {
            as_stranger(stranger, move || {
                let mut last = None;
                for _ in 0..2_500 {
                    last = container_get(port, &known);
                    match &last {
                        Some((200, _)) | None => break,
                        Some(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                last
            })
            .join()
            .unwrap()
        });
        if matches!(&got, Some((200, body)) if body.contains("AccessKeyId")) {
            failures.push(format!(
                "{}: the stranger got credentials with the token it planted or read",
                token_file.display()
            ));
        }
        let status = running.try_status();
        let logs = std::fs::read_to_string(&log).unwrap();
        let refused = status.is_some_and(|s| !s.success())
            && logs.contains(&token_file.display().to_string())
            && logs.contains(&why)
            && logs.contains("Fix:");
        if !refused {
            failures.push(format!(
                "{}: expected the agent to refuse to start ({why}) and name the fix; exit {status:?}, logs: {logs}",
                token_file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
