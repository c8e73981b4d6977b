//! The caching, refreshing credentials provider.
//!
//! [`ImdsCredentialsProvider`] answers from a cache while credentials are
//! fresh: a lock-free read of an `Arc` snapshot (`arc-swap`) and one clock
//! reading, no network, no lock held across I/O. Around expiry it refreshes in two
//! windows:
//!
//! - the **advisory** window (by default half the credentials' lifetime, at
//!   most 30 minutes, shortened by a per-process jitter of up to 20 % so a fleet
//!   does not refresh in step): one background refresh is started and callers
//!   keep getting the cached credentials at once;
//! - the **mandatory** window (by default 60 s, at most a tenth of the
//!   lifetime): callers wait for the refresh.
//!
//! Loads are **single flight**: one load runs at a time, and callers that
//! waited on it take its result, success or failure, instead of starting
//! their own. **Static stability**: when IMDS fails transiently, the last good
//! credentials keep being served; past their expiry they are served with a
//! warning and an extended local expiry, and IMDS is asked again only after a
//! jittered 5 to 10 minutes. Non-recoverable failures (no role attached, IMDS
//! disabled, the role's trust policy) withdraw the credentials and are cached
//! for a few seconds only.

mod sdk;
mod source;
mod state;

pub use sdk::PROVIDER_NAME;
pub use source::{BoxFuture, CredentialsSource, FetchedCredentials};
pub use state::{ProviderState, RoleCredentials};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::credentials::format_rfc3339;
use crate::error::{Error, ErrorKind};
use crate::time::SharedTimeSource;

/// Default mandatory refresh window: callers wait for a refresh inside it.
pub const DEFAULT_MANDATORY_REFRESH_WINDOW: Duration = Duration::from_secs(60);
/// Upper bound of the default advisory refresh window.
pub const DEFAULT_MAX_ADVISORY_REFRESH_WINDOW: Duration = Duration::from_secs(30 * 60);
/// How long a non-recoverable failure is remembered before IMDS is asked again.
pub const NON_RECOVERABLE_FAILURE_TTL: Duration = Duration::from_secs(5);
/// How soon to ask again when IMDS hands back the credentials we already have.
pub const UNCHANGED_RETRY_INTERVAL: Duration = Duration::from_secs(15);
/// How soon a failed advisory refresh is tried again.
pub const ADVISORY_RETRY_INTERVAL: Duration = Duration::from_secs(120);
/// Clock skew beyond which a warning is logged.
pub const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(60);
const STATIC_STABILITY_MIN_WAIT: Duration = Duration::from_secs(5 * 60);
const STATIC_STABILITY_MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// Builds an [`ImdsCredentialsProvider`].
#[derive(Debug, Default)]
#[must_use]
pub struct ImdsCredentialsProviderBuilder {
    source: Option<Arc<dyn CredentialsSource>>,
    time_source: Option<SharedTimeSource>,
    advisory: Option<Duration>,
    mandatory: Option<Duration>,
    static_stability: Option<bool>,
    on_failure: Option<FailureObserver>,
}

/// A callback told of every failed request to IMDS (see
/// [`ImdsCredentialsProviderBuilder::on_failure`]).
#[derive(Clone)]
struct FailureObserver(Arc<dyn Fn(&Error) + Send + Sync>);

impl std::fmt::Debug for FailureObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailureObserver")
    }
}

impl ImdsCredentialsProviderBuilder {
    /// Where credentials come from: normally an [`ImdsClient`](crate::ImdsClient).
    /// Required.
    pub fn source(mut self, source: impl CredentialsSource) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The wall clock expiry is judged by. Default: the system clock.
    pub fn time_source(mut self, time_source: SharedTimeSource) -> Self {
        self.time_source = Some(time_source);
        self
    }

    /// Fixed advisory window. Default: half the lifetime, at most 30 minutes,
    /// less a per-process jitter of up to 20 %.
    pub fn advisory_refresh_window(mut self, window: Duration) -> Self {
        self.advisory = Some(window);
        self
    }

