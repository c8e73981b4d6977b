//! Faults the emulator can inject, and how long they last.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A misbehaviour of IMDS.
///
/// Status, redirects, latency and dropped connections apply to every IMDS
/// request; `TokenBlackhole` only to token requests; `TokenRejected` only to
/// metadata and credential requests; the body faults and `Code` only to
/// credential documents; `ExtendedPathStatus` only to the extended
/// credentials path.
///
/// Values outside the ranges [`Fault::check`] states are refused by the
/// control surface; given to [`MockImds::inject`](super::MockImds::inject)
/// they are answered as the nearest sensible thing (a status outside
/// 200-599 as 500, a redirect status outside 300-399 as 307).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this HTTP status and an empty body (500, 503, 429, ...).
    Status {
        /// The status code.
        status: u16,
    },
    /// Answer with this redirect status (301, 302, 307, 308, ...) and a
    /// `Location` header. Real IMDS never redirects: this is a hostile or
    /// broken endpoint.
    Redirect {
        /// The 3xx status.
        status: u16,
        /// Where the redirect points, e.g. `http://127.0.0.1:4000/steal`.
        location: String,
    },
    /// The extended credentials path (`security-credentials-extended/...`)
    /// answers this status and nothing else changes: what moto's IMDS does
    /// (500) for paths it does not know.
    ExtendedPathStatus {
        /// The status code, e.g. 500.
        status: u16,
    },
    /// Wait this long before answering normally.
    Latency {
        /// The added delay in milliseconds.
        millis: u64,
    },
    /// Drop the connection before a response completes.
    Drop,
    /// Token requests connect but are never answered (what a container
    /// behind a hop limit of 1 sees).
    TokenBlackhole,
    /// Metadata requests answer `401 Unauthorized` whatever token they carry
    /// (tokens invalidated faster than the client can use them).
    TokenRejected,
    /// Credential documents are cut off half-way.
    TruncatedBody,
    /// Credential documents are not JSON.
    MalformedJson,
    /// Credential documents carry this `Code` (HTTP 200, as AWS sends it).
    Code {
        /// For example `AssumeRoleUnauthorizedAccess`.
        code: String,
        /// The `Message` field.
        message: String,
    },
}

/// How long an injected fault lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultDuration {
    /// For the next N requests it applies to.
    Requests(u32),
    /// For this long (on tokio's clock).
    For(Duration),
    /// Until cleared.
    Forever,
}

/// The longest latency the control surface accepts: 1 hour.
pub(crate) const MAX_LATENCY_MILLIS: u64 = 3_600_000;
/// The longest `Location` the control surface accepts.
const MAX_LOCATION_LEN: usize = 2048;

impl Fault {
    pub(crate) fn applies_to(&self, kind: RequestKind) -> bool {
        match self {
            Fault::Status { .. } | Fault::Redirect { .. } | Fault::Latency { .. } | Fault::Drop => {
                true
            }
            Fault::TokenBlackhole => kind == RequestKind::Token,
            Fault::TokenRejected => kind != RequestKind::Token,
            Fault::TruncatedBody | Fault::MalformedJson | Fault::Code { .. } => {
                matches!(
                    kind,
                    RequestKind::Credentials | RequestKind::ExtendedCredentials
                )
            }
            Fault::ExtendedPathStatus { .. } => kind == RequestKind::ExtendedCredentials,
        }
    }

    /// Whether every value is in its accepted range; the error names the
    /// field and the range. The control surface refuses a fault that fails.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Fault::Status { status } if !(200..=599).contains(status) => Err(format!(
                "status must be an HTTP status from 200 to 599, got {status}"
            )),
            Fault::ExtendedPathStatus { status } if !(400..=599).contains(status) => Err(format!(
                "status must be an HTTP error status from 400 to 599, got {status}"
            )),
            Fault::Redirect { status, .. } if !(300..=399).contains(status) => Err(format!(
                "status must be a redirect status from 300 to 399, got {status}"
            )),
            Fault::Redirect { location, .. }
                if location.is_empty()
                    || location.len() > MAX_LOCATION_LEN
                    || axum::http::HeaderValue::from_str(location).is_err() =>
            {
                Err(format!(
                    "location must be 1 to {MAX_LOCATION_LEN} visible ASCII characters"
                ))
            }
            Fault::Latency { millis } if *millis > MAX_LATENCY_MILLIS => Err(format!(
                "millis must be from 0 to {MAX_LATENCY_MILLIS} (1 hour), got {millis}"
            )),
            _ => Ok(()),
        }
    }
}

/// What a request is, for deciding which faults apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Token,
    /// The role list and the classic credentials path.
    Credentials,
    /// `security-credentials-extended/...`.
    ExtendedCredentials,
    Metadata,
}
