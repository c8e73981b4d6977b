//! The container-credentials endpoint: the protocol every AWS SDK reads
//! through `AWS_CONTAINER_CREDENTIALS_FULL_URI` plus
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN` or `..._TOKEN_FILE`.
//!
//! On loopback, or on the container link's address (169.254.170.23 or
//! fd00:ec2::23, the link-local hosts every AWS SDK accepts in
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI`, as the EKS Pod Identity agent
//! serves them), where containers on a local bridge reach it; there a peer
//! that is neither a local process nor behind a local bridge is refused at
//! accept (see `origin`). It listens where `--container-endpoint` says, or
//! on the sockets systemd passes (`imds-agent-container.socket`, see
//! [`crate::run::Activated`]): systemd binds port 80 of the link, so the
//! agent needs no capability, and one agent serves the IPv4 and the IPv6
//! address together. Both `/credentials` and `/v1/credentials` are
//! served. Every request must carry the token as the raw
//! `Authorization` value (compared in constant time). Requests that look like
//! a browser or a DNS-rebinding attempt (a `Host` that is not the address
//! and port we listen on, or any `Origin`, `Referer` or
//! `X-Forwarded-For`) are refused before the token is even looked at.
//!
//! Any local process can reach a loopback port, so floods are expected.
//! A request refused for its token or headers is answered at once with
//! `Connection: close`, so it holds a connection slot only while it is
//! answered. Connections are capped in all and per peer (see
//! `http_listener`); since every local process comes from `127.0.0.1`, a
//! loopback peer is the uid that owns its socket, asked of the kernel at
//! accept (`http_listener::sock_diag`), so one user cannot take the slots
//! of all the others. A container on a bridge has no local uid: its
//! address is the peer. A container can answer for many addresses on its
//! bridge (added ones, or any it claims with raw packets), so containers
//! together hold at most half the connection slots (`BridgeShare`): a
//! container flooding from many addresses can crowd out other containers,
//! never the host's own processes. Refusals are counted in `/metrics` and
//! logged sparingly; with a config file, the audit records of refusals and
//! errors are limited per peer and reason as on the socket
//! (`audit_limit`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use anyhow::bail;
use axum::Router;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use imds_client::{ImdsClient, ProviderState, SecretString, SharedTimeSource};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::audit_limit::AuditLimit;
use crate::format::container_credentials_json;
use crate::http_listener::{Accept, Admission, Peer, Refusal, Refusals, ServerLimits, sock_diag};
use crate::metrics::Metrics;

mod instance_profile;
mod origin;

pub use instance_profile::InstanceProfile;

/// The container link's IPv4 address: the host in
/// `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials`.
pub const CONTAINER_LINK_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);

/// The container link's IPv6 address (`http://[fd00:ec2::23]/v1/credentials`).
pub const CONTAINER_LINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);

/// Is `ip` one of the container link's addresses?
pub fn is_container_link(ip: IpAddr) -> bool {
    ip == IpAddr::V4(CONTAINER_LINK_V4) || ip == IpAddr::V6(CONTAINER_LINK_V6)
}

/// Is `ip` an address the endpoint may listen on: loopback, or one of the
/// container link's? Any other would serve the instance's credentials to
/// the network.
pub fn is_accepted(ip: IpAddr) -> bool {
    ip.is_loopback() || is_container_link(ip)
}

/// Refuses any address but loopback and the container link's two: any
/// other would serve the instance's credentials to the network.
pub fn check_endpoint(addr: &SocketAddr) -> anyhow::Result<()> {
    if !is_accepted(addr.ip()) {
        bail!(
            "--container-endpoint {addr} is refused: it would serve credentials to the network. \
             Give a loopback address (127.0.0.1:8901 or [::1]:8901), or the container link's \
             169.254.170.23:PORT or [fd00:ec2::23]:PORT (see README, \"Containers\")"
        );
    }
    Ok(())
}

#[derive(Clone)]
struct App {
    token: SecretString,
    state: watch::Receiver<ProviderState>,
    profile: watch::Receiver<Option<InstanceProfile>>,
    clock: SharedTimeSource,
    refusals: Arc<Refusals>,
    /// Limits the audit records of refusals and errors ([`crate::audit_limit`]).
    audits: Arc<AuditLimit>,
    consumers: Option<ContainerConsumers>,
}

