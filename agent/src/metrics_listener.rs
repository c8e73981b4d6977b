//! The metrics listener: `GET /metrics` and `GET /healthz`, apart from
//! credentials.
//!
//! Whoever may use the credential socket gets the instance's credentials,
//! so monitoring must not need it: a Prometheus scraper or a health probe
//! should read counters without being able to read keys. As the ECS agent
//! and the EKS Pod Identity agent do, the agent serves its metrics and its
//! health on their own listeners, which serve nothing else:
//!
//! - `--metrics-socket PATH`, a Unix socket born closed like the credential
//!   socket ([`crate::socket_file::bind`]: bound in a private directory, given
//!   its mode and group, renamed into place), mode 0600 by default, 0660 when
//!   `--metrics-socket-group` hands it to a monitoring group. The kernel
//!   decides who may connect; nobody it lets in is refused.
//! - `--metrics-listen 127.0.0.1:PORT`, loopback TCP for scrapers that cannot
//!   read a Unix socket. Any local user can read it; it holds no secret.
//!
//! Both are bounded like the other listeners (see `http_listener`: per-peer and
//! global connection caps, header size and time, connection lifetime), so a
//! flood of scrapes cannot starve the credential socket's clients.
//!
//! `/healthz` is served on the credential socket too: a client that gets
//! 503 for `/credentials` may ask why. Its JSON is built by [`health`].

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use imds_client::{ProviderState, SharedTimeSource};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;

use crate::http_listener::{Admission, Peer, Refusals, ServerLimits, serve_limited, sock_diag};
use crate::metrics::Metrics;

/// What the metrics listener reads.
#[derive(Debug, Clone)]
pub struct Probes {
    /// The provider's state.
    pub state: watch::Receiver<ProviderState>,
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// The wall clock (for seconds until expiry).
    pub clock: SharedTimeSource,
    /// With a config file: the consumers, reported by name (never keys).
    pub consumers: Option<crate::broker::handout::Consumers>,
}

fn router(probes: Probes) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(probes)
}

