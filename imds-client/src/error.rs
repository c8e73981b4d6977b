//! The one error type of this crate.
//!
//! [`Error`] is opaque: callers branch on [`Error::kind`], whose variants say
//! what happened in terms of what to do about it (not on EC2, IMDS disabled, no
//! role attached, throttled, ...). The `Display` text is one lowercase phrase
//! saying what failed; the underlying cause, if any, is in
//! [`std::error::Error::source`], and [`Error::hint`] gives the likely fix.
//! No variant ever carries a secret: IMDS tokens, secret keys and session
//! tokens never reach an error.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// What went wrong, in terms of what the caller can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// IMDS access is switched off by configuration (`AWS_EC2_METADATA_DISABLED`).
    /// No request was sent.
    #[error("access to the instance metadata service is disabled by configuration")]
    Disabled,
    /// A setting has an invalid value; `setting` names it (for example
    /// `AWS_METADATA_SERVICE_NUM_ATTEMPTS`). Nothing was sent.
    #[error("invalid value for {setting}: {reason}")]
    InvalidConfiguration {
        /// The setting, as the user would spell it.
        setting: String,
        /// Why the value was refused.
        reason: String,
    },
    /// Nothing answered at the IMDS endpoint: most likely not running on EC2.
    #[error("the instance metadata service is unreachable")]
    Unreachable,
    /// The token request connected but no answer came back: the classic sign
    /// of a hop limit of 1 seen from inside a container.
    #[error("the IMDS session token request timed out")]
    TokenTimeout,
    /// IMDS refused to issue a session token (HTTP status given): IMDS may be
    /// disabled on this instance, or the request looked forwarded.
    #[error("IMDS refused the session token request (HTTP {status})")]
    TokenRejected {
        /// The HTTP status IMDS answered with.
        status: u16,
    },
    /// A request was answered 401 even with a fresh session token.
    #[error("IMDS rejected the session token (HTTP 401)")]
    Unauthorized,
    /// No IAM role is attached to this instance (IMDS lists none).
    #[error("no IAM role is attached to this instance")]
    NoRoleAttached,
    /// The named role (from configuration) is not the one attached.
    #[error("the IAM role {role:?} is not attached to this instance")]
    RoleNotFound {
        /// The configured role name.
        role: String,
    },
    /// IMDS answered with a credentials document whose `Code` is not `Success`.
    #[error("IMDS could not provide role credentials ({code}: {message})")]
    CredentialsUnavailable {
        /// The `Code` field, for example `AssumeRoleUnauthorizedAccess`.
        code: String,
        /// The `Message` field.
        message: String,
    },
    /// A metadata path answered 404.
    #[error("the metadata path {path:?} was not found (HTTP 404)")]
    NotFound {
        /// The path requested.
        path: String,
    },
    /// IMDS kept answering 429 after every retry.
    #[error("IMDS is throttling requests (HTTP 429)")]
    Throttled,
    /// IMDS kept answering with a server error after every retry.
    #[error("IMDS answered with a server error (HTTP {status})")]
    ServerError {
        /// The last HTTP status seen.
        status: u16,
    },
    /// IMDS answered with a redirect. IMDS never redirects, and following one
    /// would hand the session token (and then the credentials' origin) to
    /// whatever host the `Location` names, so this client never does.
    #[error(
        "IMDS answered with a redirect (HTTP {status}, Location: {}), which this client never follows",
        location.as_deref().map_or_else(|| "none".to_owned(), |l| format!("{l:?}"))
    )]
    Redirected {
        /// The 3xx status.
        status: u16,
        /// The `Location` header, if any (at most 256 characters of it).
        location: Option<String>,
    },
    /// IMDS answered with a status this client does not expect.
    #[error("IMDS answered with unexpected HTTP status {status}")]
    UnexpectedStatus {
        /// The HTTP status.
        status: u16,
    },
    /// A request timed out after connecting.
    #[error("the request to IMDS timed out")]
    Timeout,
    /// The connection failed mid-request (reset, closed early).
    #[error("the connection to IMDS failed")]
    Connection,
    /// The response could not be understood; `what` says which part.
    #[error("IMDS sent a malformed response: {what}")]
    MalformedResponse {
        /// What was wrong, never including secret values.
        what: String,
    },
    /// The response body exceeded the size this client accepts.
    #[error("the IMDS response exceeded {limit} bytes")]
    ResponseTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

