//! The caching, refreshing credentials provider.
//!
//! [`ImdsCredentialsProvider`] answers from a cache while credentials are
//! fresh: one clock reading and a read of the one cached entry inside a
//! read-side section (no shared memory written but the clone's reference
//! count), no network, no lock, no allocation. Around expiry it refreshes in
//! two windows:
//!
//! - the **advisory** window (by default half the credentials' lifetime, at
//!   most 30 minutes, shortened by a per-process jitter of up to 20 % so a fleet
//!   does not refresh in step): one background refresh is started and callers
//!   keep getting the cached credentials at once;
//! - the **mandatory** window (by default 60 s, at most a tenth of the
//!   lifetime): callers wait for the refresh.
//!
//! Loads are **single flight**: one load runs at a time, and callers that
//! waited on it take what it left in the cache instead of starting their own.
//! **Static stability**: when IMDS fails transiently, the credentials cached
//! at that moment keep being served; past their expiry they are served with a
//! warning and an extended local expiry, and IMDS is asked again only after a
//! jittered 5 to 10 minutes. Non-recoverable failures (no role attached, IMDS
//! disabled, the role's trust policy) withdraw the credentials and are
//! remembered for a few seconds only.
//!
//! The pieces: `cache` holds the one cached state and its schedule
//! (computed once per change), `read_side` lets it be read without writing
//! a shared reference count and replaced without freeing what a reader
//! still holds, `policy` decides from (state, time) as pure
//! functions, and this module runs loads and publishes [`ProviderState`].
//! Expiry is judged on IMDS's clock: every response's `Date` (role checks
//! included) re-measures the skew, and a reading more than
//! 15 minutes off is not believed.

mod cache;
mod policy;
mod read_side;
mod sdk;
mod source;
mod state;

pub use cache::{DEFAULT_MANDATORY_REFRESH_WINDOW, DEFAULT_MAX_ADVISORY_REFRESH_WINDOW};
pub use sdk::PROVIDER_NAME;
#[cfg(not(feature = "test-util"))]
pub(crate) use source::{BoxFuture, CredentialsSource, FetchedCredentials, FetchedRole};
#[cfg(feature = "test-util")]
pub use source::{BoxFuture, CredentialsSource, FetchedCredentials, FetchedRole};
pub use state::{ProviderState, RoleCredentials};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use cache::{Cache, Entry, Shard, Timing, Windows};
use policy::{AfterFailure, CLOCK_SKEW_WARNING, Decision, NON_RECOVERABLE_FAILURE_TTL};

use crate::client::ImdsClient;
use crate::credentials::format_rfc3339;
use crate::error::{Error, ErrorKind};
use crate::time::SharedTimeSource;

/// Builds an [`ImdsCredentialsProvider`].
#[derive(Debug, Default)]
#[must_use]
pub struct ImdsCredentialsProviderBuilder {
    source: Option<Arc<dyn CredentialsSource>>,
    time_source: Option<SharedTimeSource>,
    advisory: Option<Duration>,
    mandatory: Option<Duration>,
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
    /// The IMDS client to fetch credentials with, for settings other than
    /// the defaults (endpoint, timeouts, attempts, a fixed role name).
    /// Default: `ImdsClient::builder().build()`, configured from the
    /// environment and the AWS config file.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), imds_client::Error> {
    /// use std::time::Duration;
    /// use imds_client::{ImdsClient, ImdsCredentialsProvider};
    /// let client = ImdsClient::builder().read_timeout(Duration::from_secs(2)).build()?;
    /// let provider = ImdsCredentialsProvider::builder().imds_client(client).build();
    /// # Ok(()) }
    /// ```
    pub fn imds_client(mut self, client: ImdsClient) -> Self {
        self.source = Some(Arc::new(client));
        self
    }

    /// Where credentials come from, instead of an [`ImdsClient`]: a test
    /// seam for scripted fakes (feature `test-util`).
    #[cfg(feature = "test-util")]
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

