//! `POST /refresh`: a refresh a client can ask for, without a signal.
//!
//! A client whose AWS call failed with `ExpiredToken` (its credentials were
//! revoked, or it held on to them past a rotation) may ask the agent to ask
//! IMDS again now, rather than wait for the next poll. Only root can send
//! the agent SIGHUP, so the credential socket takes the request, from the
//! peers it already serves `/credentials` to.
//!
//! The request takes the same path as SIGHUP: the socket server hands it to
//! the daemon's reload source ([`crate::signals::Reloads`]), the daemon calls
//! the provider's `refresh_now` and the outputs follow as for any other
//! change. The client is answered when that refresh is done, with what it
//! brought.
//!
//! IMDS is shared by everything on the instance and throttles, so requests
//! are bounded: at most one refresh runs at a time, and a request made while
//! one runs waits for it and gets its answer (a burst of clients that all got
//! `ExpiredToken` at once causes one request to IMDS). After a refresh
//! finished, further requests are refused for [`MIN_INTERVAL`] with 429 and a
//! `Retry-After`: IMDS would have nothing newer, and the answer to the last
//! refresh is what `GET /credentials` serves meanwhile.
//!
//! The client side, `imds-agent refresh`, is [`request`].

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use imds_client::RoleCredentials;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;

/// After a refresh finished, further requests are refused (429) for this long.
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);

/// What a refresh brought: the credentials, or why there are none.
pub type Outcome = Result<RoleCredentials, Failure>;

/// A refresh that brought no credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// IMDS says no role is attached.
    pub no_role: bool,
    /// What failed, with its hint (never a secret: the error's text).
    pub message: String,
}

/// The daemon's end of one requested refresh: answer it once done.
#[derive(Debug)]
pub struct Pending {
    reply: watch::Sender<Option<(Instant, Outcome)>>,
}

impl Pending {
    /// Answers every client waiting on this refresh with its result.
    pub fn answer(self, result: &Result<RoleCredentials, imds_client::Error>) {
        let outcome = match result {
            Ok(current) => Ok(current.clone()),
            Err(e) => Err(Failure {
                no_role: matches!(e.kind(), imds_client::ErrorKind::NoRoleAttached),
                message: match e.hint() {
                    Some(hint) => format!("{e}. Hint: {hint}"),
                    None => e.to_string(),
                },
            }),
        };
        self.reply.send_replace(Some((Instant::now(), outcome)));
    }
}

/// How a request for a refresh was answered.
#[derive(Debug)]
pub enum Answer {
    /// The refresh ran (started by this request, or joined): what it brought.
    Done(Outcome),
    /// A refresh finished less than [`MIN_INTERVAL`] ago: ask again after this long.
    TooSoon(Duration),
    /// The agent is stopping.
    Stopping,
}

type Reply = watch::Receiver<Option<(Instant, Outcome)>>;

/// The server's end: asks the daemon for refreshes, one at a time and at
/// most one per [`MIN_INTERVAL`].
#[derive(Debug, Clone)]
pub struct Refresher {
    requests: mpsc::UnboundedSender<Pending>,
    /// The last refresh asked for: running (no answer yet) or done.
    last: Arc<Mutex<Option<Reply>>>,
    min_interval: Duration,
    metrics: Arc<Metrics>,
}

/// A refresher, and the requests it makes, for the daemon's reload source
/// ([`crate::signals::Reloads::with_requests`]).
pub fn channel(
    min_interval: Duration,
    metrics: Arc<Metrics>,
) -> (Refresher, mpsc::UnboundedReceiver<Pending>) {
    let (requests, rx) = mpsc::unbounded_channel();
    let refresher = Refresher {
        requests,
        last: Arc::new(Mutex::new(None)),
        min_interval,
        metrics,
    };
    (refresher, rx)
}

impl Refresher {
    /// Asks for a refresh now and waits until it is done; joins one already
    /// running; refuses within [`MIN_INTERVAL`] of the last one.
    pub async fn refresh(&self) -> Answer {
        let mut reply = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let running = match last.as_ref() {
                Some(reply) => {
                    let answered = reply.borrow().as_ref().map(|(at, _)| *at);
                    match answered {
                        Some(at) if at.elapsed() < self.min_interval => {
                            self.metrics.refresh_request("rate_limited");
                            return Answer::TooSoon(self.min_interval - at.elapsed());
                        }
                        Some(_) => None,
                        // No answer yet, and the daemon still holds the
                        // request: it is running.
                        None if reply.has_changed().is_ok() => Some(reply.clone()),
                        None => None,
                    }
                }
                None => None,
            };
            match running {
                Some(reply) => {
                    self.metrics.refresh_request("joined");
                    reply
                }
                None => {
                    let (tx, rx) = watch::channel(None);
                    if self.requests.send(Pending { reply: tx }).is_err() {
                        self.metrics.refresh_request("stopping");
                        return Answer::Stopping;
                    }
                    self.metrics.refresh_request("started");
                    *last = Some(rx.clone());
                    rx
                }
            }
        };
        match reply.wait_for(Option::is_some).await {
            Ok(answered) => match answered.as_ref() {
                Some((_, outcome)) => Answer::Done(outcome.clone()),
                None => Answer::Stopping,
            },
            // The daemon dropped the request unanswered: it is stopping.
            Err(_) => Answer::Stopping,
        }
    }
}

