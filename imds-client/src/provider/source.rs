//! Where the provider gets role credentials from.
//!
//! The provider talks to a [`CredentialsSource`] rather than to
//! [`ImdsClient`](crate::ImdsClient) directly. The client implements it for
//! production; provider tests implement it with scripted fakes, so refresh
//! timing can run on tokio's paused clock without real sockets (a paused
//! clock auto-advances past I/O waits, which would make socket timeouts fire
//! spuriously).
//!
//! Both answers carry the response's `Date`: the provider re-measures the
//! clock skew on every response, role checks included, so one bad reading is
//! replaced by the next.
//!
//! Public only with the `test-util` feature: it is a seam for tests, not a
//! way to feed the provider credentials from elsewhere.
#![cfg_attr(not(feature = "test-util"), allow(unreachable_pub))]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use crate::credentials::Credentials;
use crate::error::Error;

/// A boxed, sendable future, as returned by [`CredentialsSource`] methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Credentials as fetched, with the server's clock reading.
#[derive(Debug, Clone)]
pub struct FetchedCredentials {
    /// The credentials.
    pub credentials: Credentials,
    /// The `Date` header of the response, for clock-skew detection.
    pub server_time: Option<SystemTime>,
}

/// The attached role's name as fetched, with the server's clock reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedRole {
    /// The role name.
    pub role: String,
    /// The `Date` header of the response (`None` when no request was made,
    /// for a configured role name), for clock-skew detection.
    pub server_time: Option<SystemTime>,
}

/// Something that can name the attached role and fetch its credentials.
pub trait CredentialsSource: Send + Sync + fmt::Debug + 'static {
    /// The name of the attached role.
    /// [`ErrorKind::NoRoleAttached`](crate::ErrorKind::NoRoleAttached) when none is.
    fn role_name(&self) -> BoxFuture<'_, Result<FetchedRole, Error>>;

    /// The current credentials of `role`.
    fn role_credentials<'a>(
        &'a self,
        role: &'a str,
    ) -> BoxFuture<'a, Result<FetchedCredentials, Error>>;
}