    /// Calls `observer` once for every failed attempt to reach IMDS: loads
    /// (including background refreshes, whose errors callers never see),
    /// role checks by [`poll`](ImdsCredentialsProvider::poll), and "no role
    /// attached". Failures answered from a short-lived memo of an earlier one
    /// are not repeated. Meant for metrics; it runs inline, so keep it cheap.
    pub fn on_failure(mut self, observer: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_failure = Some(FailureObserver(Arc::new(observer)));
        self
    }

    /// Builds the provider. Never fails: without
    /// [`imds_client`](Self::imds_client) it builds a default client, and if
    /// the environment or config file holds an invalid setting, every call
    /// returns that error (naming the setting) instead.
    pub fn build(self) -> ImdsCredentialsProvider {
        let source = self
            .source
            .unwrap_or_else(|| match ImdsClient::builder().build() {
                Ok(client) => Arc::new(client),
                Err(error) => Arc::new(Misconfigured(error)),
            });
        let (state_tx, _) = watch::channel(ProviderState::Starting);
        ImdsCredentialsProvider {
            inner: Arc::new(Inner {
                source,
                clock: self.time_source.unwrap_or_default(),
                windows: Windows {
                    advisory: self.advisory,
                    mandatory: self.mandatory,
                    jitter: 0.8 + fastrand::f64() * 0.2,
                },
                shards: cache::shard_count(),
                cache: Cache::default(),
                load_lock: tokio::sync::Mutex::new(()),
                generation: AtomicU64::new(0),
                last_failure: Mutex::new(None),
                refreshing: AtomicBool::new(false),
                state_tx,
                on_failure: self.on_failure,
            }),
        }
    }
}

/// The source of a provider whose default client could not be built: every
/// request fails with the configuration error.
#[derive(Debug)]
struct Misconfigured(Error);

impl CredentialsSource for Misconfigured {
    fn role_name(&self) -> BoxFuture<'_, Result<FetchedRole, Error>> {
        let error = self.0.clone();
        Box::pin(async move { Err(error) })
    }

    fn role_credentials<'a>(
        &'a self,
        _role: &'a str,
    ) -> BoxFuture<'a, Result<FetchedCredentials, Error>> {
        let error = self.0.clone();
        Box::pin(async move { Err(error) })
    }
}

#[derive(Debug)]
struct Inner {
    source: Arc<dyn CredentialsSource>,
    clock: SharedTimeSource,
    windows: Windows,
    /// How many copies of the credentials an entry holds (see `cache`).
    shards: usize,
    /// The one cached state.
    cache: Cache,
    load_lock: tokio::sync::Mutex<()>,
    /// Incremented after each load, so its waiters know one ran.
    generation: AtomicU64,
    /// The last load's failure and when (cleared by a success): what its
    /// waiters get when it withdrew the credentials, and the memo of a
    /// non-recoverable failure. Never credentials.
    last_failure: Mutex<Option<(Error, SystemTime)>>,
    refreshing: AtomicBool,
    state_tx: watch::Sender<ProviderState>,
    on_failure: Option<FailureObserver>,
}

/// Instance-role credentials from IMDS, cached and refreshed before expiry.
///
/// ```no_run
/// # async fn demo() -> Result<(), imds_client::Error> {
/// use imds_client::ImdsCredentialsProvider;
/// let provider = ImdsCredentialsProvider::builder().build();
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

/// What a failed load left: the credentials cached when it failed, kept,
/// or nothing.
enum Failed {
    Kept(Arc<Entry>),
    Withdrawn(Error),
}

impl ImdsCredentialsProvider {
    /// Starts configuring a provider.
    pub fn builder() -> ImdsCredentialsProviderBuilder {
        ImdsCredentialsProviderBuilder::default()
    }

    /// Current credentials: from the cache while fresh, otherwise loaded.
    pub async fn credentials(&self) -> Result<crate::Credentials, Error> {
        if let Some(credentials) = self.cached(|_, shard| shard.credentials.clone()) {
            return Ok(credentials);
        }
        // Boxed: this future stays a few words, so a cached call neither
        // builds nor moves the (large) state of a load.
        Box::pin(self.resolve(Reason::Mandatory))
            .await
            .map(|e| e.shard().credentials.clone())
    }

