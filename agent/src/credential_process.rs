//! `imds-agent credential-process`: the agent's credentials for
//! `credential_process` in `~/.aws/config`.

use std::path::Path;

use anyhow::{Context, bail};
use tokio::net::UnixStream;

/// Fetches `GET /credentials` from the agent's socket and returns the JSON.
pub async fn fetch(socket: &Path) -> anyhow::Result<String> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "the agent is not running (cannot connect to {})",
            socket.display()
        )
    })?;
    let crate::socket_client::Answer { status, body, .. } = crate::socket_client::exchange(
        stream,
        b"GET /credentials HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        std::time::Duration::from_secs(10),
    )
    .await?;
    if status != 200 {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("HTTP {status}"));
        bail!("{message}");
    }
    Ok(body)
}
