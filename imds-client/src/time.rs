//! An injectable wall clock.
//!
//! Credential expiry is wall-clock time (`Expiration` in the IMDS JSON), but
//! `tokio::time::pause()` only moves tokio's monotonic clock, never
//! [`SystemTime`]. Every "is it stale?" question in this crate therefore asks a
//! [`TimeSource`], and tests hand in a `ManualTimeSource` (feature
//! `test-util`) that they move
//! together with tokio's paused clock. `clippy.toml` forbids
//! `SystemTime::now` everywhere else, so nothing can bypass it by accident.

use std::fmt;
use std::sync::Arc;
#[cfg(any(test, feature = "test-util"))]
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A source of wall-clock time.
pub trait TimeSource: Send + Sync + fmt::Debug {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The real system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemTimeSource;

impl TimeSource for SystemTimeSource {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[inline]
    fn now(&self) -> SystemTime {
        // The one place the real wall clock is read. The coarse clock is the
        // kernel's last tick (resolution about 4 ms): several times cheaper
        // than the precise one, and far finer than anything compared with it
        // here (refresh windows of seconds to minutes).
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        match u64::try_from(ts.tv_sec) {
            Ok(secs) => SystemTime::UNIX_EPOCH + Duration::new(secs, ts.tv_nsec as u32),
            Err(_) => precise_now(),
        }
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn now(&self) -> SystemTime {
        precise_now()
    }
}

#[allow(clippy::disallowed_methods)] // reason: the one place the real wall clock is read
fn precise_now() -> SystemTime {
    SystemTime::now()
}

/// A cheaply cloneable handle to a [`TimeSource`]; `Default` is the system clock.
#[derive(Debug, Clone)]
pub struct SharedTimeSource(Source);

/// The system clock is called directly (the cached path reads it on every
/// call); any other source through its trait object.
#[derive(Debug, Clone)]
enum Source {
    System,
    Other(Arc<dyn TimeSource>),
}

impl SharedTimeSource {
    /// Wraps a time source.
    pub fn new(source: impl TimeSource + 'static) -> Self {
        Self(Source::Other(Arc::new(source)))
    }

    /// The current wall-clock time according to the wrapped source.
    #[inline]
    pub fn now(&self) -> SystemTime {
        match &self.0 {
            Source::System => SystemTimeSource.now(),
            Source::Other(source) => source.now(),
        }
    }
}

impl Default for SharedTimeSource {
    /// The system clock.
    fn default() -> Self {
        Self(Source::System)
    }
}

impl TimeSource for SharedTimeSource {
    #[inline]
    fn now(&self) -> SystemTime {
        SharedTimeSource::now(self)
    }
}

/// A wall clock that only moves when told to, for tests (feature `test-util`).
///
/// Clones share the same time, so a test keeps one handle and gives another to
/// the code under test.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone)]
pub struct ManualTimeSource(Arc<Mutex<SystemTime>>);

#[cfg(any(test, feature = "test-util"))]
impl ManualTimeSource {
    /// A clock stopped at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self(Arc::new(Mutex::new(start)))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Sets the clock to `to` (which may be earlier, to model a clock step).
    pub fn set(&self, to: SystemTime) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

#[cfg(any(test, feature = "test-util"))]
impl TimeSource for ManualTimeSource {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let clock = ManualTimeSource::new(start);
        let shared = SharedTimeSource::new(clock.clone());
        assert_eq!(shared.now(), start);
        clock.advance(Duration::from_secs(5));
        assert_eq!(shared.now(), start + Duration::from_secs(5));
    }
}
