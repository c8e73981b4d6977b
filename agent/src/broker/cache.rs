//! One cached STS session per consumer, with the instance credentials' guarantees.
//!
//! [`Broker`] hands each consumer its credentials: a session obtained with
//! [`AssumeRole`] (signed with the instance role's credentials), cached and
//! refreshed around expiry:
//!
//! - **Refresh windows.** Until the *advisory* window (half the session's
//!   lifetime, at most [`MAX_ADVISORY_WINDOW`] before expiry, shortened by a
//!   per-process jitter of up to 20 % so a fleet's agents do not call STS on a
//!   common tick) callers get the cached session at once. Inside it, one
//!   background refresh starts and callers still get the cached session at
//!   once. Inside the *mandatory* window ([`MANDATORY_WINDOW`], at most a tenth
//!   of the lifetime) callers wait for the refresh.
//! - **Single flight.** Per consumer, one `AssumeRole` runs at a time;
//!   callers that waited for it take its result, success or failure, instead
//!   of starting their own. A thousand concurrent peers cause one call.
//! - **Static stability.** When STS fails transiently, the still-valid
//!   session keeps being served, and STS is asked again after a jittered,
//!   growing backoff (longer on `Throttling`). Unlike the instance
//!   credentials, a session is never served past its expiry: AWS would refuse
//!   it, so the caller gets the error instead.
//! - **The instance role.** A rotation of the instance credentials (same role)
//!   changes nothing: sessions assumed with the old keys stay valid until they
//!   expire. A *detach* (no role) withdraws every consumer's session at once,
//!   including a load in flight. A *replacement* (another role name) makes
//!   every session of the old role unusable: the next call or poll assumes
//!   again with the new role.
//! - **Refusals.** STS `AccessDenied` (trust policy, missing permission) and
//!   invalid requests are logged once per consumer with a hint, and remembered
//!   for [`REFUSAL_RETRY`]: callers get the error without STS being called
//!   again in a tight loop.
//!
//! Which peer is which consumer is [`Config::consumer_for`](super::config::Config::consumer_for);
//! this module only deals with named consumers. Wall-clock decisions ("is it
//! stale?") read an injected [`SharedTimeSource`], so the timeline tests move
//! it together with tokio's paused clock. Nothing here logs or formats a
//! secret: credentials are [`imds_client::Credentials`], whose `Debug` shows
//! only the access key id and expiry.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use imds_client::credentials::format_rfc3339;
use imds_client::{ProviderState, RoleCredentials, SharedTimeSource};
use tracing::{error, info, warn};

use super::config::{Config, Consumer};

/// Upper bound of the advisory window (before jitter).
pub const MAX_ADVISORY_WINDOW: Duration = Duration::from_secs(15 * 60);
/// The mandatory window: inside it, callers wait for a refresh.
pub const MANDATORY_WINDOW: Duration = Duration::from_secs(60);
/// How long an `AccessDenied` or invalid request is remembered before STS is asked again.
pub const REFUSAL_RETRY: Duration = Duration::from_secs(5 * 60);
/// First backoff after a transient failure (doubling, jittered to 50-100 %).
pub const TRANSIENT_BACKOFF: Duration = Duration::from_secs(1);
/// Longest backoff after transient failures.
pub const MAX_TRANSIENT_BACKOFF: Duration = Duration::from_secs(60);
/// First backoff after `Throttling` (doubling, jittered to 50-100 %).
pub const THROTTLED_BACKOFF: Duration = Duration::from_secs(10);
/// Longest backoff after `Throttling`.
pub const MAX_THROTTLED_BACKOFF: Duration = Duration::from_secs(5 * 60);
/// Shortest wait between two polls of one consumer ([`Broker::poll_interval`]).
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// One consumer as `/healthz` may show it ([`Broker::status`]): no keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerStatus {
    /// The consumer's name.
    pub name: String,
    /// When its session expires; `None`: it has no valid session.
    pub expiration: Option<SystemTime>,
    /// The last STS failure, until the next success (no secrets).
    pub last_error: Option<String>,
}

/// Obtains a consumer's session from STS. The STS client implements it;
/// tests implement it with fakes.
pub trait AssumeRole: Send + Sync + 'static {
    /// Assumes `consumer`'s role (its `role_arn`, or the instance role when
    /// it has none) with its session policies, signed with the instance
    /// role's credentials `with`. The returned `role` names the assumed role
    /// (its ARN); `credentials` are the session's.
    fn assume(
        &self,
        consumer: &Consumer,
        with: &RoleCredentials,
    ) -> impl Future<Output = Result<RoleCredentials, AssumeError>> + Send;
}

/// What kind of failure an [`AssumeError`] is: it decides when STS is asked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AssumeErrorKind {
    /// The network, a timeout, a 5xx: try again soon ([`TRANSIENT_BACKOFF`]).
    Transient,
    /// STS said `Throttling`: back off longer ([`THROTTLED_BACKOFF`]).
    Throttled,
    /// STS said `AccessDenied`: the role's trust policy or the instance
    /// role's permissions. Retried after [`REFUSAL_RETRY`].
    AccessDenied,
    /// STS refused the request itself (malformed policy, bad duration,
    /// packed policy too large, ...). Retried after [`REFUSAL_RETRY`].
    Invalid,
}

/// Why `AssumeRole` failed. The message is STS's (or the client's) and must
/// never hold a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeError {
    kind: AssumeErrorKind,
    message: String,
}

impl AssumeError {
    /// An error of `kind`, described by `message` (no secrets).
    pub fn new(kind: AssumeErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// What kind of failure it is.
    pub fn kind(&self) -> AssumeErrorKind {
        self.kind
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for AssumeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            AssumeErrorKind::Transient => "transient failure",
            AssumeErrorKind::Throttled => "throttled",
            AssumeErrorKind::AccessDenied => "access denied",
            AssumeErrorKind::Invalid => "invalid request",
        };
        write!(f, "{kind}: {}", self.message)
    }
}

impl std::error::Error for AssumeError {}

