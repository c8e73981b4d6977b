//! Soak: many rotations at a compressed schedule (a rotation and a SIGHUP,
//! each waited for until it reaches the file) with readers attached to the file and the socket.
//! File descriptors, memory and tasks must stay flat.
//!
//! The full run (10,000 rotations, a few minutes) is not part of the test
//! suite; run it with
//!
//! ```text
//! cargo test -p imds-agent --test e2e -- --ignored soak --nocapture
//! ```
//!
//! (`IMDS_SOAK_ROTATIONS` changes the count). A short run of the same code
//! is in the suite, so it cannot rot.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::util::{Running, agent_against, metric, unix_get, wait_for};

/// What is measured of the agent process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    fds: usize,
    rss_kib: u64,
    threads: u64,
    tasks: u64,
}

fn sample(pid: u32, socket: &Path) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    Sample {
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count(),
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        tasks: metric(&crate::util::metrics_socket_of(socket), "imds_agent_tasks")
            .expect("the tasks gauge"),
    }
}

fn soak(rotations: usize) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let imds = runtime
        .block_on(MockImds::builder().role("r").start())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    let socket = dir.path().join("agent.sock");
    let mut cmd = agent_against(&imds);
    cmd.arg("--credentials-file")
        .arg(&file)
        .arg("--json-file")
        .arg(dir.path().join("credentials.json"))
        .arg("--socket")
        .arg(&socket)
        .arg("--metrics-socket")
        .arg(crate::util::metrics_socket_of(&socket))
        .args(["--poll-interval", "1"]);
    let running = Running::start(cmd);
    wait_for("the first write", || file.exists());

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let (file, socket, stop) = (file.clone(), socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if i == 0 {
                        let text = std::fs::read_to_string(&file).unwrap();
                        assert!(text.contains("aws_session_token = "), "partial: {text}");
                    } else {
                        let (status, _) = unix_get(&socket, "/credentials").unwrap();
                        assert_eq!(200, status);
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();

    let pid = running.pid();
    let mut warm = None;
    for round in 1..=rotations {
        imds.rotate();
        running.signal(Signal::HUP);
        // Lockstep: every rotation reaches the file before the next.
        let key = imds
            .current_credentials()
            .unwrap()
            .access_key_id()
            .to_owned();
        let deadline = std::time::Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        while !std::fs::read_to_string(&file).is_ok_and(|t| t.contains(&key)) {
            assert!(
                started.elapsed() < deadline,
                "rotation {round} never reached the file"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if round == rotations / 10 {
            warm = Some(sample(pid, &socket));
        }
    }
    let last = imds.current_credentials().unwrap();
    wait_for("the last rotation", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(last.access_key_id()))
    });
    // Readers' connections close; let the agent settle before measuring.
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let warm = warm.unwrap();
    let end = sample(pid, &socket);
    let refreshes = metric(
        &crate::util::metrics_socket_of(&socket),
        "imds_agent_refreshes_total",
    )
    .unwrap_or(0);
    eprintln!(
        "soak: {rotations} rotations at IMDS, {refreshes} refreshes by the agent, {reads} reads; \
         after 10 %: {warm:?}; at the end: {end:?}"
    );
    assert!(
        refreshes as usize >= rotations / 4,
        "the agent kept up with few rotations"
    );
    assert!(
        end.fds <= warm.fds + 2,
        "file descriptors grew: {warm:?} -> {end:?}"
    );
    assert!(
        end.threads <= warm.threads + 2,
        "threads grew: {warm:?} -> {end:?}"
    );
    assert!(
        end.tasks <= warm.tasks + 2,
        "tasks grew: {warm:?} -> {end:?}"
    );
    assert!(
        end.rss_kib <= warm.rss_kib + 4 * 1024,
        "memory grew by more than 4 MiB: {warm:?} -> {end:?}"
    );
    assert!(running.stop_with(Signal::TERM).success());
    drop(imds);
}

#[test]
fn soak_short_run_keeps_descriptors_memory_and_tasks_flat() {
    soak(100);
}

#[test]
#[ignore = "a few minutes: the full soak, run by hand (see the module docs)"]
fn soak_ten_thousand_rotations() {
    let rotations = std::env::var("IMDS_SOAK_ROTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    soak(rotations);
}