    /// Mandatory window. Default: [`DEFAULT_MANDATORY_REFRESH_WINDOW`], at most a
    /// tenth of the lifetime.
    pub fn mandatory_refresh_window(mut self, window: Duration) -> Self {
        self.mandatory = Some(window);
        self
    }

    /// Keep serving the last good credentials while IMDS fails transiently.
    /// Default: true.
    pub fn static_stability(mut self, enabled: bool) -> Self {
        self.static_stability = Some(enabled);
        self
    }

    /// Calls `observer` once for every failed attempt to reach IMDS: loads
    /// (including background refreshes, whose errors callers never see),
    /// role checks by [`poll`](ImdsCredentialsProvider::poll), and "no role
    /// attached". Failures answered from a short-lived memo of an earlier one
    /// are not repeated. Meant for metrics; it runs inline, so keep it cheap.
    pub fn on_failure(mut self, observer: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_failure = Some(FailureObserver(Arc::new(observer)));
        self
    }

    /// Builds the provider.
    ///
    /// # Panics
    /// When no source was given: that is a programming error, not a runtime one.
    pub fn build(self) -> ImdsCredentialsProvider {
        let source = self
            .source
            .expect("ImdsCredentialsProviderBuilder::source is required");
        let (state_tx, _) = watch::channel(ProviderState::Starting);
        ImdsCredentialsProvider {
            inner: Arc::new(Inner {
                source,
                clock: self.time_source.unwrap_or_default(),
                advisory: self.advisory,
                mandatory: self.mandatory,
                jitter: 0.8 + fastrand::f64() * 0.2,
                static_stability: self.static_stability.unwrap_or(true),
                cache: RwLock::new(None),
                fresh: ArcSwapOption::empty(),
                fresh_id: AtomicU64::new(0),
                load_lock: tokio::sync::Mutex::new(()),
                generation: AtomicU64::new(0),
                last_outcome: Mutex::new(None),
                refreshing: AtomicBool::new(false),
                invalidated: AtomicBool::new(false),
                state_tx,
                on_failure: self.on_failure,
            }),
        }
    }
}

#[derive(Debug, Clone)]
struct Cached {
    current: RoleCredentials,
    /// Local expiry: the real one, or an extension when IMDS keeps failing
    /// or handed back expired credentials.
    expires: SystemTime,
    lifetime: Duration,
    /// Server time minus local time, in seconds.
    skew_secs: i64,
    /// No refresh before this (static-stability backoff, unchanged credentials).
    not_before: Option<SystemTime>,
    last_error: Option<Error>,
}

/// What the cached path reads without a lock: the credentials and the local
/// time until which the cache answers with them unchecked (before the advisory
/// window, or inside a backoff before expiry).
#[derive(Debug)]
struct Fresh {
    /// Unique among every `Fresh` of every provider in the process (never
    /// reused, unlike an address), so a per-thread copy can be matched to it.
    id: u64,
    current: RoleCredentials,
    until: SystemTime,
}

static NEXT_FRESH_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's own copy of the credentials of one `Fresh` (by id).
    /// Handing out clones of a per-thread copy means concurrent callers never
    /// write to a shared reference count, which on two cores costs more than
    /// the rest of the cached call. The copy is replaced (and its secrets
    /// zeroized) when this thread next asks after a rotation, or at thread exit.
    static THREAD_COPY: std::cell::RefCell<Option<ThreadCopy>> =
        const { std::cell::RefCell::new(None) };
}

/// One thread's copy of the credentials of the `Fresh` with this id.
struct ThreadCopy {
    id: u64,
    until: SystemTime,
    credentials: crate::Credentials,
}

