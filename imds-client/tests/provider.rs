//! `ImdsCredentialsProvider` as a timeline: a scripted source, tokio's paused
//! clock and a manual wall clock moved together.

use std::sync::atomic::{AtomicUsize, Ordering};

use aws_credential_types::provider::ProvideCredentials;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use imds_client::provider::{BoxFuture, FetchedCredentials, FetchedRole};
use imds_client::{
    Credentials, CredentialsSource, Error, ErrorKind, ImdsCredentialsProvider, ManualTimeSource,
    ProviderState, SharedTimeSource, TimeSource,
};

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

/// A source whose answers the test sets, counting calls.
#[derive(Debug, Clone)]
struct Fake {
    role: Arc<Mutex<Result<String, ErrorKind>>>,
    creds: Arc<Mutex<Result<Credentials, ErrorKind>>>,
    role_calls: Arc<AtomicUsize>,
    cred_calls: Arc<AtomicUsize>,
    delay: Duration,
    /// When set, responses carry a `Date` this far ahead of this clock.
    server_ahead: Option<(ManualTimeSource, Duration)>,
}

impl Fake {
    fn new(role: &str, creds: Credentials) -> Self {
        Self {
            role: Arc::new(Mutex::new(Ok(role.into()))),
            creds: Arc::new(Mutex::new(Ok(creds))),
            role_calls: Arc::default(),
            cred_calls: Arc::default(),
            delay: Duration::from_millis(10),
            server_ahead: None,
        }
    }
    fn set_creds(&self, creds: Result<Credentials, ErrorKind>) {
        *self.creds.lock().unwrap() = creds;
    }
    fn set_role(&self, role: Result<&str, ErrorKind>) {
        *self.role.lock().unwrap() = role.map(str::to_owned);
    }
    fn server_time(&self) -> Option<SystemTime> {
        self.server_ahead
            .as_ref()
            .map(|(clock, ahead)| clock.now() + *ahead)
    }
    fn calls(&self) -> (usize, usize) {
        (
            self.role_calls.load(Ordering::SeqCst),
            self.cred_calls.load(Ordering::SeqCst),
        )
    }
}

impl CredentialsSource for Fake {
    fn role_name(&self) -> BoxFuture<'_, Result<FetchedRole, Error>> {
        Box::pin(async move {
            self.role_calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.role
                .lock()
                .unwrap()
                .clone()
                .map(|role| FetchedRole {
                    role,
                    server_time: self.server_time(),
                })
                .map_err(Error::new)
        })
    }
    fn role_credentials<'a>(
        &'a self,
        role: &'a str,
    ) -> BoxFuture<'a, Result<FetchedCredentials, Error>> {
        Box::pin(async move {
            self.cred_calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            assert_eq!(
                Ok(role.to_owned()),
                *self.role.lock().unwrap(),
                "asked for the attached role"
            );
            self.creds
                .lock()
                .unwrap()
                .clone()
                .map(|credentials| FetchedCredentials {
                    credentials,
                    server_time: self.server_time(),
                })
                .map_err(Error::new)
        })
    }
}

fn start() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000)
}

fn creds(key: &str, issued: SystemTime, lifetime: Duration) -> Credentials {
    Credentials::new(
        key,
        format!("secret-{key}"),
        format!("token-{key}"),
        issued + lifetime,
    )
    .with_last_updated(issued)
}

/// Moves tokio's paused clock and the wall clock together.
async fn advance(clock: &ManualTimeSource, by: Duration) {
    clock.advance(by);
    tokio::time::advance(by).await;
}

fn provider(fake: &Fake, clock: &ManualTimeSource) -> ImdsCredentialsProvider {
    ImdsCredentialsProvider::builder()
        .source(fake.clone())
        .time_source(SharedTimeSource::new(clock.clone()))
        .advisory_refresh_window(20 * MINUTE)
        .build()
}

