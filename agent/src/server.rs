//! HTTP/1.1 over the credential socket: `GET /credentials`, `POST /refresh`
//! (see [`crate::refresh`]) and `GET /healthz`. With a config file
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
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use imds_client::{ProviderState, RoleCredentials, SharedTimeSource};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::broker::config::Match;
use crate::broker::handout::{self, Consumers, PeerId};
use crate::format::credential_process_json;
pub use crate::http_listener::ServerLimits;
use crate::http_listener::{Admission, Peer, Refusal, Refusals, serve_limited};
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

/// `GET /credentials`. With a config file, the peer's consumer's session
/// (or 403 for a peer no consumer claims, unless `unmatched =
/// "instance-role"`), each answer audited ([`handout`]); without one, the
/// instance role's credentials.
async fn credentials(State(app): State<App>, peer: Option<Extension<PeerId>>) -> Response {
    app.metrics.request();
    let state = app.state.borrow().clone();
    if let (Some(consumers), Some(Extension(peer))) = (&app.consumers, peer) {
        return for_consumer(consumers, &peer, &state, &app.clock).await;
    }
    instance_role(&state, &app.clock)
}

/// The instance role's credentials, as without a config file.
fn instance_role(state: &ProviderState, clock: &SharedTimeSource) -> Response {
    match state {
        ProviderState::Active { current, .. } => served(current, clock),
        ProviderState::NoRole => no_role(),
        ProviderState::Starting => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "credentials are not loaded yet",
        ),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no valid credentials: IMDS is unavailable",
        ),
    }
}

/// What a peer gets with a config file, audited.
async fn for_consumer(
    consumers: &Consumers,
    peer: &PeerId,
    state: &ProviderState,
    clock: &SharedTimeSource,
) -> Response {
    const OUTPUT: &str = "socket";
    match consumers.answer(peer, state).await {
        handout::Answer::Consumer {
            name,
            result: Ok(session),
        } => {
            handout::audit(&name, OUTPUT, peer, Some(&session), "served", None);
            json(StatusCode::OK, credential_process_json(&session))
        }
        handout::Answer::Consumer {
            name,
            result: Err(e),
        } => {
            let message = e.to_string();
            handout::audit(&name, OUTPUT, peer, None, "error", Some(&message));
            let status = match e {
                crate::broker::cache::BrokerError::NoInstanceRole => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(status, &message)
        }
        handout::Answer::InstanceRole => {
            let response = instance_role(state, clock);
            match (response.status(), state.current()) {
                (StatusCode::OK, Some(current)) => handout::audit(
                    "(instance-role)",
                    OUTPUT,
                    peer,
                    Some(current),
                    "served",
                    None,
                ),
                (status, _) => handout::audit(
                    "(instance-role)",
                    OUTPUT,
                    peer,
                    None,
                    "error",
                    Some(status.as_str()),
                ),
            }
            response
        }
        handout::Answer::Denied(reason) => {
            handout::audit("", OUTPUT, peer, None, "denied", Some(&reason));
            error(StatusCode::FORBIDDEN, &reason)
        }
    }
}

/// 200 with the `credential_process` JSON while `current` is valid.
fn served(current: &RoleCredentials, clock: &SharedTimeSource) -> Response {
    if current.credentials.expiration() > clock.now() {
        json(StatusCode::OK, credential_process_json(current))
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no valid credentials: IMDS is unavailable",
        )
    }
}

fn no_role() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no IAM role is attached to this instance",
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
            if let Match::Denied | Match::Ambiguous(_) =
                consumers
                    .config
                    .consumer_for(peer.uid, peer.gid, &peer.groups)
            {
                return for_consumer(consumers, &peer, &state, &app.clock).await;
            }
            Some((consumers, peer))
        }
        _ => None,
    };
    match app.refresher.refresh().await {
        Answer::Done(Ok(_)) if consumer.is_some() => {
            let (consumers, peer) = consumer.expect("checked");
            let state = app.state.borrow().clone();
            for_consumer(consumers, &peer, &state, &app.clock).await
        }
        Answer::Done(Ok(current)) => served(&current, &app.clock),
        Answer::Done(Err(failure)) if failure.no_role => no_role(),
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
    let app = router(App {
        state,
        metrics: metrics.clone(),
        clock,
        refresher,
        metrics_at: metrics_at.into(),
        consumers,
    });
    let refusals = Arc::new(Refusals::new("socket", metrics));
    let admit = |stream: &UnixStream| match stream.peer_cred() {
        Ok(cred) => {
            let peer = Peer {
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
                pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
                addr: None,
            };
            let groups = crate::peer_groups::read_or_none(stream).unwrap_or_default();
            if policy.allows(cred.uid(), cred.gid(), &groups) {
                let id = PeerId {
                    uid: cred.uid(),
                    gid: cred.gid(),
                    groups: groups.into(),
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
