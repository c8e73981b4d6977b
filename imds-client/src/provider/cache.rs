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
//! per fetch, and each thread clones the shard its number picks. The copies
//! belong to the entry, not to threads: they go (and their secrets are
//! zeroized) when the entry is replaced or withdrawn and the last clone
//! handed out is dropped.
//!
//! The quickest path ([`Cache::read_fresh`]) reads the published entry inside
//! a read-side section ([`super::read_side`]): no reference count of the
//! entry is written, only the thread's own slot, and a writer drops a
//! replaced entry only after the sections under way have ended. No thread
//! keeps anything of an entry between calls, so an idle thread never holds
//! on to withdrawn or replaced credentials.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::read_side::{self, Published};
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
    pub(crate) fn shard(&self) -> &Shard {
        self.shard_of(read_side::this_threads_number())
    }

    /// The copy thread number `thread` hands out.
    #[inline]
    fn shard_of(&self, thread: usize) -> &Shard {
        // A power of two of shards: the mask picks one.
        &self.shards[thread & (self.shards.len() - 1)]
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

/// The one place the entry lives: read without a lock (or any shared
/// write), replaced under one.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    entry: Published<Entry>,
}

impl Cache {
    /// The current entry, to keep.
    pub(crate) fn get(&self) -> Option<Arc<Entry>> {
        self.entry.get()
    }

    /// `take` applied to the published entry and this thread's shard of it,
    /// if `now` is before the entry's `serve_until`: the cached path, which
    /// writes no shared memory (see the module docs). `take` must be quick
    /// (a clone) and must not call back into the cache.
    #[inline]
    pub(crate) fn read_fresh<T>(
        &self,
        now: SystemTime,
        take: impl FnOnce(&Entry, &Shard) -> T,
    ) -> Option<T> {
        self.entry
            .read(|entry, thread| {
                (now < entry.schedule.serve_until).then(|| take(entry, entry.shard_of(thread)))
            })
            .flatten()
    }

