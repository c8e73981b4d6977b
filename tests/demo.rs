//! `imds-agent demo`: the README's main-job command.

use crate::util::agent;

#[test]
fn demo_runs_writes_every_output_and_stops_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args(["demo", "--duration", "2", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("curl --unix-socket"), "{stdout}");
    assert!(stdout.contains("credential-process --socket"), "{stdout}");
    let credentials = std::fs::read_to_string(dir.path().join("credentials")).unwrap();
    assert!(
        credentials.contains("aws_access_key_id = ASIA"),
        "{credentials}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("credentials.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["Version"], 1);
    assert!(
        !dir.path().join("agent.sock").exists(),
        "socket removed at shutdown"
    );
}
