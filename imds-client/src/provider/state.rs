//! What the provider knows right now, published to subscribers.
//!
//! The agent (and any other consumer that wants to react to role changes)
//! holds a `tokio::sync::watch::Receiver<ProviderState>` and fans the state out
//! to its outputs; it never calls IMDS itself.

use std::sync::Arc;

use crate::credentials::Credentials;
use crate::error::Error;

/// Credentials of the role attached now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleCredentials {
    /// The IAM role (instance profile role) name.
    pub role: String,
    /// Its current credentials.
    pub credentials: Arc<Credentials>,
}

/// The provider's view of the instance's role and credentials.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ProviderState {
    /// Nothing is known yet: the first load has not finished.
    Starting,
    /// Credentials for the attached role. `last_error` is set while refreshes
    /// fail but the credentials are still being served (static stability).
    Active {
        /// The role and its credentials.
        current: RoleCredentials,
        /// The most recent refresh failure, cleared on the next success.
        last_error: Option<Error>,
    },
    /// IMDS says no role is attached: nothing may be handed out.
    NoRole,
    /// No usable credentials: IMDS failed and nothing valid is cached.
    /// `stale` holds the last good credentials, if any, now past expiry.
    Unavailable {
        /// Why the last load failed.
        error: Error,
        /// The last good credentials, already expired.
        stale: Option<RoleCredentials>,
    },
}

impl ProviderState {
    /// The role and credentials currently served, if any.
    pub fn current(&self) -> Option<&RoleCredentials> {
        match self {
            ProviderState::Active { current, .. } => Some(current),
            _ => None,
        }
    }
}
