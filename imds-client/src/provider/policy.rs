//! The serve / refresh / load decision and what a fetch or a failure makes
//! of the cached timing, as pure functions of the state and the time, so
//! that each is written once and tested as a table.
//!
//! - [`decide`]: serve without asking, serve and refresh in the background,
//!   or load now.
//! - [`after_fetch`]: the timing of freshly fetched credentials (extended
//!   briefly when IMDS hands out expired ones; held briefly when it hands
//!   back the ones already cached).
//! - [`after_failure`]: keep the cached credentials (a transient failure:
//!   static stability, with a backoff) or withdraw them (no role, a
//!   configuration error, or nothing cached).
//! - [`measure_skew`]: IMDS's clock against ours, from one `Date` header,
//!   bounded so one implausible reading cannot move the schedule by years.

use std::time::{Duration, SystemTime};

use super::cache::{Schedule, Timing, Windows, shift};
use crate::credentials::Credentials;

/// How long a non-recoverable failure is remembered before IMDS is asked again.
pub(crate) const NON_RECOVERABLE_FAILURE_TTL: Duration = Duration::from_secs(5);
/// How soon to ask again when IMDS hands back the credentials we already have.
pub(crate) const UNCHANGED_RETRY_INTERVAL: Duration = Duration::from_secs(15);
/// How soon a failed refresh before the mandatory window is tried again.
pub(crate) const ADVISORY_RETRY_INTERVAL: Duration = Duration::from_secs(120);
/// Clock skew beyond which a warning is logged.
pub(crate) const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(60);
/// The largest clock skew believed. A `Date` further from the local clock
/// is ignored (expiry is judged on the local clock): AWS rejects requests
/// signed more than 5 minutes off, so a local clock that far off breaks
/// every AWS call anyway, while a wrong `Date` believed could postpone
/// refreshes past expiry. Within this bound a wrong reading moves the
/// schedule by at most 15 minutes, less than the default advisory window of
/// six-hour credentials, and the next response measures again.
pub(crate) const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);
const STATIC_STABILITY_MIN_WAIT: Duration = Duration::from_secs(5 * 60);
const STATIC_STABILITY_MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// What a caller gets from the cache at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Hand out the cached credentials; ask nobody.
    Serve,
    /// Hand out the cached credentials and start one background refresh.
    RefreshInBackground,
    /// Wait for a load.
    LoadNow,
}

/// The decision at local time `now`.
#[inline]
pub(crate) fn decide(schedule: &Schedule, now: SystemTime) -> Decision {
    if now < schedule.serve_until {
        Decision::Serve
    } else if now < schedule.load_at {
        Decision::RefreshInBackground
    } else {
        Decision::LoadNow
    }
}

/// A jittered 5 to 10 minutes: how long to serve the last good credentials
/// before asking a failing IMDS again.
pub(crate) fn static_stability_wait() -> Duration {
    let span = STATIC_STABILITY_MAX_WAIT - STATIC_STABILITY_MIN_WAIT;
    STATIC_STABILITY_MIN_WAIT + span.mul_f64(fastrand::f64())
}

/// The timing of credentials fetched at local time `now`, with `skew_secs`
/// measured on the response. `unchanged`: IMDS handed back the credentials
/// already cached. `wait`: see [`static_stability_wait`].
pub(crate) fn after_fetch(
    credentials: &Credentials,
    skew_secs: i64,
    unchanged: bool,
    now: SystemTime,
    wait: Duration,
) -> Timing {
    let server_now = shift(now, skew_secs);
    let real = credentials.expiration();
    let lifetime = real
        .duration_since(credentials.last_updated().unwrap_or(server_now))
        .unwrap_or_default()
        .max(Duration::from_secs(1));
    let (expires, hold_until) = if real <= server_now {
        // Expired on arrival: use them a few minutes, then ask again.
        (server_now + wait, Some(now + wait))
    } else if unchanged {
        (real, Some(now + UNCHANGED_RETRY_INTERVAL))
    } else {
        (real, None)
    };
    Timing {
        expires,
        lifetime,
        skew_secs,
        hold_until,
        invalidated: false,
    }
}

/// What a failed load does to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// Keep serving the cached credentials with this timing.
    Keep(Timing),
    /// Withdraw them: nothing is served.
    Withdraw,
}

