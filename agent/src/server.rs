//! HTTP/1.1 over the credential socket: `GET /credentials`, `POST /refresh`
//! (see [`crate::refresh`]) and `GET /healthz`. `GET /credentials` answers
//! with an `ETag` and, given `?wait=SECONDS&since=ETAG`, waits for a change
//! ([`crate::long_poll`]). With a config file
//! (`run --config`), `GET /credentials` answers each peer with its
//! consumer's STS session, matched by `SO_PEERCRED` uid/gid
//! ([`crate::broker::handout`]); `POST /refresh` still refreshes the
//! instance credentials only. `/metrics` is not served here
//! (404 naming where it is): it lives on the metrics listener
//! ([`crate::metrics_listener`]), so that monitoring needs no access to
//! credentials.
//!
//! Access is decided per connection: the socket file's mode and group first
//! (the kernel, at `connect`, with every group of the peer), then an
//! allow-list of peer uids and gids (primary or supplementary) read with
//! `SO_PEERCRED` and `SO_PEERGROUPS` when the connection is accepted. A
//! refused peer gets a fixed 403, written without waiting, and its connection is shut at once: it never holds a connection
//! slot, and the agent never waits for its request head. Its first refusal is logged with its uid, gid and
//! pid, further ones are summarised (see `http_listener`). Connections are
//! bounded in number (in all, and per uid), header size, header read time and
//! lifetime, so one misbehaving user cannot starve the others.

use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use imds_client::{ProviderState, RoleCredentials, SharedTimeSource};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::audit_limit::AuditLimit;
use crate::broker::config::Match;
use crate::broker::handout::{self, Consumers, PeerId};
use crate::format::credential_process_json;
pub use crate::http_listener::ServerLimits;
use crate::http_listener::{
    Admission, ConnectionControl, Peer, PeerKey, Refusal, Refusals, serve_limited,
};
use crate::long_poll::{self, ETag};
use crate::metrics::Metrics;
use crate::metrics_listener::health;
use crate::refresh::{Answer, Refresher};

/// Who may use the socket beyond what its file mode allows.
///
/// Matched against the peer's credentials as the kernel fixed them when the
/// peer connected: its effective uid and primary gid (`SO_PEERCRED`) and its
/// supplementary groups (`SO_PEERGROUPS`, [`crate::peer_groups`]; on a
/// kernel before 4.13 the primary gid only). Never from `/proc/PID/status`,
/// whose pid may by then belong to another process.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Allowed peer uids. Empty lists on both sides: anyone who can open the socket.
    pub uids: Vec<u32>,
    /// Allowed peer gids, primary or supplementary (see the type's docs).
    pub gids: Vec<u32>,
}

impl AccessPolicy {
    /// Whether a peer with effective `uid`, primary `gid` and supplementary
    /// `groups` may use the socket.
    fn allows(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        (self.uids.is_empty() && self.gids.is_empty())
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
            || groups.iter().any(|g| self.gids.contains(g))
    }
}

/// The gids that can change what a peer gets: the allow-list's and the
/// consumers'. A peer's other supplementary groups are dropped at accept,
/// so a connection keeps at most this many, however many the peer has.
#[derive(Debug)]
struct NamedGroups(Vec<u32>);

impl NamedGroups {
    fn new(policy: &AccessPolicy, config: Option<&crate::broker::config::Config>) -> Self {
        let mut gids: Vec<u32> = policy.gids.clone();
        gids.extend(config.into_iter().flat_map(|c| c.gids()));
        gids.sort_unstable();
        gids.dedup();
        Self(gids)
    }

    /// The groups among `groups` that the allow-list or a consumer names:
    /// a binary search of the (few) named gids per group, no hashing, and
    /// nothing at all when none is named.
    fn keep(&self, groups: &[u32]) -> Arc<[u32]> {
        if self.0.is_empty() {
            return Arc::from([]);
        }
        groups
            .iter()
            .copied()
            .filter(|g| self.0.binary_search(g).is_ok())
            .collect()
    }
}

/// The credential socket's settings: what it serves, and to whom.
#[derive(Debug)]
pub struct CredentialSocket {
    /// The provider's state (the credentials served).
    pub state: watch::Receiver<ProviderState>,
    /// The counters (requests, refusals).
    pub metrics: Arc<Metrics>,
    /// The wall clock.
    pub clock: SharedTimeSource,
    /// Who may use the socket beyond what its file mode allows.
    pub policy: AccessPolicy,
    /// Connection limits.
    pub limits: ServerLimits,
    /// Hands `POST /refresh` to the daemon.
    pub refresher: Refresher,
    /// Where metrics are served (`--metrics-socket`, `--metrics-listen`),
    /// named in the 404 for `/metrics`.
    pub metrics_at: Vec<String>,
    /// With a config file: each peer gets its consumer's session (or 403).
    /// `None`: every admitted peer gets the instance role, as before.
    pub consumers: Option<Consumers>,
}

