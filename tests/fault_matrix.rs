//! The agent under every IMDS fault, at cold start and in steady state: it
//! never writes bad data, keeps the last good credentials while they are
//! valid, counts the failure in its metrics, and recovers once the fault
//! clears.
//!
//! In steady state, `/healthz` says `degraded` (HTTP 200) while a fault that
//! hits every request lasts (status, latency, drops, 401s, disabled).
//!
//! | fault                  | cold start: outputs | cold: health | steady: outputs after a rotation + SIGHUP |
//! |------------------------|---------------------|--------------|-------------------------------------------|
//! | 500 / 503 burst (2)    | written             | ok           | new keys (absorbed by retries)            |
//! | 429 storm              | none                | 503          | old keys kept, failure counted            |
//! | latency > timeout      | none                | 503          | old keys kept, failure counted            |
//! | dropped connections    | none                | 503          | old keys kept, failure counted            |
//! | truncated / malformed  | none                | 503          | old keys kept, failure counted            |
//! | `Code` not `Success`   | none                | 503          | old keys kept in files (still valid), failure counted |
//! | tokens rejected        | none                | 503          | old keys kept, failure counted            |
//! | endpoint disabled      | none                | 503          | old keys kept, failure counted            |
//! | tokens made required   | written             | ok           | new keys                                  |
//!
//! During a role replacement, every fault that is not absorbed keeps the old
//! role's keys in the outputs (whole) until it clears; then the new role's
//! keys are written. Just before expiry (12-second credentials, so the real
//! clock can be used), a 503 storm, dropped connections or malformed JSON
//! leave the old keys in place and served while they are valid, and the new
//! keys are written once IMDS answers again.
//!
//! In every cell, once the fault clears the outputs hold the emulator's
//! current keys. The library's `imds-client/tests/fault_matrix.rs` runs the
//! same faults through all four phases with a movable clock.

use std::path::{Path, PathBuf};

use imds_client::mock::{Fault, FaultDuration, MockImds};
use rustix::process::Signal;

use crate::util::{Running, agent_against, metric_sum, unix_get, wait_for};

#[derive(Debug, Clone)]
enum Injected {
    Fault(Fault, FaultDuration),
    Disabled,
    TokensRequired,
}

impl Injected {
    fn apply(&self, imds: &MockImds) {
        match self {
            Injected::Fault(fault, duration) => imds.inject(fault.clone(), *duration),
            Injected::Disabled => imds.set_enabled(false),
            Injected::TokensRequired => imds.set_tokens_required(true),
        }
    }

    /// Whether it hits the role check too (every request), so that health
    /// stays degraded for as long as it lasts.
    fn hits_every_request(&self) -> bool {
        matches!(
            self,
            Injected::Disabled
                | Injected::Fault(
                    Fault::Status { .. }
                        | Fault::Latency { .. }
                        | Fault::Drop
                        | Fault::TokenRejected,
                    FaultDuration::Forever
                )
        )
    }

    /// Whether the agent gets through it without a failure.
    fn absorbed(&self) -> bool {
        matches!(
            self,
            Injected::TokensRequired | Injected::Fault(_, FaultDuration::Requests(_))
        )
    }
}

fn clear(imds: &MockImds) {
    imds.clear_faults();
    imds.set_enabled(true);
}

fn faults() -> Vec<(&'static str, Injected)> {
    use Fault::*;
    use FaultDuration::*;
    vec![
        (
            "500 burst",
            Injected::Fault(Status { status: 500 }, Requests(2)),
        ),
        (
            "503 burst",
            Injected::Fault(Status { status: 503 }, Requests(2)),
        ),
        (
            "429 storm",
            Injected::Fault(Status { status: 429 }, Forever),
        ),
        (
            "latency",
            Injected::Fault(Latency { millis: 2_000 }, Forever),
        ),
        ("dropped", Injected::Fault(Drop, Forever)),
        ("truncated", Injected::Fault(TruncatedBody, Forever)),
        ("malformed", Injected::Fault(MalformedJson, Forever)),
        (
            "code",
            Injected::Fault(
                Code {
                    code: "AssumeRoleUnauthorizedAccess".into(),
                    message: "not authorized".into(),
                },
                Forever,
            ),
        ),
        ("tokens rejected", Injected::Fault(TokenRejected, Forever)),
        ("disabled", Injected::Disabled),
        ("tokens required", Injected::TokensRequired),
    ]
}

