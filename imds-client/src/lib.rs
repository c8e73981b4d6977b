//! IMDSv2 session tokens and EC2 instance-role credentials, for any Rust
//! program and the AWS SDK for Rust.
//!
//! ```no_run
//! # async fn demo() -> Result<(), imds_client::Error> {
//! use imds_client::{ImdsClient, ImdsCredentialsProvider};
//!
//! let client = ImdsClient::builder().build()?; // settings from AWS_EC2_METADATA_* too
//! let provider = ImdsCredentialsProvider::builder().source(client).build();
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
//! through the [`CredentialsSource`] trait, so its timing is tested on tokio's
//! paused clock with an injected wall clock ([`time`]) and no sockets.
//!
//! - [`client`]: the IMDSv2 client and its retry table.
//! - [`config`]: where settings come from, in order.
//! - [`credentials`]: the credentials type (secrets redacted in `Debug`,
//!   zeroized on drop) and the IMDS JSON it is parsed from.
//! - [`provider`]: refresh windows, single flight, static stability, and the
//!   AWS SDK's `ProvideCredentials`.
//! - [`error`]: one error type whose kind says what to do.
//! - `mock` (cargo feature `mock`): an IMDSv2 emulator for tests and demos.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

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
pub use provider::{CredentialsSource, ImdsCredentialsProvider, ProviderState, RoleCredentials};
pub use secret::SecretString;
pub use time::{ManualTimeSource, SharedTimeSource, SystemTimeSource, TimeSource};