/// With a config file: each consumer's container token, and the broker
/// that hands out its session ([`crate::broker::tokens`]).
#[derive(Debug, Clone)]
pub struct ContainerConsumers {
    /// Each consumer's token.
    pub tokens: Arc<crate::broker::tokens::ConsumerTokens>,
    /// The consumers and their broker.
    pub consumers: crate::broker::handout::Consumers,
}

/// Why a request gets no credentials: the ECS agent's error codes, with its
/// statuses, so every SDK and every operator who knows ECS reads them alike.
/// The body is `{"code": ..., "message": ...}`, as the ECS agent's.
///
/// Our token plays the part of the ECS agent's credentials id: a missing
/// one is its `NoIdInRequest`, a wrong one its `InvalidIdInRequest`. The
/// SDKs retry 5xx and give up at once on 4xx: the AWS SDK for Rust reports
/// `Non-success status from HTTP credential provider: STATUS`, botocore
/// quotes the body (`Received non 200 response (STATUS) from ECS metadata: BODY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorCode {
    /// 400: no `Authorization` header, or an empty one.
    NoIdInRequest,
    /// 400: a token that is not ours.
    InvalidIdInRequest,
    /// 400: no IAM role is attached to the instance.
    NoCredentialsAssociated,
    /// 503: no credentials yet: the first fetch has not succeeded.
    CredentialsUninitialized,
    /// 500: the credentials expired and IMDS is failing.
    InternalServerError,
    /// 403: a request that looks like a browser's or a proxy's. Ours: the
    /// ECS agent, reached only from its own network namespace, has no such
    /// check, and `AccessDenied` is AWS's usual word for it.
    AccessDenied,
}

impl ErrorCode {
    fn status(self) -> StatusCode {
        match self {
            Self::NoIdInRequest | Self::InvalidIdInRequest | Self::NoCredentialsAssociated => {
                StatusCode::BAD_REQUEST
            }
            Self::CredentialsUninitialized => StatusCode::SERVICE_UNAVAILABLE,
            Self::InternalServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::AccessDenied => StatusCode::FORBIDDEN,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::NoIdInRequest => "NoIdInRequest",
            Self::InvalidIdInRequest => "InvalidIdInRequest",
            Self::NoCredentialsAssociated => "NoCredentialsAssociated",
            Self::CredentialsUninitialized => "CredentialsUninitialized",
            Self::InternalServerError => "InternalServerError",
            Self::AccessDenied => "AccessDenied",
        }
    }
}

/// An error answer: the code's status and `{"code": ..., "message": ...}`.
fn refuse(code: ErrorCode, message: &str) -> Response {
    (
        code.status(),
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "code": code.as_str(), "message": message }).to_string(),
    )
        .into_response()
}

/// A refusal of the request's token or headers: counted, logged sparingly,
/// and answered with `Connection: close`, so the connection ends with it.
fn refuse_and_close(
    app: &App,
    peer: &Peer,
    why: Refusal,
    code: ErrorCode,
    message: &str,
) -> Response {
    app.refusals.refuse(peer, why);
    let mut response = refuse(code, message);
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
    let mut allowed = vec![
        local.to_string(),
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ];
    // Clients leave the default port out (`http://169.254.170.23/...`).
    if port == 80 {
        let bare: Vec<String> = allowed
            .iter()
            .filter_map(|a| a.strip_suffix(":80"))
            .map(str::to_owned)
            .collect();
        allowed.extend(bare);
    }
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        None
    } else {
        Some("the Host header must name this endpoint's address and port")
    }
}

