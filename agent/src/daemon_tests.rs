//! The daemon in-process: a scripted IMDS (a `CredentialsSource` fake), a
//! recording output, the credential socket in a temp dir, tokio's paused
//! clock and a manual wall clock. Each test drives one life event of an
//! instance role (rotation, replacement, detach, outage) and checks what the
//! outputs and the socket hand out, without a real sleep.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use imds_client::provider::{BoxFuture, CredentialsSource, FetchedCredentials, FetchedRole};
use imds_client::{
    Credentials, Error, ErrorKind, ImdsCredentialsProvider, ManualTimeSource, RoleCredentials,
    SharedTimeSource,
};

use super::{Daemon, Refresh, Server, run};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::outputs::{Outputs, WriteLimits};
use crate::server::{AccessPolicy, CredentialSocket, ServerLimits};
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::signals::Reloads;
use crate::sink::Sink;

const START: u64 = 1_800_000_000;
const HOUR: Duration = Duration::from_secs(3600);
const POLL: Duration = Duration::from_secs(60);

fn at(offset: Duration) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(START) + offset
}

fn credentials(key: &str, expires: SystemTime) -> Credentials {
    Credentials::new(
        key,
        format!("secret-of-{key}"),
        format!("token-of-{key}"),
        expires,
    )
}

/// IMDS as the test scripts it.
#[derive(Debug)]
struct ScriptedImds {
    role: Mutex<Result<String, ErrorKind>>,
    credentials: Mutex<Result<Credentials, ErrorKind>>,
}

impl ScriptedImds {
    fn attach(&self, role: &str, credentials: Credentials) {
        *self.role.lock().unwrap() = Ok(role.into());
        *self.credentials.lock().unwrap() = Ok(credentials);
    }

    fn rotate(&self, credentials: Credentials) {
        *self.credentials.lock().unwrap() = Ok(credentials);
    }

    fn detach(&self) {
        *self.role.lock().unwrap() = Err(ErrorKind::NoRoleAttached);
    }

    fn fail(&self, status: u16) {
        *self.role.lock().unwrap() = Err(ErrorKind::ServerError { status });
        *self.credentials.lock().unwrap() = Err(ErrorKind::ServerError { status });
    }
}

impl CredentialsSource for ScriptedImds {
    fn role_name(&self) -> BoxFuture<'_, Result<FetchedRole, Error>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let role = self.role.lock().unwrap().clone();
            role.map(|role| FetchedRole {
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
            tokio::time::sleep(Duration::from_millis(5)).await;
            let credentials = self.credentials.lock().unwrap().clone();
            credentials
                .map(|credentials| FetchedCredentials {
                    credentials,
                    server_time: None,
                })
                .map_err(Error::new)
        })
    }
}

/// An output that records what it was asked to hold.
#[derive(Debug, Default)]
struct Recorder {
    held: Mutex<Option<String>>,
    writes: Mutex<Vec<String>>,
}

impl Recorder {
    fn held(&self) -> Option<String> {
        self.held.lock().unwrap().clone()
    }
}

impl Sink for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }

    fn publish(&self, current: &RoleCredentials) -> anyhow::Result<()> {
        let key = current.credentials.access_key_id().to_owned();
        self.writes.lock().unwrap().push(key.clone());
        *self.held.lock().unwrap() = Some(key);
        Ok(())
    }

    fn withdraw(&self) -> anyhow::Result<()> {
        self.writes.lock().unwrap().push("withdrawn".into());
        *self.held.lock().unwrap() = None;
        Ok(())
    }
}