/// What a load failing at local time `now` does to `cached` (the timing and
/// real expiry of the credentials cached *now*, if any). Only a transient
/// failure keeps them: until the mandatory window with a short backoff,
/// from then on (static stability) for `wait`, past their real expiry if need
/// be.
pub(crate) fn after_failure(
    cached: Option<(Timing, SystemTime)>,
    transient: bool,
    now: SystemTime,
    windows: &Windows,
    wait: Duration,
) -> AfterFailure {
    let Some((timing, real_expiry)) = cached.filter(|_| transient) else {
        return AfterFailure::Withdraw;
    };
    let server_now = shift(now, timing.skew_secs);
    let mandatory_start = server_now + windows.mandatory(timing.lifetime);
    let (expires, hold) = match timing.expires.duration_since(mandatory_start) {
        // Before the mandatory window: try again a little later, no later
        // than the start of that window.
        Ok(until_mandatory) if !until_mandatory.is_zero() => {
            (timing.expires, ADVISORY_RETRY_INTERVAL.min(until_mandatory))
        }
        _ => {
            let expires = if real_expiry > server_now {
                timing.expires
            } else {
                // Past the real expiry: extend locally.
                server_now + wait
            };
            let left = expires.duration_since(server_now).unwrap_or_default();
            (expires, wait.min(left))
        }
    };
    AfterFailure::Keep(Timing {
        expires,
        hold_until: Some(now + hold),
        invalidated: false,
        ..timing
    })
}

