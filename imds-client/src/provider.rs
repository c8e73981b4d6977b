//! The caching, refreshing credentials provider.

mod source;
mod state;

pub use source::{BoxFuture, CredentialsSource, FetchedCredentials};
pub use state::{ProviderState, RoleCredentials};