#[derive(Clone)]
struct App {
    state: watch::Receiver<ProviderState>,
    metrics: Arc<Metrics>,
    clock: SharedTimeSource,
    refresher: Refresher,
    metrics_at: Arc<[String]>,
    consumers: Option<Consumers>,
    /// Limits the audit records of refusals and errors ([`crate::audit_limit`]).
    audits: Arc<AuditLimit>,
}

fn router(app: App) -> Router {
    Router::new()
        .route("/credentials", get(credentials))
        .route("/healthz", get(healthz))
        .route("/refresh", post(refresh))
        .route("/metrics", get(metrics_moved))
        .with_state(app)
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, serde_json::json!({ "error": message }).to_string())
}

/// What `GET /credentials` answers, before it becomes a response.
#[derive(Debug)]
enum Reply {
    /// 200 and the `credential_process` JSON of these credentials.
    Credentials(RoleCredentials),
    /// An error status and its message.
    Error(StatusCode, String),
}

impl Reply {
    /// The `ETag` of this answer (never derived from a secret: see [`long_poll`]).
    fn etag(&self) -> ETag {
        match self {
            Reply::Credentials(current) => ETag::of_credentials(current),
            Reply::Error(status, message) => ETag::of_error(status.as_u16(), message),
        }
    }

    fn into_response(self) -> Response {
        let tag = self.etag();
        let mut response = match self {
            Reply::Credentials(current) => json(StatusCode::OK, credential_process_json(&current)),
            Reply::Error(status, message) => error(status, &message),
        };
        with_etag(&mut response, tag);
        response
    }
}

fn with_etag(response: &mut Response, tag: ETag) {
    if let Ok(value) = header::HeaderValue::from_str(&tag.to_string()) {
        response.headers_mut().insert(header::ETAG, value);
    }
}

/// An answer resolved for one peer, sent (and, for a consumer, audited)
/// only once it is final: a long-poll resolves again at every change.
#[derive(Debug)]
struct Resolved {
    reply: Reply,
    /// With a config file: the audit record's consumer, result and reason.
    audit: Option<(String, &'static str, Option<String>)>,
    /// The consumer whose session this is, if it is one.
    consumer: Option<String>,
}

impl Resolved {
    fn instance(reply: Reply) -> Self {
        Self {
            reply,
            audit: None,
            consumer: None,
        }
    }

    /// Whether this refuses the peer (no consumer, `unmatched = "deny"`).
    fn denied(&self) -> bool {
        matches!(&self.audit, Some((_, "denied", _)))
    }

    /// The response, audited for `peer` with a config file (a refusal or
    /// an error in full at most once per uid and reason per interval, see
    /// [`crate::audit_limit`]).
    fn send(self, peer: Option<&PeerId>, audits: &AuditLimit) -> Response {
        if let (Some((consumer, result, reason)), Some(peer)) = (&self.audit, peer) {
            let write = *result == "served"
                || audits.admit(
                    PeerKey::Uid(peer.uid),
                    "socket",
                    result,
                    reason.as_deref().unwrap_or(""),
                );
            if write {
                let served = match &self.reply {
                    Reply::Credentials(current) => Some(current),
                    Reply::Error(..) => None,
                };
                handout::audit(consumer, "socket", peer, served, result, reason.as_deref());
            }
        }
        self.reply.into_response()
    }
}

/// `GET /credentials`. With a config file, the peer's consumer's session
/// (or 403 for a peer no consumer claims, unless `unmatched =
/// "instance-role"`), each answer audited ([`handout`]); without one, the
/// instance role's credentials. Every answer has an `ETag`; `since` and
/// `wait` make it a conditional request or a long-poll ([`long_poll`]).
async fn credentials(
    State(app): State<App>,
    peer: Option<Extension<PeerId>>,
    connection: Option<Extension<ConnectionControl>>,
    RawQuery(query): RawQuery,
) -> Response {
    app.metrics.request();
    let request = match long_poll::Request::parse(query.as_deref()) {
        Ok(request) => request,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let peer = peer.map(|Extension(peer)| peer);
    let mut state = app.state.clone();
    let current = state.borrow_and_update().clone();
    let resolved = resolve(&app, peer.as_ref(), &current).await;
    let tag = resolved.reply.etag();
    // A refusal is never conditional: it is answered (and audited) every time.
    if !request.holds(tag) || resolved.denied() {
        return resolved.send(peer.as_ref(), &app.audits);
    }
    let Some(wait) = request.wait else {
        return not_modified(tag);
    };
    // Long-poll: held until what this peer is served changes, the wait
    // ends, or the agent stops.
    let deadline = tokio::time::Instant::now() + wait;
    if let Some(Extension(connection)) = &connection {
        connection.keep_open_until(deadline + long_poll::LIFETIME_MARGIN);
    }
    let stopping = async {
        match &connection {
            Some(Extension(connection)) => connection.stopping().await,
            None => std::future::pending().await,
        }
    };
    let changed = next_change(&app, peer.as_ref(), &mut state, resolved, tag);
    tokio::select! {
        biased;
        () = stopping => stopping_now(),
        () = tokio::time::sleep_until(deadline) => not_modified(tag),
        changed = changed => match changed {
            Some(resolved) => resolved.send(peer.as_ref(), &app.audits),
            None => stopping_now(),
        },
    }
}

/// `304 Not Modified`: the client's `since` is still what is served.
fn not_modified(tag: ETag) -> Response {
    let mut response = StatusCode::NOT_MODIFIED.into_response();
    with_etag(&mut response, tag);
    response
}

fn stopping_now() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the agent is stopping; ask again once it is back",
    )
}

