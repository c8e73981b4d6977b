//! Faults the emulator can inject, and how long they last.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A misbehaviour of IMDS.
///
/// Status, latency and dropped connections apply to every IMDS request;
/// `TokenBlackhole` only to token requests; `TokenRejected` only to
/// metadata and credential requests; the body faults and
/// `CredentialsCode` only to credential documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this HTTP status and an empty body (500, 503, 429, ...).
    Status {
        /// The status code.
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

impl Fault {
    pub(crate) fn applies_to(&self, kind: RequestKind) -> bool {
        match self {
            Fault::Status { .. } | Fault::Latency { .. } | Fault::Drop => true,
            Fault::TokenBlackhole => kind == RequestKind::Token,
            Fault::TokenRejected => kind != RequestKind::Token,
            Fault::TruncatedBody | Fault::MalformedJson | Fault::Code { .. } => {
                kind == RequestKind::Credentials
            }
        }
    }
}

/// What a request is, for deciding which faults apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Token,
    Credentials,
    Metadata,
}