#[tokio::test(start_paused = true)]
async fn a_thousand_callers_at_cold_start_cause_one_load() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKIDFIRST", start(), 6 * HOUR));
    let provider = provider(&fake, &clock);
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let provider = provider.clone();
            tokio::spawn(async move { provider.credentials().await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().access_key_id(), "AKIDFIRST");
    }
    assert_eq!(fake.calls(), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_failed_load_is_shared_by_its_waiters() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKID", start(), 6 * HOUR));
    fake.set_creds(Err(ErrorKind::ServerError { status: 500 }));
    let provider = provider(&fake, &clock);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let provider = provider.clone();
            tokio::spawn(async move { provider.credentials().await })
        })
        .collect();
    for task in tasks {
        assert_eq!(
            task.await.unwrap().unwrap_err().kind(),
            &ErrorKind::ServerError { status: 500 }
        );
    }
    assert_eq!(fake.calls(), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn refresh_timeline_advisory_in_background_then_mandatory_waits() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKID1", start(), 6 * HOUR));
    let provider = provider(&fake, &clock);
    provider.credentials().await.unwrap();
    assert_eq!(fake.calls(), (1, 1));

    // Fresh: no I/O.
    advance(&clock, 5 * HOUR + 30 * MINUTE).await;
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID1"
    );
    assert_eq!(fake.calls(), (1, 1), "not in the advisory window yet");

    // Into the advisory window (15 min left): cached answer at once, one
    // background refresh.
    fake.set_creds(Ok(creds("AKID2", clock.now(), 6 * HOUR)));
    advance(&clock, 15 * MINUTE).await;
    let at_once = provider.credentials().await.unwrap();
    assert_eq!(
        at_once.access_key_id(),
        "AKID1",
        "callers are not made to wait"
    );
    for _ in 0..5 {
        assert_eq!(
            provider.credentials().await.unwrap().access_key_id(),
            "AKID1"
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.calls(), (2, 2), "exactly one background refresh");
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID2"
    );

    // Mandatory window of the new credentials: the caller waits for the load.
    fake.set_creds(Ok(creds(
        "AKID3",
        clock.now() + 6 * HOUR - 30 * MINUTE,
        6 * HOUR,
    )));
    advance(&clock, 6 * HOUR - 30 * Duration::from_secs(1)).await;
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID3"
    );
}

#[tokio::test(start_paused = true)]
async fn static_stability_serves_last_good_and_backs_off_then_recovers() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKID1", start(), HOUR));
    let provider = provider(&fake, &clock);
    let mut state = provider.subscribe();
    provider.credentials().await.unwrap();
    fake.set_creds(Err(ErrorKind::ServerError { status: 503 }));
    fake.set_role(Err(ErrorKind::ServerError { status: 503 }));

    // Ask every 10 s for two hours, well past expiry.
    for _ in 0..(2 * 360) {
        advance(&clock, Duration::from_secs(10)).await;
        let got = provider
            .credentials()
            .await
            .expect("last good credentials are served");
        assert_eq!(got.access_key_id(), "AKID1");
    }
    let (role_calls, _) = fake.calls();
    // Advisory window: a background try per call would be ~120; with the
    // 5-10 minute backoff past the mandatory window it is a few dozen at most.
    assert!(
        role_calls <= 40,
        "no storm: {role_calls} role requests in 2 h"
    );
    assert!(matches!(
        &*state.borrow_and_update(),
        ProviderState::Unavailable { stale: Some(_), .. }
    ));

    // IMDS answers again: recovery at the next attempt, at once on request.
    fake.set_role(Ok("r"));
    fake.set_creds(Ok(creds("AKID2", clock.now(), HOUR)));
    assert_eq!(
        provider
            .refresh_now()
            .await
            .unwrap()
            .credentials
            .access_key_id(),
        "AKID2"
    );
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID2"
    );
    assert!(matches!(
        &*state.borrow_and_update(),
        ProviderState::Active {
            last_error: None,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_detached_role_withdraws_credentials_and_a_replaced_role_is_followed() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("first", creds("AKID1", start(), 6 * HOUR));
    let provider = provider(&fake, &clock);
    let state = provider.subscribe();
    provider.credentials().await.unwrap();

    fake.set_role(Ok("second"));
    fake.set_creds(Ok(creds("AKID2", start(), 6 * HOUR)));
    let polled = provider.poll().await.unwrap();
    assert_eq!(
        (polled.role.as_str(), polled.credentials.access_key_id()),
        ("second", "AKID2")
    );
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID2"
    );

    fake.set_role(Err(ErrorKind::NoRoleAttached));
    let err = provider.poll().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::NoRoleAttached);
    assert!(matches!(&*state.borrow(), ProviderState::NoRole));
    let err = provider.credentials().await.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::NoRoleAttached,
        "the detached role's credentials are gone"
    );
    assert!(provider.last_good().is_none());
}

