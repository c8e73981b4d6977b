//! Outputs the daemon fans the provider's state out to.
//!
//! A sink never calls IMDS: the daemon hands it the credentials to publish, or
//! tells it to withdraw them when the role is detached. Sinks do blocking file
//! I/O; the daemon calls them from `spawn_blocking`.

use std::fmt;

use imds_client::RoleCredentials;

/// One output of the agent (a credentials file, a JSON file, ...).
pub trait Sink: Send + Sync + fmt::Debug {
    /// A short name for logs and metrics, for example `credentials-file`.
    fn name(&self) -> &str;

    /// Makes `current` the published credentials. Called when they change.
    /// On error nothing already published may be damaged.
    fn publish(&self, current: &RoleCredentials) -> anyhow::Result<()>;

    /// Removes our credentials (the role was detached).
    fn withdraw(&self) -> anyhow::Result<()>;
}
