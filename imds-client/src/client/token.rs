//! The IMDSv2 session token and its cache.
//!
//! IMDSv2 is a two-step protocol: `PUT /latest/api/token` with the wanted
//! lifetime in `X-aws-ec2-metadata-token-ttl-seconds` returns a token, and
//! every metadata `GET` carries it in `X-aws-ec2-metadata-token`. A token is
//! reused until [`TOKEN_REFRESH_BUFFER`] before its TTL runs out, counted on
//! tokio's monotonic clock from when the request was *sent* (so a slow answer
//! cannot make us keep a token past its life). The cache's async mutex is held
//! while a token is fetched, so concurrent callers share one request.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::secret::SecretString;

/// How long before a token's TTL ends it is replaced.
pub const TOKEN_REFRESH_BUFFER: Duration = Duration::from_secs(120);

/// A token, or `None` when the client fell back to IMDSv1.
pub(crate) type MaybeToken = Option<SecretString>;

#[derive(Debug)]
struct Cached {
    token: MaybeToken,
    refresh_at: Instant,
}

/// A single-flight cache of the session token.
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    current: Mutex<Option<Cached>>,
}

impl TokenCache {
    /// The cached token, or the result of `fetch` (run by one caller at a time;
    /// the others wait and then reuse what it got).
    pub(crate) async fn get_or_fetch<F, Fut, E>(
        &self,
        ttl: Duration,
        fetch: F,
    ) -> Result<MaybeToken, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<MaybeToken, E>>,
    {
        let mut current = self.current.lock().await;
        if let Some(cached) = current.as_ref()
            && Instant::now() < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        let sent_at = Instant::now();
        let token = fetch().await?;
        let life = ttl.saturating_sub(TOKEN_REFRESH_BUFFER).max(ttl / 2);
        *current = Some(Cached {
            token: token.clone(),
            refresh_at: sent_at + life,
        });
        Ok(token)
    }

    /// Forgets the token (IMDS answered 401).
    pub(crate) async fn invalidate(&self) {
        *self.current.lock().await = None;
    }
}
