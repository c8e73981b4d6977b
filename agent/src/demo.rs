//! `imds-agent demo`: the emulator and the agent in one process.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use imds_client::mock::MockImds;

use crate::cli::{DemoArgs, RunArgs};
use crate::signals::Reloads;

/// Runs the demo until `shutdown` (Ctrl-C/SIGTERM) or `--duration`.
pub async fn run(
    args: DemoArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    reloads: Reloads,
) -> anyhow::Result<()> {
    let dir = args.dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("imds-agent-demo-{}", std::process::id()))
    });
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating the demo directory {}", dir.display()))?;
    let imds = MockImds::builder()
        .role("demo-role")
        .start()
        .await
        .context("starting the IMDS emulator")?;
    let endpoint = imds.endpoint();
    let socket = dir.join("agent.sock");
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
        socket.display()
    );
    println!(
        "  {} credential-process --socket {}",
        exe.display(),
        socket.display()
    );
    println!("Change the role the way the EC2 console would (the agent follows within a second):");
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
        activated: None,
        notifier: crate::notify::Notifier::from_env()?,
    };
    let result = crate::run::run(run_args, inherited, stop, reloads).await;
    imds.shutdown().await;
    println!("demo stopped; outputs left in {}", dir.display());
    result
}