/// Waits until `peer` would be served something other than `tag` and
/// returns that; `None` once the provider is gone (the agent is stopping).
///
/// Woken by every new provider state (a rotation, a replacement, a detach,
/// a recovery; with a config file these also reach consumers' sessions);
/// for the instance role, also when the served credentials expire; for a
/// consumer, also when its session is due for a refresh, which this waits
/// for (one STS call shared with every other caller, see
/// [`crate::broker::cache::Broker::poll`]).
async fn next_change(
    app: &App,
    peer: Option<&PeerId>,
    state: &mut watch::Receiver<ProviderState>,
    mut resolved: Resolved,
    tag: ETag,
) -> Option<Resolved> {
    let latest = state.clone();
    loop {
        let expiry = match &resolved.reply {
            Reply::Credentials(current) if resolved.consumer.is_none() => current
                .credentials
                .expiration()
                .duration_since(app.clock.now())
                .ok(),
            _ => None,
        };
        let refresh = async {
            match (&app.consumers, &resolved.consumer) {
                (Some(consumers), Some(name)) => {
                    tokio::time::sleep(consumers.broker.poll_interval(name)).await;
                    let current = latest.borrow().clone();
                    let _ = consumers.broker.poll(name, &current).await;
                }
                _ => match expiry {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending().await,
                },
            }
        };
        tokio::select! {
            changed = state.changed() => changed.ok()?,
            () = refresh => {}
        }
        let current = state.borrow_and_update().clone();
        resolved = resolve(app, peer, &current).await;
        if resolved.reply.etag() != tag {
            return Some(resolved);
        }
    }
}

/// What `peer` is served now: its consumer's answer with a config file,
/// else the instance role's.
async fn resolve(app: &App, peer: Option<&PeerId>, state: &ProviderState) -> Resolved {
    match (&app.consumers, peer) {
        (Some(consumers), Some(peer)) => resolve_consumer(consumers, peer, state, &app.clock).await,
        _ => Resolved::instance(instance_role(state, &app.clock)),
    }
}

/// The instance role's credentials, as without a config file.
fn instance_role(state: &ProviderState, clock: &SharedTimeSource) -> Reply {
    match state {
        ProviderState::Active { current, .. } => served(current, clock),
        ProviderState::NoRole => no_role(),
        ProviderState::Starting => Reply::Error(
            StatusCode::SERVICE_UNAVAILABLE,
            "credentials are not loaded yet".into(),
        ),
        _ => Reply::Error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no valid credentials: IMDS is unavailable".into(),
        ),
    }
}

/// What a peer gets with a config file, audited.
async fn for_consumer(
    consumers: &Consumers,
    peer: &PeerId,
    state: &ProviderState,
    clock: &SharedTimeSource,
    audits: &AuditLimit,
) -> Response {
    resolve_consumer(consumers, peer, state, clock)
        .await
        .send(Some(peer), audits)
}