async fn credentials(
    State(app): State<App>,
    Extension(peer): Extension<Peer>,
    Extension(Local(local)): Extension<Local>,
    headers: HeaderMap,
) -> Response {
    if let Some(why) = looks_forged(&headers, &local) {
        return refuse_and_close(&app, &peer, Refusal::Forged, ErrorCode::AccessDenied, why);
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| !v.is_empty());
    let Some(given) = given else {
        return refuse_and_close(
            &app,
            &peer,
            Refusal::NoToken,
            ErrorCode::NoIdInRequest,
            "the Authorization header is missing or empty: send the token from \
             AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        );
    };
    if let Some(consumers) = &app.consumers
        && let Some(name) = consumers.tokens.consumer_for(given)
    {
        return for_consumer(&app, consumers, name, &peer).await;
    }
    let instance_token = bool::from(given.ct_eq(app.token.expose().as_bytes()));
    if instance_token
        && let Some(consumers) = &app.consumers
        && consumers.consumers.config.unmatched() == crate::broker::config::Unmatched::Deny
    {
        let reason = "the agent's own container token gets nothing while the config file says \
                      unmatched = \"deny\": give the container a consumer's \
                      container_token_file, or set unmatched = \"instance-role\"";
        consumers.consumers.broker.count_refusal(false);
        if app.audits.admit(peer.key(), "container", "denied", reason) {
            crate::broker::handout::audit_ids(
                "",
                "container",
                (peer.uid, None, None),
                None,
                "denied",
                Some(reason),
            );
        }
        return refuse(ErrorCode::AccessDenied, reason);
    }
    if !instance_token {
        return refuse_and_close(
            &app,
            &peer,
            Refusal::WrongToken,
            ErrorCode::InvalidIdInRequest,
            "the Authorization token is wrong: send the token from \
             AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE as it is, without \"Bearer\"",
        );
    }
    let state = app.state.borrow().clone();
    match &state {
        ProviderState::Active { current, .. }
            if current.credentials.expiration() > app.clock.now() =>
        {
            let profile = app.profile.borrow().clone();
            (
                [(header::CONTENT_TYPE, "application/json")],
                container_credentials_json(current, profile.as_ref()),
            )
                .into_response()
        }
        ProviderState::Starting => refuse(
            ErrorCode::CredentialsUninitialized,
            "the agent has not fetched credentials from IMDS yet: retry shortly",
        ),
        ProviderState::NoRole => refuse(
            ErrorCode::NoCredentialsAssociated,
            "no IAM role is attached to this instance: attach an instance profile",
        ),
        ProviderState::Unavailable { error, stale: None } => refuse(
            ErrorCode::CredentialsUninitialized,
            &format!("no credentials yet: {error}; the agent keeps asking IMDS"),
        ),
        ProviderState::Unavailable { error, .. } => refuse(
            ErrorCode::InternalServerError,
            &format!("the credentials expired: {error}; the agent keeps asking IMDS"),
        ),
        _ => refuse(
            ErrorCode::InternalServerError,
            "the credentials expired and no new ones came yet; the agent keeps asking IMDS",
        ),
    }
}

/// A consumer's session for a container presenting its token, audited.
async fn for_consumer(
    app: &App,
    consumers: &ContainerConsumers,
    name: &str,
    peer: &Peer,
) -> Response {
    let state = app.state.borrow().clone();
    let ids = (peer.uid, None, None);
    match consumers.consumers.broker.credentials(name, &state).await {
        Ok(session) => {
            crate::broker::handout::audit_ids(
                name,
                "container",
                ids,
                Some(&session),
                "served",
                None,
            );
            (
                [(header::CONTENT_TYPE, "application/json")],
                container_credentials_json(&session, None),
            )
                .into_response()
        }
        Err(e) => {
            let message = e.to_string();
            if app.audits.admit(peer.key(), "container", "error", &message) {
                crate::broker::handout::audit_ids(
                    name,
                    "container",
                    ids,
                    None,
                    "error",
                    Some(&message),
                );
            }
            let code = match e {
                crate::broker::cache::BrokerError::NoInstanceRole => {
                    ErrorCode::NoCredentialsAssociated
                }
                crate::broker::cache::BrokerError::InstanceUnavailable { .. } => {
                    ErrorCode::CredentialsUninitialized
                }
                _ => ErrorCode::InternalServerError,
            };
            refuse(code, &message)
        }
    }
}

/// Serves the endpoint on every listener in `listeners` at once (the IPv4
/// and IPv6 sockets systemd passes, say) until `shutdown` resolves: one
/// server, so the connection caps are shared as if the listeners were one,
/// and they are the Unix socket's, since any local process (or container)
/// can reach the port and idle or flooding clients must not exhaust the
/// agent. Each request's `Host` is checked against the address its
/// connection came in on. Refusals are counted in `metrics`
/// (`imds_agent_refused_connections_total` with `endpoint="container"`).
/// With `imds`, `iam/info` is read at start and on each role change (see
/// [`InstanceProfile`]), so the document names the role's ARN in the
/// instance's partition and account; without it `RoleArn` is left out.
/// With `consumers` (a config file), a container presenting a consumer's
/// token gets that consumer's session; the agent's own token then gets the
/// instance role only with `unmatched = "instance-role"`.
#[allow(clippy::too_many_arguments)]
pub async fn serve_all(
    listeners: Vec<TcpListener>,
    token: SecretString,
    state: watch::Receiver<ProviderState>,
    clock: SharedTimeSource,
    metrics: Arc<Metrics>,
    imds: Option<ImdsClient>,
    consumers: Option<ContainerConsumers>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if listeners.is_empty() {
        bail!("the container endpoint was given no socket to listen on");
    }
    let refusals = Arc::new(Refusals::new("container", metrics));
    let (profile_tx, profile) = watch::channel(None);
    // Aborted when the endpoint stops (the guard drops).
    let _follower = imds.map(|imds| {
        AbortOnDrop(tokio::spawn(instance_profile::follow(
            imds,
            state.clone(),
            profile_tx,
        )))
    });
    let app = Router::new()
        .route("/credentials", get(credentials))
        .route("/v1/credentials", get(credentials))
        .with_state(App {
            token,
            state,
            profile,
            clock,
            refusals: refusals.clone(),
            audits: Arc::default(),
            consumers,
        });
    let limits = ServerLimits::default();
    let bridges = BridgeShare::new(limits.max_connections / 2);
    let admit = |stream: &TcpStream| match (peer_of(stream), stream.local_addr()) {
        (Some((peer, bridged)), Ok(local)) => {
            let router = app
                .clone()
                .layer(Extension(peer))
                .layer(Extension(Local(local)));
            if !bridged {
                return Admission::Serve(peer, router);
            }
            // Held by the connection's router, so until the connection ends.
            match bridges.take() {
                Some(slot) => Admission::Serve(peer, router.layer(Extension(slot))),
                None => Admission::Refuse(peer, Refusal::PeerLimit),
            }
        }
        _ => Admission::Refuse(
            Peer {
                addr: stream.peer_addr().ok().map(|a| a.ip()),
                ..Peer::default()
            },
            Refusal::AllowList,
        ),
    };
    crate::http_listener::serve_limited(
        Listeners {
            listeners,
            first: AtomicUsize::new(0),
        },
        limits,
        refusals,
        admit,
        shutdown,
    )
    .await;
    Ok(())
}

/// The connection slots containers on local bridges hold, all together.
///
/// Each bridge peer is an address, capped like any peer; but a container
/// can answer for many addresses on its bridge (`ip addr add` with
/// `CAP_NET_ADMIN`, or any address it claims by ARP or neighbour discovery
/// with the `CAP_NET_RAW` Docker grants by default), each with its own
/// per-peer share. This caps them together, so the host's own processes
/// keep the other slots whatever the containers do.
#[derive(Debug)]
struct BridgeShare(Arc<Semaphore>);

/// One connection's place in the [`BridgeShare`]: freed when its router,
/// which the connection holds until it ends, is dropped.
#[derive(Debug, Clone)]
struct BridgeSlot(#[allow(dead_code, reason = "held, never read")] Arc<OwnedSemaphorePermit>);

impl BridgeShare {
    /// A share of `slots` connections.
    fn new(slots: usize) -> Self {
        Self(Arc::new(Semaphore::new(slots)))
    }

    /// A place for one more connection from behind a bridge, unless the
    /// containers hold every one already.
    fn take(&self) -> Option<BridgeSlot> {
        let permit = self.0.clone().try_acquire_owned().ok()?;
        Some(BridgeSlot(Arc::new(permit)))
    }
}

/// The address a connection came in on: what its `Host` must name.
#[derive(Debug, Clone, Copy)]
struct Local(SocketAddr);

/// Several listeners accepted from as one. Each accept starts with the
/// next listener in turn, so a flood on one cannot starve the others.
struct Listeners {
    listeners: Vec<TcpListener>,
    first: AtomicUsize,
}

impl Accept for Listeners {
    type Stream = TcpStream;

    async fn next(&self) -> std::io::Result<TcpStream> {
        let count = self.listeners.len();
        let first = self.first.fetch_add(1, Ordering::Relaxed) % count;
        std::future::poll_fn(|cx| {
            for i in 0..count {
                let listener = &self.listeners[(first + i) % count];
                if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                    return Poll::Ready(accepted.map(|(stream, _)| stream));
                }
            }
            Poll::Pending
        })
        .await
    }

    fn write_now(stream: &TcpStream, bytes: &[u8]) {
        <TcpListener as Accept>::write_now(stream, bytes);
    }

    fn read_now(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
        <TcpListener as Accept>::read_now(stream, buf)
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Who is at the other end of `stream`: the uid owning a loopback peer's
/// socket (every local process comes from the same loopback address), and
/// its address; and whether it is a container behind a local bridge. On the
/// container link, `None` for a peer that is neither a local process nor a
/// container behind a local bridge (see `origin`).
fn peer_of(stream: &TcpStream) -> Option<(Peer, bool)> {
    let (Ok(remote), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
        return Some((Peer::default(), false));
    };
    let mut bridged = false;
    let uid = if local.ip().is_loopback() {
        remote
            .ip()
            .is_loopback()
            .then(|| sock_diag::tcp_peer_uid(remote, local))
            .flatten()
    } else {
        match origin::classify(remote, || sock_diag::tcp_peer_uid(remote, local)) {
            origin::Origin::Host(uid) => uid,
            origin::Origin::Bridge(_) => {
                bridged = true;
                None
            }
            origin::Origin::Elsewhere => return None,
        }
    };
    let peer = Peer {
        uid,
        addr: Some(remote.ip()),
        ..Peer::default()
    };
    Some((peer, bridged))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use imds_client::{Credentials, Error, ErrorKind, RoleCredentials};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// An endpoint serving `state` on an ephemeral loopback port.
    struct Endpoint {
        addr: SocketAddr,
        state: watch::Sender<ProviderState>,
        metrics: Arc<Metrics>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        server: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl Endpoint {
        async fn start(state: ProviderState) -> Self {
            Self::start_with(state, None).await
        }

        /// As [`Endpoint::start`], with a config file's consumers.
        async fn start_with(state: ProviderState, consumers: Option<ContainerConsumers>) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let metrics = Arc::new(Metrics::default());
            let (state, rx) = watch::channel(state);
            let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(serve_all(
                vec![listener],
                SecretString::new(TOKEN.to_owned()),
                rx,
                SharedTimeSource::default(),
                metrics.clone(),
                None,
                consumers,
                async {
                    let _ = stop_rx.await;
                },
            ));
            Self {
                addr,
                state,
                metrics,
                stop: Some(stop),
                server,
            }
        }

        /// The raw answer (lowercased head, body) to `GET /credentials`
        /// with `headers`; the agent or `Connection: close` ends it.
        async fn get(&self, headers: &str) -> (String, String) {
            self.get_path("/credentials", headers).await
        }

        /// As [`Endpoint::get`], for `GET path`.
        async fn get_path(&self, path: &str, headers: &str) -> (String, String) {
            let mut stream = TcpStream::connect(self.addr).await.unwrap();
            let host = self.addr;
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n").as_bytes(),
                )
                .await
                .unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            // Read until the whole body (Content-Length) is in, or EOF.
            loop {
                let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf))
                    .await
                    .expect("an answer within 60 s")
                    .unwrap();
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw).into_owned();
                if n == 0 {
                    break;
                }
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .to_lowercase()
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: ").map(str::to_owned))
                        .and_then(|l| l.trim().parse::<usize>().ok());
                    if length.is_some_and(|l| body.len() >= l) {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&raw).into_owned();
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            (head.to_lowercase(), body.to_owned())
        }

        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            self.server.await.unwrap().unwrap();
        }
    }

    /// The status, `code` and `message` of an error answer, checked to be
    /// JSON with exactly those two fields.
    fn error_of(head: &str, body: &str) -> (u16, String, String) {
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("expected an HTTP status line, got {head:?}"));
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "expected a JSON error, got head {head:?}"
        );
        let doc: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("expected a JSON body, got {body:?}: {e}"));
        let fields: Vec<&String> = doc
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        assert_eq!(
            fields,
            ["code", "message"],
            "expected {{code, message}}, got {body}"
        );
        (
            status,
            doc["code"].as_str().unwrap().to_owned(),
            doc["message"].as_str().unwrap().to_owned(),
        )
    }

    fn active(expires_in: i64) -> ProviderState {
        let now = SharedTimeSource::default().now();
        let expiry = if expires_in >= 0 {
            now + Duration::from_secs(expires_in.unsigned_abs())
        } else {
            now - Duration::from_secs(expires_in.unsigned_abs())
        };
        ProviderState::Active {
            current: RoleCredentials {
                role: "r".into(),
                credentials: Arc::new(Credentials::new("ASIAKEY", "secret", "token", expiry)),
            },
            last_error: None,
        }
    }

    /// Another token than the agent's: consumer "billing"'s.
    const BILLING_TOKEN: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    /// Consumer "billing" with a container token, under `unmatched =
    /// "deny"`; its STS is never reached (the tests ask nothing of it).
    fn billing() -> ContainerConsumers {
        let consumers = crate::broker::handout::Consumers::with_unreachable_sts(
            "unmatched = \"deny\"\n[[consumer]]\nname = \"billing\"\nuids = [4242]\n",
        );
        let mut tokens = crate::broker::tokens::ConsumerTokens::default();
        tokens
            .insert(
                "billing",
                SecretString::new(BILLING_TOKEN.to_owned()),
                std::path::Path::new("/etc/imds-agent/billing.token"),
            )
            .unwrap();
        ContainerConsumers {
            tokens: Arc::new(tokens),
            consumers,
        }
    }

    /// A container looping with the agent's own token, which `unmatched =
    /// "deny"` refuses: every request is a 403 and counted, but the audit
    /// log gets one full record per interval (then how many were not
    /// written), not one per request; another reason is recorded on its own.
    #[tokio::test(start_paused = true)]
    #[tracing_test::traced_test]
    async fn a_refused_container_is_audited_once_per_interval_not_per_request() {
        let consumers = billing();
        let broker = consumers.consumers.broker.clone();
        let endpoint = Endpoint::start_with(active(3600), Some(consumers)).await;
        let own = format!("Authorization: {TOKEN}\r\nConnection: close\r\n");
        let records = |lines: &[&str], result: &str| {
            lines
                .iter()
                .filter(|l| {
                    l.contains("imds_agent::audit")
                        && l.contains("credentials refused")
                        && l.contains(&format!("result=\"{result}\""))
                })
                .count()
        };
        let started = tokio::time::Instant::now();
        for _ in 0..50 {
            let (head, body) = endpoint.get(&own).await;
            let (status, code, _) = error_of(&head, &body);
            assert_eq!((status, code.as_str()), (403, "AccessDenied"), "{body}");
        }
        assert!(
            started.elapsed() < crate::audit_limit::REFUSAL_SUMMARY_INTERVAL,
            "the 50 requests took {:?} of tokio time",
            started.elapsed()
        );
        assert_eq!(
            broker.refusals(),
            (50, 0),
            "every refusal is counted in imds_agent_consumer_refused_requests_total"
        );
        logs_assert(|lines| match records(lines, "denied") {
            1 => Ok(()),
            n => Err(format!(
                "expected one audit record for 50 refusals within the interval, saw {n}"
            )),
        });

        // Another reason within the interval: consumer billing's token
        // while no role is attached is recorded in full at once.
        endpoint.state.send_replace(ProviderState::NoRole);
        let billing = format!("Authorization: {BILLING_TOKEN}\r\nConnection: close\r\n");
        for _ in 0..3 {
            let (head, body) = endpoint.get(&billing).await;
            let (status, code, _) = error_of(&head, &body);
            assert_eq!(
                (status, code.as_str()),
                (400, "NoCredentialsAssociated"),
                "{body}"
            );
        }
        logs_assert(
            |lines| match (records(lines, "denied"), records(lines, "error")) {
                (1, 1) => Ok(()),
                (denied, error) => Err(format!(
                    "expected the other reason recorded once on its own (1 denied, 1 error), \
                 saw {denied} denied and {error} error records"
                )),
            },
        );
        endpoint.state.send_replace(active(3600));

        // After the interval: the count of the refusals not written, then
        // the next refusal in full.
        tokio::time::advance(crate::audit_limit::REFUSAL_SUMMARY_INTERVAL).await;
        let (head, _) = endpoint.get(&own).await;
        assert!(head.starts_with("http/1.1 403"), "{head}");
        logs_assert(|lines| match records(lines, "denied") {
            2 => Ok(()),
            n => Err(format!(
                "expected a second full record after the interval, saw {n}"
            )),
        });
        logs_assert(|lines| {
            let summaries: Vec<&&str> = lines
                .iter()
                .filter(|l| l.contains("more refusals of uid 0 for this reason were counted"))
                .collect();
            match summaries.as_slice() {
                [one]
                    if one.contains("49 more refusals") && one.contains("output=\"container\"") =>
                {
                    Ok(())
                }
                _ => Err(format!(
                    "expected one record of the 49 refusals not written one by one, saw {summaries:#?}"
                )),
            }
        });
        assert_eq!(broker.refusals(), (51, 0));
        endpoint.stop().await;
    }

    #[tokio::test]
    async fn a_request_without_a_token_is_answered_closed_and_counted() {
        let endpoint = Endpoint::start(ProviderState::Starting).await;
        // Keep-alive by default: only the agent's `Connection: close` ends it.
        let (head, body) = endpoint.get("").await;
        assert!(
            head.contains("\r\nconnection: close"),
            "expected Connection: close, got {head}"
        );
        let (status, code, _) = error_of(&head, &body);
        assert_eq!((status, code.as_str()), (400, "NoIdInRequest"), "{body}");

        let rendered = endpoint
            .metrics
            .render(&ProviderState::Starting, std::time::SystemTime::UNIX_EPOCH);
        let series =
            "imds_agent_refused_connections_total{endpoint=\"container\",reason=\"no_token\"} 1";
        assert!(
            rendered.contains(series),
            "expected {series} in:\n{rendered}"
        );
        endpoint.stop().await;
    }

    #[tokio::test]
    async fn refusals_carry_the_ecs_agents_codes_and_statuses() {
        let endpoint = Endpoint::start(active(3600)).await;
        for (headers, want_status, want_code) in [
            ("", 400, "NoIdInRequest"),
            ("Authorization: \r\n", 400, "NoIdInRequest"),
            ("Authorization: wrong\r\n", 400, "InvalidIdInRequest"),
            (
                &format!("Authorization: Bearer {TOKEN}\r\n") as &str,
                400,
                "InvalidIdInRequest",
            ),
            (
                &format!("Origin: http://attacker.example\r\nAuthorization: {TOKEN}\r\n"),
                403,
                "AccessDenied",
            ),
        ] {
            let (head, body) = endpoint.get(headers).await;
            let (status, code, message) = error_of(&head, &body);
            assert_eq!(
                (status, code.as_str()),
                (want_status, want_code),
                "for headers {headers:?}: expected {want_status} {want_code}, got {status} {body}"
            );
            assert!(
                !message.contains(TOKEN),
                "the token reached a message: {message}"
            );
        }
        endpoint.stop().await;
    }

    #[tokio::test]
    async fn the_provider_state_maps_to_the_ecs_agents_codes() {
        let endpoint = Endpoint::start(ProviderState::Starting).await;
        let authorised = format!("Authorization: {TOKEN}\r\n");
        let unavailable = || Error::from(ErrorKind::Unreachable);
        let stale = active(-60).current().cloned();
        for (state, want_status, want_code) in [
            (ProviderState::Starting, 503, "CredentialsUninitialized"),
            (
                ProviderState::Unavailable {
                    error: unavailable(),
                    stale: None,
                },
                503,
                "CredentialsUninitialized",
            ),
            (ProviderState::NoRole, 400, "NoCredentialsAssociated"),
            (
                ProviderState::Unavailable {
                    error: unavailable(),
                    stale,
                },
                500,
                "InternalServerError",
            ),
            (active(-60), 500, "InternalServerError"),
        ] {
            let what = format!("{state:?}");
            endpoint.state.send_replace(state);
            let (head, body) = endpoint.get(&authorised).await;
            let (status, code, message) = error_of(&head, &body);
            assert_eq!(
                (status, code.as_str()),
                (want_status, want_code),
                "in state {what}: expected {want_status} {want_code}, got {status} {body}"
            );
            assert!(!message.is_empty(), "an empty message in state {what}");
            assert!(!body.contains("secret"), "a secret in {body}");
        }
        endpoint.state.send_replace(active(3600));
        let (head, body) = endpoint.get(&authorised).await;
        assert!(
            head.starts_with("http/1.1 200"),
            "expected 200, got {head} {body}"
        );
        endpoint.stop().await;
    }

    #[tokio::test]
    async fn v1_credentials_is_served_as_the_eks_pod_identity_agent_does() {
        let endpoint = Endpoint::start(active(3600)).await;
        let authorised = format!("Authorization: {TOKEN}\r\n");
        for path in ["/credentials", "/v1/credentials"] {
            let (head, body) = endpoint.get_path(path, &authorised).await;
            assert!(
                head.starts_with("http/1.1 200"),
                "expected 200 for GET {path}, got {head} {body}"
            );
            assert!(body.contains("ASIAKEY"), "GET {path}: {body}");
        }
        let (head, _) = endpoint.get_path("/v1/credentials", "").await;
        assert!(
            head.starts_with("http/1.1 400"),
            "expected 400 without a token on /v1/credentials, got {head}"
        );
        let (head, _) = endpoint.get_path("/v2/credentials", &authorised).await;
        assert!(head.starts_with("http/1.1 404"), "expected 404, got {head}");
        endpoint.stop().await;
    }

    #[test]
    fn the_container_link_addresses_are_accepted_and_no_other() {
        for ok in [
            "127.0.0.1:8901",
            "[::1]:8901",
            "169.254.170.23:80",
            "169.254.170.23:8901",
            "[fd00:ec2::23]:80",
        ] {
            let addr: SocketAddr = ok.parse().unwrap();
            assert!(
                check_endpoint(&addr).is_ok(),
                "expected {ok} to be accepted"
            );
        }
        for bad in [
            "0.0.0.0:80",
            "[::]:80",
            "169.254.170.2:80",
            "169.254.169.254:80",
            "10.0.0.5:80",
            "[fd00:ec2::254]:80",
        ] {
            let addr: SocketAddr = bad.parse().unwrap();
            let message = check_endpoint(&addr)
                .expect_err(&format!("expected {bad} to be refused"))
                .to_string();
            for form in [
                bad,
                "loopback",
                "169.254.170.23:PORT",
                "[fd00:ec2::23]:PORT",
            ] {
                assert!(message.contains(form), "expected {form:?} in: {message}");
            }
        }
    }

    #[test]
    fn the_host_header_names_the_link_address_with_or_without_port_80() {
        let headers = |host: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, host.parse().unwrap());
            headers
        };
        for (local, good, bad) in [
            (
                "169.254.170.23:80",
                &["169.254.170.23", "169.254.170.23:80"][..],
                &[
                    "attacker.example",
                    "attacker.example:80",
                    "169.254.170.23:8080",
                    "169.254.169.254",
                ][..],
            ),
            (
                "[fd00:ec2::23]:80",
                &["[fd00:ec2::23]", "[fd00:ec2::23]:80", "[FD00:EC2::23]"][..],
                &["fd00:ec2::23:80", "[fd00:ec2::254]", "attacker.example"][..],
            ),
            (
                "169.254.170.23:8901",
                &["169.254.170.23:8901"][..],
                &["169.254.170.23", "169.254.170.23:80"][..],
            ),
        ] {
            let local: SocketAddr = local.parse().unwrap();
            for host in good {
                assert_eq!(
                    looks_forged(&headers(host), &local),
                    None,
                    "Host {host} on {local}: expected it to be accepted"
                );
            }
            for host in bad {
                assert!(
                    looks_forged(&headers(host), &local).is_some(),
                    "Host {host} on {local}: expected a refusal"
                );
            }
        }
    }
}
