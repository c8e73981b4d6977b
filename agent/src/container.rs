//! The container-credentials endpoint: the protocol every AWS SDK reads
//! through `AWS_CONTAINER_CREDENTIALS_FULL_URI` plus
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN` or `..._TOKEN_FILE`.
//!
//! Loopback only. Every request must carry the token as the raw
//! `Authorization` value (compared in constant time). Requests that look like
//! a browser or a DNS-rebinding attempt (a `Host` that is not the loopback
//! address and port we listen on, or any `Origin`, `Referer` or
//! `X-Forwarded-For`) are refused before the token is even looked at.

use std::net::SocketAddr;

use anyhow::bail;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use imds_client::{ProviderState, SecretString, SharedTimeSource};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::format::container_credentials_json;

/// Refuses anything but a loopback address.
pub fn check_loopback(addr: &SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("--container-endpoint must be a loopback address such as 127.0.0.1:8901, not {addr}");
    }
    Ok(())
}

#[derive(Clone)]
struct App {
    token: SecretString,
    local: SocketAddr,
    state: watch::Receiver<ProviderState>,
    clock: SharedTimeSource,
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": message }).to_string(),
    )
        .into_response()
}

/// Why a request is refused before its token is checked, if it is.
fn looks_forged(headers: &HeaderMap, local: &SocketAddr) -> Option<&'static str> {
    for name in ["origin", "referer", "x-forwarded-for"] {
        if headers.contains_key(name) {
            return Some("requests from browsers or proxies are refused");
        }
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok())?;
    let port = local.port();
    let allowed = [
        format!("{}:{port}", local.ip()),
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ];
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        None
    } else {
        Some("the Host header must name this loopback endpoint")
    }
}

async fn credentials(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(why) = looks_forged(&headers, &app.local) {
        tracing::warn!(reason = why, "refused a container-credentials request");
        return refuse(StatusCode::FORBIDDEN, why);
    }
    let Some(given) = headers.get(header::AUTHORIZATION) else {
        tracing::warn!("refused a container-credentials request without a token");
        return refuse(
            StatusCode::UNAUTHORIZED,
            "the Authorization token is missing",
        );
    };
    if !bool::from(given.as_bytes().ct_eq(app.token.expose().as_bytes())) {
        tracing::warn!("refused a container-credentials request with a wrong token");
        return refuse(StatusCode::FORBIDDEN, "the Authorization token is wrong");
    }
    let state = app.state.borrow().clone();
    match &state {
        ProviderState::Active { current, .. }
            if current.credentials.expiration() > app.clock.now() =>
        {
            (
                [(header::CONTENT_TYPE, "application/json")],
                container_credentials_json(current),
            )
                .into_response()
        }
        ProviderState::NoRole => refuse(
            StatusCode::NOT_FOUND,
            "no IAM role is attached to this instance",
        ),
        _ => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "no valid credentials right now",
        ),
    }
}

/// Serves the endpoint until `shutdown` resolves, with the same connection
/// limits as the Unix socket: any local process (or container) can reach a
/// loopback port, so idle or flooding clients must not exhaust the agent.
pub async fn serve(
    listener: TcpListener,
    token: SecretString,
    state: watch::Receiver<ProviderState>,
    clock: SharedTimeSource,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/credentials", get(credentials))
        .with_state(App {
            token,
            local,
            state,
            clock,
        });
    crate::limits::serve_limited(
        listener,
        crate::server::ServerLimits::default(),
        |_| app.clone(),
        shutdown,
    )
    .await;
    Ok(())
}