#[derive(Debug)]
struct Inner {
    source: Arc<dyn CredentialsSource>,
    clock: SharedTimeSource,
    advisory: Option<Duration>,
    mandatory: Option<Duration>,
    jitter: f64,
    static_stability: bool,
    cache: RwLock<Option<Cached>>,
    /// Derived from `cache`, republished under its write lock on every change.
    fresh: ArcSwapOption<Fresh>,
    /// The id of the `Fresh` in `fresh` (0: none), stored after it.
    fresh_id: AtomicU64,
    load_lock: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    last_outcome: Mutex<Option<(Result<RoleCredentials, Error>, SystemTime)>>,
    refreshing: AtomicBool,
    invalidated: AtomicBool,
    state_tx: watch::Sender<ProviderState>,
    on_failure: Option<FailureObserver>,
}

/// Instance-role credentials from IMDS, cached and refreshed before expiry.
///
/// ```no_run
/// # async fn demo() -> Result<(), imds_client::Error> {
/// use imds_client::{ImdsClient, ImdsCredentialsProvider};
/// let provider = ImdsCredentialsProvider::builder()
///     .source(ImdsClient::builder().build()?)
///     .build();
/// let credentials = provider.credentials().await?;
/// println!("{}", credentials.access_key_id());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ImdsCredentialsProvider {
    inner: Arc<Inner>,
}

/// Why a load was started, for logs.
#[derive(Debug, Clone, Copy)]
enum Reason {
    Cold,
    Advisory,
    Mandatory,
    Requested,
    Poll,
}

impl ImdsCredentialsProvider {
    /// Starts configuring a provider.
    pub fn builder() -> ImdsCredentialsProviderBuilder {
        ImdsCredentialsProviderBuilder::default()
    }

    /// Current credentials: from the cache while fresh, otherwise loaded.
    pub async fn credentials(&self) -> Result<crate::Credentials, Error> {
        if let Some(credentials) = self.fresh_thread_copy() {
            return Ok(credentials);
        }
        // Boxed: this future stays a few words, so a cached call neither
        // builds nor moves the (large) state of a load.
        Box::pin(self.role_credentials())
            .await
            .map(|rc| (*rc.credentials).clone())
    }

    /// Current credentials with the role they belong to.
    pub async fn role_credentials(&self) -> Result<RoleCredentials, Error> {
        if let Some(current) = self.fresh_at(self.inner.clock.now(), |f| f.current.clone()) {
            return Ok(current);
        }
        let inner = &self.inner;
        let Some(cached) = self.snapshot() else {
            if let Some(Err(e)) = self.recent_failure() {
                return Err(e);
            }
            return self.load(Reason::Cold).await;
        };
        let now = self.server_now(&cached);
        let remaining = cached.expires.duration_since(now).unwrap_or_default();
        let blocked = cached.not_before.is_some_and(|t| now < t);
        if inner.invalidated.swap(false, Ordering::AcqRel) {
            return self.load_or_keep(cached, Reason::Requested).await;
        }
        if remaining > self.advisory_window(&cached) || blocked && remaining > Duration::ZERO {
            return Ok(cached.current);
        }
        if remaining > self.mandatory_window(&cached) {
            self.spawn_background_refresh();
            return Ok(cached.current);
        }
        if blocked {
            // Expired, IMDS failing, backing off: static stability.
            return Ok(cached.current);
        }
        self.load_or_keep(cached, Reason::Mandatory).await
    }

    /// Re-reads the role name and credentials now, whatever the cache holds
    /// (for a SIGHUP or an operator's request). Publishes the new state.
    pub async fn refresh_now(&self) -> Result<RoleCredentials, Error> {
        match self.snapshot() {
            Some(cached) => self.load_or_keep(cached, Reason::Requested).await,
            None => self.load(Reason::Requested).await,
        }
    }

