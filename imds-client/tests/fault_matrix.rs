//! Every IMDS fault the emulator can inject, in every phase of a provider's
//! life: the caller gets valid credentials or a clear typed error, never a
//! panic or a hang, and everything recovers once the fault clears.
//!
//! What each cell expects (the `MATRIX` table below is the executable form):
//!
//! | fault                  | cold start   | steady (refresh) | just before expiry | role replaced (poll) |
//! |------------------------|--------------|------------------|--------------------|----------------------|
//! | 500 burst (2 requests) | fresh        | fresh            | fresh              | fresh (new role)     |
//! | 503 burst (2 requests) | fresh        | fresh            | fresh              | fresh (new role)     |
//! | 429 storm              | Throttled    | kept             | kept               | kept (old role)      |
//! | latency > timeout      | TokenTimeout | kept             | kept               | kept (old role)      |
//! | dropped connections    | Connection   | kept             | kept               | kept (old role)      |
//! | truncated JSON         | Malformed    | kept             | kept               | kept (old role)      |
//! | malformed JSON         | Malformed    | kept             | kept               | kept (old role)      |
//! | `Code` not `Success`   | Unavailable  | Unavailable      | Unavailable        | Unavailable          |
//! | tokens rejected        | Unauthorized | kept             | kept               | kept (old role)      |
//! | endpoint disabled      | TokenRejected| kept             | kept               | kept (old role)      |
//! | tokens made required   | fresh        | fresh            | fresh              | fresh (new role)     |
//!
//! - *fresh*: the emulator's current credentials (a short burst is absorbed
//!   by the retries; we always use tokens, so requiring them changes nothing).
//! - *kept*: static stability: the last good credentials, still valid, and
//!   the failure is published in the provider's state (`last_error`).
//! - an error kind: a typed [`ErrorKind`]; transient ones are retried by the
//!   caller's next call. `Code` other than `Success` (the role's trust policy)
//!   is not transient: the credentials are withdrawn rather than served
//!   against IMDS's word. A disabled endpoint refuses tokens (`403`): with no
//!   credentials yet that is a typed error; with credentials still valid they
//!   keep being served until they expire (AWS does not revoke them either).
//! - a latency fault hits the token request first, which the client reports
//!   as `TokenTimeout` (the hop-limit symptom: it cannot tell the two apart).
//!
//! After the fault clears and the clock moves past the back-off (11 min),
//! every cell yields the emulator's current credentials for its current role.
#![cfg(feature = "mock")]

use std::time::{Duration, SystemTime};

use imds_client::config::Env;
use imds_client::mock::{Fault, FaultDuration, MockImds};
use imds_client::{
    Error, ImdsClient, ImdsCredentialsProvider, ManualTimeSource, ProviderState, RoleCredentials,
    SharedTimeSource,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Cold,
    Steady,
    NearExpiry,
    Replacement,
}

const PHASES: [Phase; 4] = [
    Phase::Cold,
    Phase::Steady,
    Phase::NearExpiry,
    Phase::Replacement,
];

#[derive(Debug, Clone)]
enum Injected {
    Fault(Fault, FaultDuration),
    Disabled,
    TokensRequired,
}

