//! `imds-agent run`: from flags to a running daemon.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use imds_client::config::EndpointMode;
use imds_client::{ImdsClient, ImdsCredentialsProvider, SharedTimeSource};
use tokio::net::UnixListener;

use crate::cli::RunArgs;
use crate::daemon::{Daemon, Refresh, Server, run as run_daemon};
use crate::metrics::Metrics;
use crate::metrics_listener::Probes;
use crate::notify::Notifier;
use crate::on_change::{Hook, HookLimits, OnChange};
use crate::outputs::{Outputs, WriteLimits};
use crate::refresh::MIN_INTERVAL;
use crate::server::{AccessPolicy, CredentialSocket, ServerLimits};
use crate::shutdown::Shutdown;
use crate::signals::Reloads;
use crate::sink::{CredentialsFileSink, FileOptions, JsonFileSink, Sink};

mod activation;

pub use activation::{Activated, CONTAINER_NAME, CREDENTIALS_NAME};

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
        crate::container::check_endpoint(addr)?;
    }
    if let (Some(socket), Some(metrics)) = (&args.socket, &args.metrics_socket)
        && resolve_output(socket) == resolve_output(metrics)
    {
        bail!(
            "--socket {} and --metrics-socket {} are the same path: the metrics socket would \
             replace the credential socket. Give two different paths, such as \
             /run/imds-agent/agent.sock and /run/imds-agent/metrics.sock",
            socket.display(),
            metrics.display()
        );
    }
    if let (Some(a), Some(b)) = (&args.credentials_file, &args.json_file) {
        let (ra, rb) = (resolve_output(a), resolve_output(b));
        let same_inode = match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(ma), Ok(mb)) => (ma.dev(), ma.ino()) == (mb.dev(), mb.ino()),
            _ => false,
        };
        if ra == rb || same_inode {
            bail!(
                "--credentials-file {} and --json-file {} are the same file ({}): the JSON \
                 document would replace the credentials file. Give two different files",
                a.display(),
                b.display(),
                ra.display()
            );
        }
    }
    FileOptions {
        mode: args.file_mode,
        ..FileOptions::default()
    }
    .check()
    .context("--file-mode")?;
    if args.imds_endpoint.is_some() && args.imds_endpoint_mode.is_some() {
        bail!("give --imds-endpoint or --imds-endpoint-mode, not both");
    }
    Ok(())
}

/// Where an output path leads, for telling two outputs apart: symlinks
/// followed (bounded), `..` resolved, and a missing file or directory
/// resolved as far as it exists, then lexically. Only compared, never opened
/// for writing: the writes themselves go through [`crate::trust`].
fn resolve_output(path: &Path) -> std::path::PathBuf {
    let mut current = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    for _ in 0..40 {
        if let Ok(real) = std::fs::canonicalize(&current) {
            return real;
        }
        match std::fs::read_link(&current) {
            Ok(target) => {
                current = current.parent().unwrap_or(Path::new("/")).join(target);
            }
            Err(_) => break,
        }
    }
    // The file does not exist: its directory, as far as that exists.
    let mut missing = Vec::new();
    let mut dir = lexical(&current);
    loop {
        if let Ok(real) = std::fs::canonicalize(&dir) {
            return missing.iter().rev().fold(real, |p, n| p.join(n));
        }
        match (dir.file_name().map(|n| n.to_owned()), dir.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name);
                dir = parent.to_owned();
            }
            _ => return lexical(&current),
        }
    }
}

/// `path` with `.` and `..` resolved by text.
fn lexical(path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The `--on-change` and `--reload-unit` commands, started.
fn on_change(args: &RunArgs, metrics: Arc<Metrics>) -> anyhow::Result<OnChange> {
    let mut hooks = args.on_change.clone();
    for unit in &args.reload_unit {
        hooks.push(Hook::reload_unit(unit).map_err(anyhow::Error::msg)?);
    }
    if hooks.is_empty() {
        return Ok(OnChange::disabled());
    }
    tracing::info!(
        commands = hooks.len(),
        timeout_seconds = args.on_change_timeout,
        "running commands on every change of the outputs"
    );
    let limits = HookLimits {
        timeout: Duration::from_secs(args.on_change_timeout),
    };
    Ok(OnChange::start(hooks, limits, metrics))
}

/// Builds the IMDS client and the provider from the flags; every failed
/// request to IMDS is counted in `metrics`.
pub fn provider(args: &RunArgs, metrics: Arc<Metrics>) -> anyhow::Result<ImdsCredentialsProvider> {
    let mut provider = ImdsCredentialsProvider::builder()
        .imds_client(imds_client(args)?)
        .on_failure(move |error| metrics.failed(error));
    if let Some(window) = args.refresh_window {
        provider = provider.advisory_refresh_window(Duration::from_secs(window));
    }
    Ok(provider.build())
}

/// An IMDS client configured from the flags.
pub fn imds_client(args: &RunArgs) -> anyhow::Result<ImdsClient> {
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
    builder
        .unreachable_memo(Duration::ZERO)
        .build()
        .context("configuring the IMDS client")
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    if !value.is_finite() || value <= 0.0 || value > 3600.0 {
        bail!("{flag} must be a number of seconds between 0 and 3600");
    }
    Ok(Duration::from_secs_f64(value))
}

/// The file outputs the flags ask for, each prepared (its directory checked
/// if it exists, its own stale temp files from a killed run removed).
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
    let started = SharedTimeSource::default().now();
    for sink in &sinks {
        sink.prepare(started)?;
    }
    Ok(sinks)
}

