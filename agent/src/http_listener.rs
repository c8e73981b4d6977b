//! The shared HTTP listener: how the credential socket, the container
//! endpoint and the metrics listener accept and bound their connections.
//!
//! They serve tiny responses to local clients, some of which may misbehave:
//! connect and send nothing, send slowly, send huge or non-HTTP heads, or
//! open connections by the thousand, as a user the allow-list refuses or
//! without a token. Three rules keep them from crowding out good clients
//! (`tests/hostile_flood.rs` floods the real agent to show it):
//!
//! - **A peer is judged at accept.** Who it is comes from the kernel
//!   (`SO_PEERCRED` on the socket; the owner of the other end of a loopback
//!   TCP connection, see [`sock_diag`]). A refused peer gets a short fixed
//!   response, written without waiting, and its connection is shut: it holds
//!   no slot and is never waited for. (It is closed a moment later, at most
//!   [`MAX_LINGERING`] at a time, so that a client still writing its request
//!   reads why it was refused instead of "broken pipe".)
//! - **Each peer has its own cap** ([`ServerLimits::max_connections_per_peer`])
//!   below the global one, so one user cannot take every slot. The peer is
//!   its uid when the kernel says who it is, else its address. Root and the
//!   agent's own user are exempt: the agent trusts them anyway (they can stop
//!   or trace it), and its own tools may need more.
//! - **Refusals are counted, and logged sparingly.** The first refusal of a
//!   peer for each reason is logged with its uid, gid and pid; further ones
//!   are counted and summarised once per [`REFUSAL_SUMMARY_INTERVAL`], so a flood of
//!   thousands of connections costs a few log lines, not one per connection
//!   (which would push real audit lines past journald's rate limit). Every
//!   refusal is counted in `/metrics`.
//!
//! Accepted connections are bounded in header size, header read time and
//! lifetime, so memory stays bounded. Only a request already read whole can
//! stretch its own connection's lifetime ([`ConnectionControl`]: a
//! credential-socket long-poll, by its wait plus a margin), and a stopping
//! server tells such requests to answer at once.
//!
//! What this does not do: a user who controls many uids (a range of
//! subordinate uids mapped into a user namespace, say) gets a share per uid,
//! and enough of them can still fill the global cap; the global cap keeps
//! the agent itself safe either way. A loopback peer whose owner the kernel
//! cannot name (its socket is already gone) is counted under its address.

pub(crate) mod sock_diag;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};

use crate::metrics::Metrics;

/// How often further refusals of a peer are summarised in the log.
pub(crate) const REFUSAL_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Peers whose refusals are tracked one by one; beyond this many in one
/// interval, refusals are summarised together as "other peers", so the
/// tracking itself stays small however many uids or addresses flood.
const MAX_TRACKED_PEERS: usize = 1024;

/// Limits that keep one client from starving the others.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections served at once; more are refused at once (503).
    pub max_connections: usize,
    /// Connections served at once to one peer (one uid, or one address when
    /// the uid is unknown); more are refused at once (503). Root and the
    /// agent's own uid are exempt.
    pub max_connections_per_peer: usize,
    /// Time a client has to send its request headers.
    pub header_timeout: Duration,
    /// The longest a connection may stay open. A credential-socket
    /// long-poll (`GET /credentials?wait=SECONDS`) stretches its own
    /// connection's to cover the wait, plus a margin to answer.
    pub connection_lifetime: Duration,
    /// Largest request head, in bytes.
    pub max_header_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_peer: 64,
            header_timeout: Duration::from_secs(5),
            connection_lifetime: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// Who is on the other end of a connection, as far as the kernel says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Peer {
    /// Its uid (`SO_PEERCRED`, or the owner of a loopback TCP socket).
    pub(crate) uid: Option<u32>,
    /// Its primary gid (`SO_PEERCRED`).
    pub(crate) gid: Option<u32>,
    /// Its pid at connect time (`SO_PEERCRED`).
    pub(crate) pid: Option<u32>,
    /// Its address (TCP).
    pub(crate) addr: Option<IpAddr>,
}

impl Peer {
    /// What its connections are counted and summarised under.
    pub(crate) fn key(&self) -> PeerKey {
        match (self.uid, self.addr) {
            (Some(uid), _) => PeerKey::Uid(uid),
            (None, Some(addr)) => PeerKey::Addr(addr),
            (None, None) => PeerKey::Other,
        }
    }
}