    /// Replaces the entry with what `change` makes of the current one, with
    /// no other change in between; returns what `change` returns. A replaced
    /// entry is dropped here (its secrets zeroized once no clone is left).
    pub(crate) fn update<R>(
        &self,
        change: impl FnOnce(Option<Arc<Entry>>) -> (Option<Arc<Entry>>, R),
    ) -> R {
        self.entry.update(change)
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
    use std::sync::{Mutex, mpsc};

    use crate::credentials::WeakCredentials;

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

    /// The key id a cached read gives, in both forms and from the entry's
    /// first shard (which must all agree).
    fn read_key(cache: &Cache, now: SystemTime) -> Option<String> {
        let (ours, sdk, first) = cache.read_fresh(now, |entry, shard| {
            (
                shard.credentials.clone(),
                shard.sdk.clone(),
                entry.shards[0].credentials.clone(),
            )
        })?;
        assert_eq!(ours.access_key_id(), sdk.access_key_id());
        assert_eq!(ours.access_key_id(), first.access_key_id());
        Some(ours.access_key_id().to_owned())
    }

    #[test]
    fn the_published_entry_is_read_until_serve_until() {
        let cache = Cache::default();
        assert_eq!(read_key(&cache, at(0)), None, "nothing published yet");
        publish(&cache, Some(entry("AKIDAAAAAAAAAAAAAAAA", 2)));
        assert_eq!(
            read_key(&cache, at(0)).as_deref(),
            Some("AKIDAAAAAAAAAAAAAAAA")
        );
        assert_eq!(
            read_key(&cache, at(1799)).as_deref(),
            Some("AKIDAAAAAAAAAAAAAAAA")
        );
        assert_eq!(
            read_key(&cache, at(1800)),
            None,
            "from serve_until on, the policy decides"
        );
    }

    #[test]
    fn a_replaced_or_withdrawn_entry_is_never_read() {
        let cache = Cache::default();
        let a = entry("AKIDAAAAAAAAAAAAAAAA", 1);
        publish(&cache, Some(a.clone()));
        let held = cache
            .read_fresh(at(0), |_, shard| shard.credentials.clone())
            .expect("published");
        // Replaced: the old credentials are still alive (held above), but
        // never read again.
        publish(&cache, Some(entry("AKIDBBBBBBBBBBBBBBBB", 1)));
        assert_eq!(
            read_key(&cache, at(0)).as_deref(),
            Some("AKIDBBBBBBBBBBBBBBBB")
        );
        // The same credentials with a timing that ends serving.
        let invalidated = Timing {
            invalidated: true,
            ..a.timing
        };
        publish(
            &cache,
            Some(Arc::new(a.with_timing(
                invalidated,
                &Windows {
                    advisory: Some(Duration::from_secs(1800)),
                    mandatory: Some(Duration::from_secs(60)),
                    jitter: 1.0,
                },
            ))),
        );
        assert_eq!(read_key(&cache, at(0)), None);
        publish(&cache, None);
        assert_eq!(read_key(&cache, at(0)), None);
        assert_eq!(held.access_key_id(), "AKIDAAAAAAAAAAAAAAAA");
    }

    #[test]
    fn caches_on_one_thread_read_their_own_entries() {
        let caches: Vec<Cache> = (0..5).map(|_| Cache::default()).collect();
        for (i, cache) in caches.iter().enumerate() {
            publish(cache, Some(entry(&format!("AKID{i:016}"), 1)));
        }
        for (i, cache) in caches.iter().enumerate() {
            assert_eq!(read_key(cache, at(0)), Some(format!("AKID{i:016}")));
        }
    }

    #[test]
    fn no_thread_keeps_withdrawn_secrets_alive() {
        let cache = Arc::new(Cache::default());
        let a = entry("AKIDAAAAAAAAAAAAAAAA", shard_count());
        publish(&cache, Some(a.clone()));
        let weak_copies: Vec<WeakCredentials> =
            a.shards.iter().map(|s| s.credentials.downgrade()).collect();
        drop(a);

        // Threads that served the entry, then sit idle.
        let (served_tx, served_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let idle: Vec<_> = (0..3)
            .map(|_| {
                let cache = cache.clone();
                let served_tx = served_tx.clone();
                let release_rx = release_rx.clone();
                std::thread::spawn(move || {
                    served_tx
                        .send(read_key(&cache, at(0)).is_some())
                        .expect("send");
                    release_rx.lock().expect("lock").recv().expect("release");
                    read_key(&cache, at(0)).is_none()
                })
            })
            .collect();
        for _ in &idle {
            assert!(served_rx.recv().expect("served"), "the thread read it");
        }

        publish(&cache, None);
        assert!(
            weak_copies.iter().all(|w| w.upgrade().is_none()),
            "a withdrawn entry's credentials must be gone (secrets zeroized) \
             while threads that served them sit idle"
        );

        for _ in &idle {
            release_tx.send(()).expect("release");
        }
        for thread in idle {
            assert!(
                thread.join().expect("idle thread"),
                "nothing read after withdrawal"
            );
        }
    }

    #[test]
    fn readers_on_many_threads_see_whole_entries_while_a_writer_replaces_them() {
        // Each entry's two forms and every shard carry one key id; a reader
        // racing the writer must never see a mix, a freed entry, or a key
        // that was never published.
        let cache = Arc::new(Cache::default());
        publish(&cache, Some(entry(&format!("AKID{:016}", 0), 4)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let cache = cache.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut last = 0u64;
                    let mut reads = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let key = read_key(&cache, at(0)).expect("always one published");
                        let n: u64 = key["AKID".len()..].parse().expect("a key we made");
                        assert!(n >= last, "keys only move forward: {n} after {last}");
                        last = n;
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for n in 1..=500u64 {
            publish(&cache, Some(entry(&format!("AKID{n:016}"), 4)));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for reader in readers {
            reader.join().expect("a reader saw a torn or freed entry");
        }
        assert_eq!(read_key(&cache, at(0)), Some(format!("AKID{:016}", 500)));
    }
}