/// The error returned by everything in this crate.
///
/// Cheap to clone (shared), so one failed load can be handed to every caller
/// that waited on it. One pointer wide, so that a `Result` of credentials
/// and an error stays two words: the cached path returns it in registers.
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl Error {
    /// An error of `kind` with no underlying cause. Public with the
    /// `test-util` feature only: fakes of [`crate::CredentialsSource`] need
    /// to fail the way IMDS does; everyone else receives errors.
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn new(kind: ErrorKind) -> Self {
        Self {
            inner: Arc::new(Inner { kind, source: None }),
        }
    }

    /// An error of `kind` with no underlying cause.
    #[cfg(not(feature = "test-util"))]
    pub(crate) fn new(kind: ErrorKind) -> Self {
        Self {
            inner: Arc::new(Inner { kind, source: None }),
        }
    }

    /// An error of `kind` caused by `source`.
    pub(crate) fn with_source(
        kind: ErrorKind,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                source: Some(Box::new(source)),
            }),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.inner.kind
    }

    /// The likely fix, for logs and operators, when the cause is known.
    pub fn hint(&self) -> Option<&'static str> {
        match &self.inner.kind {
            ErrorKind::Disabled => Some("unset AWS_EC2_METADATA_DISABLED to allow IMDS access"),
            ErrorKind::Unreachable => Some(
                "this does not look like an EC2 instance, or IMDS is turned off \
                 (aws ec2 modify-instance-metadata-options --http-endpoint enabled)",
            ),
            ErrorKind::TokenTimeout => Some(
                "the token reply was probably dropped by the hop limit (common in containers): \
                 raise it with aws ec2 modify-instance-metadata-options --http-put-response-hop-limit 2",
            ),
            ErrorKind::TokenRejected { .. } => Some(
                "IMDS may be disabled for this instance, or the request passed through a proxy \
                 (X-Forwarded-For is refused)",
            ),
            ErrorKind::NoRoleAttached => {
                Some("this instance may not have an IAM role (instance profile) associated")
            }
            ErrorKind::RoleNotFound { .. } => Some(
                "check AWS_EC2_INSTANCE_PROFILE_NAME against the role attached to the instance",
            ),
            ErrorKind::CredentialsUnavailable { code, .. }
                if code == "AssumeRoleUnauthorizedAccess" =>
            {
                Some("the role's trust policy must allow ec2.amazonaws.com to call sts:AssumeRole")
            }
            ErrorKind::Throttled => {
                Some("too many IMDS requests from this instance; cache credentials")
            }
            ErrorKind::Redirected { .. } => Some(
                "IMDS itself never redirects: check AWS_EC2_METADATA_SERVICE_ENDPOINT and \
                 whatever sits between this host and it (a proxy, a captive portal)",
            ),
            _ => None,
        }
    }

    /// Whether trying again later may succeed without anyone changing the
    /// instance's configuration. Static stability keeps serving the last good
    /// credentials only for these.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::Unreachable
                | ErrorKind::TokenTimeout
                | ErrorKind::Unauthorized
                | ErrorKind::Throttled
                | ErrorKind::ServerError { .. }
                | ErrorKind::Timeout
                | ErrorKind::Connection
                | ErrorKind::MalformedResponse { .. }
                | ErrorKind::ResponseTooLarge { .. }
                | ErrorKind::Redirected { .. }
                | ErrorKind::UnexpectedStatus { .. }
        )
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind);
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner.kind, f)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Self::new(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_result_is_two_words() {
        // The cached path returns `Result<Credentials, Error>`: kept small,
        // it travels in registers instead of through the stack.
        assert_eq!(size_of::<Error>(), size_of::<usize>());
        assert_eq!(
            size_of::<Result<crate::Credentials, Error>>(),
            2 * size_of::<usize>()
        );
    }

    #[test]
    fn display_is_the_kind_and_cause_is_the_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::with_source(ErrorKind::Unreachable, io);
        assert_eq!(
            err.to_string(),
            "the instance metadata service is unreachable"
        );
        assert_eq!(err.source().unwrap().to_string(), "refused");
        assert!(err.hint().unwrap().contains("EC2"));
        assert!(err.is_transient());
    }

    #[test]
    fn trust_policy_failures_get_a_hint_and_are_not_transient() {
        let err = Error::new(ErrorKind::CredentialsUnavailable {
            code: "AssumeRoleUnauthorizedAccess".into(),
            message: "EC2 cannot assume the role".into(),
        });
        assert!(err.hint().unwrap().contains("trust policy"));
        assert!(!err.is_transient());
    }
}