/// Reads and validates `--config` (every problem with file, line and key),
/// before anything starts. `None` without `--config`.
pub fn load_config(args: &RunArgs) -> anyhow::Result<Option<crate::broker::config::Config>> {
    load_config_for(args, args.container_endpoint.is_some())
}

/// [`load_config`], for an agent that serves the container endpoint or not
/// (from `--container-endpoint` or from sockets systemd passed).
fn load_config_for(
    args: &RunArgs,
    container_endpoint: bool,
) -> anyhow::Result<Option<crate::broker::config::Config>> {
    let Some(path) = &args.config else {
        return Ok(None);
    };
    let config = crate::broker::config::Config::load(path)?;
    if args.socket.is_none()
        && !container_endpoint
        && config
            .files()
            .all(|(_, key, _)| key == "container_token_file")
    {
        tracing::warn!(
            config = %path.display(),
            "no --socket, no --container-endpoint and no consumer files: no consumer gets \
             credentials"
        );
    }
    if !container_endpoint {
        for (consumer, key, file) in config
            .files()
            .filter(|(_, key, _)| *key == "container_token_file")
        {
            tracing::warn!(
                config = %path.display(),
                consumer = %consumer.name,
                key,
                file = %file.display(),
                "a consumer has a container token but no --container-endpoint is given: \
                 no container gets its credentials"
            );
        }
    }
    Ok(Some(config))
}

/// The broker for `config`'s consumers, and the task (pushed to `servers`)
/// that tells it about every change of the instance role.
fn consumers(
    args: &RunArgs,
    config: crate::broker::config::Config,
    provider: &ImdsCredentialsProvider,
    shutdown: &Shutdown,
    metrics: &Arc<Metrics>,
    servers: &mut Vec<Server>,
) -> anyhow::Result<crate::broker::handout::Consumers> {
    use crate::broker::{assumer::StsAssumer, cache::Broker, sts::StsClient};
    let assumer = StsAssumer::new(imds_client(args)?, StsClient::builder).context(
        "configuring the STS client for the consumers (AWS_ENDPOINT_URL_STS, AWS_REGION)",
    )?;
    let broker = Broker::builder(assumer).config(&config).build();
    tracing::info!(
        config = ?config.path(),
        consumers = ?config.consumers().iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        unmatched = ?config.unmatched(),
        "consumers configured: each socket peer gets its consumer's STS session"
    );
    let follow = crate::broker::handout::follow(
        broker.clone(),
        provider.subscribe(),
        shutdown.clone().wait_owned(),
    );
    servers.push(Server::new("consumer broker", async move {
        follow.await;
        Ok(())
    }));
    servers.extend(crate::broker::files::tasks(
        &broker,
        &provider.subscribe(),
        metrics,
        shutdown,
    )?);
    Ok(crate::broker::handout::Consumers {
        config: Arc::new(config),
        broker,
    })
}

/// The container endpoint's listeners: the ones systemd passed, else
/// `--container-endpoint` bound (none without either).
async fn container_listeners(
    args: &RunArgs,
    activated: Vec<std::net::TcpListener>,
) -> anyhow::Result<Vec<tokio::net::TcpListener>> {
    if activated.is_empty() {
        let Some(addr) = args.container_endpoint else {
            return Ok(Vec::new());
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the container endpoint {addr}"))?;
        return Ok(vec![listener]);
    }
    if let Some(addr) = args.container_endpoint {
        tracing::warn!(
            container_endpoint = %addr,
            "systemd passed the container endpoint's sockets: --container-endpoint is not bound"
        );
    }
    activated
        .into_iter()
        .map(|listener| {
            listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(listener))
                .context("adopting a container endpoint socket passed by systemd")
        })
        .collect()
}

/// What `main` hands the agent from the process's start: the sockets systemd
/// passed (socket activation) and systemd's notify socket.
#[derive(Debug)]
pub struct Inherited {
    /// The listening sockets systemd passed, each checked and sorted by
    /// its name ([`Activated::take`]): the credential socket, used instead
    /// of binding `--socket`, and the container endpoint's, used instead of
    /// binding `--container-endpoint`.
    pub activated: Activated,
    /// systemd's notify socket (a no-op outside systemd).
    pub notifier: Notifier,
}