struct Harness {
    imds: Arc<ScriptedImds>,
    clock: ManualTimeSource,
    output: Arc<Recorder>,
    socket: PathBuf,
    reload: tokio::sync::mpsc::UnboundedSender<()>,
    stop: ShutdownTrigger,
    daemon: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// The daemon against `imds`, started at `at(0)`.
    fn start(imds: ScriptedImds) -> Self {
        let clock = ManualTimeSource::new(at(Duration::ZERO));
        let time = SharedTimeSource::new(clock.clone());
        let imds = Arc::new(imds);
        let provider = ImdsCredentialsProvider::builder()
            .source(ArcSource(imds.clone()))
            .time_source(time.clone())
            .build();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (stop, shutdown) = Shutdown::new();
        let (refresher, requests) =
            crate::refresh::channel(crate::refresh::MIN_INTERVAL, metrics.clone());
        let (reload, reloads) = Reloads::channel();
        let serve = crate::server::serve(
            listener,
            CredentialSocket {
                state: provider.subscribe(),
                metrics: metrics.clone(),
                clock: time.clone(),
                policy: AccessPolicy::default(),
                limits: ServerLimits::default(),
                refresher,
                metrics_at: Vec::new(),
                consumers: None,
            },
            shutdown.clone().wait_owned(),
        );
        let output = Arc::new(Recorder::default());
        let daemon = Daemon {
            outputs: Outputs::start(
                vec![output.clone()],
                WriteLimits::default(),
                metrics.clone(),
            ),
            servers: vec![Server::new("credential socket", async move {
                serve.await;
                Ok(())
            })],
            refresh: Refresh {
                provider,
                poll_interval: POLL,
                reloads: reloads.with_requests(requests),
            },
            notifier: Notifier::none(),
            on_change: crate::on_change::OnChange::disabled(),
            clock: time,
            metrics,
        };
        let daemon = tokio::spawn(run(daemon, shutdown));
        Self {
            imds,
            clock,
            output,
            socket,
            reload,
            stop,
            daemon,
            _dir: dir,
        }
    }

    /// Moves both clocks: the wall clock the credentials expire on, and
    /// tokio's, which the poll interval runs on.
    async fn pass(&self, by: Duration) {
        self.clock.advance(by);
        tokio::time::sleep(by).await;
    }

    /// Waits (in paused time) until the output holds `key` (`None`: nothing).
    async fn output_holds(&self, key: Option<&str>) {
        for _ in 0..10_000 {
            if self.output.held().as_deref() == key {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "expected the output to hold {key:?}; it holds {:?} after writes {:?}",
            self.output.held(),
            self.output.writes.lock().unwrap()
        );
    }

    /// `GET path` on the credential socket: (status, body).
    async fn get(&self, path: &str) -> (u16, String) {
        get(&self.socket, path).await
    }

    async fn stop(self) {
        self.stop.trigger();
        self.daemon.await.unwrap().unwrap();
    }
}

async fn get(socket: &Path, path: &str) -> (u16, String) {
    let answer = crate::socket_client::test_get(socket, path).await;
    (answer.status, answer.body)
}

/// The provider takes its source by value; the test keeps a handle.
#[derive(Debug)]
struct ArcSource(Arc<ScriptedImds>);

impl CredentialsSource for ArcSource {
    fn role_name(&self) -> BoxFuture<'_, Result<FetchedRole, Error>> {
        self.0.role_name()
    }

    fn role_credentials<'a>(
        &'a self,
        role: &'a str,
    ) -> BoxFuture<'a, Result<FetchedCredentials, Error>> {
        self.0.role_credentials(role)
    }
}

fn attached(role: &str, key: &str, expires: SystemTime) -> ScriptedImds {
    ScriptedImds {
        role: Mutex::new(Ok(role.into())),
        credentials: Mutex::new(Ok(credentials(key, expires))),
    }
}