#[tokio::test(start_paused = true)]
async fn non_recoverable_failures_are_cached_briefly() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKID", start(), 6 * HOUR));
    fake.set_creds(Err(ErrorKind::CredentialsUnavailable {
        code: "AssumeRoleUnauthorizedAccess".into(),
        message: "no".into(),
    }));
    let provider = provider(&fake, &clock);
    for _ in 0..10 {
        assert!(provider.credentials().await.is_err());
    }
    assert_eq!(fake.calls(), (1, 1));
    advance(&clock, Duration::from_secs(6)).await;
    assert!(provider.credentials().await.is_err());
    assert_eq!(fake.calls(), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn expired_credentials_from_imds_are_extended_briefly() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKIDOLD", start() - 7 * HOUR, 6 * HOUR));
    let provider = provider(&fake, &clock);
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKIDOLD"
    );
    for _ in 0..20 {
        advance(&clock, Duration::from_secs(10)).await;
        provider.credentials().await.unwrap();
    }
    assert!(fake.calls().1 <= 2, "no re-fetch storm: {:?}", fake.calls());
}

#[tokio::test(start_paused = true)]
async fn invalidate_forces_a_refresh() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKID1", start(), 6 * HOUR));
    let provider = provider(&fake, &clock);
    provider.credentials().await.unwrap();
    fake.set_creds(Ok(creds("AKID2", start(), 6 * HOUR)));
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID1"
    );
    provider.invalidate();
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID2"
    );
}

#[tokio::test(start_paused = true)]
#[tracing_test::traced_test]
async fn refreshes_are_scheduled_on_imds_time_when_the_local_clock_is_behind() {
    // The local clock is 10 minutes behind IMDS (within MAX_CLOCK_SKEW).
    let clock = ManualTimeSource::new(start());
    let server_start = start() + 10 * MINUTE;
    let mut fake = Fake::new("r", creds("AKID1", server_start, HOUR));
    fake.server_ahead = Some((clock.clone(), 10 * MINUTE));
    let provider = provider(&fake, &clock);
    provider.credentials().await.unwrap();
    assert!(
        logs_contain("differs from IMDS"),
        "a skew warning is logged"
    );

    // 45 minutes on: local time says 25 minutes remain (outside the
    // 20-minute advisory window), IMDS time says 15: a refresh must start.
    fake.set_creds(Ok(creds("AKID2", server_start + 45 * MINUTE, HOUR)));
    advance(&clock, 45 * MINUTE).await;
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID1"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.calls(), (2, 2), "refreshed on IMDS time");
}

#[tokio::test(start_paused = true)]
async fn by_default_six_hour_credentials_are_replaced_with_more_than_fifteen_minutes_left() {
    // botocore and the Java SDK start refreshing 15 minutes before expiry;
    // handing out less makes every client call refetch.
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKID1", start(), 6 * HOUR));
    let provider = ImdsCredentialsProvider::builder()
        .source(fake.clone())
        .time_source(SharedTimeSource::new(clock.clone()))
        .build();
    provider.credentials().await.unwrap();
    fake.set_creds(Ok(creds("AKID2", start() + 5 * HOUR, 6 * HOUR)));
    // 24 minutes before expiry is inside the default advisory window whatever
    // the jitter (30 minutes less up to 20 %).
    advance(&clock, 6 * HOUR - 24 * MINUTE).await;
    provider.credentials().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID2"
    );
    // ...and 31 minutes before expiry is outside it.
    let fresh = Fake::new("r", creds("AKID1", start(), 6 * HOUR));
    let clock = ManualTimeSource::new(start());
    let provider = ImdsCredentialsProvider::builder()
        .source(fresh.clone())
        .time_source(SharedTimeSource::new(clock.clone()))
        .build();
    provider.credentials().await.unwrap();
    advance(&clock, 6 * HOUR - 31 * MINUTE).await;
    provider.credentials().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fresh.calls(), (1, 1));
}

