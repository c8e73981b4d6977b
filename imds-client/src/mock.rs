//! An IMDSv2 emulator, for tests and demos (cargo feature `mock`).
//!
//! [`MockImds`] serves the Instance Metadata Service's HTTP interface on a
//! loopback port, in process. It is meant to be as strict as the real service
//! wherever a client could tell the difference, because a lenient emulator
//! lets a client pass its tests and fail on EC2. The rules it follows are
//! taken from the EC2 user guide ("Use the Instance Metadata Service to access
//! instance metadata", "Retrieve security credentials from instance
//! metadata"); each handler cites the rule it implements.
//!
//! [`MockSts`] serves STS (`AssumeRole`, `GetCallerIdentity`) beside it, on
//! a listener of its own, and accepts the credentials this emulator issued.
//!
//! Besides IMDS paths, the same listener answers a control surface under
//! `/_mock/` (paths real IMDS never serves) to attach, replace and detach the
//! role, rotate credentials, read request counts and inject faults. It is
//! described in `imds-client/MOCK.md`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use imds_client::mock::MockImds;
//! let imds = MockImds::builder().role("app-role").start().await?;
//! println!("IMDS at {}", imds.endpoint());
//! imds.replace_role("other-role");
//! imds.detach_role();
//! # Ok(()) }
//! ```

mod control;
mod fault;
mod routes;
mod state;
pub mod sts;

pub use fault::{Fault, FaultDuration};
pub use state::RequestCounts;
pub use sts::{MockSts, MockStsBuilder, StsCall, StsFault};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::credentials::Credentials;
use crate::time::SharedTimeSource;
use state::{Settings, Shared};

/// Default credential lifetime: 6 hours, as EC2 issues them.
pub const DEFAULT_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// Default rotation interval: new credentials every hour, long before expiry.
pub const DEFAULT_ROTATION_INTERVAL: Duration = Duration::from_secs(3600);
/// The longest credential lifetime and rotation interval accepted: 365 days.
const MAX_CREDENTIAL_PERIOD: Duration = Duration::from_secs(365 * 86_400);
/// The largest clock skew accepted, either way: 10 years, in seconds.
pub const MAX_SKEW_SECONDS: i64 = 3650 * 86_400;

/// Configures and starts a [`MockImds`].
#[derive(Debug)]
pub struct MockImdsBuilder {
    role: Option<String>,
    lifetime: Duration,
    rotation: Duration,
    tokens_required: bool,
    extended: bool,
    time_source: SharedTimeSource,
    listen: SocketAddr,
}

impl Default for MockImdsBuilder {
    fn default() -> Self {
        Self {
            role: None,
            lifetime: DEFAULT_CREDENTIAL_LIFETIME,
            rotation: DEFAULT_ROTATION_INTERVAL,
            tokens_required: true,
            extended: true,
            time_source: SharedTimeSource::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

impl MockImdsBuilder {
    /// Attaches `role` from the start. Default: no role attached.
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.role = Some(role.into());
        self
    }

    /// How long issued credentials stay valid, 1 s to 365 days (checked by
    /// [`start`](Self::start)). Default: 6 hours.
    pub fn credential_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// How often new credentials are issued, 1 s to 365 days (checked by
    /// [`start`](Self::start)). Default: 1 hour.
    pub fn rotation_interval(mut self, interval: Duration) -> Self {
        self.rotation = interval;
        self
    }

    /// Whether requests without a session token are refused (IMDSv2 only).
    /// Default: true, as on new instances.
    pub fn tokens_required(mut self, required: bool) -> Self {
        self.tokens_required = required;
        self
    }

    /// Whether `security-credentials-extended/` is served. Default: true.
    pub fn extended_credentials(mut self, served: bool) -> Self {
        self.extended = served;
        self
    }

    /// The wall clock used for token expiry, credential times and `Date`.
    /// Default: the system clock.
    pub fn time_source(mut self, time_source: SharedTimeSource) -> Self {
        self.time_source = time_source;
        self
    }

    /// Where to listen. Default: `127.0.0.1:0` (an ephemeral loopback port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Binds the listener and starts serving in a spawned task. A setting
    /// out of range is an [`InvalidInput`](std::io::ErrorKind::InvalidInput)
    /// error naming it and the range.
    pub async fn start(self) -> std::io::Result<MockImds> {
        for (setting, value) in [
            ("credential_lifetime", self.lifetime),
            ("rotation_interval", self.rotation),
        ] {
            if !(Duration::from_secs(1)..=MAX_CREDENTIAL_PERIOD).contains(&value) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{setting} must be from 1 to {} seconds (365 days), got {} seconds",
                        MAX_CREDENTIAL_PERIOD.as_secs(),
                        value.as_secs_f64()
                    ),
                ));
            }
        }
        let listener = TcpListener::bind(self.listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(
            Settings {
                lifetime: self.lifetime,
                rotation: self.rotation,
            },
            self.time_source,
            self.role,
            self.tokens_required,
            self.extended,
        ));
        let stop = CancellationToken::new();
        let app = routes::router(shared.clone(), stop.clone());
        let server_stop = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(server_stop.cancelled_owned())
                .await;
        });
        Ok(MockImds {
            shared,
            local_addr,
            stop,
            task: Some(task),
        })
    }
}