/// `imds-agent refresh`: `POST /refresh` on the agent's socket. Returns the
/// line to print (the new credentials' key id and expiry, never a secret),
/// or the agent's error. Asked again once if the agent says a refresh just
/// ran (429), after the `Retry-After` it gives (at most [`MIN_INTERVAL`]).
pub async fn request(socket: &Path) -> anyhow::Result<String> {
    let mut answer = post_refresh(socket).await?;
    if answer.status == 429 {
        let wait = answer.retry_after.unwrap_or(MIN_INTERVAL).min(MIN_INTERVAL);
        tokio::time::sleep(wait).await;
        answer = post_refresh(socket).await?;
    }
    let body: serde_json::Value = serde_json::from_str(&answer.body)
        .with_context(|| format!("the agent's answer (HTTP {}) is not JSON", answer.status))?;
    if answer.status != 200 {
        let message = body["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("HTTP {}", answer.status));
        bail!("the refresh failed: {message}");
    }
    let key = body["AccessKeyId"].as_str().unwrap_or("?");
    let expiration = body["Expiration"].as_str().unwrap_or("?");
    Ok(format!(
        "refreshed: the agent now serves access key {key}, expiring {expiration}"
    ))
}

struct HttpAnswer {
    status: u16,
    retry_after: Option<Duration>,
    body: String,
}

async fn post_refresh(socket: &Path) -> anyhow::Result<HttpAnswer> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the agent's socket {} (is the agent running, and may this user use its socket?)",
                socket.display()
            )
        })?;
    // The agent answers when IMDS has (its own timeouts and retries bound that).
    let answer = crate::socket_client::exchange(
        stream,
        b"POST /refresh HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Duration::from_secs(60),
    )
    .await?;
    let retry_after = answer
        .header("retry-after")
        .and_then(|value| value.parse().ok().map(Duration::from_secs));
    Ok(HttpAnswer {
        status: answer.status,
        retry_after,
        body: answer.body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use imds_client::Credentials;
    use std::time::SystemTime;

    fn creds(key: &str) -> RoleCredentials {
        RoleCredentials {
            role: "r".into(),
            credentials: Arc::new(Credentials::new(
                key,
                "secret",
                "token",
                SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000),
            )),
        }
    }

    /// A timeline on the paused clock: requests while one runs join it; one
    /// right after it finished is refused until the interval has passed.
    #[tokio::test(start_paused = true)]
    async fn one_refresh_at_a_time_and_at_most_one_per_interval() {
        let metrics = Arc::new(Metrics::default());
        let (refresher, mut daemon) = channel(MIN_INTERVAL, metrics.clone());
        let first = tokio::spawn({
            let r = refresher.clone();
            async move { r.refresh().await }
        });
        let pending = daemon
            .recv()
            .await
            .expect("the first request reaches the daemon");
        let joined: Vec<_> = (0..5)
            .map(|_| {
                let r = refresher.clone();
                tokio::spawn(async move { r.refresh().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(
            daemon.try_recv().is_err(),
            "requests made while a refresh runs join it"
        );
        pending.answer(&Ok(creds("ASIANEW")));
        for task in std::iter::once(first).chain(joined) {
            match task.await.unwrap() {
                Answer::Done(Ok(c)) => assert_eq!(c, creds("ASIANEW")),
                other => panic!("expected the refresh's credentials, got {other:?}"),
            }
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        match refresher.refresh().await {
            Answer::TooSoon(wait) => assert_eq!(wait, Duration::from_secs(3)),
            other => panic!("expected 429 two seconds after a refresh, got {other:?}"),
        }
        tokio::time::advance(Duration::from_secs(3)).await;
        let next = tokio::spawn({
            let r = refresher.clone();
            async move { r.refresh().await }
        });
        let pending = daemon
            .recv()
            .await
            .expect("a new refresh once the interval passed");
        drop(pending);
        assert!(
            matches!(next.await.unwrap(), Answer::Stopping),
            "a request the daemon drops (it is stopping) is answered"
        );
        drop(daemon);
        assert!(matches!(refresher.refresh().await, Answer::Stopping));
        let rendered = metrics.render(
            &imds_client::ProviderState::Starting,
            SystemTime::UNIX_EPOCH,
        );
        for line in [
            "imds_agent_refresh_requests_total{outcome=\"started\"} 2",
            "imds_agent_refresh_requests_total{outcome=\"joined\"} 5",
            "imds_agent_refresh_requests_total{outcome=\"rate_limited\"} 1",
            "imds_agent_refresh_requests_total{outcome=\"stopping\"} 1",
        ] {
            assert!(rendered.contains(line), "expected {line:?} in:\n{rendered}");
        }
    }
}