/// Replaces the test of the removed `static_stability(false)`: a failing
/// refresh never drops valid credentials in either window, says so in the
/// published state, and does not ask IMDS on every call.
#[tokio::test(start_paused = true)]
async fn a_failing_refresh_keeps_the_credentials_through_both_windows_and_past_expiry() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKID1", start(), HOUR));
    let provider = provider(&fake, &clock);
    let state = provider.subscribe();
    provider.credentials().await.unwrap();
    fake.set_creds(Err(ErrorKind::ServerError { status: 503 }));
    let failing = |state: &ProviderState| match state {
        ProviderState::Active {
            current,
            last_error: Some(e),
        } => {
            current.credentials.access_key_id() == "AKID1"
                && e.kind() == &ErrorKind::ServerError { status: 503 }
        }
        _ => false,
    };

    // Advisory window: the background refresh fails; the credentials stay.
    advance(&clock, 45 * MINUTE).await;
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID1"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.calls(), (2, 2), "one background refresh");
    assert!(failing(&state.borrow()), "state: {:?}", *state.borrow());
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID1"
    );

    // Mandatory window: the caller's own load fails; the credentials stay,
    // and the next calls do not ask again (backoff).
    advance(&clock, 14 * MINUTE + 30 * Duration::from_secs(1)).await;
    for _ in 0..10 {
        assert_eq!(
            provider.credentials().await.unwrap().access_key_id(),
            "AKID1"
        );
    }
    assert_eq!(
        fake.calls(),
        (3, 3),
        "one load in the mandatory window, then a backoff"
    );
    assert!(failing(&state.borrow()), "state: {:?}", *state.borrow());

    // Past the real expiry: still served (static stability), and the state
    // says they are stale.
    advance(&clock, 11 * MINUTE).await;
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID1"
    );
    assert!(
        matches!(&*state.borrow(), ProviderState::Unavailable { stale: Some(s), .. } if s.credentials.access_key_id() == "AKID1"),
        "state: {:?}",
        *state.borrow()
    );
}

#[tokio::test(start_paused = true)]
async fn the_failure_observer_sees_background_refresh_failures_callers_never_see() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKID1", start(), 6 * HOUR));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let provider = {
        let seen = seen.clone();
        ImdsCredentialsProvider::builder()
            .source(fake.clone())
            .time_source(SharedTimeSource::new(clock.clone()))
            .advisory_refresh_window(20 * MINUTE)
            .on_failure(move |e| seen.lock().unwrap().push(e.kind().clone()))
            .build()
    };
    provider.credentials().await.unwrap();
    assert!(seen.lock().unwrap().is_empty(), "no failure yet");

    // In the advisory window the refresh runs in the background and fails:
    // the caller gets the cached credentials, the observer gets the error.
    fake.set_creds(Err(ErrorKind::ServerError { status: 503 }));
    advance(&clock, 5 * HOUR + 45 * MINUTE).await;
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKID1"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![ErrorKind::ServerError { status: 503 }]
    );

    // A failed role check in `poll` is seen too; its waiters add nothing.
    fake.set_role(Err(ErrorKind::Timeout));
    provider.poll().await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(seen.lock().unwrap()[1], ErrorKind::Timeout);
}

