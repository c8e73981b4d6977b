//! IMDSv2 session tokens and EC2 instance-role credentials, for any Rust
//! program and the AWS SDK for Rust.
//!
//! ```no_run
//! # async fn demo() -> Result<(), imds_client::Error> {
//! use imds_client::{ImdsClient, ImdsCredentialsProvider};
//!
//! // The client's settings come from AWS_EC2_METADATA_* and ~/.aws/config too;
//! // `.imds_client(..)` is needed only to set them in code.
//! let client = ImdsClient::builder().build()?;
//! let provider = ImdsCredentialsProvider::builder().imds_client(client).build();
//! let credentials = provider.credentials().await?; // cached; refreshed before expiry
//! println!("{} expires {}", credentials.access_key_id(), credentials.expiration_rfc3339());
//! # Ok(()) }
//! ```
//!
//! # Design
//!
//! Data flows one way: [`ImdsClient`] speaks HTTP to IMDS (session token,
//! retries, timeouts, bounded bodies); [`ImdsCredentialsProvider`] turns that
//! into cached, refreshed credentials and publishes a [`ProviderState`] that
//! consumers (such as `imds-agent`) subscribe to. The provider reads the client
//! through a trait, so its timing is tested on tokio's paused clock with an
//! injected wall clock ([`time`]) and no sockets.
//!
//! - [`client`]: the IMDSv2 client and its retry table.
//! - [`config`]: where settings come from, in order.
//! - [`credentials`]: the credentials type (secrets redacted in `Debug`,
//!   zeroized on drop) and the IMDS JSON it is parsed from.
//! - [`provider`]: refresh windows, single flight, static stability, and the
//!   AWS SDK's `ProvideCredentials`.
//! - [`error`]: one error type whose kind says what to do.
//! - `mock` (cargo feature `mock`): an IMDSv2 emulator for tests and demos.
//!
//! # Features
//!
//! - `mock`: the IMDSv2 emulator (module `mock`).
//! - `test-util`: seams for testing code built on the provider: the
//!   provider builder's `source` (any `CredentialsSource`, for scripted
//!   fakes) and `ManualTimeSource`. Not for production builds.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod client;
pub mod config;
pub mod credentials;
pub mod error;
#[cfg(feature = "mock")]
pub mod mock;
pub mod provider;
pub mod secret;
pub mod time;

pub use client::ImdsClient;
pub use credentials::Credentials;
pub use error::{Error, ErrorKind};
#[cfg(feature = "test-util")]
pub use provider::CredentialsSource;
pub use provider::{
    ImdsCredentialsProvider, ImdsCredentialsProviderBuilder, ProviderState, RoleCredentials,
};
pub use secret::SecretString;
#[cfg(feature = "test-util")]
pub use time::ManualTimeSource;
pub use time::{SharedTimeSource, SystemTimeSource, TimeSource};
