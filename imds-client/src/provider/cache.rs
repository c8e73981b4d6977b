//! The one cached state: an [`Entry`] holds the credentials in both forms
//! handed out (ours and the AWS SDK's, each built once per fetch) and the
//! [`Schedule`] that says, on the local clock, until when they are served
//! without asking and when a caller must wait for a load. The schedule is
//! computed once, when the entry is made, from its [`Timing`]; nothing
//! recomputes windows per call.
//!
//! An entry is immutable. Every change (a fetch, a failure kept or
//! withdrawn, a new skew reading, an invalidation) makes a new one and swaps
//! it in under [`Cache`]'s write lock, so the cached path is one lock-free
//! load and one comparison.
//!
//! A cached call hands out a clone: one reference count incremented. Threads
//! incrementing the same count at once slow each other down several times
//! over (the cache line moves between cores on every call), so an entry
//! holds a few [`Shard`]s, separate copies of the same credentials made once
//! per fetch, and each thread clones the shard its index picks. The copies
//! belong to the entry, not to threads: they go (and their secrets are
//! zeroized) when the entry is replaced or withdrawn and the last clone
//! handed out is dropped.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwapOption, Guard};

use super::state::RoleCredentials;
use crate::credentials::Credentials;

/// The most shards an entry holds.
const MAX_SHARDS: usize = 16;

/// Default mandatory refresh window: callers wait for a refresh inside it.
pub const DEFAULT_MANDATORY_REFRESH_WINDOW: Duration = Duration::from_secs(60);
/// Upper bound of the default advisory refresh window.
pub const DEFAULT_MAX_ADVISORY_REFRESH_WINDOW: Duration = Duration::from_secs(30 * 60);

/// The refresh windows a provider was configured with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Windows {
    /// Fixed advisory window, or `None` for the default.
    pub(crate) advisory: Option<Duration>,
    /// Fixed mandatory window, or `None` for the default.
    pub(crate) mandatory: Option<Duration>,
    /// This process's factor (0.8 to 1.0) on the default advisory window.
    pub(crate) jitter: f64,
}

impl Windows {
    /// The advisory window for credentials of this lifetime: by default half
    /// of it, at most 30 minutes, times the jitter.
    pub(crate) fn advisory(&self, lifetime: Duration) -> Duration {
        self.advisory.unwrap_or_else(|| {
            (lifetime / 2)
                .min(DEFAULT_MAX_ADVISORY_REFRESH_WINDOW)
                .mul_f64(self.jitter)
        })
    }

    /// The mandatory window: by default 60 s, at most a tenth of the lifetime.
    pub(crate) fn mandatory(&self, lifetime: Duration) -> Duration {
        self.mandatory
            .unwrap_or_else(|| DEFAULT_MANDATORY_REFRESH_WINDOW.min(lifetime / 10))
    }
}

/// When to serve, refresh in the background, or load, on the local clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    /// Before this, the credentials are served without asking IMDS.
    pub(crate) serve_until: SystemTime,
    /// Before this (and from `serve_until`), they are served and one
    /// background refresh is started; from this on, callers wait for a load.
    pub(crate) load_at: SystemTime,
}

/// What an entry's schedule is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    /// Expiry on IMDS's clock: the credentials' own, or a local extension
    /// while IMDS fails or hands out expired credentials.
    pub(crate) expires: SystemTime,
    /// The credentials' lifetime (expiry less issue time), for the windows.
    pub(crate) lifetime: Duration,
    /// IMDS's clock less the local clock, in seconds, from the latest
    /// response (0 without a usable reading).
    pub(crate) skew_secs: i64,
    /// Local time before which IMDS is not asked again (a backoff).
    pub(crate) hold_until: Option<SystemTime>,
    /// Set by `invalidate`: the next call loads.
    pub(crate) invalidated: bool,
}

impl Timing {
    /// The schedule, on the local clock.
    pub(crate) fn schedule(&self, windows: &Windows) -> Schedule {
        if self.invalidated {
            return Schedule {
                serve_until: SystemTime::UNIX_EPOCH,
                load_at: SystemTime::UNIX_EPOCH,
            };
        }
        let expires = shift(self.expires, -self.skew_secs);
        let before = |window: Duration| {
            expires
                .checked_sub(window)
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        let advisory_start = before(windows.advisory(self.lifetime));
        let mandatory_start = before(windows.mandatory(self.lifetime));
        // A hold never reaches past the expiry: then a caller must wait.
        let hold = self
            .hold_until
            .map_or(SystemTime::UNIX_EPOCH, |h| h.min(expires));
        Schedule {
            serve_until: advisory_start.max(hold),
            load_at: mandatory_start.max(hold),
        }
    }
}

/// One copy of the credentials in both forms handed out.
#[derive(Debug, Clone)]
pub(crate) struct Shard {
    /// Ours.
    pub(crate) credentials: Credentials,
    /// The AWS SDK's, converted once.
    pub(crate) sdk: aws_credential_types::Credentials,
}

/// How many shards entries hold: the next power of two at or above the
/// number of CPUs, at most [`MAX_SHARDS`].
pub(crate) fn shard_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .next_power_of_two()
        .min(MAX_SHARDS)
}