#[tokio::test(start_paused = true)]
async fn providers_sharing_a_thread_never_hand_out_each_others_credentials() {
    let clock = ManualTimeSource::new(start());
    let fake_a = Fake::new("a", creds("AKIDA1", start(), 6 * HOUR));
    let fake_b = Fake::new("b", creds("AKIDB1", start(), 6 * HOUR));
    let a = provider(&fake_a, &clock);
    let b = provider(&fake_b, &clock);
    for _ in 0..3 {
        assert_eq!(a.credentials().await.unwrap().access_key_id(), "AKIDA1");
        assert_eq!(b.credentials().await.unwrap().access_key_id(), "AKIDB1");
    }
    // A rotation at A is seen at once by the next call on this thread, and
    // B is unaffected.
    fake_a.set_creds(Ok(creds("AKIDA2", clock.now(), 6 * HOUR)));
    a.refresh_now().await.unwrap();
    assert_eq!(a.credentials().await.unwrap().access_key_id(), "AKIDA2");
    assert_eq!(b.credentials().await.unwrap().access_key_id(), "AKIDB1");
    // Detached at B: nothing cached is handed out.
    fake_b.set_role(Err(ErrorKind::NoRoleAttached));
    b.poll().await.unwrap_err();
    assert_eq!(
        b.credentials().await.unwrap_err().kind(),
        &ErrorKind::NoRoleAttached
    );
    assert_eq!(a.credentials().await.unwrap().access_key_id(), "AKIDA2");
}

#[tokio::test(start_paused = true)]
async fn every_thread_sees_a_rotation() {
    let clock = ManualTimeSource::new(start());
    let fake = Fake::new("r", creds("AKID1", start(), 6 * HOUR));
    let provider = provider(&fake, &clock);
    let on_threads = |expected: &'static str| {
        let provider = provider.clone();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    for _ in 0..10 {
                        let got = rt.block_on(provider.credentials()).unwrap();
                        assert_eq!(got.access_key_id(), expected);
                        // The SDK trait hands out the same credentials (each
                        // thread's copy, converted once per fetch).
                        let sdk = rt.block_on(provider.provide_credentials()).unwrap();
                        assert_eq!(sdk.access_key_id(), expected);
                        assert_eq!(sdk.secret_access_key(), got.secret_access_key());
                    }
                });
            }
        });
    };
    provider.credentials().await.unwrap();
    on_threads("AKID1");
    fake.set_creds(Ok(creds("AKID2", clock.now(), 6 * HOUR)));
    provider.refresh_now().await.unwrap();
    on_threads("AKID2");
}

/// A source that answers each role-name request from a script, in order;
/// a step may first wait for the test to release it.
#[derive(Debug, Clone)]
struct Scripted {
    roles: Arc<Mutex<std::collections::VecDeque<RoleStep>>>,
    creds: Arc<Mutex<Result<Credentials, ErrorKind>>>,
    /// Told when a gated step has been reached.
    entered: Arc<tokio::sync::Notify>,
}

#[derive(Debug)]
struct RoleStep {
    gate: Option<Arc<tokio::sync::Notify>>,
    answer: Result<String, ErrorKind>,
}

impl Scripted {
    fn new(creds: Credentials, steps: Vec<RoleStep>) -> Self {
        Self {
            roles: Arc::new(Mutex::new(steps.into())),
            creds: Arc::new(Mutex::new(Ok(creds))),
            entered: Arc::default(),
        }
    }
}

fn step(answer: Result<&str, ErrorKind>) -> RoleStep {
    RoleStep {
        gate: None,
        answer: answer.map(str::to_owned),
    }
}

impl CredentialsSource for Scripted {
    fn role_name(&self) -> BoxFuture<'_, Result<FetchedRole, Error>> {
        Box::pin(async move {
            let step = self
                .roles
                .lock()
                .unwrap()
                .pop_front()
                .expect("the test scripted this many role requests");
            if let Some(gate) = step.gate {
                self.entered.notify_one();
                gate.notified().await;
            }
            step.answer
                .map(|role| FetchedRole {
                    role,
                    server_time: None,
                })
                .map_err(Error::new)
        })
    }
    fn role_credentials<'a>(
        &'a self,
        _role: &'a str,
    ) -> BoxFuture<'a, Result<FetchedCredentials, Error>> {
        Box::pin(async move {
            self.creds
                .lock()
                .unwrap()
                .clone()
                .map(|credentials| FetchedCredentials {
                    credentials,
                    server_time: None,
                })
                .map_err(Error::new)
        })
    }
}