/// Why a consumer gets no credentials now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// No consumer of that name is configured.
    #[error("no consumer named {0:?} is configured")]
    UnknownConsumer(String),
    /// The instance has no IAM role: every consumer's session is withdrawn.
    #[error(
        "no IAM role is attached to this instance, so no consumer gets credentials. \
         Hint: attach an instance profile"
    )]
    NoInstanceRole,
    /// The instance credentials are not available, and the consumer has no valid session.
    #[error(
        "consumer {consumer:?} has no valid session, and the instance role's credentials \
         needed to assume one are not available ({reason})"
    )]
    InstanceUnavailable {
        /// The consumer.
        consumer: String,
        /// Why the instance credentials are not available.
        reason: String,
    },
    /// STS refused or failed, and the consumer has no valid session.
    #[error("STS AssumeRole for consumer {consumer:?} failed: {error}{}", hint(.error, .role_arn.as_deref()))]
    Assume {
        /// The consumer.
        consumer: String,
        /// The role it assumes (`None`: the instance role).
        role_arn: Option<String>,
        /// What STS said.
        error: AssumeError,
    },
}

fn hint(error: &AssumeError, role_arn: Option<&str>) -> String {
    let role = role_arn.unwrap_or("the instance role itself");
    match error.kind {
        AssumeErrorKind::AccessDenied => format!(
            ". Hint: the trust policy of {role} must allow the instance role to sts:AssumeRole \
             (role chaining; also sts:SetSourceIdentity / sts:TagSession when the consumer sets \
             source_identity / session_tags), and the instance role's own policy must allow \
             sts:AssumeRole on it. Asked again in {} minutes",
            REFUSAL_RETRY.as_secs() / 60
        ),
        AssumeErrorKind::Invalid => format!(
            ". Hint: check the consumer's session policy, policy_arns and duration_seconds. \
             Asked again in {} minutes",
            REFUSAL_RETRY.as_secs() / 60
        ),
        _ => String::new(),
    }
}

/// Hands each consumer its cached, refreshed STS session (module docs).
///
/// Cloning is cheap; clones share the cache.
pub struct Broker<A> {
    inner: Arc<Inner<A>>,
}