async fn metrics(State(probes): State<Probes>) -> Response {
    let state = probes.state.borrow().clone();
    let now = probes.clock.now();
    let mut text = probes.metrics.render(&state, now);
    if let Some(consumers) = &probes.consumers {
        text.push_str(&consumers.render_metrics(now));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn healthz(State(probes): State<Probes>) -> Response {
    let state = probes.state.borrow().clone();
    let now = probes.clock.now();
    let (status, mut body) = health(&state, &probes.metrics, now);
    if let Some(consumers) = &probes.consumers {
        body["consumers"] = consumers.health(now);
    }
    json(status, body.to_string())
}

async fn not_found() -> Response {
    json(
        StatusCode::NOT_FOUND,
        serde_json::json!({
            "error": "the metrics listener serves GET /metrics and GET /healthz only; credentials are on the credential socket (--socket)"
        })
        .to_string(),
    )
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The agent's health, as `/healthz` answers it (on the metrics listener
/// and on the credential socket): 200 while valid credentials are served,
/// `"status": "degraded"` when IMDS is failing or an output is stuck or
/// failing; 503 with the reason when no valid credentials are served. The
/// outputs' counts are always shown: `"outputs": {"stuck": n, "failing": m}`.
pub fn health(
    state: &ProviderState,
    metrics: &Metrics,
    now: std::time::SystemTime,
) -> (StatusCode, serde_json::Value) {
    let (stuck, failing) = (metrics.outputs_stuck(), metrics.outputs_failing());
    let outputs = serde_json::json!({ "stuck": stuck, "failing": failing });
    let (status, mut body) = match state {
        ProviderState::Active {
            current,
            last_error,
        } => match current.credentials.expiration().duration_since(now) {
            Ok(left) => {
                let degraded = last_error.is_some() || stuck > 0 || failing > 0;
                (
                    StatusCode::OK,
                    serde_json::json!({
                        "status": if degraded { "degraded" } else { "ok" },
                        "role": current.role,
                        "expires_in_seconds": left.as_secs(),
                        "last_error": last_error.as_ref().map(|e| e.to_string()),
                    }),
                )
            }
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
    body["outputs"] = outputs;
    (status, body)
}

/// Serves the metrics socket until `shutdown`. Anyone the socket's mode and
/// group let connect is served.
pub async fn serve_unix(
    listener: UnixListener,
    probes: Probes,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let refusals = Arc::new(Refusals::new("metrics", probes.metrics.clone()));
    let app = router(probes);
    let admit = |stream: &UnixStream| {
        let peer = match stream.peer_cred() {
            Ok(cred) => Peer {
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
                pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
                addr: None,
            },
            Err(_) => Peer::default(),
        };
        Admission::Serve(peer, app.clone())
    };
    serve_limited(listener, ServerLimits::default(), refusals, admit, shutdown).await;
}

/// Serves `--metrics-listen` (a loopback address) until `shutdown`.
pub async fn serve_tcp(
    listener: TcpListener,
    probes: Probes,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let refusals = Arc::new(Refusals::new("metrics", probes.metrics.clone()));
    let app = router(probes);
    let admit = |stream: &TcpStream| {
        let peer = match (stream.peer_addr(), stream.local_addr()) {
            (Ok(remote), Ok(local)) => Peer {
                uid: sock_diag::tcp_peer_uid(remote, local),
                addr: Some(remote.ip()),
                ..Peer::default()
            },
            _ => Peer::default(),
        };
        Admission::Serve(peer, app.clone())
    };
    serve_limited(listener, ServerLimits::default(), refusals, admit, shutdown).await;
}

/// Refuses a `--metrics-listen` address that is not loopback: the metrics
/// name the role and count refusals by reason, which is nobody's business
/// off this host.
pub fn check_loopback(addr: &std::net::SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "{addr} is not a loopback address: the metrics listener serves this host only. \
             Use 127.0.0.1:PORT or [::1]:PORT (a scraper on another host can reach it through \
             a local exporter or an SSH tunnel), or --metrics-socket PATH"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imds_client::{Credentials, RoleCredentials};
    use std::time::{Duration, SystemTime};

    #[test]
    fn health_is_degraded_while_an_output_is_stuck_or_failing() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let state = ProviderState::Active {
            current: RoleCredentials {
                role: "r".into(),
                credentials: Arc::new(Credentials::new(
                    "ASIAKEY",
                    "secret",
                    "token",
                    now + Duration::from_secs(3_600),
                )),
            },
            last_error: None,
        };
        let metrics = Metrics::default();
        let status = |metrics: &Metrics| {
            let (code, body) = health(&state, metrics, now);
            (
                code,
                body["status"].as_str().unwrap().to_owned(),
                body["outputs"].to_string(),
            )
        };
        assert_eq!(
            status(&metrics),
            (
                StatusCode::OK,
                "ok".into(),
                r#"{"failing":0,"stuck":0}"#.into()
            )
        );
        metrics.output_failing(true);
        assert_eq!(
            status(&metrics),
            (
                StatusCode::OK,
                "degraded".into(),
                r#"{"failing":1,"stuck":0}"#.into()
            )
        );
        metrics.output_failing(false);
        metrics.output_stuck(true);
        assert_eq!(
            status(&metrics),
            (
                StatusCode::OK,
                "degraded".into(),
                r#"{"failing":0,"stuck":1}"#.into()
            )
        );
        let (code, body) = health(&ProviderState::NoRole, &metrics, now);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["outputs"]["stuck"], 1, "{body}");
    }

    #[test]
    fn only_loopback_addresses_are_accepted() {
        for ok in ["127.0.0.1:9464", "[::1]:9464", "127.0.0.2:0"] {
            assert_eq!(check_loopback(&ok.parse().unwrap()), Ok(()), "{ok}");
        }
        for bad in [
            "0.0.0.0:9464",
            "10.0.0.1:9464",
            "[::]:9464",
            "169.254.170.23:80",
        ] {
            let err = check_loopback(&bad.parse().unwrap()).unwrap_err();
            assert!(err.contains("not a loopback address"), "{bad}: {err}");
        }
    }
}
