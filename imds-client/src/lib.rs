//! IMDSv2 session tokens and EC2 instance-role credentials.
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