/// What a peer gets with a config file, with its audit record (not yet written).
async fn resolve_consumer(
    consumers: &Consumers,
    peer: &PeerId,
    state: &ProviderState,
    clock: &SharedTimeSource,
) -> Resolved {
    match consumers.answer(peer, state).await {
        handout::Answer::Consumer {
            name,
            result: Ok(session),
        } => Resolved {
            reply: Reply::Credentials(session),
            audit: Some((name.clone(), "served", None)),
            consumer: Some(name),
        },
        handout::Answer::Consumer {
            name,
            result: Err(e),
        } => {
            let message = e.to_string();
            let status = match e {
                crate::broker::cache::BrokerError::NoInstanceRole => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            Resolved {
                reply: Reply::Error(status, message.clone()),
                audit: Some((name.clone(), "error", Some(message))),
                consumer: Some(name),
            }
        }
        handout::Answer::InstanceRole => {
            let reply = instance_role(state, clock);
            let audit = match &reply {
                Reply::Credentials(_) => ("(instance-role)".to_owned(), "served", None),
                Reply::Error(status, _) => (
                    "(instance-role)".to_owned(),
                    "error",
                    Some(status.as_str().to_owned()),
                ),
            };
            Resolved {
                reply,
                audit: Some(audit),
                consumer: None,
            }
        }
        handout::Answer::Denied(reason) => Resolved {
            reply: Reply::Error(StatusCode::FORBIDDEN, reason.clone()),
            audit: Some((String::new(), "denied", Some(reason))),
            consumer: None,
        },
    }
}

/// 200 with the `credential_process` JSON while `current` is valid.
fn served(current: &RoleCredentials, clock: &SharedTimeSource) -> Reply {
    if current.credentials.expiration() > clock.now() {
        Reply::Credentials(current.clone())
    } else {
        Reply::Error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no valid credentials: IMDS is unavailable".into(),
        )
    }
}

fn no_role() -> Reply {
    Reply::Error(
        StatusCode::NOT_FOUND,
        "no IAM role is attached to this instance".into(),
    )
}

/// `POST /refresh`: asks IMDS now (see [`crate::refresh`]) and answers with
/// what it brought: 200 and the `/credentials` JSON, 404 when no role is
/// attached, 503 when IMDS failed, 429 with `Retry-After` right after
/// another refresh.
///
/// The refresh is of the **instance** credentials (consumers' sessions keep
/// their own schedule). With a config file the answer is what
/// `GET /credentials` gives this peer afterwards, never the instance role's
/// credentials unless the peer gets those anyway; a denied peer is refused
/// before anything is asked.
async fn refresh(State(app): State<App>, peer: Option<Extension<PeerId>>) -> Response {
    app.metrics.request();
    let consumer = match (&app.consumers, peer) {
        (Some(consumers), Some(Extension(peer))) => {
            let state = app.state.borrow().clone();
            if let Match::Denied | Match::Ambiguous(_) | Match::GroupsUnknown = consumers
                .config
                .consumer_for(peer.uid, peer.gid, peer.groups.as_deref())
            {
                return for_consumer(consumers, &peer, &state, &app.clock, &app.audits).await;
            }
            Some((consumers, peer))
        }
        _ => None,
    };
    match app.refresher.refresh().await {
        Answer::Done(Ok(_)) if consumer.is_some() => {
            let (consumers, peer) = consumer.expect("checked");
            let state = app.state.borrow().clone();
            for_consumer(consumers, &peer, &state, &app.clock, &app.audits).await
        }
        Answer::Done(Ok(current)) => served(&current, &app.clock).into_response(),
        Answer::Done(Err(failure)) if failure.no_role => no_role().into_response(),
        Answer::Done(Err(failure)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "IMDS did not give new credentials: {}; GET /credentials serves the previous ones while they are valid",
                failure.message
            ),
        ),
        Answer::TooSoon(wait) => {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "credentials were refreshed from IMDS less than {} s ago and GET /credentials serves them; \
                     a new refresh is allowed in {seconds} s",
                    crate::refresh::MIN_INTERVAL.as_secs()
                ),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
            response
        }
        Answer::Stopping => error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping"),
    }
}

async fn healthz(State(app): State<App>) -> Response {
    app.metrics.request();
    let state = app.state.borrow().clone();
    let now = app.clock.now();
    let (status, mut body) = health(&state, &app.metrics, now);
    if let Some(consumers) = &app.consumers {
        body["consumers"] = consumers.health(now);
    }
    json(status, body.to_string())
}

