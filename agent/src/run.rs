//! `imds-agent run`: from flags to a running daemon.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use imds_client::config::EndpointMode;
use imds_client::{ImdsClient, ImdsCredentialsProvider, SharedTimeSource};
use tokio::net::UnixListener;

use crate::cli::RunArgs;
use crate::daemon::{DaemonConfig, run as run_daemon};
use crate::metrics::Metrics;
use crate::server::{AccessPolicy, ServerLimits};
use crate::sink::{CredentialsFileSink, FileOptions, JsonFileSink, Sink};

/// Checks the flags before anything starts.
pub fn validate(args: &RunArgs) -> anyhow::Result<()> {
    validate_outputs(args, false)
}

fn validate_outputs(args: &RunArgs, activated: bool) -> anyhow::Result<()> {
    if !activated
        && args.credentials_file.is_none()
        && args.json_file.is_none()
        && args.socket.is_none()
        && args.container_endpoint.is_none()
    {
        bail!(
            "give at least one output: --credentials-file, --json-file, --socket or --container-endpoint"
        );
    }
    if let Some(addr) = &args.container_endpoint {
        crate::container::check_loopback(addr)?;
    }
    if let (Some(a), Some(b)) = (&args.credentials_file, &args.json_file)
        && a == b
    {
        bail!("--credentials-file and --json-file must be different files");
    }
    if args.imds_endpoint.is_some() && args.imds_endpoint_mode.is_some() {
        bail!("give --imds-endpoint or --imds-endpoint-mode, not both");
    }
    Ok(())
}

/// Builds the IMDS client and the provider from the flags; every failed
/// request to IMDS is counted in `metrics`.
pub fn provider(args: &RunArgs, metrics: Arc<Metrics>) -> anyhow::Result<ImdsCredentialsProvider> {
    let mut builder = ImdsClient::builder();
    if let Some(endpoint) = &args.imds_endpoint {
        builder = builder.endpoint(endpoint).context("--imds-endpoint")?;
    }
    if let Some(mode) = &args.imds_endpoint_mode {
        builder = builder.endpoint_mode(EndpointMode::parse(mode, "--imds-endpoint-mode")?);
    }
    if let Some(t) = args.connect_timeout {
        builder = builder.connect_timeout(seconds(t, "--connect-timeout")?);
    }
    if let Some(t) = args.read_timeout {
        builder = builder.read_timeout(seconds(t, "--read-timeout")?);
    }
    if let Some(n) = args.attempts {
        builder = builder.max_attempts(n);
    }
    // The agent polls on its own schedule: no memo of an unreachable IMDS,
    // so that it delivers at the first poll after IMDS comes up (early boot).
    let client = builder
        .unreachable_memo(Duration::ZERO)
        .build()
        .context("configuring the IMDS client")?;
    let mut provider = ImdsCredentialsProvider::builder()
        .imds_client(client)
        .on_failure(move |error| metrics.failed(error));
    if let Some(window) = args.refresh_window {
        provider = provider.advisory_refresh_window(Duration::from_secs(window));
    }
    Ok(provider.build())
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    if !value.is_finite() || value <= 0.0 || value > 3600.0 {
        bail!("{flag} must be a number of seconds between 0 and 3600");
    }
    Ok(Duration::from_secs_f64(value))
}

/// The file outputs the flags ask for.
pub fn sinks(args: &RunArgs) -> anyhow::Result<Vec<Arc<dyn Sink>>> {
    let options = FileOptions {
        mode: args.file_mode,
        owner: args.file_owner,
        group: args.file_group,
        in_place: args.in_place,
    };
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    if let Some(path) = &args.credentials_file {
        sinks.push(Arc::new(CredentialsFileSink::new(
            path.clone(),
            args.profile.clone(),
            options,
        )?));
    }
    if let Some(path) = &args.json_file {
        sinks.push(Arc::new(JsonFileSink::new(path.clone(), options)?));
    }
    Ok(sinks)
}

/// Binds the socket: a stale socket file is replaced, anything else at the
/// path is an error; the mode and group are set before anyone can connect.
pub fn bind_socket(path: &Path, mode: u32, group: Option<u32>) -> anyhow::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the socket {}", path.display()))?;
    if group.is_some() {
        std::os::unix::fs::chown(path, None, group)
            .with_context(|| format!("setting the group of {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Runs the agent until `shutdown`. `activated` is a listening socket passed
/// by systemd (socket activation); it is used instead of binding `--socket`.
pub async fn run(
    args: RunArgs,
    activated: Option<std::os::unix::net::UnixListener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    validate_outputs(&args, activated.is_some())?;
    let metrics = Arc::new(Metrics::default());
    let provider = provider(&args, metrics.clone())?;
    let sinks = sinks(&args)?;
    let owns_socket_file = activated.is_none();
    let listener = match (activated, &args.socket) {
        (Some(inherited), _) => {
            inherited
                .set_nonblocking(true)
                .context("preparing the socket passed by systemd")?;
            tracing::info!("using the socket passed by systemd");
            Some(
                UnixListener::from_std(inherited)
                    .context("adopting the socket passed by systemd")?,
            )
        }
        (None, Some(path)) => Some(bind_socket(path, args.socket_mode, args.socket_group)?),
        (None, None) => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let container = match args.container_endpoint {
        Some(addr) => {
            let token = crate::container::load_or_create_token(&args.container_token_file)?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the container endpoint {addr}"))?;
            let local = listener.local_addr()?;
            tracing::info!(
                "container endpoint ready: AWS_CONTAINER_CREDENTIALS_FULL_URI=http://{}:{}/credentials AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={}",
                local.ip(),
                local.port(),
                args.container_token_file.display()
            );
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(crate::container::serve(
                listener,
                token,
                provider.subscribe(),
                SharedTimeSource::default(),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tracing::info!(
        credentials_file = ?args.credentials_file,
        json_file = ?args.json_file,
        socket = ?args.socket,
        poll_interval_seconds = args.poll_interval,
        "imds-agent starting"
    );
    let config = DaemonConfig {
        poll_interval: Duration::from_secs(args.poll_interval),
        access: AccessPolicy {
            uids: args.allow_uid.clone(),
            gids: args.allow_gid.clone(),
        },
        limits: ServerLimits::default(),
        clock: SharedTimeSource::default(),
    };
    let result = run_daemon(provider, sinks, listener, config, metrics, shutdown).await;
    if let Some(path) = args.socket.as_ref().filter(|_| owns_socket_file) {
        let _ = std::fs::remove_file(path);
    }
    if let Some(container) = container {
        let _ = container.await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_but_another_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a stale socket file is left behind");
        let listener = bind_socket(&path, 0o600, None).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        drop(listener);

        let file = dir.path().join("precious");
        std::fs::write(&file, "data").unwrap();
        let err = bind_socket(&file, 0o600, None).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    }
}
