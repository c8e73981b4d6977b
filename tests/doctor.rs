//! `imds-agent doctor` against the emulator.

use std::os::unix::fs::PermissionsExt;

use imds_client::mock::MockImds;

use crate::eqnice;
use crate::util::{Stranger, agent};

#[tokio::test(flavor = "multi_thread")]
async fn doctor_reports_tokens_lockdown_and_unsafe_files_with_fixes() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let safe = dir.path().join("safe");
    std::fs::write(&safe, "x").unwrap();
    std::fs::set_permissions(&safe, std::fs::Permissions::from_mode(0o600)).unwrap();
    let endpoint = imds.endpoint();
    let doctor = |file: &std::path::Path| {
        let endpoint = endpoint.clone();
        let file = file.to_owned();
        std::thread::spawn(move || {
            agent()
                .args(["doctor", "--imds-endpoint", &endpoint, "--credentials-file"])
                .arg(&file)
                .output()
                .unwrap()
        })
        .join()
        .unwrap()
    };
    let out = doctor(&safe);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("[ok  ] IMDS answers with a session token"),
        "{text}"
    );
    assert!(text.contains("[ok  ] IAM role attached: r"), "{text}");
    assert!(text.contains("[ok  ] IMDSv2 is required"), "{text}");
    assert!(text.contains("mode 0600"), "{text}");
    // Nothing locks the emulator's loopback port down: another user reaches it.
    assert!(
        text.contains("[warn] uid 65534 (not the agent's user) can connect to IMDS"),
        "{text}"
    );

    imds.set_tokens_required(false);
    let open = dir.path().join("open");
    std::fs::write(&open, "x").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = doctor(&open);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eqnice!(Some(1), out.status.code());
    assert!(text.contains("[warn] IMDSv1 is allowed"), "{text}");
    assert!(text.contains("--http-tokens required"), "{text}");
    assert!(
        text.contains("[FAIL]") && text.contains("readable by every user"),
        "{text}"
    );
}

/// Runs `imds-agent doctor --imds-endpoint ENDPOINT ARGS...` off the async
/// test's thread; (success, standard output).
fn doctor_with(endpoint: &str, args: Vec<std::ffi::OsString>) -> (bool, String) {
    let endpoint = endpoint.to_owned();
    std::thread::spawn(move || {
        let out = agent()
            .args(["doctor", "--imds-endpoint", &endpoint])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    })
    .join()
    .unwrap()
}

/// Issue 11: doctor reports output directories another user could write
/// (the agent's own rule) and checks the container token file as the agent
/// does, each with its fix.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
async fn doctor_reports_directories_others_could_write_and_unsafe_token_files() {
    let stranger = Stranger::new();
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let home = stranger.home(root.path());
    let dir = |name: &str, mode: u32| {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        dir
    };
    let (shared, closed, team) = (
        dir("shared", 0o1777),
        dir("closed", 0o755),
        dir("team", 0o775),
    );
    let token = closed.join("token");
    std::fs::write(&token, "0123456789abcdef".repeat(4)).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();

    let (ok, text) = doctor_with(
        &imds.endpoint(),
        vec![
            "--credentials-file".into(),
            home.join("credentials").into(),
            "--json-file".into(),
            shared.join("credentials.json").into(),
            "--socket".into(),
            closed.join("agent.sock").into(),
            "--container-token-file".into(),
            token.clone().into(),
        ],
    );
    assert!(!ok, "a failed check exits 1: {text}");
    let line = |prefix: &str| {
        text.lines()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("expected a line starting {prefix:?} in:\n{text}"))
    };
    let home_line = line(&format!(
        "[FAIL] credentials file: refusing the directory {}: it is owned by uid {}",
        home.display(),
        stranger.uid
    ));
    assert!(
        text.lines()
            .nth(home_line + 1)
            .unwrap()
            .contains("fix: use a directory only root"),
        "{text}"
    );
    line(&format!(
        "[warn] the JSON file's directory {}: every user may create files in it",
        shared.display()
    ));
    line(&format!(
        "[ok  ] the socket's directory {}: only root and the agent's user can write it",
        closed.display()
    ));
    let token_line = line(&format!(
        "[FAIL] refusing the container token file {}: its mode 0644 lets every user read it",
        token.display()
    ));
    assert!(
        text.lines()
            .nth(token_line + 1)
            .unwrap()
            .contains("fix: `chmod o-rwx"),
        "{text}"
    );
    assert!(
        !text.contains("0123456789abcdef"),
        "the token is never shown: {text}"
    );

    // A group-writable directory; a closed token file; one the stranger planted.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    stranger.sh(&format!(
        "printf %s {} > {}/planted",
        "f".repeat(64),
        shared.display()
    ));
    for (token_file, expected) in [
        (
            token.clone(),
            format!(
                "[ok  ] container token file {}: mode 0640, owner 0",
                token.display()
            ),
        ),
        (
            shared.join("planted"),
            format!(
                "[FAIL] the container token file {}: refusing {}: it is owned by uid {}",
                shared.join("planted").display(),
                shared.join("planted").display(),
                stranger.uid
            ),
        ),
    ] {
        let (ok, text) = doctor_with(
            &imds.endpoint(),
            vec![
                "--credentials-file".into(),
                team.join("credentials").into(),
                "--container-token-file".into(),
                token_file.into(),
            ],
        );
        assert!(!ok, "{text}");
        assert!(
            text.contains(&format!(
                "[FAIL] credentials file: refusing the directory {}: its mode 0775 lets its group write in it",
                team.display()
            )),
            "{text}"
        );
        assert!(
            text.contains(&expected),
            "expected {expected:?} in:\n{text}"
        );
    }
}