/// A running IMDSv2 emulator. Dropping it stops the server.
#[derive(Debug)]
pub struct MockImds {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MockImds {
    /// Starts configuring an emulator.
    pub fn builder() -> MockImdsBuilder {
        MockImdsBuilder::default()
    }

    /// The base URL to point a client at, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// The address the emulator listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Attaches `role`, or replaces the attached one. A new role gets new
    /// credentials at once.
    pub fn attach_role(&self, role: impl Into<String>) {
        self.shared.set_role(Some(role.into()));
    }

    /// Same as [`attach_role`](Self::attach_role): the console's "replace".
    pub fn replace_role(&self, role: impl Into<String>) {
        self.attach_role(role);
    }

    /// Detaches the role: the credential paths answer 404 from now on.
    pub fn detach_role(&self) {
        self.shared.set_role(None);
    }

    /// The attached role, if any.
    pub fn role(&self) -> Option<String> {
        self.shared.role()
    }

    /// The partition in `iam/info`'s `InstanceProfileArn` (`aws-cn` gives
    /// `arn:aws-cn:iam::123456789012:instance-profile/ROLE`). Default: `aws`.
    pub fn set_partition(&self, partition: impl Into<String>) {
        let partition = partition.into();
        self.shared.with_state(|s| s.partition = partition);
    }

    /// Issues new credentials now.
    pub fn rotate(&self) {
        self.shared.rotate();
    }

    /// The credentials IMDS serves right now, if a role is attached.
    pub fn current_credentials(&self) -> Option<Credentials> {
        self.shared.current_credentials()
    }

    /// How many IMDS requests arrived (control requests not counted).
    pub fn request_counts(&self) -> RequestCounts {
        self.shared.request_counts()
    }

    /// Forgets the request counts.
    pub fn reset_request_counts(&self) {
        self.shared.reset_request_counts();
    }

    /// Injects `fault` for `duration`. Faults stack; the oldest applicable one
    /// wins.
    pub fn inject(&self, fault: Fault, duration: FaultDuration) {
        self.shared.inject(fault, duration);
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.shared.clear_faults();
    }

    /// Switches between IMDSv2-only (true) and IMDSv1 allowed (false).
    pub fn set_tokens_required(&self, required: bool) {
        self.shared.with_state(|s| s.tokens_required = required);
    }

    /// Switches the endpoint on or off (`http-endpoint disabled`).
    pub fn set_enabled(&self, enabled: bool) {
        self.shared.with_state(|s| s.enabled = enabled);
    }

    /// Shifts the `Date` header by `seconds` (negative: server behind),
    /// clamped to ±[`MAX_SKEW_SECONDS`] (10 years). The control surface
    /// refuses values beyond that instead.
    pub fn set_clock_skew(&self, seconds: i64) {
        let seconds = seconds.clamp(-MAX_SKEW_SECONDS, MAX_SKEW_SECONDS);
        self.shared.with_state(|s| s.skew_seconds = seconds);
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockImds {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
