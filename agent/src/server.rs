//! HTTP/1.1 over the Unix socket: `/credentials`, `/healthz`, `/metrics`.
//!
//! Access is decided per connection: the socket file's mode and group first
//! (the kernel, at `connect`, with every group of the peer), then an
//! allow-list of peer uids and primary gids read with `SO_PEERCRED` when the
//! connection is accepted. A refused peer gets a fixed 403, written without
//! waiting, and its connection is shut at once: it never holds a connection
//! slot, and the agent never waits for its request head. Its first refusal is logged with its uid, gid and
//! pid, further ones are summarised (see `limits`). Connections are
//! bounded in number (in all, and per uid), header size, header read time and
//! lifetime, so one misbehaving user cannot starve the others.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use imds_client::{ProviderState, SharedTimeSource};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::format::credential_process_json;
pub use crate::limits::ServerLimits;
use crate::limits::{Admission, Peer, Refusal, Refusals, serve_limited};
use crate::metrics::Metrics;

/// Who may use the socket beyond what its file mode allows.
///
/// Matched against the peer's credentials as `SO_PEERCRED` gives them,
/// fixed by the kernel when the peer connected: its effective uid and its
/// **primary** (effective) gid. Supplementary groups are not matched: the
/// kernel does not hand them over with the connection (`SO_PEERGROUPS` is
/// not reachable without `unsafe` code), and reading them later from
/// `/proc/PID/status` would trust a pid that may by then belong to another
/// process (an attacker connects, passes the socket on and exits; its pid is
/// reused by a process of an allowed group), besides being hidden from the
/// agent by the unit's `ProtectProc=invisible`. To admit a group's members
/// by any of their groups, give the socket that group (`--socket-group`,
/// `--socket-mode 0660`): the kernel checks every group at `connect`.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Allowed peer uids. Empty lists on both sides: anyone who can open the socket.
    pub uids: Vec<u32>,
    /// Allowed peer primary gids (see the type's docs).
    pub gids: Vec<u32>,
}

impl AccessPolicy {
    /// Whether a peer with effective `uid` and primary `gid` may use the socket.
    fn allows(&self, uid: u32, gid: u32) -> bool {
        (self.uids.is_empty() && self.gids.is_empty())
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
    }
}

#[derive(Clone)]
struct App {
    state: watch::Receiver<ProviderState>,
    metrics: Arc<Metrics>,
    clock: SharedTimeSource,
}

fn router(app: App) -> Router {
    Router::new()
        .route("/credentials", get(credentials))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(app)
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, serde_json::json!({ "error": message }).to_string())
}

async fn credentials(State(app): State<App>) -> Response {
    app.metrics.request();
    let state = app.state.borrow().clone();
    match &state {
        ProviderState::Active { current, .. }
            if current.credentials.expiration() > app.clock.now() =>
        {
            json(StatusCode::OK, credential_process_json(current))
        }
        ProviderState::NoRole => error(
            StatusCode::NOT_FOUND,
            "no IAM role is attached to this instance",
        ),
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

async fn healthz(State(app): State<App>) -> Response {
    app.metrics.request();
    let state = app.state.borrow().clone();
    let now = app.clock.now();
    let (status, body) = match &state {
        ProviderState::Active {
            current,
            last_error,
        } => match current.credentials.expiration().duration_since(now) {
            Ok(left) => (
                StatusCode::OK,
                serde_json::json!({
                    "status": if last_error.is_some() { "degraded" } else { "ok" },
                    "role": current.role,
                    "expires_in_seconds": left.as_secs(),
                    "last_error": last_error.as_ref().map(|e| e.to_string()),
                }),
            ),
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "expired", "role": current.role}),
            ),
        },
        ProviderState::NoRole => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "no-role"}),
        ),
        ProviderState::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "starting"}),
        ),
        ProviderState::Unavailable { error, .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unavailable", "error": error.to_string()}),
        ),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unknown"}),
        ),
    };
    json(status, body.to_string())
}

async fn metrics(State(app): State<App>) -> Response {
    app.metrics.request();
    let state = app.state.borrow().clone();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(&state, app.clock.now()),
    )
        .into_response()
}

/// Serves the socket until `shutdown` resolves, then lets open connections
/// finish (bounded by their lifetime) and returns.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: UnixListener,
    state: watch::Receiver<ProviderState>,
    metrics: Arc<Metrics>,
    clock: SharedTimeSource,
    policy: AccessPolicy,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let app = router(App {
        state,
        metrics: metrics.clone(),
        clock,
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
            if policy.allows(cred.uid(), cred.gid()) {
                Admission::Serve(peer, app.clone())
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