/// This thread's shard among `count` (a power of two): threads are numbered
/// in the order they first ask, so concurrent callers mostly differ.
#[inline]
pub(crate) fn shard_index(count: usize) -> usize {
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let index = INDEX
        .try_with(|index| {
            if index.get() == usize::MAX {
                index.set(NEXT.fetch_add(1, Ordering::Relaxed) & (MAX_SHARDS - 1));
            }
            index.get()
        })
        .unwrap_or(0);
    index & (count - 1)
}

/// The cached state: credentials, both forms, and their schedule.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The role and its credentials.
    pub(crate) current: RoleCredentials,
    /// Copies of the credentials for cached calls (a power of two of them).
    shards: Box<[Shard]>,
    /// What `schedule` was computed from.
    pub(crate) timing: Timing,
    /// Computed once from `timing` and the provider's windows.
    pub(crate) schedule: Schedule,
}

impl Entry {
    /// A new entry for freshly fetched credentials, with `shards` copies
    /// (a power of two) for cached calls.
    pub(crate) fn new(
        current: RoleCredentials,
        timing: Timing,
        windows: &Windows,
        shards: usize,
    ) -> Self {
        // Not marked with the SDK's `AwsCredentialFeature::CredentialsImds`:
        // the mark lives in the credentials' property map, and every clone of
        // a marked value then allocates three times (see BENCHMARKS.md).
        let shards = (0..shards.max(1))
            .map(|i| {
                let credentials = if i == 0 {
                    (*current.credentials).clone()
                } else {
                    current.credentials.separate_copy()
                };
                let sdk = credentials.to_aws_credentials(super::sdk::PROVIDER_NAME);
                Shard { credentials, sdk }
            })
            .collect();
        Self {
            current,
            shards,
            schedule: timing.schedule(windows),
            timing,
        }
    }

    /// The same credentials with another timing (no copy or conversion
    /// repeated).
    pub(crate) fn with_timing(&self, timing: Timing, windows: &Windows) -> Self {
        Self {
            current: self.current.clone(),
            shards: self.shards.clone(),
            schedule: timing.schedule(windows),
            timing,
        }
    }

    /// The copy this thread hands out.
    #[inline]
    pub(crate) fn shard(&self) -> &Shard {
        &self.shards[shard_index(self.shards.len())]
    }

    /// The credentials' own expiry, on IMDS's clock.
    pub(crate) fn real_expiry(&self) -> SystemTime {
        self.current.credentials.expiration()
    }

    /// The local clock reading `now` as IMDS's clock.
    pub(crate) fn server_time(&self, now: SystemTime) -> SystemTime {
        shift(now, self.timing.skew_secs)
    }
}

/// The one place the entry lives: read without a lock, replaced under one.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    entry: ArcSwapOption<Entry>,
    write: Mutex<()>,
}

impl Cache {
    /// The current entry, for a quick look (no reference count written).
    #[inline]
    pub(crate) fn peek(&self) -> Guard<Option<Arc<Entry>>> {
        self.entry.load()
    }

    /// The current entry, to keep.
    pub(crate) fn get(&self) -> Option<Arc<Entry>> {
        self.entry.load_full()
    }

    /// Replaces the entry with what `change` makes of the current one, with
    /// no other change in between; returns what `change` returns.
    pub(crate) fn update<R>(
        &self,
        change: impl FnOnce(Option<Arc<Entry>>) -> (Option<Arc<Entry>>, R),
    ) -> R {
        let _writing = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let (next, result) = change(self.entry.load_full());
        self.entry.store(next);
        result
    }
}

/// `t` moved by `secs` seconds (either way), saturating at the epoch.
pub(crate) fn shift(t: SystemTime, secs: i64) -> SystemTime {
    let by = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        t.checked_add(by).unwrap_or(t)
    } else {
        t.checked_sub(by).unwrap_or(SystemTime::UNIX_EPOCH)
    }
}