/// `/metrics` moved to the metrics listener: whoever may scrape metrics
/// should not need to be able to read credentials.
async fn metrics_moved(State(app): State<App>) -> Response {
    app.metrics.request();
    let message = if app.metrics_at.is_empty() {
        "metrics are not served on the credential socket; start the agent with \
         --metrics-socket PATH (or --metrics-listen 127.0.0.1:PORT) and read GET /metrics there"
            .to_owned()
    } else {
        format!(
            "metrics are not served on the credential socket; read GET /metrics on {}",
            app.metrics_at.join(" or ")
        )
    };
    error(StatusCode::NOT_FOUND, &message)
}

/// Serves the socket until `shutdown` resolves, then lets open connections
/// finish (bounded by their lifetime) and returns.
pub async fn serve(
    listener: UnixListener,
    socket: CredentialSocket,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let CredentialSocket {
        state,
        metrics,
        clock,
        policy,
        limits,
        refresher,
        metrics_at,
        consumers,
    } = socket;
    let consumers_config = consumers.as_ref().map(|c| c.config.clone());
    let app = router(App {
        state,
        metrics: metrics.clone(),
        clock,
        refresher,
        metrics_at: metrics_at.into(),
        consumers,
        audits: Arc::default(),
    });
    let refusals = Arc::new(Refusals::new("socket", metrics));
    let named = NamedGroups::new(&policy, consumers_config.as_deref());
    // One buffer for every peer's groups (up to 65,536 of them).
    let mut buffer = Vec::new();
    let admit = move |stream: &UnixStream| match stream.peer_cred() {
        Ok(cred) => {
            let peer = Peer {
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
                pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
                addr: None,
            };
            // Unknown groups allow nothing here (fail closed), and the
            // config refuses to widen such a peer (`Match::GroupsUnknown`).
            let groups =
                crate::peer_groups::read_or_none(stream, &mut buffer).map(|g| named.keep(g));
            if policy.allows(
                cred.uid(),
                cred.gid(),
                groups.as_deref().unwrap_or_default(),
            ) {
                let id = PeerId {
                    uid: cred.uid(),
                    gid: cred.gid(),
                    groups,
                    pid: peer.pid,
                };
                Admission::Serve(peer, app.clone().layer(Extension(id)))
            } else {
                Admission::Refuse(peer, Refusal::AllowList)
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "could not read the peer's credentials");
            Admission::Refuse(Peer::default(), Refusal::UnknownPeer)
        }
    };
    serve_limited(listener, limits, refusals, admit, shutdown).await;
}

#[cfg(test)]
mod tests {
    //! The long-poll in-process: the real socket server on a temp socket,
    //! a provider state the test publishes, tokio's paused clock and a
    //! manual wall clock. A test knows a long-poll is waiting once the
    //! server counted its request (the handler then runs, single-threaded,
    //! until it waits).

    use std::path::PathBuf;
    use std::time::{Duration, SystemTime};

    use imds_client::{Credentials, Error, ErrorKind, ManualTimeSource};

    use super::*;
    use crate::audit_limit::REFUSAL_SUMMARY_INTERVAL;
    use crate::shutdown::{Shutdown, ShutdownTrigger};

