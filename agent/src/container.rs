//! The container-credentials endpoint: the protocol every AWS SDK reads
//! through `AWS_CONTAINER_CREDENTIALS_FULL_URI` plus
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN` or `..._TOKEN_FILE`.
//!
//! Loopback only. Every request must carry the token as the raw
//! `Authorization` value (compared in constant time). Requests that look like
//! a browser or a DNS-rebinding attempt (a `Host` that is not the loopback
//! address and port we listen on, or any `Origin`, `Referer` or
//! `X-Forwarded-For`) are refused before the token is even looked at.
//!
//! Any local process can reach a loopback port, so floods are expected.
//! A request refused for its token or headers is answered at once with
//! `Connection: close`, so it holds a connection slot only while it is
//! answered. Connections are capped in all and per peer (see
//! `limits`); since every local process comes from `127.0.0.1`, a
//! loopback peer is the uid that owns its socket, asked of the kernel at
//! accept (`limits::sock_diag`), so one user cannot take the slots
//! of all the others. Refusals are counted in `/metrics` and logged
//! sparingly.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::bail;
use axum::Router;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use imds_client::{ProviderState, SecretString, SharedTimeSource};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::format::container_credentials_json;
use crate::limits::{Admission, Peer, Refusal, Refusals, ServerLimits, sock_diag};
use crate::metrics::Metrics;

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
    refusals: Arc<Refusals>,
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": message }).to_string(),
    )
        .into_response()
}

/// A refusal of the request's token or headers: counted, logged sparingly,
/// and answered with `Connection: close`, so the connection ends with it.
fn refuse_and_close(
    app: &App,
    peer: &Peer,
    why: Refusal,
    status: StatusCode,
    message: &str,
) -> Response {
    app.refusals.refuse(peer, why);
    let mut response = refuse(status, message);
    response.headers_mut().insert(
        header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
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

async fn credentials(
    State(app): State<App>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    if let Some(why) = looks_forged(&headers, &app.local) {
        return refuse_and_close(&app, &peer, Refusal::Forged, StatusCode::FORBIDDEN, why);
    }
    let Some(given) = headers.get(header::AUTHORIZATION) else {
        return refuse_and_close(
            &app,
            &peer,
            Refusal::NoToken,
            StatusCode::UNAUTHORIZED,
            "the Authorization token is missing",
        );
    };
    if !bool::from(given.as_bytes().ct_eq(app.token.expose().as_bytes())) {
        return refuse_and_close(
            &app,
            &peer,
            Refusal::WrongToken,
            StatusCode::FORBIDDEN,
            "the Authorization token is wrong",
        );
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
/// Refusals are counted in a [`Metrics`] of its own; use
/// [`serve_with_metrics`] to count them in the agent's `/metrics`.
pub async fn serve(
    listener: TcpListener,
    token: SecretString,
    state: watch::Receiver<ProviderState>,
    clock: SharedTimeSource,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    serve_with_metrics(listener, token, state, clock, metrics, shutdown).await
}

/// [`serve`], counting refusals (`imds_agent_refused_connections_total`
/// with `endpoint="container"`) in `metrics`.
pub async fn serve_with_metrics(
    listener: TcpListener,
    token: SecretString,
    state: watch::Receiver<ProviderState>,
    clock: SharedTimeSource,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    let refusals = Arc::new(Refusals::new("container", metrics));
    let app = Router::new()
        .route("/credentials", get(credentials))
        .with_state(App {
            token,
            local,
            state,
            clock,
            refusals: refusals.clone(),
        });
    let admit = |stream: &TcpStream| {
        let peer = peer_of(stream);
        Admission::Serve(peer, app.clone().layer(Extension(peer)))
    };
    crate::limits::serve_limited(listener, ServerLimits::default(), refusals, admit, shutdown)
        .await;
    Ok(())
}

/// Who is at the other end of `stream`: the uid owning a loopback peer's
/// socket (every local process comes from the same loopback address), and
/// its address.
fn peer_of(stream: &TcpStream) -> Peer {
    let (Ok(remote), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
        return Peer::default();
    };
    let uid = remote
        .ip()
        .is_loopback()
        .then(|| sock_diag::tcp_peer_uid(remote, local))
        .flatten();
    Peer {
        uid,
        addr: Some(remote.ip()),
        ..Peer::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_request_without_a_token_is_answered_closed_and_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let (_state_tx, state) = watch::channel(ProviderState::Starting);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with_metrics(
            listener,
            SecretString::new("t".repeat(64)),
            state,
            SharedTimeSource::default(),
            metrics.clone(),
            async {
                let _ = stop_rx.await;
            },
        ));

        // Keep-alive by default: only the agent's `Connection: close` ends it.
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET /credentials HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
            .await
            .expect("the agent closes the connection")
            .unwrap();
        let raw = String::from_utf8_lossy(&raw).to_lowercase();
        assert!(
            raw.starts_with("http/1.1 401") && raw.contains("\r\nconnection: close\r\n"),
            "expected 401 with Connection: close, got {raw}"
        );

        let rendered = metrics.render(&ProviderState::Starting, std::time::SystemTime::UNIX_EPOCH);
        let series =
            "imds_agent_refused_connections_total{endpoint=\"container\",reason=\"no_token\"} 1";
        assert!(
            rendered.contains(series),
            "expected {series} in:\n{rendered}"
        );
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }
}