fn start(imds: &MockImds, dir: &Path) -> (Running, PathBuf, PathBuf) {
    let file = dir.join("credentials");
    let socket = dir.join("agent.sock");
    let mut cmd = agent_against(imds);
    cmd.arg("--credentials-file")
        .arg(&file)
        .arg("--socket")
        .arg(&socket)
        .arg("--metrics-socket")
        .arg(crate::util::metrics_socket_of(&socket))
        .args(["--poll-interval", "1"])
        .args(["--connect-timeout", "0.3", "--read-timeout", "0.3"]);
    (Running::start(cmd), file, socket)
}

/// The access key id of a whole `default` profile, or `None`; panics on a
/// partial file.
fn key_in(file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k));
    let key = get("aws_access_key_id = ").map(str::to_owned);
    let complete =
        get("aws_secret_access_key = ").is_some() && get("aws_session_token = ").is_some();
    assert!(complete == key.is_some(), "a partial file: {text}");
    key
}

/// The sum of `imds_agent_refresh_failures_total` over every error kind.
fn failures(socket: &Path) -> u64 {
    metric_sum(
        &crate::util::metrics_socket_of(socket),
        "imds_agent_refresh_failures_total",
    )
}

fn current_key(imds: &MockImds) -> String {
    imds.current_credentials()
        .unwrap()
        .access_key_id()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn steady_state_every_fault_keeps_good_keys_counts_and_recovers() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (running, file, socket) = start(&imds, dir.path());
    let mut issued = vec![current_key(&imds)];
    wait_for("the first write", || {
        key_in(&file).as_ref() == issued.last()
    });

    for (name, injected) in faults() {
        let old = key_in(&file).unwrap();
        let counted = failures(&socket);
        imds.rotate();
        issued.push(current_key(&imds));
        injected.apply(&imds);
        running.signal(Signal::HUP);
        if injected.absorbed() {
            wait_for(name, || key_in(&file).as_ref() == issued.last());
        } else {
            wait_for(name, || failures(&socket) > counted);
            // Asked again under the fault: still the old, whole file.
            let counted = failures(&socket);
            running.signal(Signal::HUP);
            wait_for(name, || failures(&socket) > counted);
            assert_eq!(Some(old), key_in(&file), "{name}: the good keys must stay");
            if injected.hits_every_request() {
                let (status, body) = unix_get(&socket, "/healthz").unwrap();
                assert_eq!(200, status, "{name}: {body}");
                assert!(body.contains("degraded"), "{name}: {body}");
            }
        }
        clear(&imds);
        imds.set_tokens_required(false);
        running.signal(Signal::HUP);
        wait_for(&format!("recovery from {name}"), || {
            key_in(&file).as_ref() == issued.last()
        });
        let (status, _) = unix_get(&socket, "/credentials").unwrap();
        assert_eq!(200, status, "{name}: served again");
    }
    assert!(running.stop_with(Signal::TERM).success());
}

/// Starts the agent with `injected` already in place: nothing is written,
/// health says so, the failure is counted; then it clears and the agent
/// writes the current keys.
async fn cold_start_under(name: &str, injected: Injected) {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    injected.apply(&imds);
    let dir = tempfile::tempdir().unwrap();
    let (running, file, socket) = start(&imds, dir.path());
    if injected.absorbed() {
        wait_for(name, || key_in(&file) == Some(current_key(&imds)));
    } else {
        wait_for(name, || failures(&socket) > 0);
        assert!(
            !file.exists(),
            "{name}: nothing written without credentials"
        );
        let (status, body) = unix_get(&socket, "/healthz").unwrap();
        assert_eq!(503, status, "{name}: {body}");
        clear(&imds);
        wait_for(&format!("recovery from {name}"), || {
            key_in(&file) == Some(current_key(&imds))
        });
    }
    assert!(running.stop_with(Signal::TERM).success());
}

