//! The client side of the agent's Unix socket, for its own subcommands
//! (`credential-process`, `refresh`): one HTTP/1.1 exchange, bounded in
//! time and size, on a connection the caller opened (so each command keeps
//! its own hint for a socket it cannot reach).

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The largest answer read from the agent.
const MAX_ANSWER: u64 = 1 << 20;

/// The agent's answer: status, head (status line and headers) and body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: String,
}

impl Answer {
    /// The value of header `name` (case-insensitive), if present.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then_some(value.trim())
        })
    }
}

/// Sends `request` (a whole HTTP/1.1 request with `Connection: close`) and
/// reads the answer, waiting at most `timeout`.
pub(crate) async fn exchange(
    mut stream: UnixStream,
    request: &[u8],
    timeout: Duration,
) -> anyhow::Result<Answer> {
    stream
        .write_all(request)
        .await
        .context("sending the request to the agent")?;
    let mut raw = Vec::new();
    tokio::time::timeout(timeout, stream.take(MAX_ANSWER).read_to_end(&mut raw))
        .await
        .with_context(|| format!("the agent did not answer within {} s", timeout.as_secs()))?
        .context("reading the agent's answer")?;
    let text = String::from_utf8(raw).context("the agent's answer is not text")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the agent's answer is not HTTP")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the agent's answer has no status")?;
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// `GET path` on the socket at `socket`, for tests: the answer, or a panic
/// naming what went wrong. Waits as long as a test may (a day, which a
/// paused clock reaches only if nothing else would ever answer).
#[cfg(test)]
pub(crate) async fn test_get(socket: &std::path::Path, path: &str) -> Answer {
    let stream = UnixStream::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    exchange(stream, request.as_bytes(), Duration::from_secs(24 * 3600))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
}
