//! HTTP/1.1 over the Unix socket: `/credentials`, `/healthz`, `/metrics`.
//!
//! Access is decided per connection: the socket file's mode and group first
//! (the kernel), then an allow-list of peer uids and gids read with
//! `SO_PEERCRED`. A refused peer gets 403 to every request and an audit log
//! line with its uid and pid. Connections are bounded in number, header size,
//! header read time and lifetime, so one misbehaving client cannot starve the
//! others.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Extension, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use imds_client::{ProviderState, SharedTimeSource};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::format::credential_process_json;
pub use crate::limits::ServerLimits;
use crate::limits::serve_limited;
use crate::metrics::Metrics;

/// Who may use the socket beyond what its file mode allows.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Allowed peer uids. Empty lists on both sides: anyone who can open the socket.
    pub uids: Vec<u32>,
    /// Allowed peer gids.
    pub gids: Vec<u32>,
}

impl AccessPolicy {
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

#[derive(Clone, Copy)]
struct Peer {
    allowed: bool,
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

async fn credentials(State(app): State<App>, Extension(peer): Extension<Peer>) -> Response {
    app.metrics.request();
    if !peer.allowed {
        return error(
            StatusCode::FORBIDDEN,
            "this user may not read the credentials",
        );
    }
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

async fn healthz(State(app): State<App>, Extension(peer): Extension<Peer>) -> Response {
    app.metrics.request();
    if !peer.allowed {
        return error(StatusCode::FORBIDDEN, "this user may not use this socket");
    }
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

async fn metrics(State(app): State<App>, Extension(peer): Extension<Peer>) -> Response {
    app.metrics.request();
    if !peer.allowed {
        return error(StatusCode::FORBIDDEN, "this user may not use this socket");
    }
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
    let service_for = |stream: &UnixStream| {
        let allowed = match stream.peer_cred() {
            Ok(cred) => {
                let allowed = policy.allows(cred.uid(), cred.gid());
                if !allowed {
                    metrics.denied();
                    tracing::warn!(
                        peer_uid = cred.uid(),
                        peer_gid = cred.gid(),
                        peer_pid = cred.pid(),
                        "refused a socket client that is not on the allow-list"
                    );
                }
                allowed
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the peer's credentials; refusing");
                false
            }
        };
        app.clone().layer(Extension(Peer { allowed }))
    };
    serve_limited(listener, limits, service_for, shutdown).await;
}