macro_rules! cold_start_cells {
    ($($test:ident: $index:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread")]
        async fn $test() {
            let (name, injected) = faults().swap_remove($index);
            cold_start_under(name, injected).await;
        }
    )*};
}

cold_start_cells! {
    cold_start_500_burst: 0;
    cold_start_503_burst: 1;
    cold_start_429_storm: 2;
    cold_start_latency: 3;
    cold_start_dropped: 4;
    cold_start_truncated: 5;
    cold_start_malformed: 6;
    cold_start_code: 7;
    cold_start_tokens_rejected: 8;
    cold_start_disabled: 9;
    cold_start_tokens_required: 10;
}

#[tokio::test(flavor = "multi_thread")]
async fn role_replacement_under_every_fault_keeps_the_old_keys_until_it_clears() {
    let imds = MockImds::builder().role("role-0").start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (running, file, socket) = start(&imds, dir.path());
    wait_for("the first write", || {
        key_in(&file) == Some(current_key(&imds))
    });

    for (i, (name, injected)) in faults().into_iter().enumerate() {
        let old = key_in(&file).unwrap();
        let counted = failures(&socket);
        injected.apply(&imds);
        imds.replace_role(format!("role-{}", i + 1));
        let new = current_key(&imds);
        if injected.absorbed() {
            wait_for(name, || key_in(&file).as_ref() == Some(&new));
        } else {
            wait_for(name, || failures(&socket) > counted);
            assert_eq!(Some(old), key_in(&file), "{name}: the old role's keys stay");
        }
        clear(&imds);
        imds.set_tokens_required(false);
        wait_for(&format!("the new role after {name}"), || {
            key_in(&file).as_ref() == Some(&new)
        });
    }
    assert!(running.stop_with(Signal::TERM).success());
}

/// A fault from just after the first fetch until inside the mandatory
/// refresh window of 12-second credentials.
async fn near_expiry_under(name: &str, fault: Fault) {
    let imds = MockImds::builder()
        .role("r")
        .credential_lifetime(std::time::Duration::from_secs(12))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (running, file, socket) = start(&imds, dir.path());
    let first = imds.current_credentials().unwrap();
    wait_for("the first write", || {
        key_in(&file).as_deref() == Some(first.access_key_id())
    });
    imds.inject(fault, FaultDuration::Forever);
    // Until 0.6 s before expiry: the refreshes fail, the old keys stay.
    #[allow(clippy::disallowed_methods)] // the agent runs on the real clock
    let left = first
        .expiration()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    std::thread::sleep(left.saturating_sub(std::time::Duration::from_millis(600)));
    assert!(failures(&socket) > 0, "{name}: failures counted");
    assert_eq!(
        Some(first.access_key_id().to_owned()),
        key_in(&file),
        "{name}: old keys kept"
    );
    let (status, body) = unix_get(&socket, "/credentials").unwrap();
    assert_eq!(200, status, "{name}: still valid, still served");
    assert!(body.contains(first.access_key_id()));

    imds.clear_faults();
    imds.rotate();
    let new = current_key(&imds);
    wait_for(&format!("recovery from {name}"), || {
        key_in(&file).as_ref() == Some(&new)
    });
    assert!(running.stop_with(Signal::TERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn near_expiry_503_storm() {
    near_expiry_under("503 storm", Fault::Status { status: 503 }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn near_expiry_dropped_connections() {
    near_expiry_under("dropped", Fault::Drop).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn near_expiry_malformed_json() {
    near_expiry_under("malformed", Fault::MalformedJson).await;
}
