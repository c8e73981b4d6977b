//! Many rotations with readers attached, and SIGKILL in the middle.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use imds_client::mock::MockImds;
use rustix::process::Signal;

use crate::util::{Running, agent_against, wait_for};

/// Parses the credentials file: (key, secret, token) of the `default` profile.
fn parse(text: &str) -> Option<(String, String, String)> {
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).map(str::to_owned))
    };
    Some((
        get("aws_access_key_id = ")?,
        get("aws_secret_access_key = ")?,
        get("aws_session_token = ")?,
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn readers_never_see_partial_or_mixed_files_across_rotations_and_a_kill() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    let start = |imds: &MockImds| {
        let mut cmd = agent_against(imds);
        cmd.arg("--credentials-file")
            .arg(&file)
            .args(["--poll-interval", "1"])
            .arg("--socket")
            .arg(dir.path().join("agent.sock"));
        Running::start(cmd)
    };
    let mut running = start(&imds);
    wait_for("first write", || file.exists());

    // Every key set the emulator issues, so a reader can check a file holds
    // one whole set.
    let first = imds.current_credentials().unwrap();
    let issued = Arc::new(std::sync::Mutex::new(vec![(
        first.access_key_id().to_owned(),
        first.secret_access_key().to_owned(),
        first.session_token().to_owned(),
    )]));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (file, stop, reads) = (file.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let text = std::fs::read_to_string(&file).expect("the file is always there");
                    let set = parse(&text).unwrap_or_else(|| panic!("partial file: {text}"));
                    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
                    assert_eq!(mode, 0o600);
                    seen.push(set);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                seen
            })
        })
        .collect();

    for round in 0..100 {
        imds.rotate();
        let c = imds.current_credentials().unwrap();
        issued.lock().unwrap().push((
            c.access_key_id().to_owned(),
            c.secret_access_key().to_owned(),
            c.session_token().to_owned(),
        ));
        // SIGHUP makes the agent fetch now instead of at the next poll.
        let pid = rustix::process::Pid::from_raw(running.pid() as i32).unwrap();
        rustix::process::kill_process(pid, Signal::HUP).unwrap();
        if round == 50 {
            // SIGKILL while rotations are under way, then start again.
            rustix::process::kill_process(pid, Signal::KILL).unwrap();
            drop(running);
            running = start(&imds);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let last = issued.lock().unwrap().last().unwrap().0.clone();
    wait_for("the last rotation", || {
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| parse(&t))
            .is_some_and(|s| s.0 == last)
    });
    stop.store(true, Ordering::Relaxed);
    let issued = issued.lock().unwrap().clone();
    for reader in readers {
        for set in reader.join().unwrap() {
            // Every file read holds one whole key set the emulator issued.
            assert!(
                issued.contains(&set),
                "a file mixed two key sets: {}",
                set.0
            );
        }
    }
    assert!(reads.load(Ordering::Relaxed) > 100);
    assert!(running.stop_with(Signal::TERM).success());
}

/// Key ids of every set the emulator issued, and the file's set must be one.
fn assert_whole_and_issued(file: &std::path::Path, issued: &[(String, String, String)]) {
    let text = std::fs::read_to_string(file).expect("the file survives a kill");
    let set = parse(&text).unwrap_or_else(|| panic!("partial file after SIGKILL: {text}"));
    assert!(issued.contains(&set), "mixed key sets after SIGKILL");
    let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "wrong mode after SIGKILL");
    let json = std::fs::read_to_string(file.with_extension("json")).unwrap();
    let value: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("partial JSON ({e}): {json}"));
    let key = value["AccessKeyId"].as_str().unwrap();
    assert!(issued.iter().any(|s| s.0 == key), "JSON from no issued set");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_points_never_leaves_a_partial_mixed_or_open_file() {
    use rand::Rng;
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    let start = || {
        let mut cmd = agent_against(&imds);
        cmd.arg("--credentials-file")
            .arg(&file)
            .arg("--json-file")
            .arg(file.with_extension("json"))
            .args(["--poll-interval", "1"]);
        Running::start(cmd)
    };
    let issued_now = |issued: &mut Vec<(String, String, String)>| {
        let c = imds.current_credentials().unwrap();
        issued.push((
            c.access_key_id().to_owned(),
            c.secret_access_key().to_owned(),
            c.session_token().to_owned(),
        ));
        c.access_key_id().to_owned()
    };
    let mut issued = Vec::new();
    let mut latest = issued_now(&mut issued);
    for _round in 0..25 {
        let running = start();
        // Both outputs (written one after the other) hold the latest keys.
        wait_for("the restarted agent to catch up", || {
            std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| parse(&t))
                .is_some_and(|s| s.0 == latest)
                && std::fs::read_to_string(file.with_extension("json"))
                    .is_ok_and(|t| t.contains(&latest))
        });
        // A few rotations, then a kill at a random moment: often while a
        // write is under way.
        for _ in 0..rng.random_range(1..4) {
            imds.rotate();
            latest = issued_now(&mut issued);
            running.signal(Signal::HUP);
            std::thread::sleep(std::time::Duration::from_micros(rng.random_range(0..3_000)));
        }
        running.signal(Signal::KILL);
        drop(running);
        assert_whole_and_issued(&file, &issued);
    }
    // Temp files a killed writer left are the only leftovers, and they are
    // never readable by others.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o077;
        assert_eq!(0, mode, "{:?} is open to others", entry.file_name());
    }
}
