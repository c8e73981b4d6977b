//! The one cached state: an [`Entry`] holds the credentials in both forms
//! handed out (ours and the AWS SDK's, each built once per fetch) and the
//! [`Schedule`] that says, on the local clock, until when they are served
//! without asking and when a caller must wait for a load. The schedule is
//! computed once, when the entry is made, from its [`Timing`]; nothing
//! recomputes windows per call.
//!
//! An entry is immutable. Every change (a fetch, a failure kept or
//! withdrawn, a new skew reading, an invalidation) makes a new one, with a
//! number never used before, and swaps it in under [`Cache`]'s write lock.
//!
//! A cached call hands out a clone: one reference count incremented. Threads
//! incrementing the same count at once slow each other down several times
//! over (the cache line moves between cores on every call), so an entry
//! holds a few [`Shard`]s, separate copies of the same credentials made once
//! per fetch, and each thread clones the shard its index picks. The copies
//! belong to the entry, not to threads: they go (and their secrets are
//! zeroized) when the entry is replaced or withdrawn and the last clone
//! handed out is dropped.
//!
//! The quickest path is a thread's memory of the entry it last served
//! ([`Cache::recall_credentials`]): the entry's number, its `serve_until` and
//! *weak* handles to its shard. A call compares the number with the published
//! one (one plain atomic load of a line no one writes between fetches) and
//! the clock with `serve_until`, then upgrades the weak handle: no
//! hazard-pointer bookkeeping as in a full `ArcSwap` load. A weak handle does
//! not keep the secrets alive, so an idle thread never holds on to withdrawn
//! or replaced credentials: once the entry and the clones handed out are
//! gone, the secrets are zeroized and the upgrade fails.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwapOption, Guard};

use super::state::RoleCredentials;
use crate::credentials::{Credentials, WeakCredentials};

/// The most shards an entry holds.
const MAX_SHARDS: usize = 16;

/// How many providers' entries a thread remembers at once (a power of two;
/// providers beyond that on one thread share slots and take the slower path
/// more often, never a wrong one).
const REMEMBERED: usize = 4;

/// The next entry number: never reused, never 0 (0 means "no entry").
static NEXT_ENTRY_ID: AtomicU64 = AtomicU64::new(1);

/// The next cache number, which picks a cache's slot in a thread's memory.
static NEXT_CACHE_KEY: AtomicUsize = AtomicUsize::new(0);