/// A poll checks the role and finds it replaced, so it loads; meanwhile
/// another poll finds the role detached and withdraws the credentials; then
/// the first poll's own load fails transiently. The detached role's
/// credentials must not come back: not to the caller, not from the cache,
/// not in the published state.
#[tokio::test(start_paused = true)]
async fn a_transient_failure_after_a_detach_never_hands_out_the_detached_roles_credentials() {
    let clock = ManualTimeSource::new(start());
    let gate = Arc::new(tokio::sync::Notify::new());
    let fake = Scripted::new(
        creds("AKIDDETACHED", start(), 6 * HOUR),
        vec![
            // The first load.
            step(Ok("first")),
            // Poll A's role check: the role was replaced (held until released).
            RoleStep {
                gate: Some(gate.clone()),
                answer: Ok("second".into()),
            },
            // Poll B's role check and its load: no role any more.
            step(Err(ErrorKind::NoRoleAttached)),
            step(Err(ErrorKind::NoRoleAttached)),
            // Poll A's own load: a transient failure.
            step(Err(ErrorKind::ServerError { status: 503 })),
        ],
    );
    let provider = ImdsCredentialsProvider::builder()
        .source(fake.clone())
        .time_source(SharedTimeSource::new(clock.clone()))
        .build();
    let state = provider.subscribe();
    assert_eq!(
        provider.credentials().await.unwrap().access_key_id(),
        "AKIDDETACHED"
    );

    let a = tokio::spawn({
        let provider = provider.clone();
        async move { provider.poll().await }
    });
    fake.entered.notified().await;
    let b = provider.poll().await;
    assert_eq!(
        b.unwrap_err().kind(),
        &ErrorKind::NoRoleAttached,
        "poll B sees the detach"
    );
    assert!(matches!(&*state.borrow(), ProviderState::NoRole));

    gate.notify_one();
    let a = a.await.unwrap();
    match &a {
        Ok(rc) => panic!(
            "poll A must fail (503 with nothing left to keep), but it handed out {} of role {}",
            rc.credentials.access_key_id(),
            rc.role
        ),
        Err(e) => assert_eq!(e.kind(), &ErrorKind::ServerError { status: 503 }),
    }
    assert!(
        provider.last_good().is_none(),
        "nothing cached after the detach"
    );
    let published = state.borrow().clone();
    assert!(
        published.current().is_none(),
        "no credentials published after the detach, saw {published:?}"
    );
    assert!(
        fake.roles.lock().unwrap().is_empty(),
        "every scripted role request was made"
    );
}

/// `builder().build()` without a client builds the default one and never
/// panics: an invalid setting in the environment becomes every call's error,
/// naming the setting. The check runs in a child process (this test binary,
/// the ignored test below) whose environment this test sets.
#[test]
fn build_without_a_client_never_panics_and_reports_a_bad_setting() {
    let child = "a_bad_setting_in_the_environment_is_every_calls_error";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child, "--ignored", "--test-threads=1"])
        .env("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "many")
        // Loopback only, should the client be built after all.
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_CONFIG_FILE", "/nonexistent/imds-client-test")
        .output()
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && shown.contains("1 passed"),
        "expected the child test to run and pass, saw: {shown}"
    );
}

#[tokio::test]
#[ignore = "run in a child process by build_without_a_client_never_panics_and_reports_a_bad_setting"]
async fn a_bad_setting_in_the_environment_is_every_calls_error() {
    let provider = ImdsCredentialsProvider::builder().build();
    for _ in 0..2 {
        let err = provider.credentials().await.unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::InvalidConfiguration { setting, .. } if setting == "AWS_METADATA_SERVICE_NUM_ATTEMPTS"),
            "expected an invalid-configuration error naming AWS_METADATA_SERVICE_NUM_ATTEMPTS, got {err:?}"
        );
    }
}