    /// Current credentials with the role they belong to.
    pub async fn role_credentials(&self) -> Result<RoleCredentials, Error> {
        if let Some(current) = self.cached(|e, _| e.current.clone()) {
            return Ok(current);
        }
        Box::pin(self.resolve(Reason::Mandatory))
            .await
            .map(|e| e.current.clone())
    }

    /// Re-reads the role name and credentials now, whatever the cache holds
    /// (for a SIGHUP or an operator's request). Publishes the new state.
    pub async fn refresh_now(&self) -> Result<RoleCredentials, Error> {
        self.load(Reason::Requested)
            .await
            .map(|e| e.current.clone())
    }

    /// Checks whether the attached role changed (one cheap request) and
    /// refreshes if it did, or if the credentials are due. Meant to be called
    /// on a timer by a long-running process (the agent's poll interval), so
    /// that attach, replace and detach are noticed without waiting for expiry.
    /// The answer's `Date` re-measures the clock skew.
    pub async fn poll(&self) -> Result<RoleCredentials, Error> {
        let Some(cached) = self.inner.cache.get() else {
            return self.load(Reason::Poll).await.map(|e| e.current.clone());
        };
        let entry = match self.inner.source.role_name().await {
            Ok(fetched) if fetched.role == cached.current.role => {
                self.remeasure_skew(&fetched);
                self.set_health(None);
                self.resolve(Reason::Poll).await
            }
            Err(e) if e.is_transient() => {
                self.observe_failure(&e);
                tracing::warn!(error = %e, hint = e.hint(), "role check failed; keeping the current credentials");
                self.set_health(Some(e));
                self.resolve(Reason::Poll).await
            }
            // Another role, no role any more, or a configuration failure:
            // reload, which follows the new role or withdraws the credentials.
            _ => self.load(Reason::Poll).await,
        };
        entry.map(|e| e.current.clone())
    }

    /// Marks the cached credentials as unusable (an AWS service answered
    /// `ExpiredToken` or `InvalidToken`): the next call refreshes.
    pub fn invalidate(&self) {
        let windows = self.inner.windows;
        self.inner.cache.update(|entry| {
            let next = entry.map(|e| {
                let timing = Timing {
                    invalidated: true,
                    ..e.timing
                };
                Arc::new(e.with_timing(timing, &windows))
            });
            (next, ())
        });
    }

    /// A receiver of every state change: role and credentials, no role, or
    /// unavailable with the last error.
    pub fn subscribe(&self) -> watch::Receiver<ProviderState> {
        self.inner.state_tx.subscribe()
    }

    /// The last good credentials, if any (even expired).
    pub fn last_good(&self) -> Option<RoleCredentials> {
        self.inner.cache.get().map(|e| e.current.clone())
    }

    /// The cached path: `read` applied to the entry and this thread's copy
    /// of its credentials when the policy says serve them without asking.
    /// No lock, no shared count written but the clone `read` makes.
    #[inline]
    fn cached<T>(&self, read: impl FnOnce(&Entry, &Shard) -> T) -> Option<T> {
        let now = self.inner.clock.now();
        self.inner.cache.read_fresh(now, read)
    }

    /// The slow path: what the policy says for the entry cached now.
    async fn resolve(&self, reason: Reason) -> Result<Arc<Entry>, Error> {
        let Some(entry) = self.inner.cache.get() else {
            if let Some(error) = self.recent_non_recoverable_failure() {
                return Err(error);
            }
            return self.load(Reason::Cold).await;
        };
        match policy::decide(&entry.schedule, self.inner.clock.now()) {
            Decision::Serve => Ok(entry),
            Decision::RefreshInBackground => {
                self.spawn_background_refresh();
                Ok(entry)
            }
            Decision::LoadNow => {
                let reason = if entry.timing.invalidated {
                    Reason::Requested
                } else {
                    reason
                };
                self.load(reason).await
            }
        }
    }