/// Runs the agent until `shutdown` (SIGTERM or SIGINT, already registered by
/// `main`, so one that arrived during start-up stops the agent cleanly here).
pub async fn run(
    args: RunArgs,
    inherited: Inherited,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    reloads: Reloads,
) -> anyhow::Result<()> {
    let Inherited {
        activated,
        notifier,
    } = inherited;
    let shutdown = Shutdown::on(shutdown);
    let Activated {
        socket: activated,
        container: activated_container,
    } = activated;
    validate_outputs(
        &args,
        activated.is_some() || !activated_container.is_empty(),
    )?;
    // The token file is checked (and made if missing) before any container
    // socket is bound: an agent about to refuse a planted or readable token
    // never listens, not even for a moment.
    let container_token = if args.container_endpoint.is_some() || !activated_container.is_empty() {
        Some(crate::token_file::load_or_create(
            &args.container_token_file,
        )?)
    } else {
        None
    };
    let container_listeners = container_listeners(&args, activated_container).await?;
    let config = load_config_for(&args, !container_listeners.is_empty())?;
    let metrics = Arc::new(Metrics::default());
    let provider = provider(&args, metrics.clone())?;
    let sinks = sinks(&args)?;
    let clock = SharedTimeSource::default();
    let mut socket_file = None;
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
        (None, Some(path)) => {
            let (listener, file) =
                crate::socket_file::bind(path, args.socket_mode, args.socket_group)?;
            socket_file = Some(file);
            Some(listener)
        }
        (None, None) => None,
    };
    let mut servers = Vec::new();
    let consumers = match config {
        Some(config) => Some(consumers(
            &args,
            config,
            &provider,
            &shutdown,
            &metrics,
            &mut servers,
        )?),
        None => None,
    };
    let probes = Probes {
        state: provider.subscribe(),
        metrics: metrics.clone(),
        clock: clock.clone(),
        consumers: consumers.clone(),
    };
    let mut metrics_at = Vec::new();
    let mut metrics_socket_file = None;
    if let Some(path) = &args.metrics_socket {
        let (listener, file) =
            crate::socket_file::bind(path, args.metrics_socket_mode(), args.metrics_socket_group)
                .with_context(|| format!("--metrics-socket {}", path.display()))?;
        metrics_socket_file = Some(file);
        metrics_at.push(path.display().to_string());
        let serve = crate::metrics_listener::serve_unix(
            listener,
            probes.clone(),
            shutdown.clone().wait_owned(),
        );
        servers.push(Server::new("metrics socket", async move {
            serve.await;
            Ok(())
        }));
    }
    if let Some(addr) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-listen {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!("metrics listener ready: http://{local}/metrics and http://{local}/healthz");
        metrics_at.push(format!("http://{local}/metrics"));
        let serve = crate::metrics_listener::serve_tcp(
            listener,
            probes.clone(),
            shutdown.clone().wait_owned(),
        );
        servers.push(Server::new("metrics listener", async move {
            serve.await;
            Ok(())
        }));
    }
    let (refresher, refresh_requests) = crate::refresh::channel(MIN_INTERVAL, metrics.clone());
    let reloads = reloads.with_requests(refresh_requests);
    if let Some(listener) = listener {
        let socket = CredentialSocket {
            state: provider.subscribe(),
            metrics: metrics.clone(),
            clock: clock.clone(),
            policy: AccessPolicy {
                uids: args.allow_uid.clone(),
                gids: args.allow_gid.clone(),
            },
            limits: ServerLimits::default(),
            refresher,
            metrics_at,
            consumers: consumers.clone(),
        };
        let serve = crate::server::serve(listener, socket, shutdown.clone().wait_owned());
        servers.push(Server::new("credential socket", async move {
            serve.await;
            Ok(())
        }));
    }
    if let Some(token) = container_token.filter(|_| !container_listeners.is_empty()) {
        let container_consumers = match &consumers {
            Some(consumers) => Some(crate::container::ContainerConsumers {
                tokens: Arc::new(crate::broker::tokens::ConsumerTokens::load(
                    &consumers.config,
                )?),
                consumers: consumers.clone(),
            }),
            None => None,
        };
        for listener in &container_listeners {
            let local = listener.local_addr()?;
            tracing::info!(
                "container endpoint ready: AWS_CONTAINER_CREDENTIALS_FULL_URI=http://{local}/v1/credentials AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={}",
                args.container_token_file.display()
            );
        }
        servers.push(Server::new(
            "container endpoint",
            crate::container::serve_all(
                container_listeners,
                token,
                provider.subscribe(),
                clock.clone(),
                metrics.clone(),
                Some(imds_client(&args)?),
                container_consumers,
                shutdown.clone().wait_owned(),
            ),
        ));
    }
    tracing::info!(
        credentials_file = ?args.credentials_file,
        json_file = ?args.json_file,
        socket = ?args.socket,
        metrics_socket = ?args.metrics_socket,
        metrics_listen = ?args.metrics_listen,
        poll_interval_seconds = args.poll_interval,
        "imds-agent starting"
    );
    let on_change = on_change(&args, metrics.clone())?;
    let daemon = Daemon {
        on_change,
        outputs: Outputs::start(sinks, WriteLimits::default(), metrics.clone()),
        servers,
        refresh: Refresh {
            provider,
            poll_interval: Duration::from_secs(args.poll_interval),
            reloads,
        },
        notifier,
        clock,
        metrics,
    };
    let result = run_daemon(daemon, shutdown).await;
    for file in [socket_file, metrics_socket_file].into_iter().flatten() {
        file.remove();
    }
    result
}