/// One row: the fault and the outcome expected in each phase, in `PHASES` order.
struct Row {
    name: &'static str,
    injected: fn() -> Injected,
    expected: [&'static str; 4],
}

const KEPT: [&str; 4] = ["", "kept", "kept", "kept"];

const MATRIX: &[Row] = &[
    Row {
        name: "500 burst",
        injected: || Injected::Fault(Fault::Status { status: 500 }, FaultDuration::Requests(2)),
        expected: ["fresh", "fresh", "fresh", "fresh"],
    },
    Row {
        name: "503 burst",
        injected: || Injected::Fault(Fault::Status { status: 503 }, FaultDuration::Requests(2)),
        expected: ["fresh", "fresh", "fresh", "fresh"],
    },
    Row {
        name: "429 storm",
        injected: || Injected::Fault(Fault::Status { status: 429 }, FaultDuration::Forever),
        expected: ["Throttled", KEPT[1], KEPT[2], KEPT[3]],
    },
    Row {
        name: "latency beyond the timeout",
        injected: || Injected::Fault(Fault::Latency { millis: 2_000 }, FaultDuration::Forever),
        // The token request is the first to time out: from the client's side
        // this looks like the hop-limit symptom, and is reported as such.
        expected: ["TokenTimeout", KEPT[1], KEPT[2], KEPT[3]],
    },
    Row {
        name: "dropped connections",
        injected: || Injected::Fault(Fault::Drop, FaultDuration::Forever),
        expected: ["Connection", KEPT[1], KEPT[2], KEPT[3]],
    },
    Row {
        name: "truncated JSON",
        injected: || Injected::Fault(Fault::TruncatedBody, FaultDuration::Forever),
        expected: ["MalformedResponse", KEPT[1], KEPT[2], KEPT[3]],
    },
    Row {
        name: "malformed JSON",
        injected: || Injected::Fault(Fault::MalformedJson, FaultDuration::Forever),
        expected: ["MalformedResponse", KEPT[1], KEPT[2], KEPT[3]],
    },
    Row {
        name: "Code other than Success",
        injected: || {
            Injected::Fault(
                Fault::Code {
                    code: "AssumeRoleUnauthorizedAccess".into(),
                    message: "not authorized".into(),
                },
                FaultDuration::Forever,
            )
        },
        expected: [
            "CredentialsUnavailable",
            "CredentialsUnavailable",
            "CredentialsUnavailable",
            "CredentialsUnavailable",
        ],
    },
    Row {
        name: "tokens rejected",
        injected: || Injected::Fault(Fault::TokenRejected, FaultDuration::Forever),
        expected: ["Unauthorized", KEPT[1], KEPT[2], KEPT[3]],
    },
    Row {
        name: "endpoint disabled",
        injected: || Injected::Disabled,
        // Without a token, none can be had; with one, the 403s are treated
        // as transient and credentials still valid keep being served.
        expected: ["TokenRejected", KEPT[1], KEPT[2], KEPT[3]],
    },
    Row {
        name: "tokens made required",
        injected: || Injected::TokensRequired,
        expected: ["fresh", "fresh", "fresh", "fresh"],
    },
];

/// The bound on any single call: a cell that takes longer is a hang.
const NO_HANG: Duration = Duration::from_secs(10);

struct Cell {
    imds: MockImds,
    clock: ManualTimeSource,
    provider: ImdsCredentialsProvider,
    /// The credentials the provider held before the fault, if any.
    before: Option<RoleCredentials>,
}

impl Cell {
    async fn new(phase: Phase) -> Self {
        let clock =
            ManualTimeSource::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        let shared = SharedTimeSource::new(clock.clone());
        let imds = MockImds::builder()
            .role("first-role")
            .time_source(shared.clone())
            .start()
            .await
            .unwrap();
        let client = ImdsClient::builder()
            .env(Env::empty())
            .endpoint(imds.endpoint())
            .unwrap()
            .connect_timeout(Duration::from_millis(300))
            .read_timeout(Duration::from_millis(300))
            .max_attempts(3)
            // Recovery is checked at once, on tokio's real clock: no memo.
            .unreachable_memo(Duration::ZERO)
            .build()
            .unwrap();
        let provider = ImdsCredentialsProvider::builder()
            .source(client)
            .time_source(shared)
            .build();
        let mut cell = Self {
            imds,
            clock,
            provider,
            before: None,
        };
        if phase != Phase::Cold {
            cell.before = Some(cell.call(Phase::Cold).await.expect("a good first fetch"));
        }
        match phase {
            Phase::Cold => {}
            Phase::Steady => {
                // New keys at IMDS, so a refresh that gets them is told
                // apart from one that keeps the old.
                cell.clock.advance(Duration::from_secs(60));
                cell.imds.rotate();
            }
            Phase::NearExpiry => {
                let expires = cell.before.as_ref().unwrap().credentials.expiration();
                cell.clock.set(expires - Duration::from_secs(30));
            }
            Phase::Replacement => cell.imds.replace_role("second-role"),
        }
        cell
    }