/// What a peer's connections are counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PeerKey {
    /// A local user.
    Uid(u32),
    /// A source address whose user is unknown.
    Addr(IpAddr),
    /// Unknown peers, or more peers than are tracked one by one.
    Other,
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, "uid {uid}"),
            Self::Addr(addr) => write!(f, "address {addr}"),
            Self::Other => f.write_str("other peers"),
        }
    }
}

/// Why a connection or request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Refusal {
    /// The peer is not on the socket's allow-list.
    AllowList,
    /// The kernel could not say who the peer is.
    UnknownPeer,
    /// The peer already holds its share of connections.
    PeerLimit,
    /// Every connection slot is taken.
    GlobalLimit,
    /// A container-credentials request without a token.
    NoToken,
    /// A container-credentials request with a wrong token.
    WrongToken,
    /// A request that looks like a browser or a proxy.
    Forged,
}

impl Refusal {
    /// The `reason` label in `/metrics`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::AllowList => "allow_list",
            Self::UnknownPeer => "unknown_peer",
            Self::PeerLimit => "peer_limit",
            Self::GlobalLimit => "global_limit",
            Self::NoToken => "no_token",
            Self::WrongToken => "wrong_token",
            Self::Forged => "forged",
        }
    }

    /// The log line for a peer's first refusal.
    fn message(self) -> &'static str {
        match self {
            Self::AllowList => "refused a socket client that is not on the allow-list",
            Self::UnknownPeer => "refused a client whose credentials could not be read",
            Self::PeerLimit => "refused a connection: this peer holds its share of connections",
            Self::GlobalLimit => "refused a connection: every connection slot is taken",
            Self::NoToken => "refused a container-credentials request without a token",
            Self::WrongToken => "refused a container-credentials request with a wrong token",
            Self::Forged => "refused a container-credentials request from a browser or proxy",
        }
    }

    /// The fixed response written to a connection refused at accept.
    fn response(self) -> String {
        let (status, message) = match self {
            Self::AllowList | Self::UnknownPeer => {
                ("403 Forbidden", "this user may not use this socket")
            }
            Self::PeerLimit => (
                "503 Service Unavailable",
                "too many connections from this user; close some and retry",
            ),
            _ => (
                "503 Service Unavailable",
                "too many connections; retry later",
            ),
        };
        let body = serde_json::json!({ "error": message }).to_string();
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

/// Counts refusals in `/metrics` and logs them sparingly: a peer's first
/// refusal in full, the rest as one summary per interval.
#[derive(Debug)]
pub(crate) struct Refusals {
    endpoint: &'static str,
    metrics: Arc<Metrics>,
    /// Refusals not yet summarised, per peer and reason seen since the
    /// last summary.
    pending: Mutex<HashMap<(PeerKey, Refusal), u64>>,
}

impl Refusals {
    /// Refusals on `endpoint` (the `endpoint` label: `socket`, `container`).
    pub(crate) fn new(endpoint: &'static str, metrics: Arc<Metrics>) -> Self {
        Self {
            endpoint,
            metrics,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a refusal of `peer`, and logs it if it is the peer's first
    /// for this reason since it was last quiet for a whole interval.
    pub(crate) fn refuse(&self, peer: &Peer, why: Refusal) {
        self.metrics.refused(self.endpoint, why.label());
        if why == Refusal::AllowList {
            self.metrics.denied();
        }
        let key = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let mut key = (peer.key(), why);
            if !pending.contains_key(&key) && pending.len() >= MAX_TRACKED_PEERS {
                key.0 = PeerKey::Other;
            }
            match pending.get_mut(&key) {
                Some(count) => {
                    *count += 1;
                    return;
                }
                None => {
                    pending.insert(key, 0);
                    key.0
                }
            }
        };
        tracing::warn!(
            endpoint = self.endpoint,
            reason = why.label(),
            peer_uid = peer.uid,
            peer_gid = peer.gid,
            peer_pid = peer.pid,
            peer_addr = peer.addr.map(tracing::field::display),
            "{}; further refusals of {key} are summarised every {} s",
            why.message(),
            REFUSAL_SUMMARY_INTERVAL.as_secs()
        );
    }

    /// Logs one summary line per peer (and reason) refused since the last
    /// summary, and forgets the peers that were quiet (their next refusal is
    /// logged in full).
    pub(crate) fn summarise(&self) {
        let counts: Vec<((PeerKey, Refusal), u64)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.retain(|_, count| *count > 0);
            pending
                .iter_mut()
                .map(|(key, count)| (*key, std::mem::take(count)))
                .collect()
        };
        for ((key, why), count) in counts {
            tracing::warn!(
                endpoint = self.endpoint,
                reason = why.label(),
                refused = count,
                "refused {count} more connections from {key} since the last report"
            );
        }
    }
}

/// What to do with an accepted connection.
pub(crate) enum Admission {
    /// Serve it with this router, counted against the peer's cap.
    Serve(Peer, Router),
    /// Answer with a fixed response and close it at once.
    Refuse(Peer, Refusal),
}

/// A listener the limited server accepts connections from.
pub(crate) trait Accept {
    /// The accepted connection.
    type Stream: AsyncRead + AsyncWrite + std::os::fd::AsFd + Unpin + Send + 'static;
    /// The next connection.
    fn next(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
    /// Writes what the socket buffer takes of `bytes` now, without waiting.
    fn write_now(stream: &Self::Stream, bytes: &[u8]);
    /// Reads what has arrived already, without waiting.
    fn read_now(stream: &Self::Stream, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn next(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
    fn write_now(stream: &UnixStream, bytes: &[u8]) {
        let _ = stream.try_write(bytes);
    }
    fn read_now(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
        stream.try_read(buf)
    }
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn next(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
    fn write_now(stream: &TcpStream, bytes: &[u8]) {
        let _ = stream.try_write(bytes);
    }
    fn read_now(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
        stream.try_read(buf)
    }
}

/// How long a refused connection stays half-open after its answer: time for
/// the client to finish writing its request (else its write fails with
/// "broken pipe" and it never reads why it was refused).
const REFUSED_LINGER: Duration = Duration::from_millis(250);

/// Refused connections kept half-open at most; beyond, the oldest is closed
/// at once, so a flood costs at most this many file descriptors.
const MAX_LINGERING: usize = 64;

/// Refused connections, answered and shut for writing, waiting a moment
/// before they are closed. They hold no connection slot and are never read
/// from beyond what has already arrived.
struct Lingering<S> {
    queue: std::collections::VecDeque<(tokio::time::Instant, S)>,
}

impl<S: std::os::fd::AsFd> Lingering<S> {
    fn new() -> Self {
        Self {
            queue: std::collections::VecDeque::new(),
        }
    }

    /// Answers `stream` with `response`, shuts it for writing (the client
    /// reads the answer, then end of file) and keeps it for a moment.
    fn refuse<L: Accept<Stream = S>>(&mut self, stream: S, response: &[u8]) {
        L::write_now(&stream, response);
        let _ = rustix::net::shutdown(&stream, rustix::net::Shutdown::Write);
        if self.queue.len() >= MAX_LINGERING
            && let Some((_, oldest)) = self.queue.pop_front()
        {
            close::<L>(oldest);
        }
        self.queue
            .push_back((tokio::time::Instant::now() + REFUSED_LINGER, stream));
    }

    /// When the next one is due to be closed.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.queue.front().map(|(due, _)| *due)
    }

    /// Closes every connection due by now.
    fn close_due<L: Accept<Stream = S>>(&mut self) {
        let now = tokio::time::Instant::now();
        while self.queue.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, stream)) = self.queue.pop_front() {
                close::<L>(stream);
            }
        }
    }
}

/// Closes a refused connection after discarding what it sent already
/// (closing with unread data would reset the connection, and the client
/// could lose the answer it has not read yet).
fn close<L: Accept>(stream: L::Stream) {
    let mut buf = [0u8; 4096];
    for _ in 0..8 {
        match L::read_now(&stream, &mut buf) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

/// Open connections per peer.
#[derive(Debug, Default)]
struct PeerCounts {
    open: Mutex<HashMap<PeerKey, usize>>,
}

/// One open connection counted against its peer; uncounted on drop.
struct PeerSlot {
    counts: Arc<PeerCounts>,
    key: PeerKey,
}

impl PeerCounts {
    /// A slot for `key`, unless it already holds `cap`.
    fn take(self: &Arc<Self>, key: PeerKey, cap: usize) -> Option<PeerSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_default();
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            counts: self.clone(),
            key,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Whether `key` is exempt from the per-peer cap: root and the agent's own
/// user, whom the agent trusts anyway.
fn trusted(key: PeerKey) -> bool {
    matches!(key, PeerKey::Uid(uid) if uid == 0 || uid == rustix::process::geteuid().as_raw())
}

/// What a request handler may know of its connection, handed to it as an
/// axum `Extension`: a long-poll stretches the connection's lifetime to
/// cover its wait, and answers at once when the server stops.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionControl {
    deadline: Arc<watch::Sender<tokio::time::Instant>>,
    stopping: watch::Receiver<bool>,
}

impl ConnectionControl {
    /// Keeps the connection open until at least `until` (never shortens it).
    /// Only a handler calls this, once a request has been read whole: the
    /// header timeout still bounds slow or idle clients.
    pub(crate) fn keep_open_until(&self, until: tokio::time::Instant) {
        self.deadline.send_if_modified(|deadline| {
            let later = until > *deadline;
            if later {
                *deadline = until;
            }
            later
        });
    }

    /// Resolves once the server stops accepting (shutdown).
    pub(crate) async fn stopping(&self) {
        let mut stopping = self.stopping.clone();
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }
}

/// Serves HTTP/1.1 on `listener` within `limits` until `shutdown` resolves,
/// then lets open connections finish (bounded) and returns. `admit` judges
/// each accepted connection (a peer check, say) and picks its router;
/// refusals, its and the caps', are counted and logged through `refusals`.
pub(crate) async fn serve_limited<L: Accept>(
    listener: L,
    limits: ServerLimits,
    refusals: Arc<Refusals>,
    mut admit: impl FnMut(&L::Stream) -> Admission,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_peer = Arc::new(PeerCounts::default());
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut summary = tokio::time::interval_at(
        tokio::time::Instant::now() + REFUSAL_SUMMARY_INTERVAL,
        REFUSAL_SUMMARY_INTERVAL,
    );
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lingering = Lingering::<L::Stream>::new();
    tokio::pin!(shutdown);
    loop {
        let linger_due = lingering.next_due();
        let stream = tokio::select! {
            accepted = listener.next() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: back off briefly.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = summary.tick() => {
                refusals.summarise();
                continue;
            }
            () = tokio::time::sleep_until(linger_due.unwrap_or_else(tokio::time::Instant::now)),
                if linger_due.is_some() =>
            {
                lingering.close_due::<L>();
                continue;
            }
            () = &mut shutdown => break,
        };
        let (peer, router) = match admit(&stream) {
            Admission::Serve(peer, router) => (peer, router),
            Admission::Refuse(peer, why) => {
                refusals.refuse(&peer, why);
                lingering.refuse::<L>(stream, why.response().as_bytes());
                continue;
            }
        };
        let key = peer.key();
        let peer_slot = if trusted(key) {
            None
        } else {
            match per_peer.take(key, limits.max_connections_per_peer) {
                Some(slot) => Some(slot),
                None => {
                    refusals.refuse(&peer, Refusal::PeerLimit);
                    lingering.refuse::<L>(stream, Refusal::PeerLimit.response().as_bytes());
                    continue;
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refusals.refuse(&peer, Refusal::GlobalLimit);
            lingering.refuse::<L>(stream, Refusal::GlobalLimit.response().as_bytes());
            continue;
        };
        let (deadline_tx, mut deadline) =
            watch::channel(tokio::time::Instant::now() + limits.connection_lifetime);
        let control = ConnectionControl {
            deadline: Arc::new(deadline_tx),
            stopping: stopping_rx.clone(),
        };
        let service = TowerToHyperService::new(router.layer(Extension(control.clone())));
        let mut stop = stop_tx.subscribe();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let _slots = (permit, peer_slot);
            let _done = done;
            // Held here too, so `deadline.changed()` never fails while the
            // connection lives.
            let _control = control;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            loop {
                let until = *deadline.borrow_and_update();
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = stop.recv() => break,
                    () = tokio::time::sleep_until(until) => break,
                    // A long-poll stretched the lifetime.
                    _ = deadline.changed() => {}
                }
            }
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
        });
    }
    // Waiting long-polls answer now; then every connection is shut gracefully.
    stopping_tx.send_replace(true);
    refusals.summarise();
    for (_, stream) in lingering.queue.drain(..) {
        close::<L>(stream);
    }
    drop(stop_tx);
    drop(done_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stranger(uid: u32) -> Peer {
        Peer {
            uid: Some(uid),
            gid: Some(uid),
            pid: Some(4242),
            addr: None,
        }
    }

    #[tokio::test(start_paused = true)]
    #[tracing_test::traced_test]
    async fn a_flood_of_refusals_is_logged_once_then_summarised_per_interval() {
        let metrics = Arc::new(Metrics::default());
        let refusals = Refusals::new("socket", metrics.clone());
        for _ in 0..1200 {
            refusals.refuse(&stranger(1234), Refusal::AllowList);
        }
        refusals.refuse(&stranger(5678), Refusal::AllowList);
        // One line each for the first refusals; nothing yet for the rest.
        logs_assert(|lines| match lines.len() {
            2 => Ok(()),
            n => Err(format!(
                "expected 2 log lines after 1,201 refusals, got {n}"
            )),
        });
        assert!(logs_contain("not on the allow-list"));
        assert!(logs_contain("peer_uid=1234 peer_gid=1234 peer_pid=4242"));

        tokio::time::advance(REFUSAL_SUMMARY_INTERVAL).await;
        refusals.summarise();
        assert!(logs_contain("refused 1199 more connections from uid 1234"));
        // The peer refused once has nothing to summarise.
        assert!(!logs_contain("from uid 5678 since"));

        // Still flooding: summarised again; quiet peers are forgotten, so
        // their next refusal is logged in full again.
        for _ in 0..10 {
            refusals.refuse(&stranger(1234), Refusal::AllowList);
        }
        refusals.summarise();
        assert!(logs_contain("refused 10 more connections from uid 1234"));
        refusals.summarise();
        refusals.summarise();
        refusals.refuse(&stranger(1234), Refusal::AllowList);
        logs_assert(|lines| {
            let full = lines.iter().filter(|l| l.contains("peer_uid=1234")).count();
            (full == 2)
                .then_some(())
                .ok_or(format!("expected 2 full lines for uid 1234, got {full}"))
        });

        let rendered = metrics.render(
            &imds_client::ProviderState::Starting,
            std::time::SystemTime::UNIX_EPOCH,
        );
        assert!(
            rendered.contains(
                "imds_agent_refused_connections_total{endpoint=\"socket\",reason=\"allow_list\"} 1212"
            ),
            "{rendered}"
        );
        assert!(
            rendered.contains("imds_agent_denied_connections_total 1212"),
            "{rendered}"
        );
    }

    #[test]
    fn many_peers_are_tracked_in_bounded_memory() {
        let refusals = Refusals::new("container", Arc::new(Metrics::default()));
        for uid in 0..(MAX_TRACKED_PEERS as u32 * 4) {
            refusals.refuse(&stranger(uid + 1000), Refusal::NoToken);
        }
        let pending = refusals.pending.lock().unwrap();
        assert_eq!(pending.len(), MAX_TRACKED_PEERS + 1);
        assert_eq!(
            pending[&(PeerKey::Other, Refusal::NoToken)],
            MAX_TRACKED_PEERS as u64 * 3 - 1
        );
    }

    #[test]
    fn a_peer_cannot_take_more_than_its_share() {
        let counts = Arc::new(PeerCounts::default());
        let held: Vec<_> = (0..64)
            .map(|_| counts.take(PeerKey::Uid(1000), 64).expect("under the cap"))
            .collect();
        assert!(counts.take(PeerKey::Uid(1000), 64).is_none());
        assert!(counts.take(PeerKey::Uid(1001), 64).is_some());
        drop(held);
        assert!(counts.take(PeerKey::Uid(1000), 64).is_some());
        assert!(trusted(PeerKey::Uid(0)));
        assert!(!trusted(PeerKey::Addr(IpAddr::from([127, 0, 0, 1]))));
    }
}