    /// Checks whether the attached role changed (one cheap request) and
    /// refreshes if it did, or if the credentials are due. Meant to be called
    /// on a timer by a long-running process (the agent's poll interval), so
    /// that attach, replace and detach are noticed without waiting for expiry.
    pub async fn poll(&self) -> Result<RoleCredentials, Error> {
        let Some(cached) = self.snapshot() else {
            return self.load(Reason::Poll).await;
        };
        match self.inner.source.role_name().await {
            Ok(role) if role == cached.current.role => {
                self.set_health(None);
                self.role_credentials().await
            }
            Ok(_) => self.load_or_keep(cached, Reason::Poll).await,
            Err(e) if e.is_transient() => {
                self.observe_failure(&e);
                tracing::warn!(error = %e, hint = e.hint(), "role check failed; keeping the current credentials");
                self.set_health(Some(e));
                self.role_credentials().await
            }
            // No role any more, or a configuration failure: reload, which
            // withdraws the credentials and publishes the state.
            Err(_) => self.load(Reason::Poll).await,
        }
    }

    /// Records whether IMDS is answering, for subscribers: a failing IMDS
    /// while the cached credentials are valid is `Active` with `last_error`.
    fn set_health(&self, error: Option<Error>) {
        let state = {
            let mut cache = self.inner.cache.write().unwrap_or_else(|e| e.into_inner());
            let Some(cached) = cache.as_mut() else { return };
            let now = shift(self.inner.clock.now(), cached.skew_secs);
            if cached.current.credentials.expiration() <= now {
                return;
            }
            // Only `last_error` changes: the lock-free view stays as it is.
            cached.last_error = error.clone();
            ProviderState::Active {
                current: cached.current.clone(),
                last_error: error,
            }
        };
        self.publish(state);
    }

    /// Marks the cached credentials as unusable (an AWS service answered
    /// `ExpiredToken` or `InvalidToken`): the next call refreshes.
    pub fn invalidate(&self) {
        self.inner.invalidated.store(true, Ordering::Release);
    }

    /// A receiver of every state change: role and credentials, no role, or
    /// unavailable with the last error.
    pub fn subscribe(&self) -> watch::Receiver<ProviderState> {
        self.inner.state_tx.subscribe()
    }

    /// The last good credentials, if any (even expired).
    pub fn last_good(&self) -> Option<RoleCredentials> {
        self.snapshot().map(|c| c.current)
    }

    /// The cached path: `read` applied to the published view when the cache
    /// would hand out its credentials unchecked at `now`, without taking a
    /// lock. Equivalent to the first return of
    /// [`role_credentials`](Self::role_credentials).
    fn fresh_at<T>(&self, now: SystemTime, read: impl FnOnce(&Fresh) -> T) -> Option<T> {
        if self.inner.invalidated.load(Ordering::Acquire) {
            return None;
        }
        let fresh = self.inner.fresh.load();
        let fresh = fresh.as_ref()?;
        (now < fresh.until).then(|| read(fresh))
    }

    /// The fresh credentials as this thread's own copy (see `THREAD_COPY`):
    /// two atomic loads, a clock reading and a thread-local reference count.
    fn fresh_thread_copy(&self) -> Option<crate::Credentials> {
        let inner = &self.inner;
        if inner.invalidated.load(Ordering::Acquire) {
            return None;
        }
        let id = inner.fresh_id.load(Ordering::Acquire);
        if id == 0 {
            return None;
        }
        let now = inner.clock.now();
        let hit = THREAD_COPY.try_with(|slot| match &*slot.borrow() {
            Some(copy) if copy.id == id && now < copy.until => Some(copy.credentials.clone()),
            _ => None,
        });
        if let Ok(Some(credentials)) = hit {
            return Some(credentials);
        }
        // A new `Fresh` since this thread last asked (or none yet): copy it.
        self.fresh_at(now, |fresh| {
            let credentials = fresh.current.credentials.deep_copy();
            let stored = THREAD_COPY.try_with(|slot| {
                *slot.borrow_mut() = Some(ThreadCopy {
                    id: fresh.id,
                    until: fresh.until,
                    credentials: credentials.clone(),
                });
            });
            // While this thread is exiting its locals are gone: share instead.
            match stored {
                Ok(()) => credentials,
                Err(_) => (*fresh.current.credentials).clone(),
            }
        })
    }