    fn inject(&self, injected: Injected) {
        match injected {
            Injected::Fault(fault, duration) => self.imds.inject(fault, duration),
            Injected::Disabled => self.imds.set_enabled(false),
            Injected::TokensRequired => self.imds.set_tokens_required(true),
        }
    }

    fn clear(&self) {
        self.imds.clear_faults();
        self.imds.set_enabled(true);
    }

    /// What a caller does in `phase`: a cold or near-expiry `credentials()`,
    /// a forced refresh (SIGHUP) in steady state, a poll after replacement.
    async fn call(&self, phase: Phase) -> Result<RoleCredentials, Error> {
        let call = async {
            match phase {
                Phase::Cold | Phase::NearExpiry => self.provider.role_credentials().await,
                Phase::Steady => self.provider.refresh_now().await,
                Phase::Replacement => self.provider.poll().await,
            }
        };
        tokio::time::timeout(NO_HANG, call)
            .await
            .unwrap_or_else(|_| panic!("{phase:?}: no answer within {NO_HANG:?}"))
    }

    /// Names the outcome as the table does.
    fn outcome(&self, result: &Result<RoleCredentials, Error>) -> String {
        match result {
            Err(e) => {
                let kind = format!("{:?}", e.kind());
                // No secret in what a caller would log.
                let shown = format!("{e} {e:?}");
                if let Some(before) = &self.before {
                    assert!(!shown.contains(before.credentials.secret_access_key()));
                }
                kind.split([' ', '{', '(']).next().unwrap().to_owned()
            }
            Ok(got) => {
                assert!(
                    got.credentials.expiration() > self.clock_now(),
                    "expired credentials served"
                );
                let issued = self.imds.current_credentials().unwrap();
                if got.credentials.access_key_id() == issued.access_key_id()
                    && Some(&got.role) == self.imds.role().as_ref()
                {
                    "fresh".into()
                } else if self.before.as_ref() == Some(got) {
                    "kept".into()
                } else {
                    format!("unexpected credentials for role {}", got.role)
                }
            }
        }
    }

    fn clock_now(&self) -> SystemTime {
        imds_client::TimeSource::now(&self.clock)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fault_in_every_phase_gives_valid_credentials_or_a_typed_error_and_recovers() {
    let mut failures = Vec::new();
    for row in MATRIX {
        for (phase, expected) in PHASES.into_iter().zip(row.expected) {
            let cell = Cell::new(phase).await;
            cell.inject((row.injected)());
            let result = cell.call(phase).await;
            let got = cell.outcome(&result);
            if got != expected {
                failures.push(format!(
                    "{} / {phase:?}: expected {expected}, got {got}",
                    row.name
                ));
            }
            if got == "kept" {
                // The failure is visible to subscribers (and the agent's metrics).
                match &*cell.provider.subscribe().borrow() {
                    ProviderState::Active { last_error, .. } => assert!(
                        last_error.is_some(),
                        "{} / {phase:?}: kept without a recorded error",
                        row.name
                    ),
                    other => panic!("{} / {phase:?}: state {other:?}", row.name),
                }
            }

            // Recovery.
            cell.clear();
            cell.clock.advance(Duration::from_secs(11 * 60));
            let recovered = cell.call(phase).await;
            let got = cell.outcome(&recovered);
            if got != "fresh" {
                failures.push(format!(
                    "{} / {phase:?}: after the fault cleared, got {got}",
                    row.name
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "cells not as the table says:\n{}",
        failures.join("\n")
    );
}