impl<A> Clone for Broker<A> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<A> fmt::Debug for Broker<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.inner.slots.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Broker")
            .field("consumers", &names)
            .field("jitter", &self.inner.jitter)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Broker`].
#[derive(Debug)]
#[must_use]
pub struct BrokerBuilder<A> {
    assumer: A,
    consumers: Vec<Consumer>,
    clock: Option<SharedTimeSource>,
    seed: Option<u64>,
}

impl<A: AssumeRole> BrokerBuilder<A> {
    /// The consumers to serve (normally [`BrokerBuilder::config`]). Default: none.
    pub fn consumers(mut self, consumers: impl IntoIterator<Item = Consumer>) -> Self {
        self.consumers.extend(consumers);
        self
    }

    /// Every consumer of `config`.
    pub fn config(self, config: &Config) -> Self {
        self.consumers(config.consumers().iter().cloned())
    }

    /// The wall clock expiry is judged by. Default: the system clock.
    pub fn time_source(mut self, clock: SharedTimeSource) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Seeds the per-process jitter (for reproducible tests). Default: random.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Builds the broker.
    pub fn build(self) -> Broker<A> {
        let mut rng = match self.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        let jitter = 0.8 + rng.f64() * 0.2;
        let slots = self
            .consumers
            .into_iter()
            .map(|consumer| {
                let slot = Arc::new(Slot {
                    consumer: Arc::new(consumer),
                    state: Mutex::new(SlotState::default()),
                    load: Arc::new(tokio::sync::Mutex::new(())),
                });
                (slot.consumer.name.clone(), slot)
            })
            .collect();
        Broker {
            inner: Arc::new(Inner {
                assumer: self.assumer,
                clock: self.clock.unwrap_or_default(),
                slots,
                jitter,
                rng: Mutex::new(rng),
                generation: AtomicU64::new(0),
                refused_no_consumer: AtomicU64::new(0),
                refused_ambiguous: AtomicU64::new(0),
            }),
        }
    }
}

struct Inner<A> {
    assumer: A,
    clock: SharedTimeSource,
    slots: HashMap<String, Arc<Slot>>,
    /// Per-process factor (0.8 to 1.0) of the advisory window.
    jitter: f64,
    rng: Mutex<fastrand::Rng>,
    /// Bumped by every withdrawal, so a load that started before one is dropped.
    generation: AtomicU64,
    /// Peers refused for matching no consumer, or the consumers of two or
    /// more of their groups ([`Broker::count_refusal`]).
    refused_no_consumer: AtomicU64,
    refused_ambiguous: AtomicU64,
}

struct Slot {
    consumer: Arc<Consumer>,
    state: Mutex<SlotState>,
    /// Held while this consumer's `AssumeRole` runs (single flight).
    load: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct SlotState {
    session: Option<Session>,
    failure: Option<Failure>,
    /// A refusal was logged since the last success (log it once).
    refusal_logged: bool,
}

struct Session {
    current: RoleCredentials,
    /// The instance role whose credentials signed the `AssumeRole`.
    instance_role: String,
    issued: SystemTime,
}

struct Failure {
    error: BrokerError,
    kind: AssumeErrorKind,
    /// No call to STS before this.
    retry_at: SystemTime,
    /// Consecutive failures of this kind (for the backoff).
    attempts: u32,
    instance_role: String,
}

/// What a caller does, decided from the state and the time.
enum Action {
    Serve(RoleCredentials),
    ServeAndRefresh(RoleCredentials),
    Load,
    Fail(BrokerError),
}

/// What the instance state allows.
enum Instance<'a> {
    Active(&'a RoleCredentials),
    Detached,
    Unavailable(String),
}

fn instance(state: &ProviderState) -> Instance<'_> {
    match state {
        ProviderState::Active { current, .. } => Instance::Active(current),
        ProviderState::NoRole => Instance::Detached,
        ProviderState::Starting => {
            Instance::Unavailable("the agent has not loaded them yet".into())
        }
        ProviderState::Unavailable { error, .. } => Instance::Unavailable(error.to_string()),
        _ => Instance::Unavailable("unknown state".into()),
    }
}

impl<A: AssumeRole> Broker<A> {
    /// A builder around the STS client `assumer`.
    pub fn builder(assumer: A) -> BrokerBuilder<A> {
        BrokerBuilder {
            assumer,
            consumers: Vec::new(),
            clock: None,
            seed: None,
        }
    }

    /// The consumers served, in no particular order.
    pub fn consumers(&self) -> impl Iterator<Item = &Consumer> {
        self.inner.slots.values().map(|slot| &*slot.consumer)
    }

    /// The credentials of the consumer `name`, given what the instance
    /// provider publishes now (`instance_state`): for a peer asking.
    ///
    /// Answers from the cache while the session is fresh; refreshes in the
    /// background inside the advisory window (the caller gets the cached
    /// session at once); waits for one shared `AssumeRole` when there is no
    /// valid session or inside the mandatory window. `ProviderState::NoRole`
    /// withdraws every consumer's session.
    pub async fn credentials(
        &self,
        name: &str,
        instance_state: &ProviderState,
    ) -> Result<RoleCredentials, BrokerError> {
        self.get(name, instance_state, false).await
    }

    /// As [`credentials`](Self::credentials), for a poller keeping the
    /// consumer's files current: inside the advisory window it waits for the
    /// refresh (shared with any other caller) and returns the new session.
    /// Call it again after [`poll_interval`](Self::poll_interval), or when
    /// the instance state changes.
    pub async fn poll(
        &self,
        name: &str,
        instance_state: &ProviderState,
    ) -> Result<RoleCredentials, BrokerError> {
        self.get(name, instance_state, true).await
    }

    async fn get(
        &self,
        name: &str,
        instance_state: &ProviderState,
        poll: bool,
    ) -> Result<RoleCredentials, BrokerError> {
        let slot = self
            .inner
            .slots
            .get(name)
            .ok_or_else(|| BrokerError::UnknownConsumer(name.to_owned()))?;
        let instance = instance(instance_state);
        if let Instance::Detached = instance {
            self.withdraw_all();
            return Err(BrokerError::NoInstanceRole);
        }
        match self.decide(slot, &instance) {
            Action::Serve(current) => return Ok(current),
            Action::ServeAndRefresh(_) if poll => {}
            Action::ServeAndRefresh(current) => {
                if let (Instance::Active(with), Ok(guard)) =
                    (&instance, Arc::clone(&slot.load).try_lock_owned())
                {
                    let this = self.clone();
                    let slot = Arc::clone(slot);
                    let with = (*with).clone();
                    let generation = self.inner.generation.load(Ordering::SeqCst);
                    tokio::spawn(async move {
                        let _guard = guard;
                        let _ = this.load(&slot, &with, generation).await;
                    });
                }
                return Ok(current);
            }
            Action::Fail(error) => return Err(error),
            Action::Load => {}
        }
        let Instance::Active(with) = instance else {
            unreachable!("decide refreshes only with an active instance role")
        };
        let generation = self.inner.generation.load(Ordering::SeqCst);
        let _guard = slot.load.lock().await;
        // Whoever held the lock before may have loaded (or failed): take that.
        match self.decide(slot, &Instance::Active(with)) {
            Action::Serve(current) => Ok(current),
            Action::ServeAndRefresh(current) if !poll => Ok(current),
            Action::Fail(error) => Err(error),
            Action::ServeAndRefresh(_) | Action::Load => self.load(slot, with, generation).await,
        }
    }

    /// Tells the broker what the instance provider publishes now, so a
    /// detach or replacement takes effect before the next caller: `NoRole`
    /// withdraws every session; an active role other than the one a session
    /// was assumed with drops that session (it is assumed again with the new
    /// role at the next call). Returns the consumers whose sessions were
    /// dropped (their outputs should be withdrawn or rewritten).
    pub fn observe(&self, instance_state: &ProviderState) -> Vec<String> {
        match instance(instance_state) {
            Instance::Detached => self.withdraw_all(),
            Instance::Active(current) => {
                let mut dropped = Vec::new();
                for slot in self.inner.slots.values() {
                    let mut state = lock(&slot.state);
                    if state
                        .session
                        .as_ref()
                        .is_some_and(|s| s.instance_role != current.role)
                    {
                        state.session = None;
                        dropped.push(slot.consumer.name.clone());
                    }
                }
                if !dropped.is_empty() {
                    info!(
                        instance_role = %current.role,
                        consumers = ?dropped,
                        "instance role replaced: consumers' sessions will be assumed again with the new role"
                    );
                }
                dropped
            }
            Instance::Unavailable(_) => Vec::new(),
        }
    }

    /// Withdraws every consumer's session (the instance role was detached),
    /// including loads in flight. Returns the consumers that had one.
    pub fn withdraw_all(&self) -> Vec<String> {
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        let mut withdrawn = Vec::new();
        for slot in self.inner.slots.values() {
            let mut state = lock(&slot.state);
            if state.session.take().is_some() {
                withdrawn.push(slot.consumer.name.clone());
            }
            state.failure = None;
        }
        if !withdrawn.is_empty() {
            warn!(consumers = ?withdrawn, "no instance role: every consumer's session is withdrawn");
        }
        withdrawn
    }

    /// When the consumer's session next needs a refresh: the start of its
    /// advisory window, or the end of a backoff after a failure, whichever
    /// is later. `None`: nothing is cached or remembered (or no such consumer).
    pub fn next_refresh(&self, name: &str) -> Option<SystemTime> {
        let slot = self.inner.slots.get(name)?;
        let state = lock(&slot.state);
        let retry_at = state.failure.as_ref().map(|f| f.retry_at);
        let advisory_at = state.session.as_ref().map(|s| self.windows(s).0);
        match (advisory_at, retry_at) {
            (Some(a), Some(r)) => Some(a.max(r)),
            (a, r) => a.or(r),
        }
    }

    /// How long a poller waits before its next [`poll`](Self::poll) of the
    /// consumer `name` (unless the instance state changes first): until
    /// [`next_refresh`](Self::next_refresh), and at least
    /// [`MIN_POLL_INTERVAL`] (so a refresh that cannot happen now, with the
    /// instance credentials unavailable, is not polled in a tight loop).
    pub fn poll_interval(&self, name: &str) -> Duration {
        let now = self.inner.clock.now();
        self.next_refresh(name)
            .and_then(|at| at.duration_since(now).ok())
            .unwrap_or_default()
            .max(MIN_POLL_INTERVAL)
    }

    /// Counts a peer refused by the config: `ambiguous` when its groups
    /// lead to two or more consumers, else for matching no consumer.
    pub fn count_refusal(&self, ambiguous: bool) {
        let counter = if ambiguous {
            &self.inner.refused_ambiguous
        } else {
            &self.inner.refused_no_consumer
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Peers refused so far: (matching no consumer, ambiguous groups).
    pub fn refusals(&self) -> (u64, u64) {
        (
            self.inner.refused_no_consumer.load(Ordering::Relaxed),
            self.inner.refused_ambiguous.load(Ordering::Relaxed),
        )
    }

    /// What `/healthz` and `/metrics` may show of every consumer: names,
    /// expiry and the last failure, never a key.
    pub fn status(&self) -> Vec<ConsumerStatus> {
        let now = self.inner.clock.now();
        let mut all: Vec<ConsumerStatus> = self
            .inner
            .slots
            .values()
            .map(|slot| {
                let state = lock(&slot.state);
                ConsumerStatus {
                    name: slot.consumer.name.clone(),
                    expiration: state
                        .session
                        .as_ref()
                        .map(|s| s.current.credentials.expiration())
                        .filter(|&e| e > now),
                    last_error: state.failure.as_ref().map(|f| f.error.to_string()),
                }
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// (advisory_at, mandatory_at) of a session.
    fn windows(&self, session: &Session) -> (SystemTime, SystemTime) {
        let expiry = session.current.credentials.expiration();
        let lifetime = expiry
            .duration_since(session.issued)
            .unwrap_or(Duration::ZERO);
        let advisory = (lifetime / 2)
            .min(MAX_ADVISORY_WINDOW)
            .mul_f64(self.inner.jitter);
        let mandatory = MANDATORY_WINDOW.min(lifetime / 10);
        (expiry - advisory, expiry - mandatory)
    }

    fn decide(&self, slot: &Slot, instance: &Instance<'_>) -> Action {
        let now = self.inner.clock.now();
        let mut state = lock(&slot.state);
        let role = match instance {
            Instance::Active(current) => Some(current.role.as_str()),
            _ => None,
        };
        // A session of a replaced instance role is never served again.
        if let (Some(role), Some(session)) = (role, &state.session)
            && session.instance_role != role
        {
            state.session = None;
        }
        let backing_off = state
            .failure
            .as_ref()
            .filter(|f| role.is_none_or(|r| r == f.instance_role))
            .filter(|f| f.retry_at > now);
        if let Some(session) = &state.session {
            let expiry = session.current.credentials.expiration();
            if now < expiry {
                let (advisory_at, mandatory_at) = self.windows(session);
                let current = session.current.clone();
                return if now < advisory_at || backing_off.is_some() || role.is_none() {
                    Action::Serve(current)
                } else if now < mandatory_at {
                    Action::ServeAndRefresh(current)
                } else {
                    Action::Load
                };
            }
        }
        if let Some(failure) = backing_off {
            return Action::Fail(failure.error.clone());
        }
        match instance {
            Instance::Active(_) => Action::Load,
            Instance::Unavailable(reason) => Action::Fail(BrokerError::InstanceUnavailable {
                consumer: slot.consumer.name.clone(),
                reason: reason.clone(),
            }),
            Instance::Detached => Action::Fail(BrokerError::NoInstanceRole),
        }
    }

    /// One `AssumeRole` for `slot`, its result stored (unless the sessions
    /// were withdrawn meanwhile). The caller holds `slot.load`.
    async fn load(
        &self,
        slot: &Slot,
        with: &RoleCredentials,
        generation: u64,
    ) -> Result<RoleCredentials, BrokerError> {
        let consumer = &slot.consumer;
        let result = self.inner.assumer.assume(consumer, with).await;
        let now = self.inner.clock.now();
        // A session that is (nearly) expired on arrival would be refreshed
        // by every caller: this host's clock is wrong, or STS is. Backed off
        // like any transient failure instead.
        let result = match result {
            Ok(current) if current.credentials.expiration() <= now + MANDATORY_WINDOW => {
                Err(AssumeError::new(
                    AssumeErrorKind::Transient,
                    format!(
                        "STS handed out a session expiring at {}, which this host's clock says \
                         is past or within a minute. Hint: check the clock (chrony, NTP)",
                        format_rfc3339(current.credentials.expiration())
                    ),
                ))
            }
            other => other,
        };
        let mut state = lock(&slot.state);
        if self.inner.generation.load(Ordering::SeqCst) != generation {
            // Detached while STS answered: what it handed out is not served.
            return Err(BrokerError::NoInstanceRole);
        }
        match result {
            Ok(current) => {
                info!(
                    consumer = %consumer.name,
                    role = %current.role,
                    instance_role = %with.role,
                    access_key_id = %current.credentials.access_key_id(),
                    expiration = %format_rfc3339(current.credentials.expiration()),
                    "assumed a session for the consumer"
                );
                if state.refusal_logged || state.failure.is_some() {
                    info!(consumer = %consumer.name, "STS answers again for the consumer");
                }
                state.session = Some(Session {
                    current: current.clone(),
                    instance_role: with.role.clone(),
                    issued: now,
                });
                state.failure = None;
                state.refusal_logged = false;
                Ok(current)
            }
            Err(error) => {
                let kind = error.kind();
                let attempts = match &state.failure {
                    Some(f) if f.kind == kind => f.attempts.saturating_add(1),
                    _ => 1,
                };
                let valid = state
                    .session
                    .as_ref()
                    .filter(|s| s.instance_role == with.role)
                    .filter(|s| s.current.credentials.expiration() > now)
                    .map(|s| s.current.clone());
                let mut wait = self.backoff(kind, attempts);
                if let (Some(v), AssumeErrorKind::Transient | AssumeErrorKind::Throttled) =
                    (&valid, kind)
                {
                    // Leave room for one more try before the session expires.
                    let room = v
                        .credentials
                        .expiration()
                        .duration_since(now)
                        .unwrap_or_default()
                        .saturating_sub(Duration::from_secs(5));
                    wait = wait.min(room.max(Duration::from_secs(1)));
                }
                let broker_error = BrokerError::Assume {
                    consumer: consumer.name.clone(),
                    role_arn: consumer.role_arn.clone(),
                    error,
                };
                match kind {
                    AssumeErrorKind::AccessDenied | AssumeErrorKind::Invalid => {
                        if !state.refusal_logged {
                            error!(consumer = %consumer.name, "{broker_error}");
                            state.refusal_logged = true;
                        }
                    }
                    _ => warn!(
                        consumer = %consumer.name,
                        retry_in_ms = wait.as_millis() as u64,
                        serving_valid_session = valid.is_some(),
                        "{broker_error}"
                    ),
                }
                state.failure = Some(Failure {
                    error: broker_error.clone(),
                    kind,
                    retry_at: now + wait,
                    attempts,
                    instance_role: with.role.clone(),
                });
                valid.ok_or(broker_error)
            }
        }
    }

    fn backoff(&self, kind: AssumeErrorKind, attempts: u32) -> Duration {
        let (base, max) = match kind {
            AssumeErrorKind::Transient => (TRANSIENT_BACKOFF, MAX_TRANSIENT_BACKOFF),
            AssumeErrorKind::Throttled => (THROTTLED_BACKOFF, MAX_THROTTLED_BACKOFF),
            _ => return REFUSAL_RETRY,
        };
        let exp = base
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
            .min(max);
        let jitter = 0.5 + lock(&self.inner.rng).f64() * 0.5;
        exp.mul_f64(jitter)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;

    use imds_client::{Credentials, ManualTimeSource, TimeSource};

    use super::*;

    const START: Duration = Duration::from_secs(1_800_000_000);
    const SECRET: &str = "SECRETaccessKEYthatMUSTneverBEseen";
    const TOKEN: &str = "SESSIONtokenTHATmustNEVERbeSEEN";

    /// A scripted STS: each call takes `delay` (tokio time) and then answers
    /// with the next scripted outcome, or with a new session lasting the
    /// consumer's `duration` when the script is empty and no outage is set.
    #[derive(Clone)]
    struct FakeSts(Arc<FakeInner>);

    struct FakeInner {
        clock: ManualTimeSource,
        delay: Duration,
        calls: Mutex<Vec<Call>>,
        script: Mutex<VecDeque<AssumeError>>,
        outage: Mutex<Option<AssumeError>>,
        /// Overrides the sessions' lifetime (default: the consumer's duration).
        lifetime: Mutex<Option<Duration>>,
        serial: AtomicUsize,
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Call {
        consumer: String,
        instance_role: String,
        instance_key: String,
    }

    impl FakeSts {
        fn new(clock: &ManualTimeSource, delay: Duration) -> Self {
            Self(Arc::new(FakeInner {
                clock: clock.clone(),
                delay,
                calls: Mutex::new(Vec::new()),
                script: Mutex::new(VecDeque::new()),
                outage: Mutex::new(None),
                lifetime: Mutex::new(None),
                serial: AtomicUsize::new(0),
            }))
        }

        fn calls(&self) -> Vec<Call> {
            lock(&self.0.calls).clone()
        }

        fn count(&self) -> usize {
            lock(&self.0.calls).len()
        }

        fn fail_next(&self, kind: AssumeErrorKind, message: &str) {
            lock(&self.0.script).push_back(AssumeError::new(kind, message));
        }

        fn outage(&self, error: Option<AssumeError>) {
            *lock(&self.0.outage) = error;
        }
    }

    impl AssumeRole for FakeSts {
        fn assume(
            &self,
            consumer: &Consumer,
            with: &RoleCredentials,
        ) -> impl Future<Output = Result<RoleCredentials, AssumeError>> + Send {
            let inner = Arc::clone(&self.0);
            let consumer = consumer.clone();
            lock(&inner.calls).push(Call {
                consumer: consumer.name.clone(),
                instance_role: with.role.clone(),
                instance_key: with.credentials.access_key_id().to_owned(),
            });
            async move {
                if !inner.delay.is_zero() {
                    tokio::time::sleep(inner.delay).await;
                }
                if let Some(error) = lock(&inner.script).pop_front() {
                    return Err(error);
                }
                if let Some(error) = lock(&inner.outage).clone() {
                    return Err(error);
                }
                let n = inner.serial.fetch_add(1, Ordering::SeqCst) + 1;
                let lifetime = lock(&inner.lifetime).unwrap_or(consumer.duration);
                let expiry = inner.clock.now() + lifetime;
                Ok(RoleCredentials {
                    role: consumer
                        .role_arn
                        .clone()
                        .unwrap_or_else(|| "instance-role-itself".into()),
                    credentials: Arc::new(Credentials::new(
                        format!("ASIA{}{n:04}", consumer.name.to_uppercase()),
                        format!("{SECRET}{n}"),
                        format!("{TOKEN}{n}"),
                        expiry,
                    )),
                })
            }
        }
    }

    const CONFIG: &str = r#"
[[consumer]]
name = "billing"
uids = [1001]
role_arn = "arn:aws:iam::123456789012:role/billing"
[[consumer]]
name = "web"
uids = [1002]
"#;

    struct Harness {
        broker: Broker<FakeSts>,
        sts: FakeSts,
        clock: ManualTimeSource,
    }

    fn harness(delay: Duration) -> Harness {
        let config = Config::parse(CONFIG, Path::new("/etc/imds-agent/agent.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let clock = ManualTimeSource::new(SystemTime::UNIX_EPOCH + START);
        let sts = FakeSts::new(&clock, delay);
        let broker = Broker::builder(sts.clone())
            .config(&config)
            .time_source(SharedTimeSource::new(clock.clone()))
            .jitter_seed(7)
            .build();
        Harness { broker, sts, clock }
    }

    fn active(role: &str, key: &str, clock: &ManualTimeSource) -> ProviderState {
        ProviderState::Active {
            current: RoleCredentials {
                role: role.into(),
                credentials: Arc::new(Credentials::new(
                    key,
                    "instance-secret-XXXXXXXX",
                    "instance-token-XXXXXXXX",
                    clock.now() + Duration::from_secs(6 * 3600),
                )),
            },
            last_error: None,
        }
    }

    fn key(result: &Result<RoleCredentials, BrokerError>) -> String {
        match result {
            Ok(current) => current.credentials.access_key_id().to_owned(),
            Err(e) => format!("error: {e}"),
        }
    }

    /// Waits (on tokio's paused clock) until STS has been called `n` times.
    async fn wait_for_calls(sts: &FakeSts, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while sts.count() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {n} AssumeRole calls, saw {:?}",
                sts.calls()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_concurrent_callers_cause_one_assume_role() {
        let h = harness(Duration::from_secs(1));
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..1000 {
            let broker = h.broker.clone();
            let state = state.clone();
            tasks.spawn(async move { key(&broker.credentials("billing", &state).await) });
        }
        let keys = tasks.join_all().await;
        assert_eq!(h.sts.count(), 1, "calls: {:?}", h.sts.calls());
        assert!(
            keys.iter().all(|k| k == "ASIABILLING0001"),
            "every caller gets the one session: {:?}",
            keys.iter().find(|k| *k != "ASIABILLING0001")
        );
        // And each consumer has its own session.
        assert_eq!(
            key(&h.broker.credentials("web", &state).await),
            "ASIAWEB0002"
        );
        assert_eq!(h.sts.count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_are_cached_then_refreshed_in_the_background_then_waited_for() {
        let h = harness(Duration::ZERO);
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        assert_eq!(
            key(&h.broker.credentials("billing", &state).await),
            "ASIABILLING0001"
        );
        let expiry = SystemTime::UNIX_EPOCH + START + Duration::from_secs(3600);
        let advisory_at = h
            .broker
            .next_refresh("billing")
            .expect("a session is cached");
        // Half the hour, at most 15 minutes, less up to 20 % of jitter.
        assert!(
            advisory_at >= expiry - Duration::from_secs(900)
                && advisory_at <= expiry - Duration::from_secs(720),
            "the advisory window starts 12 to 15 minutes before expiry, not {:?} before",
            expiry.duration_since(advisory_at)
        );

        // Before the advisory window: from the cache.
        h.clock.advance(Duration::from_secs(2690));
        for _ in 0..10 {
            assert_eq!(
                key(&h.broker.credentials("billing", &state).await),
                "ASIABILLING0001"
            );
        }
        assert_eq!(h.sts.count(), 1, "no call before the advisory window");

        // Inside it: the cached session at once, and one refresh behind it.
        h.clock.advance(Duration::from_secs(300));
        assert_eq!(
            key(&h.broker.credentials("billing", &state).await),
            "ASIABILLING0001"
        );
        wait_for_calls(&h.sts, 2).await;
        assert_eq!(
            key(&h.broker.credentials("billing", &state).await),
            "ASIABILLING0002"
        );
        assert_eq!(h.sts.count(), 2);

        // Inside the mandatory window of the new session: callers wait for it.
        h.clock.advance(Duration::from_secs(3600 - 30));
        assert_eq!(
            key(&h.broker.credentials("billing", &state).await),
            "ASIABILLING0003"
        );
        assert_eq!(h.sts.count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_poller_waits_for_the_advisory_refresh_and_is_told_when_to_come_back() {
        let h = harness(Duration::from_secs(1));
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        assert_eq!(
            key(&h.broker.poll("billing", &state).await),
            "ASIABILLING0001"
        );
        let wait = h.broker.poll_interval("billing");
        assert!(
            (Duration::from_secs(2700)..=Duration::from_secs(2880)).contains(&wait),
            "come back at the advisory window, in 45 to 48 minutes, not {wait:?}"
        );
        h.clock.advance(wait);
        // A peer's call now would get the old session at once; the poller
        // waits for the new one, to write it.
        assert_eq!(
            key(&h.broker.poll("billing", &state).await),
            "ASIABILLING0002"
        );
        assert_eq!(h.sts.count(), 2);
        assert!(h.broker.poll_interval("billing") > Duration::from_secs(2000));

        // Nothing to do without instance credentials: polled once a second, not hot.
        let unavailable = ProviderState::Starting;
        assert!(h.broker.poll("web", &unavailable).await.is_err());
        assert_eq!(h.broker.poll_interval("web"), MIN_POLL_INTERVAL);

        let status = h.broker.status();
        assert_eq!(status.len(), 2);
        assert_eq!(status[0].name, "billing");
        assert_eq!(
            status[0].expiration,
            Some(h.clock.now() + Duration::from_secs(3600))
        );
        assert_eq!(status[1].name, "web");
        assert_eq!(status[1].expiration, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_expired_on_arrival_is_backed_off_not_fetched_by_every_caller() {
        let h = harness(Duration::ZERO);
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        // As if this host's clock were 59 minutes ahead of STS's.
        *lock(&h.sts.0.lifetime) = Some(Duration::from_secs(30));
        for _ in 0..100 {
            let result = h.broker.credentials("billing", &state).await;
            let Err(error) = &result else {
                panic!(
                    "a session expiring in 30 s is refused, got {}",
                    key(&result)
                )
            };
            assert!(
                error.to_string().contains("Hint: check the clock"),
                "{error}"
            );
        }
        assert_eq!(h.sts.count(), 1, "backed off, not one call per caller");
        *lock(&h.sts.0.lifetime) = None;
        h.clock.advance(TRANSIENT_BACKOFF);
        assert_eq!(
            key(&h.broker.credentials("billing", &state).await),
            "ASIABILLING0002"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_advisory_window_is_jittered_per_process() {
        // Agents started with different seeds (different processes) refresh
        // at different times, so a fleet does not call STS on one tick.
        let clock = ManualTimeSource::new(SystemTime::UNIX_EPOCH + START);
        let config = Config::parse(CONFIG, Path::new("/etc/imds-agent/agent.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let expiry = clock.now() + Duration::from_secs(3600);
        let mut starts = Vec::new();
        for seed in 0..20 {
            let broker = Broker::builder(FakeSts::new(&clock, Duration::ZERO))
                .config(&config)
                .time_source(SharedTimeSource::new(clock.clone()))
                .jitter_seed(seed)
                .build();
            let state = active("instance", "ASIAINSTANCE0001", &clock);
            broker.credentials("web", &state).await.expect("session");
            let at = broker.next_refresh("web").expect("cached");
            let before = expiry.duration_since(at).expect("before expiry");
            assert!(
                (Duration::from_secs(720)..=Duration::from_secs(900)).contains(&before),
                "the advisory window starts 12 to 15 minutes before expiry, not {before:?}"
            );
            starts.push(before);
        }
        starts.sort();
        starts.dedup();
        assert!(
            starts.len() >= 10,
            "20 processes, only {} refresh times",
            starts.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_sts_outage_keeps_valid_sessions_until_they_expire() {
        let h = harness(Duration::ZERO);
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        assert_eq!(
            key(&h.broker.credentials("billing", &state).await),
            "ASIABILLING0001"
        );
        h.sts.outage(Some(AssumeError::new(
            AssumeErrorKind::Transient,
            "HTTP 503 from STS",
        )));
        // Through the advisory and the mandatory window, up to expiry.
        let mut at = 0;
        for step in [2000, 1000, 500, 59, 30, 10] {
            h.clock.advance(Duration::from_secs(step));
            at += step;
            for _ in 0..50 {
                assert_eq!(
                    key(&h.broker.credentials("billing", &state).await),
                    "ASIABILLING0001",
                    "the valid session is served at {at} s of 3600"
                );
            }
            tokio::task::yield_now().await;
        }
        let tries = h.sts.count() - 1;
        assert!(
            (1..=10).contains(&tries),
            "STS is retried with backoff, not by every caller: {tries} tries for 300 calls"
        );
        // Expired: never served. The caller gets STS's error.
        h.clock.advance(Duration::from_secs(1));
        let after = h.broker.credentials("billing", &state).await;
        assert!(
            matches!(&after, Err(BrokerError::Assume { error, .. }) if error.kind() == AssumeErrorKind::Transient),
            "expected the transient STS error after expiry, got {}",
            key(&after)
        );
        for _ in 0..10 {
            let again = h.broker.credentials("billing", &state).await;
            assert!(
                again.is_err(),
                "an expired session is never served, got {}",
                key(&again)
            );
        }
        // STS back: the next call after the backoff assumes again.
        h.sts.outage(None);
        h.clock.advance(MAX_TRANSIENT_BACKOFF);
        assert_eq!(
            key(&h.broker.credentials("billing", &state).await),
            "ASIABILLING0002"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_backs_off_longer_than_a_transient_failure() {
        let h = harness(Duration::ZERO);
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        h.sts
            .fail_next(AssumeErrorKind::Transient, "connection reset");
        assert!(h.broker.credentials("billing", &state).await.is_err());
        let transient = h.broker.next_refresh("billing").expect("a retry time");
        let wait = transient
            .duration_since(h.clock.now())
            .expect("in the future");
        assert!(
            wait >= TRANSIENT_BACKOFF / 2 && wait <= TRANSIENT_BACKOFF,
            "first transient backoff is 0.5-1 s, not {wait:?}"
        );
        // Inside the backoff, callers get the error without a call.
        assert!(h.broker.credentials("billing", &state).await.is_err());
        assert_eq!(h.sts.count(), 1);

        h.clock.advance(TRANSIENT_BACKOFF);
        h.sts.fail_next(AssumeErrorKind::Throttled, "Rate exceeded");
        let throttled = h.broker.credentials("billing", &state).await;
        assert!(
            matches!(&throttled, Err(BrokerError::Assume { error, .. }) if error.kind() == AssumeErrorKind::Throttled)
        );
        assert_eq!(h.sts.count(), 2);
        let wait = h
            .broker
            .next_refresh("billing")
            .expect("a retry time")
            .duration_since(h.clock.now())
            .expect("in the future");
        assert!(
            wait >= THROTTLED_BACKOFF / 2 && wait <= THROTTLED_BACKOFF,
            "first throttling backoff is 5-10 s, not {wait:?}"
        );
        h.clock.advance(Duration::from_secs(4));
        assert!(h.broker.credentials("billing", &state).await.is_err());
        assert_eq!(h.sts.count(), 2, "no call inside the throttling backoff");
        h.clock.advance(Duration::from_secs(6));
        assert_eq!(
            key(&h.broker.credentials("billing", &state).await),
            "ASIABILLING0001"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_credentials_rotation_keeps_consumer_sessions() {
        let h = harness(Duration::ZERO);
        let before = active("instance", "ASIAINSTANCE0001", &h.clock);
        assert_eq!(
            key(&h.broker.credentials("billing", &before).await),
            "ASIABILLING0001"
        );
        h.clock.advance(Duration::from_secs(600));
        let rotated = active("instance", "ASIAINSTANCE0002", &h.clock);
        assert!(
            h.broker.observe(&rotated).is_empty(),
            "a rotation drops nothing"
        );
        assert_eq!(
            key(&h.broker.credentials("billing", &rotated).await),
            "ASIABILLING0001"
        );
        assert_eq!(h.sts.count(), 1, "no new AssumeRole for a rotation");
        // The next refresh is signed with the rotated keys.
        h.clock.advance(Duration::from_secs(3000));
        assert_eq!(
            key(&h.broker.credentials("billing", &rotated).await),
            "ASIABILLING0002"
        );
        assert_eq!(h.sts.calls()[1].instance_key, "ASIAINSTANCE0002");
    }

    #[tokio::test(start_paused = true)]
    async fn a_detach_withdraws_every_consumer_at_once() {
        let h = harness(Duration::ZERO);
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        assert!(h.broker.credentials("billing", &state).await.is_ok());
        assert!(h.broker.credentials("web", &state).await.is_ok());

        let mut withdrawn = h.broker.observe(&ProviderState::NoRole);
        withdrawn.sort();
        assert_eq!(withdrawn, ["billing", "web"]);
        for name in ["billing", "web"] {
            assert_eq!(
                h.broker.credentials(name, &ProviderState::NoRole).await,
                Err(BrokerError::NoInstanceRole)
            );
        }
        // Reattached (even the same role): sessions are assumed anew.
        assert_eq!(
            key(&h.broker.credentials("web", &state).await),
            "ASIAWEB0003"
        );
        assert_eq!(h.sts.count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_detach_during_an_assume_role_discards_its_session() {
        let h = harness(Duration::from_secs(2));
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        let broker = h.broker.clone();
        let pending = tokio::spawn(async move { broker.credentials("billing", &state).await });
        wait_for_calls(&h.sts, 1).await;
        h.broker.observe(&ProviderState::NoRole);
        assert_eq!(
            pending.await.expect("task"),
            Err(BrokerError::NoInstanceRole)
        );
        assert_eq!(h.broker.next_refresh("billing"), None, "nothing cached");
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_instance_role_re_assumes_with_the_new_role() {
        let h = harness(Duration::ZERO);
        let old = active("instance-a", "ASIAINSTANCE0001", &h.clock);
        assert_eq!(
            key(&h.broker.credentials("billing", &old).await),
            "ASIABILLING0001"
        );
        let new = active("instance-b", "ASIAINSTANCE0009", &h.clock);
        assert_eq!(h.broker.observe(&new), ["billing"]);
        assert_eq!(
            key(&h.broker.credentials("billing", &new).await),
            "ASIABILLING0002"
        );
        assert_eq!(
            h.sts.calls()[1],
            Call {
                consumer: "billing".into(),
                instance_role: "instance-b".into(),
                instance_key: "ASIAINSTANCE0009".into(),
            }
        );
        // Without `observe`, the next call notices the replacement itself.
        let third = active("instance-c", "ASIAINSTANCE0010", &h.clock);
        assert_eq!(
            key(&h.broker.credentials("billing", &third).await),
            "ASIABILLING0003"
        );
        assert_eq!(h.sts.calls()[2].instance_role, "instance-c");
    }

    #[tokio::test(start_paused = true)]
    #[tracing_test::traced_test]
    async fn access_denied_is_logged_once_with_a_hint_and_not_retried_hot() {
        let h = harness(Duration::ZERO);
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        h.sts.outage(Some(AssumeError::new(
            AssumeErrorKind::AccessDenied,
            "User: arn:aws:sts::123456789012:assumed-role/instance/i-0abc is not authorized to perform: sts:AssumeRole",
        )));
        for _ in 0..20 {
            let result = h.broker.credentials("billing", &state).await;
            let Err(error) = result else {
                panic!("expected AccessDenied, got {}", key(&result))
            };
            assert!(
                error.to_string().contains(
                    "Hint: the trust policy of arn:aws:iam::123456789012:role/billing must allow the instance role to sts:AssumeRole"
                ),
                "{error}"
            );
            h.clock.advance(Duration::from_secs(10));
        }
        assert_eq!(h.sts.count(), 1, "one call in 200 s, not one per caller");
        // After the refusal memo, STS is asked again, and the log stays quiet.
        h.clock.advance(REFUSAL_RETRY);
        assert!(h.broker.credentials("billing", &state).await.is_err());
        assert_eq!(h.sts.count(), 2);
        logs_assert(|lines| {
            match lines
                .iter()
                .filter(|l| l.contains("Hint: the trust policy"))
                .count()
            {
                1 => Ok(()),
                n => Err(format!(
                    "expected the refusal logged once, it was logged {n} times"
                )),
            }
        });
        // Fixed: a success clears it.
        h.sts.outage(None);
        h.clock.advance(REFUSAL_RETRY);
        assert_eq!(
            key(&h.broker.credentials("billing", &state).await),
            "ASIABILLING0001"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_valid_session_outlives_unavailable_instance_credentials() {
        let h = harness(Duration::ZERO);
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        assert!(h.broker.credentials("billing", &state).await.is_ok());
        let unavailable = ProviderState::Unavailable {
            error: imds_client::Error::new(imds_client::ErrorKind::Timeout),
            stale: None,
        };
        h.clock.advance(Duration::from_secs(3500));
        assert_eq!(
            key(&h.broker.credentials("billing", &unavailable).await),
            "ASIABILLING0001"
        );
        let web = h.broker.credentials("web", &unavailable).await;
        assert!(
            matches!(&web, Err(BrokerError::InstanceUnavailable { consumer, .. }) if consumer == "web"),
            "{}",
            key(&web)
        );
        assert_eq!(h.sts.count(), 1);
        assert_eq!(
            h.broker.credentials("nobody", &state).await,
            Err(BrokerError::UnknownConsumer("nobody".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    #[tracing_test::traced_test]
    async fn no_secret_in_debug_errors_or_logs() {
        let h = harness(Duration::ZERO);
        let state = active("instance", "ASIAINSTANCE0001", &h.clock);
        let current = h
            .broker
            .credentials("billing", &state)
            .await
            .expect("session");
        h.sts
            .fail_next(AssumeErrorKind::Invalid, "MalformedPolicyDocument");
        h.clock.advance(Duration::from_secs(3590));
        let served = h.broker.credentials("billing", &state).await;
        h.clock.advance(Duration::from_secs(20));
        let failed = h.broker.credentials("billing", &state).await;
        let shown = format!(
            "{current:?} {served:?} {failed:?} {:?} {:?}",
            h.broker,
            failed.as_ref().err().map(ToString::to_string)
        );
        assert!(shown.contains("ASIABILLING0001"), "{shown}");
        for secret in [SECRET, TOKEN, "instance-secret", "instance-token"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
            assert!(!logs_contain(secret), "{secret} in the logs");
        }
        assert!(logs_contain("assumed a session for the consumer"));
    }
}