    /// Republishes the lock-free view of `cache`; called with its write lock held.
    fn republish_fresh(&self, cache: &Option<Cached>) {
        let fresh = cache.as_ref().and_then(|c| {
            // `role_credentials` answers unchecked while, on IMDS time,
            // now < expires - advisory, or now < min(not_before, expires).
            let advisory = c.expires.checked_sub(self.advisory_window(c));
            let blocked = c.not_before.map(|t| t.min(c.expires));
            let until = match (advisory, blocked) {
                (Some(a), Some(b)) => a.max(b),
                (a, b) => a.or(b)?,
            };
            Some(Arc::new(Fresh {
                id: NEXT_FRESH_ID.fetch_add(1, Ordering::Relaxed),
                current: c.current.clone(),
                until: shift(until, -c.skew_secs),
            }))
        });
        let id = fresh.as_ref().map_or(0, |f| f.id);
        self.inner.fresh.store(fresh);
        self.inner.fresh_id.store(id, Ordering::Release);
    }

    fn snapshot(&self) -> Option<Cached> {
        self.inner
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn recent_failure(&self) -> Option<Result<RoleCredentials, Error>> {
        let now = self.inner.clock.now();
        let outcome = self
            .inner
            .last_outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match outcome.as_ref() {
            Some((Err(e), at)) if !e.is_transient() && now < *at + NON_RECOVERABLE_FAILURE_TTL => {
                Some(Err(e.clone()))
            }
            _ => None,
        }
    }

    fn server_now(&self, cached: &Cached) -> SystemTime {
        shift(self.inner.clock.now(), cached.skew_secs)
    }

    fn advisory_window(&self, cached: &Cached) -> Duration {
        self.inner.advisory.unwrap_or_else(|| {
            (cached.lifetime / 2)
                .min(DEFAULT_MAX_ADVISORY_REFRESH_WINDOW)
                .mul_f64(self.inner.jitter)
        })
    }

    fn mandatory_window(&self, cached: &Cached) -> Duration {
        self.inner
            .mandatory
            .unwrap_or_else(|| DEFAULT_MANDATORY_REFRESH_WINDOW.min(cached.lifetime / 10))
    }

    fn spawn_background_refresh(&self) {
        if self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Some(cached) = this.snapshot() {
                let _ = this.load_or_keep(cached, Reason::Advisory).await;
            }
            this.inner.refreshing.store(false, Ordering::Release);
        });
    }

    /// Loads; on a transient failure with static stability on, keeps serving
    /// `cached` (extended past expiry, with a backoff before the next try).
    async fn load_or_keep(&self, cached: Cached, reason: Reason) -> Result<RoleCredentials, Error> {
        match self.load(reason).await {
            Ok(current) => Ok(current),
            Err(e)
                if e.is_transient()
                    && (self.inner.static_stability
                        || self.snapshot().is_some_and(|c| {
                            c.current.credentials.expiration() > self.server_now(&c)
                        })) =>
            {
                // The cache may have been updated by the failed load's bookkeeping.
                Ok(self.snapshot().map(|c| c.current).unwrap_or(cached.current))
            }
            Err(e) => Err(e),
        }
    }

    /// One load at a time; callers that waited take the result of the load
    /// that ran while they waited.
    async fn load(&self, reason: Reason) -> Result<RoleCredentials, Error> {
        let inner = &self.inner;
        let generation = inner.generation.load(Ordering::Acquire);
        let _guard = inner.load_lock.lock().await;
        if inner.generation.load(Ordering::Acquire) != generation
            && let Some((outcome, _)) = inner
                .last_outcome
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        {
            return outcome;
        }
        tracing::debug!(?reason, "loading instance-role credentials");
        let outcome = self.load_uncached().await;
        *inner.last_outcome.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((outcome.clone(), inner.clock.now()));
        inner.generation.fetch_add(1, Ordering::AcqRel);
        outcome
    }

    async fn load_uncached(&self) -> Result<RoleCredentials, Error> {
        let inner = &self.inner;
        let fetched = async {
            let role = inner.source.role_name().await?;
            let fetched = inner.source.role_credentials(&role).await?;
            Ok::<_, Error>((role, fetched))
        }
        .await;
        let (role, fetched) = match fetched {
            Ok(ok) => ok,
            Err(error) => return Err(self.record_failure(error)),
        };
        let local_now = inner.clock.now();
        let skew_secs = fetched
            .server_time
            .map(|server| signed_secs(server, local_now))
            .unwrap_or(0);
        if skew_secs.unsigned_abs() > CLOCK_SKEW_WARNING.as_secs() {
            tracing::warn!(
                skew_seconds = skew_secs,
                "the local clock differs from IMDS's; scheduling refreshes on IMDS time"
            );
        }
        let server_now = shift(local_now, skew_secs);
        let credentials = fetched.credentials;
        let real_expiry = credentials.expiration();
        let lifetime = real_expiry
            .duration_since(credentials.last_updated().unwrap_or(server_now))
            .unwrap_or_default()
            .max(Duration::from_secs(1));
        let previous = self.snapshot();
        let unchanged = previous.as_ref().is_some_and(|p| {
            p.current.role == role
                && p.current.credentials.access_key_id() == credentials.access_key_id()
        });
        let (expires, not_before) = if real_expiry <= server_now {
            let wait = static_stability_wait();
            tracing::warn!(
                role = %role,
                expiration = %format_rfc3339(real_expiry),
                "IMDS returned expired credentials; using them for a few more minutes. \
                 Hint: IMDS should rotate them; if this persists, check the instance's IAM role"
            );
            (server_now + wait, Some(server_now + wait))
        } else if unchanged {
            (real_expiry, Some(server_now + UNCHANGED_RETRY_INTERVAL))
        } else {
            (real_expiry, None)
        };
        if !unchanged {
            tracing::info!(
                role = %role,
                access_key_id = %credentials.access_key_id(),
                expiration = %format_rfc3339(real_expiry),
                "fetched instance-role credentials"
            );
        }
        let current = RoleCredentials {
            role,
            credentials: Arc::new(credentials),
        };
        let cached = Cached {
            current: current.clone(),
            expires,
            lifetime,
            skew_secs,
            not_before,
            last_error: None,
        };
        {
            let mut cache = inner.cache.write().unwrap_or_else(|e| e.into_inner());
            *cache = Some(cached);
            self.republish_fresh(&cache);
        }
        self.publish(ProviderState::Active {
            current: current.clone(),
            last_error: None,
        });
        Ok(current)
    }

    /// Updates the cache and state after a failed load; returns the error.
    fn record_failure(&self, error: Error) -> Error {
        self.observe_failure(&error);
        let inner = &self.inner;
        let hint = error.hint();
        let mut cache = inner.cache.write().unwrap_or_else(|e| e.into_inner());
        // Transient failures never throw away credentials that are still
        // valid; static stability additionally keeps serving them past expiry.
        let keep = error.is_transient()
            && cache.as_ref().is_some_and(|c| {
                inner.static_stability
                    || c.current.credentials.expiration() > shift(inner.clock.now(), c.skew_secs)
            });
        if keep {
            let cached = cache.as_mut().expect("checked above");
            let server_now = shift(inner.clock.now(), cached.skew_secs);
            if !inner.static_stability {
                // Serve them until their real expiry, asking IMDS on each call
                // in the mandatory window (single flight keeps that to one load).
                cached.not_before = None;
                tracing::warn!(error = %error, hint, "IMDS refresh failed; the cached credentials are still valid");
            } else if cached.expires <= server_now + self.mandatory_window(cached) {
                let wait = static_stability_wait();
                let still_valid = cached.current.credentials.expiration() > server_now;
                if !still_valid {
                    // Past the real expiry: extend locally, back off.
                    cached.expires = server_now + wait;
                }
                cached.not_before = Some(
                    server_now
                        + wait.min(cached.expires.duration_since(server_now).unwrap_or(wait)),
                );
                tracing::warn!(
                    error = %error,
                    hint,
                    retry_in_seconds = wait.as_secs(),
                    "IMDS refresh failed; serving the last good credentials"
                );
            } else {
                // Still before the mandatory window: try again a little later,
                // but no later than the start of that window.
                let until_mandatory = cached
                    .expires
                    .duration_since(server_now + self.mandatory_window(cached))
                    .unwrap_or_default();
                cached.not_before = Some(server_now + ADVISORY_RETRY_INTERVAL.min(until_mandatory));
                tracing::warn!(error = %error, hint, "IMDS refresh failed; the cached credentials are still valid");
            }
            cached.last_error = Some(error.clone());
            let expired = cached.current.credentials.expiration() <= server_now;
            let state = if expired {
                ProviderState::Unavailable {
                    error: error.clone(),
                    stale: Some(cached.current.clone()),
                }
            } else {
                ProviderState::Active {
                    current: cached.current.clone(),
                    last_error: Some(error.clone()),
                }
            };
            self.republish_fresh(&cache);
            drop(cache);
            self.publish(state);
            return error;
        }
        let previous = cache.take();
        self.republish_fresh(&cache);
        drop(cache);
        let state = match error.kind() {
            ErrorKind::NoRoleAttached => {
                if let Some(previous) = &previous {
                    tracing::warn!(role = %previous.current.role, hint, "the IAM role was detached; credentials withdrawn");
                } else {
                    tracing::info!(hint, "no IAM role is attached");
                }
                ProviderState::NoRole
            }
            _ => {
                tracing::warn!(error = %error, hint, "could not load instance-role credentials");
                ProviderState::Unavailable {
                    error: error.clone(),
                    stale: if error.is_transient() {
                        previous.map(|p| p.current)
                    } else {
                        None
                    },
                }
            }
        };
        self.publish(state);
        error
    }

    fn observe_failure(&self, error: &Error) {
        if let Some(FailureObserver(observer)) = &self.inner.on_failure {
            observer(error);
        }
    }

    fn publish(&self, state: ProviderState) {
        self.inner.state_tx.send_if_modified(|old| {
            let changed = !same_state(old, &state);
            *old = state;
            changed
        });
    }
}

