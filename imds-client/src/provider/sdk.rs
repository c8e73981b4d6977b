//! The AWS SDK for Rust's `ProvideCredentials`.
//!
//! A cached call answers with a ready future holding a clone of the SDK's
//! credentials type, which the cache built once per fetch: no boxing, no
//! conversion per call. Only a call that has to wait for IMDS boxes a future.
//!
//! Failures map onto the SDK's credential taxonomy deliberately:
//! no role or IMDS unreachable / disabled -> `not_loaded` (the SDK's chain may
//! try the next provider); configuration problems (trust policy, wrong role
//! name) -> `invalid_configuration`; malformed answers -> `unhandled`;
//! everything else (5xx, throttling, timeouts) -> `provider_error`.

use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials};

use super::ImdsCredentialsProvider;
use crate::error::{Error, ErrorKind};

/// The provider name the SDK sees on credentials from this crate.
pub const PROVIDER_NAME: &str = "imds-client";

impl ProvideCredentials for ImdsCredentialsProvider {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        if let Some(credentials) = self.cached_sdk() {
            return provider::future::ProvideCredentials::ready(Ok(credentials));
        }
        provider::future::ProvideCredentials::new(async move {
            self.resolve_sdk().await.map_err(to_credentials_error)
        })
    }

    fn fallback_on_interrupt(&self) -> Option<aws_credential_types::Credentials> {
        self.last_good_sdk()
    }
}

pub(crate) fn to_credentials_error(error: Error) -> CredentialsError {
    match error.kind() {
        ErrorKind::NoRoleAttached
        | ErrorKind::Unreachable
        | ErrorKind::Disabled
        | ErrorKind::TokenTimeout => CredentialsError::not_loaded(error),
        ErrorKind::CredentialsUnavailable { .. }
        | ErrorKind::RoleNotFound { .. }
        | ErrorKind::InvalidConfiguration { .. }
        | ErrorKind::TokenRejected { .. } => CredentialsError::invalid_configuration(error),
        ErrorKind::MalformedResponse { .. } | ErrorKind::ResponseTooLarge { .. } => {
            CredentialsError::unhandled(error)
        }
        _ => CredentialsError::provider_error(error),
    }
}