    const START: u64 = 1_800_000_000;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(START + seconds)
    }

    fn active(role: &str, key: &str, expires: SystemTime) -> ProviderState {
        ProviderState::Active {
            current: RoleCredentials {
                role: role.into(),
                credentials: Arc::new(Credentials::new(
                    key,
                    format!("secret-of-{key}"),
                    format!("token-of-{key}"),
                    expires,
                )),
            },
            last_error: None,
        }
    }

    struct Socket {
        state: watch::Sender<ProviderState>,
        clock: ManualTimeSource,
        metrics: Arc<Metrics>,
        path: PathBuf,
        stop: ShutdownTrigger,
        server: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    /// An HTTP answer: status, ETag, body.
    #[derive(Debug)]
    struct Got {
        status: u16,
        etag: Option<String>,
        body: String,
    }

    /// Consumers whose STS is never reached (a refusal asks nothing).
    fn consumers(text: &str) -> Consumers {
        Consumers::with_unreachable_sts(text)
    }

    impl Socket {
        fn start(state: ProviderState) -> Self {
            Self::start_with(state, None)
        }

        fn start_with(state: ProviderState, consumers: Option<Consumers>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let metrics = Arc::new(Metrics::default());
            let (state, receiver) = watch::channel(state);
            let (refresher, _requests) =
                crate::refresh::channel(crate::refresh::MIN_INTERVAL, metrics.clone());
            let (stop, shutdown) = Shutdown::new();
            let clock = ManualTimeSource::new(at(0));
            let socket = CredentialSocket {
                state: receiver,
                metrics: metrics.clone(),
                clock: SharedTimeSource::new(clock.clone()),
                policy: AccessPolicy::default(),
                limits: ServerLimits::default(),
                refresher,
                metrics_at: Vec::new(),
                consumers,
            };
            let server = tokio::spawn(serve(listener, socket, shutdown.wait_owned()));
            Self {
                state,
                clock,
                metrics,
                path,
                stop,
                server,
                _dir: dir,
            }
        }

        /// `GET path`, answered.
        async fn get(&self, path: &str) -> Got {
            get(self.path.clone(), path.to_owned()).await
        }

        /// `GET path` in a task of its own, once it is waiting in the server.
        async fn waiting(&self, path: &str) -> tokio::task::JoinHandle<Got> {
            let before = self.requests();
            let request = tokio::spawn(get(self.path.clone(), path.to_owned()));
            for _ in 0..100_000 {
                if self.requests() > before {
                    return request;
                }
                tokio::task::yield_now().await;
            }
            panic!("expected the server to receive GET {path}; it counted no new request");
        }

        /// `imds_agent_requests_total`.
        fn requests(&self) -> u64 {
            let rendered = self
                .metrics
                .render(&ProviderState::Starting, SystemTime::UNIX_EPOCH);
            rendered
                .lines()
                .find_map(|l| l.strip_prefix("imds_agent_requests_total ")?.parse().ok())
                .expect("imds_agent_requests_total in the metrics")
        }
    }

    async fn get(socket: PathBuf, path: String) -> Got {
        let answer = crate::socket_client::test_get(&socket, &path).await;
        Got {
            status: answer.status,
            etag: answer.header("etag").map(str::to_owned),
            body: answer.body,
        }
    }

    /// The tag without its quotes, as a query may carry it (`%22` works too).
    fn bare(tag: &str) -> &str {
        tag.trim_matches('"')
    }

    fn etag(got: &Got) -> String {
        got.etag
            .clone()
            .unwrap_or_else(|| panic!("expected an ETag in {got:?}"))
    }

    /// A peer may have 65,536 supplementary groups: a connection keeps
    /// only those the allow-list or a consumer names, so what it holds is
    /// bounded by the config, not by the peer.
    #[test]
    fn a_connection_keeps_only_the_groups_the_allow_list_or_a_consumer_names() {
        let policy = AccessPolicy {
            uids: vec![],
            gids: vec![4000],
        };
        let config = crate::broker::config::Config::parse(
            "[[consumer]]\nname = \"billing\"\ngids = [3000]\n",
            std::path::Path::new("/etc/imds-agent/agent.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let named = NamedGroups::new(&policy, Some(&config));
        let many: Vec<u32> = (0..65_536).collect();
        assert_eq!(&named.keep(&many)[..], &[3000, 4000]);
        assert!(
            NamedGroups::new(&AccessPolicy::default(), None)
                .keep(&many)
                .is_empty()
        );
    }

    /// A user the config refuses, looping on `GET /credentials`: each
    /// request is a 403, but the audit log gets one record per interval
    /// (and then how many were not written), not one per request.
    #[tokio::test(start_paused = true)]
    #[tracing_test::traced_test]
    async fn a_peer_the_config_refuses_is_audited_once_per_interval_not_per_request() {
        // This test runs as root: uid 0 is no consumer here.
        let socket = Socket::start_with(
            active("r", "ASIAFIRST", at(3600)),
            Some(consumers(
                "unmatched = \"deny\"\n[[consumer]]\nname = \"billing\"\nuids = [4242]\n",
            )),
        );
        let refused = |lines: &[&str]| {
            lines
                .iter()
                .filter(|l| l.contains("imds_agent::audit") && l.contains("credentials refused"))
                .count()
        };
        let started = tokio::time::Instant::now();
        for _ in 0..50 {
            let got = socket.get("/credentials").await;
            assert_eq!(got.status, 403, "{got:?}");
        }
        assert!(
            started.elapsed() < REFUSAL_SUMMARY_INTERVAL,
            "the 50 requests took {:?} of tokio time",
            started.elapsed()
        );
        logs_assert(|lines| match refused(lines) {
            1 => Ok(()),
            n => Err(format!(
                "expected one audit record for 50 refusals within {REFUSAL_SUMMARY_INTERVAL:?}, saw {n}"
            )),
        });
        tokio::time::advance(REFUSAL_SUMMARY_INTERVAL).await;
        assert_eq!(socket.get("/credentials").await.status, 403);
        logs_assert(|lines| match refused(lines) {
            2 => Ok(()),
            n => Err(format!(
                "expected a second full record after the interval, saw {n}"
            )),
        });
        assert!(
            logs_contain("49 more refusals of uid 0 for this reason were counted"),
            "expected the record of the 49 refusals not written one by one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_answer_has_an_etag_and_since_alone_is_a_conditional_get() {
        let socket = Socket::start(active("r", "ASIAFIRST", at(3600)));
        let first = socket.get("/credentials").await;
        assert_eq!(first.status, 200, "{first:?}");
        let tag = etag(&first);
        assert!(!tag.contains("ASIA"), "{tag}");
        assert_eq!(
            etag(&socket.get("/credentials").await),
            tag,
            "same state, same tag"
        );

        let unchanged = socket
            .get(&format!("/credentials?since={}", bare(&tag)))
            .await;
        assert_eq!(
            (
                unchanged.status,
                unchanged.etag.as_deref(),
                unchanged.body.as_str()
            ),
            (304, Some(tag.as_str()), "")
        );

        socket
            .state
            .send_replace(active("r", "ASIASECOND", at(7200)));
        let changed = socket
            .get(&format!("/credentials?since={}", bare(&tag)))
            .await;
        assert_eq!(changed.status, 200, "{changed:?}");
        assert!(changed.body.contains("ASIASECOND"), "{changed:?}");
        assert_ne!(etag(&changed), tag);

        socket.state.send_replace(ProviderState::NoRole);
        let detached = socket.get("/credentials").await;
        assert_eq!(detached.status, 404, "{detached:?}");
        assert_ne!(etag(&detached), etag(&changed));
    }

    /// A 304 carries the `ETag` and nothing of a body: no content headers
    /// (a client must not take it for an empty credentials document).
    #[tokio::test(start_paused = true)]
    async fn a_304_has_the_tag_and_no_body_or_content_headers() {
        let socket = Socket::start(active("r", "ASIAFIRST", at(3600)));
        let tag = etag(&socket.get("/credentials").await);
        let answer = crate::socket_client::test_get(
            &socket.path,
            &format!("/credentials?since={}", bare(&tag)),
        )
        .await;
        let head = &answer.head;
        assert!(head.starts_with("HTTP/1.1 304 "), "{answer:?}");
        assert!(
            head.lines().any(|l| l == format!("etag: {tag}")),
            "{answer:?}"
        );
        let lower = head.to_ascii_lowercase();
        assert!(
            !lower.contains("content-type:"),
            "expected no content type on a 304: {answer:?}"
        );
        assert!(
            !lower.contains("content-length:") || lower.contains("content-length: 0"),
            "expected no content length (or 0) on a 304: {answer:?}"
        );
        assert_eq!(answer.body, "", "expected no body on a 304: {answer:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_or_malformed_since_is_answered_at_once() {
        let socket = Socket::start(active("r", "ASIAFIRST", at(3600)));
        let old = etag(&socket.get("/credentials").await);
        socket
            .state
            .send_replace(active("r", "ASIASECOND", at(7200)));
        let quoted = format!("%22{}%22", bare(&old));
        for since in [bare(&old), &quoted, "not-a-tag", "%22%22", ""] {
            let got = socket
                .get(&format!("/credentials?wait=300&since={since}"))
                .await;
            // Held until the wait ended, it would be a 304.
            assert_eq!(got.status, 200, "since={since}: {got:?}");
            assert!(got.body.contains("ASIASECOND"), "since={since}: {got:?}");
        }
        let got = socket.get("/credentials?wait=300").await;
        assert_eq!(got.status, 200, "wait without since: {got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn bad_parameters_are_refused_with_400_naming_them() {
        let socket = Socket::start(active("r", "ASIAFIRST", at(3600)));
        for (query, names) in [
            ("wait=0&since=x", "wait"),
            ("wait=abc&since=x", "wait"),
            ("wait=100000&since=x", "wait"),
            ("wait=-5", "wait"),
            ("wiat=60", "wiat"),
            ("wait=5&wait=5", "wait"),
        ] {
            let got = socket.get(&format!("/credentials?{query}")).await;
            assert_eq!(got.status, 400, "{query}: {got:?}");
            assert!(got.body.contains(names), "{query}: {got:?}");
        }
        let got = socket.get("/credentials?wait=0").await;
        assert!(got.body.contains("from 1 to 300"), "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_poll_is_woken_by_each_change_of_what_is_served() {
        let error = || Error::new(ErrorKind::ServerError { status: 503 });
        let changes = [
            (
                "rotation",
                active("r", "ASIASECOND", at(7200)),
                200,
                "ASIASECOND",
            ),
            (
                "replacement",
                active("other", "ASIAOTHER", at(600)),
                200,
                "ASIAOTHER",
            ),
            ("detach", ProviderState::NoRole, 404, "no IAM role"),
            (
                "outage with nothing valid",
                ProviderState::Unavailable {
                    error: error(),
                    stale: None,
                },
                503,
                "IMDS is unavailable",
            ),
            (
                "recovery",
                active("r", "ASIATHIRD", at(9000)),
                200,
                "ASIATHIRD",
            ),
        ];
        let socket = Socket::start(active("r", "ASIAFIRST", at(3600)));
        let mut tag = etag(&socket.get("/credentials").await);
        for (what, state, status, shows) in changes {
            let started = tokio::time::Instant::now();
            let poll = socket
                .waiting(&format!("/credentials?wait=300&since={}", bare(&tag)))
                .await;
            socket.state.send_replace(state);
            let got = poll.await.unwrap();
            assert_eq!(got.status, status, "{what}: {got:?}");
            assert!(got.body.contains(shows), "{what}: {got:?}");
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "{what}: answered only after the wait"
            );
            let new = etag(&got);
            assert_ne!(new, tag, "{what}");
            tag = new;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_poll_ends_with_304_and_the_same_tag_when_nothing_served_changed() {
        let socket = Socket::start(active("r", "ASIAFIRST", at(3600)));
        let tag = etag(&socket.get("/credentials").await);
        let started = tokio::time::Instant::now();
        let poll = socket
            .waiting(&format!("/credentials?wait=120&since={}", bare(&tag)))
            .await;
        // A new provider state that serves the same keys (a failing
        // refresh) is no change for the client.
        let ProviderState::Active { current, .. } = socket.state.borrow().clone() else {
            unreachable!()
        };
        socket.state.send_replace(ProviderState::Active {
            current,
            last_error: Some(Error::new(ErrorKind::ServerError { status: 500 })),
        });
        let got = poll.await.unwrap();
        assert_eq!(
            (got.status, got.etag.as_deref(), got.body.as_str()),
            (304, Some(tag.as_str()), ""),
        );
        let waited = started.elapsed();
        assert!(
            (Duration::from_secs(120)..Duration::from_secs(121)).contains(&waited),
            "expected the 304 after the 120 s wait, got it after {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_poll_outlives_the_connection_lifetime_but_not_its_wait() {
        let socket = Socket::start(active("r", "ASIAFIRST", at(3600)));
        let lifetime = ServerLimits::default().connection_lifetime;
        let tag = etag(&socket.get("/credentials").await);
        let started = tokio::time::Instant::now();
        let got = socket
            .get(&format!("/credentials?wait=300&since={}", bare(&tag)))
            .await;
        assert_eq!(got.status, 304, "{got:?}");
        assert!(
            started.elapsed() >= Duration::from_secs(300) && lifetime < Duration::from_secs(300),
            "answered after {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn credentials_expiring_during_a_long_poll_wake_it() {
        let socket = Socket::start(active("r", "ASIAFIRST", at(60)));
        let tag = etag(&socket.get("/credentials").await);
        let started = tokio::time::Instant::now();
        let poll = socket
            .waiting(&format!("/credentials?wait=300&since={}", bare(&tag)))
            .await;
        // No new provider state: IMDS is silent. The wall clock passes the
        // expiry; the re-check due then (60 s of tokio time) finds nothing
        // valid to serve.
        socket.clock.set(at(61));
        let got = poll.await.unwrap();
        assert_eq!(got.status, 503, "{got:?}");
        assert_ne!(etag(&got), tag);
        let waited = started.elapsed();
        assert!(
            (Duration::from_secs(60)..Duration::from_secs(61)).contains(&waited),
            "expected the answer at the expiry, 60 s in; got it after {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_answers_waiting_long_polls_at_once() {
        let socket = Socket::start(active("r", "ASIAFIRST", at(3600)));
        let tag = etag(&socket.get("/credentials").await);
        let started = tokio::time::Instant::now();
        let polls = [
            socket
                .waiting(&format!("/credentials?wait=300&since={}", bare(&tag)))
                .await,
            socket
                .waiting(&format!("/credentials?wait=300&since={}", bare(&tag)))
                .await,
        ];
        socket.stop.trigger();
        for poll in polls {
            let got = poll.await.unwrap();
            assert_eq!(got.status, 503, "{got:?}");
            assert!(got.body.contains("stopping"), "{got:?}");
        }
        socket.server.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the server stopped only after {:?}",
            started.elapsed()
        );
    }
}
