//! `imds-agent demo`: the README's main-job command.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::eqnice;
use crate::util::{Stranger, agent};

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

/// `imds-agent demo` with `TMPDIR` set, run through `sh` so that a test
/// learns its pid (kept across `exec`) before it starts: it starts when a
/// line is written to its standard input.
fn demo_held_at_the_start(tmpdir: &Path) -> std::process::Child {
    Command::new("sh")
        .arg("-c")
        .arg(r#"read _ && exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_imds-agent"))
        .args(["demo", "--duration", "1"])
        .env("TMPDIR", tmpdir)
        .env_remove("RUST_LOG")
        .env("IMDS_AGENT_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Issue 11, row 8: a stranger pre-creates `$TMPDIR/imds-agent-demo-<pid>`
/// (the name the demo used to pick) holding symlinks to a root file, in a
/// shared sticky temp dir like `/tmp`. The demo, run as root, makes a fresh
/// 0700 directory of its own, and neither the stranger's directory nor the
/// root file changes.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
fn the_demo_never_uses_a_directory_a_stranger_prepared() {
    let stranger = Stranger::new();
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = root.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let victim = root.path().join("victim");
    std::fs::write(&victim, "root's\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut demo = demo_held_at_the_start(&tmp);
    let planted = tmp.join(format!("imds-agent-demo-{}", demo.id()));
    stranger.sh(&format!(
        "mkdir {dir} && ln -s {victim} {dir}/credentials && ln -s {victim} {dir}/credentials.json",
        dir = planted.display(),
        victim = victim.display()
    ));
    writeln!(demo.stdin.take().unwrap()).unwrap();
    let out = demo.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    eqnice!("root's\n", std::fs::read_to_string(&victim).unwrap());
    eqnice!(
        0o100644,
        std::fs::metadata(&victim).unwrap().permissions().mode()
    );
    let mut left: Vec<_> = std::fs::read_dir(&planted)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    eqnice!(vec!["credentials", "credentials.json"], left);
    for name in ["credentials", "credentials.json"] {
        eqnice!(victim, std::fs::read_link(planted.join(name)).unwrap());
    }

    let used = stdout
        .lines()
        .find_map(|l| l.strip_prefix("and the agent writing to "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("the demo names its directory: {stdout}"));
    assert_ne!(used, planted, "the demo used the stranger's directory");
    eqnice!(Some(tmp.as_path()), used.parent());
    let meta = std::fs::symlink_metadata(&used).unwrap();
    assert!(meta.is_dir(), "{}", used.display());
    eqnice!((0, 0o40700), (meta.uid(), meta.mode()));
    let credentials = std::fs::read_to_string(used.join("credentials")).unwrap();
    assert!(
        credentials.contains("aws_access_key_id = ASIA"),
        "{credentials}"
    );
}

/// `--dir`: an existing directory must pass the trust rules; a new one is
/// created (0700), one level only, in a directory only root and the agent
/// can write.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: run the suite as root, as CI does")]
fn a_demo_dir_another_user_could_write_is_refused() {
    let stranger = Stranger::new();
    let root = tempfile::tempdir().unwrap();
    let home = stranger.home(root.path());
    let demo = |dir: &Path| {
        agent()
            .args(["demo", "--duration", "1", "--dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    for (dir, why) in [
        (home.clone(), format!("owned by uid {}", stranger.uid)),
        (home.join("new"), format!("owned by uid {}", stranger.uid)),
        (root.path().join("a/b"), "does not exist".to_owned()),
    ] {
        let out = demo(&dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(&why),
            "expected --dir {} refused ({why}): {stderr}",
            dir.display()
        );
    }
    assert!(
        !home.join("new").exists(),
        "nothing created in the stranger's directory"
    );
    assert!(
        !root.path().join("a").exists(),
        "no directory created recursively"
    );

    let fresh = root.path().join("fresh");
    let out = demo(&fresh);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eqnice!(
        0o40700,
        std::fs::metadata(&fresh).unwrap().permissions().mode()
    );
    assert!(fresh.join("credentials").exists());
}
