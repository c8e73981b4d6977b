//! `imds-agent credential-process`: the agent's credentials for
//! `credential_process` in `~/.aws/config`.

use std::path::Path;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Fetches `GET /credentials` from the agent's socket and returns the JSON.
pub async fn fetch(socket: &Path) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "the agent is not running (cannot connect to {})",
            socket.display()
        )
    })?;
    stream
        .write_all(b"GET /credentials HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .context("sending the request to the agent")?;
    let mut raw = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.take(1 << 20).read_to_end(&mut raw),
    )
    .await
    .context("the agent did not answer within 10 s")?
    .context("reading the agent's answer")?;
    let text = String::from_utf8(raw).context("the agent's answer is not text")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the agent's answer is not HTTP")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the agent's answer has no status")?;
    if status != 200 {
        let message = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("HTTP {status}"));
        bail!("{message}");
    }
    Ok(body.to_owned())
}