    /// The credentials for the AWS SDK when the policy says serve them as
    /// they are (see [`sdk`]).
    #[inline]
    pub(crate) fn cached_sdk(&self) -> Option<aws_credential_types::Credentials> {
        self.cached(|_, shard| shard.sdk.clone())
    }

    /// The AWS SDK's credentials, by the slow path.
    pub(crate) async fn resolve_sdk(&self) -> Result<aws_credential_types::Credentials, Error> {
        self.resolve(Reason::Mandatory)
            .await
            .map(|e| e.shard().sdk.clone())
    }

    /// The AWS SDK's form of the last good credentials, if any.
    pub(crate) fn last_good_sdk(&self) -> Option<aws_credential_types::Credentials> {
        self.inner.cache.get().map(|e| e.shard().sdk.clone())
    }

    /// Records whether IMDS is answering, for subscribers: a failing IMDS
    /// while the cached credentials are valid is `Active` with `last_error`.
    fn set_health(&self, error: Option<Error>) {
        let Some(entry) = self.inner.cache.get() else {
            return;
        };
        if entry.real_expiry() <= entry.server_time(self.inner.clock.now()) {
            return;
        }
        self.publish(ProviderState::Active {
            current: entry.current.clone(),
            last_error: error,
        });
    }

    /// A role check's `Date` re-measures the skew of the cached entry.
    fn remeasure_skew(&self, fetched: &FetchedRole) {
        let now = self.inner.clock.now();
        let skew_secs = policy::measure_skew(fetched.server_time, now);
        let windows = self.inner.windows;
        self.inner.cache.update(|entry| {
            let next = entry.map(|e| {
                if e.timing.skew_secs == skew_secs || e.current.role != fetched.role {
                    return e;
                }
                warn_on_skew_change(e.timing.skew_secs, skew_secs);
                let timing = Timing {
                    skew_secs,
                    ..e.timing
                };
                Arc::new(e.with_timing(timing, &windows))
            });
            (next, ())
        });
    }

    fn recent_non_recoverable_failure(&self) -> Option<Error> {
        let now = self.inner.clock.now();
        let last = self
            .inner
            .last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match last.as_ref() {
            Some((e, at)) if !e.is_transient() && now < *at + NON_RECOVERABLE_FAILURE_TTL => {
                Some(e.clone())
            }
            _ => None,
        }
    }