fn next_entry_id() -> u64 {
    NEXT_ENTRY_ID.fetch_add(1, Ordering::Relaxed)
}

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
    /// The AWS SDK's, converted once (shared, so that a thread can hold a
    /// weak handle to it).
    pub(crate) sdk: Arc<aws_credential_types::Credentials>,
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
    /// This entry's number, never reused.
    id: u64,
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
                let sdk = Arc::new(credentials.to_aws_credentials(super::sdk::PROVIDER_NAME));
                Shard { credentials, sdk }
            })
            .collect();
        Self {
            id: next_entry_id(),
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
            id: next_entry_id(),
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

/// What a thread remembers of the entry it last served for one cache.
#[derive(Debug, Default)]
struct Remembered {
    /// The entry's number (0: nothing remembered).
    entry_id: u64,
    /// The entry's `schedule.serve_until`.
    serve_until: Option<SystemTime>,
    /// This thread's shard, weakly.
    credentials: WeakCredentials,
    /// The same, in the AWS SDK's form.
    sdk: Weak<aws_credential_types::Credentials>,
}

thread_local! {
    static REMEMBERED_ENTRIES: RefCell<[Remembered; REMEMBERED]> =
        RefCell::new(Default::default());
}

/// The one place the entry lives: read without a lock, replaced under one.
#[derive(Debug)]
pub(crate) struct Cache {
    entry: ArcSwapOption<Entry>,
    /// The number of the entry in `entry` (0: none), stored after it.
    published: AtomicU64,
    /// This cache's slot in a thread's memory.
    slot: usize,
    write: Mutex<()>,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            entry: ArcSwapOption::default(),
            published: AtomicU64::new(0),
            slot: NEXT_CACHE_KEY.fetch_add(1, Ordering::Relaxed) & (REMEMBERED - 1),
            write: Mutex::new(()),
        }
    }
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

    /// The credentials this thread last served from this cache, if that entry
    /// is still the published one, `now` is before its `serve_until`, and its
    /// credentials are still held (by the entry or a clone handed out).
    #[inline]
    pub(crate) fn recall_credentials(&self, now: SystemTime) -> Option<Credentials> {
        self.recall(now, |remembered| remembered.credentials.upgrade())
    }

    /// [`Cache::recall_credentials`] in the AWS SDK's form.
    #[inline]
    pub(crate) fn recall_sdk(&self, now: SystemTime) -> Option<aws_credential_types::Credentials> {
        self.recall(now, |remembered| {
            remembered.sdk.upgrade().map(|sdk| (*sdk).clone())
        })
    }

    #[inline]
    fn recall<T>(&self, now: SystemTime, take: impl FnOnce(&Remembered) -> Option<T>) -> Option<T> {
        let published = self.published.load(Ordering::Acquire);
        REMEMBERED_ENTRIES
            .try_with(|memory| {
                let memory = memory.try_borrow().ok()?;
                let remembered = &memory[self.slot];
                let fresh = remembered.entry_id == published
                    && remembered.serve_until.is_some_and(|until| now < until);
                if fresh { take(remembered) } else { None }
            })
            .ok()
            .flatten()
    }

    /// Makes this thread remember `entry` (served from this cache) for
    /// [`Cache::recall_credentials`].
    pub(crate) fn remember(&self, entry: &Entry) {
        let _ = REMEMBERED_ENTRIES.try_with(|memory| {
            let Ok(mut memory) = memory.try_borrow_mut() else {
                return;
            };
            let remembered = &mut memory[self.slot];
            if remembered.entry_id == entry.id {
                return;
            }
            let shard = entry.shard();
            *remembered = Remembered {
                entry_id: entry.id,
                serve_until: Some(entry.schedule.serve_until),
                credentials: shard.credentials.downgrade(),
                sdk: Arc::downgrade(&shard.sdk),
            };
        });
    }

    /// Replaces the entry with what `change` makes of the current one, with
    /// no other change in between; returns what `change` returns.
    pub(crate) fn update<R>(
        &self,
        change: impl FnOnce(Option<Arc<Entry>>) -> (Option<Arc<Entry>>, R),
    ) -> R {
        let _writing = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let (next, result) = change(self.entry.load_full());
        let id = next.as_ref().map_or(0, |entry| entry.id);
        self.entry.store(next);
        self.published.store(id, Ordering::Release);
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    const T0: Duration = Duration::from_secs(1_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    /// An entry for credentials `key` expiring at `at(3600)`, served without
    /// asking until `at(1800)` (fixed windows), with `shards` copies.
    fn entry(key: &str, shards: usize) -> Arc<Entry> {
        let credentials = Credentials::new(
            key,
            "SECRETSECRETSECRETSECRET",
            "TOKENTOKENTOKENTOKENTOKEN",
            at(3600),
        );
        let windows = Windows {
            advisory: Some(Duration::from_secs(1800)),
            mandatory: Some(Duration::from_secs(60)),
            jitter: 1.0,
        };
        let timing = Timing {
            expires: at(3600),
            lifetime: Duration::from_secs(3600),
            skew_secs: 0,
            hold_until: None,
            invalidated: false,
        };
        let current = RoleCredentials {
            role: "role".into(),
            credentials: Arc::new(credentials),
        };
        Arc::new(Entry::new(current, timing, &windows, shards))
    }

    fn publish(cache: &Cache, entry: Option<Arc<Entry>>) {
        cache.update(|_| (entry, ()));
    }

    #[test]
    fn a_thread_recalls_the_published_entry_until_serve_until() {
        let cache = Cache::default();
        let a = entry("AKIDAAAAAAAAAAAAAAAA", 2);
        publish(&cache, Some(a.clone()));
        assert!(
            cache.recall_credentials(at(0)).is_none(),
            "nothing remembered yet"
        );
        cache.remember(&a);
        let recalled = cache.recall_credentials(at(0)).expect("remembered");
        assert_eq!(recalled.access_key_id(), "AKIDAAAAAAAAAAAAAAAA");
        assert_eq!(
            cache
                .recall_sdk(at(1799))
                .expect("sdk form")
                .access_key_id(),
            "AKIDAAAAAAAAAAAAAAAA"
        );
        assert!(
            cache.recall_credentials(at(1800)).is_none(),
            "from serve_until on, the policy decides"
        );
        assert!(cache.recall_sdk(at(1800)).is_none());
    }

    #[test]
    fn a_replaced_or_withdrawn_entry_is_never_recalled() {
        let cache = Cache::default();
        let a = entry("AKIDAAAAAAAAAAAAAAAA", 1);
        publish(&cache, Some(a.clone()));
        cache.remember(&a);
        let held = cache.recall_credentials(at(0)).expect("remembered");
        // Replaced: the old credentials are still alive (held above), but
        // the published number changed.
        publish(&cache, Some(entry("AKIDBBBBBBBBBBBBBBBB", 1)));
        assert!(cache.recall_credentials(at(0)).is_none());
        assert!(cache.recall_sdk(at(0)).is_none());
        // The same credentials with new timing are a new entry too.
        publish(
            &cache,
            Some(Arc::new(a.with_timing(
                a.timing,
                &Windows {
                    advisory: Some(Duration::from_secs(1800)),
                    mandatory: Some(Duration::from_secs(60)),
                    jitter: 1.0,
                },
            ))),
        );
        assert!(cache.recall_credentials(at(0)).is_none());
        publish(&cache, None);
        assert!(cache.recall_credentials(at(0)).is_none());
        drop(held);
    }

    #[test]
    fn caches_on_one_thread_recall_their_own_entries() {
        let caches: Vec<Cache> = (0..REMEMBERED + 1).map(|_| Cache::default()).collect();
        let entries: Vec<_> = (0..caches.len())
            .map(|i| entry(&format!("AKID{i:016}"), 1))
            .collect();
        for (cache, entry) in caches.iter().zip(&entries) {
            publish(cache, Some(entry.clone()));
            cache.remember(entry);
        }
        for (i, cache) in caches.iter().enumerate() {
            // More caches than slots: some share one and are recalled by
            // neither or one, never the other's credentials.
            if let Some(recalled) = cache.recall_credentials(at(0)) {
                assert_eq!(recalled.access_key_id(), format!("AKID{i:016}"));
            }
        }
        let last = caches.last().expect("caches");
        assert_eq!(
            last.recall_credentials(at(0))
                .expect("the last remembered")
                .access_key_id(),
            format!("AKID{:016}", caches.len() - 1)
        );
    }

    #[test]
    fn an_idle_thread_does_not_keep_withdrawn_secrets_alive() {
        let cache = Arc::new(Cache::default());
        let a = entry("AKIDAAAAAAAAAAAAAAAA", shard_count());
        publish(&cache, Some(a.clone()));
        let weak_copies: Vec<WeakCredentials> =
            a.shards.iter().map(|s| s.credentials.downgrade()).collect();
        let weak_sdk: Vec<_> = a.shards.iter().map(|s| Arc::downgrade(&s.sdk)).collect();
        drop(a);

        let (served_tx, served_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let idle = std::thread::spawn({
            let cache = cache.clone();
            move || {
                let entry = cache.get().expect("published");
                cache.remember(&entry);
                drop(entry);
                let served = cache.recall_credentials(at(0)).is_some();
                served_tx.send(served).expect("send");
                // Idle, with its memory of the entry, until released.
                release_rx.recv().expect("release");
                cache.recall_credentials(at(0)).is_none()
            }
        });
        assert!(served_rx.recv().expect("served"), "the thread recalled it");

        publish(&cache, None);
        assert!(
            weak_copies.iter().all(|w| w.upgrade().is_none()),
            "a withdrawn entry's credentials must be gone (secrets zeroized) \
             while a thread that served them sits idle"
        );
        assert!(weak_sdk.iter().all(|w| w.upgrade().is_none()));

        release_tx.send(()).expect("release");
        assert!(
            idle.join().expect("idle thread"),
            "nothing recalled after withdrawal"
        );
    }
}