#[tokio::test(start_paused = true)]
async fn a_rotation_reaches_the_outputs_and_the_socket_before_the_old_keys_expire() {
    let agent = Harness::start(attached("r", "ASIAFIRST", at(6 * HOUR)));
    agent.output_holds(Some("ASIAFIRST")).await;
    let (status, body) = agent.get("/credentials").await;
    assert_eq!((status, body.contains("ASIAFIRST")), (200, true), "{body}");

    // IMDS rotates. Nothing asks for it until the refresh window opens
    // (at most 30 minutes before expiry); 20 minutes before, the next poll
    // brings the new keys everywhere.
    agent.imds.rotate(credentials("ASIASECOND", at(12 * HOUR)));
    agent.pass(5 * HOUR).await;
    assert_eq!(agent.output.held().as_deref(), Some("ASIAFIRST"));
    agent.pass(40 * Duration::from_secs(60)).await;
    agent.output_holds(Some("ASIASECOND")).await;
    let (status, body) = agent.get("/credentials").await;
    assert_eq!((status, body.contains("ASIASECOND")), (200, true), "{body}");
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_replacement_is_published_at_the_next_poll_even_with_an_earlier_expiry() {
    let agent = Harness::start(attached("first", "ASIAFIRST", at(6 * HOUR)));
    agent.output_holds(Some("ASIAFIRST")).await;
    agent
        .imds
        .attach("second", credentials("ASIAOTHER", at(HOUR)));
    agent.pass(POLL).await;
    agent.output_holds(Some("ASIAOTHER")).await;
    let (_, health) = agent.get("/healthz").await;
    assert!(health.contains("second"), "{health}");
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_detach_withdraws_every_output_and_the_socket_at_the_next_poll() {
    let agent = Harness::start(attached("r", "ASIAFIRST", at(6 * HOUR)));
    agent.output_holds(Some("ASIAFIRST")).await;
    agent.imds.detach();
    agent.pass(POLL).await;
    agent.output_holds(None).await;
    assert_eq!(agent.get("/credentials").await.0, 404);
    assert_eq!(
        agent
            .output
            .writes
            .lock()
            .unwrap()
            .last()
            .map(String::as_str),
        Some("withdrawn")
    );
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_outage_keeps_the_last_good_keys_served_and_health_says_degraded() {
    let agent = Harness::start(attached("r", "ASIAFIRST", at(6 * HOUR)));
    agent.output_holds(Some("ASIAFIRST")).await;
    agent.imds.fail(503);
    agent.pass(POLL).await;
    // A few polls into the outage: health shows it, the keys stay.
    let mut degraded = false;
    for _ in 0..100 {
        let (status, health) = agent.get("/healthz").await;
        if status == 200 && health.contains("degraded") {
            degraded = true;
            break;
        }
        agent.pass(POLL).await;
    }
    assert!(
        degraded,
        "expected /healthz to say degraded during the outage"
    );
    assert_eq!(agent.output.held().as_deref(), Some("ASIAFIRST"));
    let (status, body) = agent.get("/credentials").await;
    assert_eq!((status, body.contains("ASIAFIRST")), (200, true), "{body}");
    // IMDS recovers: health is ok again.
    agent
        .imds
        .attach("r", credentials("ASIAFIRST", at(6 * HOUR)));
    let mut ok = false;
    for _ in 0..100 {
        agent.pass(POLL).await;
        let (status, health) = agent.get("/healthz").await;
        if status == 200 && health.contains("\"ok\"") {
            ok = true;
            break;
        }
    }
    assert!(ok, "expected /healthz ok after IMDS recovered");
    agent.stop().await;
}

/// The fan-out rule end to end: a refresh that brings keys of the same role
/// expiring earlier than the published ones (an older response served
/// again) does not replace them in the outputs.
#[tokio::test(start_paused = true)]
async fn keys_that_expire_earlier_never_replace_the_published_ones() {
    let agent = Harness::start(attached("r", "ASIALATER", at(6 * HOUR)));
    agent.output_holds(Some("ASIALATER")).await;
    agent.imds.rotate(credentials("ASIAEARLIER", at(2 * HOUR)));
    agent.reload.send(()).unwrap();
    // The refresh ran (the provider serves the new answer on the socket)...
    let mut served = false;
    for _ in 0..1000 {
        if agent.get("/credentials").await.1.contains("ASIAEARLIER") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "expected the refresh to reach the provider");
    // ...but the outputs keep the keys that live longer.
    agent.pass(POLL).await;
    assert_eq!(agent.output.held().as_deref(), Some("ASIALATER"));
    assert_eq!(*agent.output.writes.lock().unwrap(), ["ASIALATER"]);
    agent.stop().await;
}