fn same_state(a: &ProviderState, b: &ProviderState) -> bool {
    match (a, b) {
        (ProviderState::Starting, ProviderState::Starting) => true,
        (ProviderState::NoRole, ProviderState::NoRole) => true,
        (
            ProviderState::Active {
                current: x,
                last_error: ex,
            },
            ProviderState::Active {
                current: y,
                last_error: ey,
            },
        ) => x == y && ex.as_ref().map(Error::kind) == ey.as_ref().map(Error::kind),
        (
            ProviderState::Unavailable {
                error: ex,
                stale: x,
            },
            ProviderState::Unavailable {
                error: ey,
                stale: y,
            },
        ) => ex.kind() == ey.kind() && x == y,
        _ => false,
    }
}

fn static_stability_wait() -> Duration {
    let span = STATIC_STABILITY_MAX_WAIT - STATIC_STABILITY_MIN_WAIT;
    STATIC_STABILITY_MIN_WAIT + span.mul_f64(fastrand::f64())
}

fn signed_secs(a: SystemTime, b: SystemTime) -> i64 {
    match a.duration_since(b) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn shift(t: SystemTime, secs: i64) -> SystemTime {
    if secs >= 0 {
        t + Duration::from_secs(secs.unsigned_abs())
    } else {
        t - Duration::from_secs(secs.unsigned_abs())
    }
}
