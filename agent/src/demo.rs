//! `imds-agent demo`: the emulator and the agent in one process.
//!
//! The README's first command, and often run as root: its directory must not
//! be one another user prepared. So the default is a fresh directory with
//! `mkdtemp` semantics (new, mode 0700, an unpredictable name, never reused)
//! in a temp dir that passes the trust rules of [`crate::trust`]; a `--dir`
//! is created the same way (one level, mode 0700) or, when it exists, must
//! pass those rules.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use imds_client::mock::MockImds;
use rustix::fs::Mode;
use rustix::io::Errno;

use crate::cli::{DemoArgs, RunArgs};
use crate::signals::Reloads;
use crate::trust::{self, Trust};

/// The directory for the demo's outputs: `given` (see the module docs) or a
/// fresh one under the temp dir. It is kept after the demo stops.
pub fn demo_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let trust = Trust::agent();
    let Some(dir) = given else {
        let tmp = std::env::temp_dir();
        trust::open_dir(&tmp, &trust)
            .with_context(|| format!("the temp dir {} (from TMPDIR)", tmp.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("imds-agent-demo-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&tmp)
            .with_context(|| format!("creating a demo directory in {}", tmp.display()))?
            .keep();
        trust::open_dir(&dir, &trust)?;
        return Ok(dir);
    };
    if trust::open_dir_if_exists(dir, &trust)?.is_some() {
        return Ok(dir.to_owned());
    }
    let Some(name) = dir.file_name() else {
        bail!("--dir {}: give a directory name", dir.display());
    };
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = trust::open_dir(parent, &trust).with_context(|| {
        format!(
            "--dir {}: the demo creates only the last directory, in a directory that exists and only root and you can write",
            dir.display()
        )
    })?;
    match rustix::fs::mkdirat(parent.as_fd(), name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("creating the demo directory {}", dir.display()));
        }
    }
    // Whatever is there now (ours, or one that appeared meanwhile) must pass.
    trust::open_dir(dir, &trust)?;
    Ok(dir.to_owned())
}

/// Runs the demo until `shutdown` (Ctrl-C/SIGTERM) or `--duration`.
pub async fn run(
    args: DemoArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    reloads: Reloads,
) -> anyhow::Result<()> {
    let dir = demo_dir(args.dir.as_deref())?;
    let imds = MockImds::builder()
        .role("demo-role")
        .start()
        .await
        .context("starting the IMDS emulator")?;
    let endpoint = imds.endpoint();
    let socket = dir.join("agent.sock");
    let metrics_socket = dir.join("metrics.sock");
    let credentials = dir.join("credentials");
    let json = dir.join("credentials.json");
    let run_args = RunArgs {
        credentials_file: Some(credentials.clone()),
        profile: "default".into(),
        json_file: Some(json.clone()),
        socket: Some(socket.clone()),
        container_endpoint: None,
        container_token_file: dir.join("container-token"),
        file_mode: 0o600,
        file_owner: None,
        file_group: None,
        in_place: false,
        socket_mode: 0o600,
        socket_group: None,
        metrics_socket: Some(metrics_socket.clone()),
        metrics_socket_mode: None,
        metrics_socket_group: None,
        metrics_listen: None,
        allow_uid: Vec::new(),
        allow_gid: Vec::new(),
        imds_endpoint: Some(endpoint.clone()),
        imds_endpoint_mode: None,
        connect_timeout: None,
        read_timeout: None,
        attempts: None,
        refresh_window: None,
        poll_interval: 1,
        log_format: "human".into(),
        on_change: Vec::new(),
        reload_unit: Vec::new(),
        on_change_timeout: 30,
        config: None,
    };
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("imds-agent"));
    println!("imds-agent demo: the IMDS emulator at {endpoint} with role demo-role attached,");
    println!("and the agent writing to {}", dir.display());
    println!();
    println!("Try, in another terminal:");
    println!("  cat {}", credentials.display());
    println!("  cat {}", json.display());
    println!(
        "  curl --unix-socket {} http://localhost/credentials",
        socket.display()
    );
    println!(
        "  curl --unix-socket {} http://localhost/healthz",
        socket.display()
    );
    println!(
        "  curl --unix-socket {} http://localhost/metrics",
        metrics_socket.display()
    );
    println!(
        "  {} refresh --socket {}        # ask IMDS again now",
        exe.display(),
        socket.display()
    );
    println!(
        "  {} credential-process --socket {}",
        exe.display(),
        socket.display()
    );
    println!("Change the role the way the EC2 console would (the agent follows within a second;");
    println!("a rotation alone shows at its next refresh, or at once after `imds-agent refresh`):");
    println!("  curl -X PUT --data other-role {endpoint}/_mock/role     # replace");
    println!("  curl -X DELETE {endpoint}/_mock/role                    # detach");
    println!("  curl -X PUT --data demo-role {endpoint}/_mock/role      # attach again");
    println!("  curl -X POST {endpoint}/_mock/rotate                    # new credentials now");
    println!();
    let stop = async move {
        match args.duration {
            Some(seconds) => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(seconds)) => {}
                    () = shutdown => {}
                }
            }
            None => shutdown.await,
        }
    };
    let inherited = crate::run::Inherited {
        activated: crate::run::Activated::default(),
        notifier: crate::notify::Notifier::from_env()?,
    };
    let result = crate::run::run(run_args, inherited, stop, reloads).await;
    imds.shutdown().await;
    println!("demo stopped; outputs left in {}", dir.display());
    result
}