/// IMDS's clock less the local clock, in whole seconds, from a response's
/// `Date` read at local time `now`: 0 without a `Date`, and 0 (with a
/// warning) when the reading is more than [`MAX_CLOCK_SKEW`] off.
pub(crate) fn measure_skew(server_time: Option<SystemTime>, now: SystemTime) -> i64 {
    let Some(server) = server_time else { return 0 };
    let (secs, ahead) = match server.duration_since(now) {
        Ok(d) => (d.as_secs(), true),
        Err(e) => (e.duration().as_secs(), false),
    };
    if secs > MAX_CLOCK_SKEW.as_secs() {
        tracing::warn!(
            skew_seconds = secs,
            imds_ahead = ahead,
            max_seconds = MAX_CLOCK_SKEW.as_secs(),
            "ignoring an IMDS Date header implausibly far from the local clock; judging expiry \
             on the local clock. Hint: check the instance's time sync (chronyc tracking)"
        );
        return 0;
    }
    let secs = i64::try_from(secs).unwrap_or(0);
    if ahead { secs } else { -secs }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn windows() -> Windows {
        Windows {
            advisory: Some(20 * MIN),
            mandatory: None,
            jitter: 1.0,
        }
    }

    fn timing(expires_in: Duration, skew_secs: i64, hold: Option<Duration>) -> Timing {
        Timing {
            expires: t0() + expires_in,
            lifetime: 6 * HOUR,
            skew_secs,
            hold_until: hold.map(|h| t0() + h),
            invalidated: false,
        }
    }

    #[test]
    fn the_decision_as_a_table() {
        use Decision::*;
        // (what, timing, minutes after t0, expected)
        let cases: &[(&str, Timing, u64, Decision)] = &[
            ("fresh", timing(HOUR, 0, None), 0, Serve),
            (
                "last second before the advisory window",
                timing(HOUR, 0, None),
                39,
                Serve,
            ),
            (
                "advisory window",
                timing(HOUR, 0, None),
                40,
                RefreshInBackground,
            ),
            (
                "mandatory window (60 s)",
                timing(HOUR, 0, None),
                59,
                LoadNow,
            ),
            ("expired", timing(HOUR, 0, None), 61, LoadNow),
            // IMDS 10 minutes ahead: every window starts 10 minutes earlier locally.
            (
                "skewed: advisory on IMDS time",
                timing(HOUR, 600, None),
                30,
                RefreshInBackground,
            ),
            (
                "skewed: mandatory on IMDS time",
                timing(HOUR, 600, None),
                49,
                LoadNow,
            ),
            (
                "IMDS behind: later locally",
                timing(HOUR, -600, None),
                45,
                Serve,
            ),
            // A hold (backoff) serves through the windows, never past expiry.
            (
                "held in the advisory window",
                timing(HOUR, 0, Some(50 * MIN)),
                45,
                Serve,
            ),
            (
                "held in the mandatory window",
                timing(HOUR, 0, Some(65 * MIN)),
                59,
                Serve,
            ),
            (
                "hold ends at expiry",
                timing(HOUR, 0, Some(65 * MIN)),
                60,
                LoadNow,
            ),
            (
                "hold over: windows again",
                timing(HOUR, 0, Some(50 * MIN)),
                50,
                RefreshInBackground,
            ),
            (
                "hold before the advisory window: no effect",
                timing(HOUR, 0, Some(5 * MIN)),
                10,
                Serve,
            ),
            (
                "invalidated",
                Timing {
                    invalidated: true,
                    ..timing(HOUR, 0, None)
                },
                0,
                LoadNow,
            ),
        ];
        for (what, timing, minutes, expected) in cases {
            let schedule = timing.schedule(&windows());
            let got = decide(&schedule, t0() + *minutes as u32 * MIN);
            assert_eq!(got, *expected, "{what}: at +{minutes} min, {schedule:?}");
        }
    }

    #[test]
    fn default_windows_are_jittered_and_bounded_by_the_lifetime() {
        let w = Windows {
            advisory: None,
            mandatory: None,
            jitter: 0.8,
        };
        assert_eq!(w.advisory(6 * HOUR), 24 * MIN, "30 min at most, less 20 %");
        assert_eq!(w.advisory(HOUR), 24 * MIN, "half the lifetime, less 20 %");
        assert_eq!(w.mandatory(6 * HOUR), MIN);
        assert_eq!(
            w.mandatory(5 * MIN),
            30 * Duration::from_secs(1),
            "a tenth of the lifetime"
        );
    }

    #[test]
    fn after_a_failure_as_a_table() {
        let wait = 7 * MIN;
        let real = t0() + HOUR;
        let keep = |expires: SystemTime, hold: Duration| {
            AfterFailure::Keep(Timing {
                expires,
                hold_until: Some(t0() + hold),
                ..timing(HOUR, 0, None)
            })
        };
        // (what, cached timing, real expiry, transient, expected)
        let cases: Vec<(&str, Option<Timing>, SystemTime, bool, AfterFailure)> = vec![
            ("nothing cached", None, real, true, AfterFailure::Withdraw),
            (
                "non-recoverable",
                Some(timing(HOUR, 0, None)),
                real,
                false,
                AfterFailure::Withdraw,
            ),
            (
                "advisory window: retry in 2 min",
                Some(timing(HOUR, 0, None)),
                real,
                true,
                keep(real, ADVISORY_RETRY_INTERVAL),
            ),
            (
                "just before the mandatory window: retry when it starts",
                Some(timing(MIN + 30 * Duration::from_secs(1), 0, None)),
                t0() + MIN + 30 * Duration::from_secs(1),
                true,
                keep(
                    t0() + MIN + 30 * Duration::from_secs(1),
                    30 * Duration::from_secs(1),
                ),
            ),
            (
                "mandatory window: back off, not past the real expiry",
                Some(timing(30 * Duration::from_secs(1), 0, None)),
                t0() + 30 * Duration::from_secs(1),
                true,
                keep(
                    t0() + 30 * Duration::from_secs(1),
                    30 * Duration::from_secs(1),
                ),
            ),
            (
                "expired: extended by the wait",
                Some(timing(Duration::ZERO, 0, None)),
                t0(),
                true,
                keep(t0() + wait, wait),
            ),
            (
                "invalidation is cleared by the failure",
                Some(Timing {
                    invalidated: true,
                    ..timing(HOUR, 0, None)
                }),
                real,
                true,
                keep(real, ADVISORY_RETRY_INTERVAL),
            ),
        ];
        for (what, cached, real, transient, expected) in cases {
            let got = after_failure(cached.map(|t| (t, real)), transient, t0(), &windows(), wait);
            assert_eq!(got, expected, "{what}");
        }
    }

    #[test]
    fn after_a_fetch() {
        let wait = 7 * MIN;
        let fresh = Credentials::new(
            "AKIDEXAMPLE000000",
            "s".repeat(16),
            "t".repeat(16),
            t0() + 6 * HOUR,
        )
        .with_last_updated(t0());
        let t = after_fetch(&fresh, 0, false, t0(), wait);
        assert_eq!(
            (t.expires, t.lifetime, t.hold_until),
            (t0() + 6 * HOUR, 6 * HOUR, None)
        );
        let t = after_fetch(&fresh, 0, true, t0(), wait);
        assert_eq!(
            t.hold_until,
            Some(t0() + UNCHANGED_RETRY_INTERVAL),
            "unchanged: ask again soon"
        );
        let stale = Credentials::new(
            "AKIDEXAMPLE000000",
            "s".repeat(16),
            "t".repeat(16),
            t0() - MIN,
        );
        let t = after_fetch(&stale, 0, false, t0(), wait);
        assert_eq!(
            (t.expires, t.hold_until),
            (t0() + wait, Some(t0() + wait)),
            "expired: extended"
        );
        // On IMDS time 10 minutes ahead, credentials expiring in 5 minutes of
        // local time are already expired.
        let soon = Credentials::new(
            "AKIDEXAMPLE000000",
            "s".repeat(16),
            "t".repeat(16),
            t0() + 5 * MIN,
        );
        let t = after_fetch(&soon, 600, false, t0(), wait);
        assert_eq!(t.expires, t0() + 10 * MIN + wait);
    }

    #[test]
    fn skew_is_bounded() {
        let now = t0();
        assert_eq!(measure_skew(None, now), 0);
        assert_eq!(measure_skew(Some(now + 10 * MIN), now), 600);
        assert_eq!(measure_skew(Some(now - 10 * MIN), now), -600);
        assert_eq!(measure_skew(Some(now + MAX_CLOCK_SKEW), now), 900);
        let three_years = 3 * 365 * 24 * HOUR;
        assert_eq!(
            measure_skew(Some(now - three_years), now),
            0,
            "implausible: ignored"
        );
        assert_eq!(
            measure_skew(Some(now + three_years), now),
            0,
            "implausible: ignored"
        );
        assert_eq!(measure_skew(Some(SystemTime::UNIX_EPOCH), now), 0);
    }
}