    fn spawn_background_refresh(&self) {
        if self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.load(Reason::Advisory).await;
            this.inner.refreshing.store(false, Ordering::Release);
        });
    }

    /// One load at a time; callers that waited take what the load that ran
    /// while they waited left in the cache. A failure keeps or withdraws
    /// what is cached when it happens, never anything read before.
    async fn load(&self, reason: Reason) -> Result<Arc<Entry>, Error> {
        let inner = &self.inner;
        let generation = inner.generation.load(Ordering::Acquire);
        let _guard = inner.load_lock.lock().await;
        if inner.generation.load(Ordering::Acquire) != generation {
            if let Some(entry) = inner.cache.get() {
                return Ok(entry);
            }
            if let Some((error, _)) = inner
                .last_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return Err(error);
            }
        }
        tracing::debug!(?reason, "loading instance-role credentials");
        let outcome = match self.fetch().await {
            Ok(entry) => Ok(entry),
            Err(error) => match self.record_failure(error) {
                Failed::Kept(entry) => Ok(entry),
                Failed::Withdrawn(error) => Err(error),
            },
        };
        inner.generation.fetch_add(1, Ordering::AcqRel);
        outcome
    }

    /// Fetches the role and its credentials and caches them.
    async fn fetch(&self) -> Result<Arc<Entry>, Error> {
        let inner = &self.inner;
        let role = inner.source.role_name().await?.role;
        let fetched = inner.source.role_credentials(&role).await?;
        let now = inner.clock.now();
        let skew_secs = policy::measure_skew(fetched.server_time, now);
        let credentials = fetched.credentials;
        let (entry, changed) = inner.cache.update(|previous| {
            let unchanged = previous.as_ref().is_some_and(|p| {
                p.current.role == role
                    && p.current.credentials.access_key_id() == credentials.access_key_id()
            });
            warn_on_skew_change(
                previous.as_ref().map_or(0, |p| p.timing.skew_secs),
                skew_secs,
            );
            let timing = policy::after_fetch(
                &credentials,
                skew_secs,
                unchanged,
                now,
                policy::static_stability_wait(),
            );
            let entry = Arc::new(Entry::new(
                RoleCredentials {
                    role,
                    credentials: Arc::new(credentials),
                },
                timing,
                &inner.windows,
                inner.shards,
            ));
            (Some(entry.clone()), (entry, !unchanged))
        });
        *inner.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let current = &entry.current;
        if entry.real_expiry() <= entry.server_time(now) {
            tracing::warn!(
                role = %current.role,
                expiration = %format_rfc3339(entry.real_expiry()),
                "IMDS returned expired credentials; using them for a few more minutes. \
                 Hint: IMDS should rotate them; if this persists, check the instance's IAM role"
            );
        } else if changed {
            tracing::info!(
                role = %current.role,
                access_key_id = %current.credentials.access_key_id(),
                expiration = %format_rfc3339(entry.real_expiry()),
                "fetched instance-role credentials"
            );
        }
        self.publish(ProviderState::Active {
            current: current.clone(),
            last_error: None,
        });
        Ok(entry)
    }

    /// Applies a failed load to what is cached now (kept or withdrawn, by
    /// [`policy::after_failure`]) and publishes the state.
    fn record_failure(&self, error: Error) -> Failed {
        self.observe_failure(&error);
        let inner = &self.inner;
        let hint = error.hint();
        let now = inner.clock.now();
        *inner.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some((error.clone(), now));
        let wait = policy::static_stability_wait();
        let (kept, withdrawn) = inner.cache.update(|entry| {
            let cached = entry.as_ref().map(|e| (e.timing, e.real_expiry()));
            match policy::after_failure(cached, error.is_transient(), now, &inner.windows, wait) {
                AfterFailure::Keep(timing) => {
                    let entry = entry.expect("only a cached entry is kept");
                    let kept = Arc::new(entry.with_timing(timing, &inner.windows));
                    (Some(kept.clone()), (Some(kept), None))
                }
                AfterFailure::Withdraw => (None, (None, entry)),
            }
        });
        if let Some(kept) = kept {
            let server_now = kept.server_time(now);
            let state = if kept.real_expiry() <= server_now {
                tracing::warn!(
                    error = %error,
                    hint,
                    retry_in_seconds = kept.timing.hold_until.and_then(|h| h.duration_since(now).ok()).unwrap_or_default().as_secs(),
                    "IMDS refresh failed; serving the last good credentials past their expiry"
                );
                ProviderState::Unavailable {
                    error,
                    stale: Some(kept.current.clone()),
                }
            } else {
                tracing::warn!(error = %error, hint, "IMDS refresh failed; the cached credentials are still valid");
                ProviderState::Active {
                    current: kept.current.clone(),
                    last_error: Some(error),
                }
            };
            self.publish(state);
            return Failed::Kept(kept);
        }
        let state = match error.kind() {
            ErrorKind::NoRoleAttached => {
                if let Some(previous) = &withdrawn {
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
                    stale: None,
                }
            }
        };
        self.publish(state);
        Failed::Withdrawn(error)
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

/// Logs a skew that newly crosses [`CLOCK_SKEW_WARNING`] (not every reading:
/// a steady skew is reported once).
fn warn_on_skew_change(old: i64, new: i64) {
    let warn = CLOCK_SKEW_WARNING.as_secs();
    if new.unsigned_abs() > warn && old.abs_diff(new) > warn {
        tracing::warn!(
            skew_seconds = new,
            "the local clock differs from IMDS's; scheduling refreshes on IMDS time"
        );
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
