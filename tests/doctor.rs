//! `imds-agent doctor` against the emulator.

use std::os::unix::fs::PermissionsExt;

use imds_client::mock::MockImds;

use crate::eqnice;
use crate::util::agent;

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
