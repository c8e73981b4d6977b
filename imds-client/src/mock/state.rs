//! The emulator's mutable state: role, credentials, tokens, faults, counts.
//!
//! One std `Mutex`, never held across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::fault::{Fault, FaultDuration, RequestKind};
use crate::credentials::Credentials;
use crate::time::SharedTimeSource;

/// How many IMDS requests the emulator has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    /// All IMDS requests (control requests under `/_mock/` excluded).
    pub total: u64,
    /// Per `"METHOD /path"`.
    pub by_route: BTreeMap<String, u64>,
}

impl RequestCounts {
    /// Requests seen for `method` and `path`.
    pub fn count(&self, method: &str, path: &str) -> u64 {
        self.by_route
            .get(&format!("{method} {path}"))
            .copied()
            .unwrap_or(0)
    }
}

pub(crate) struct Settings {
    pub(crate) lifetime: Duration,
    pub(crate) rotation: Duration,
}

pub(crate) struct Issued {
    pub(crate) credentials: Credentials,
    issued_at: SystemTime,
}

pub(crate) struct ActiveFault {
    fault: Fault,
    remaining: Option<u32>,
    until: Option<tokio::time::Instant>,
}

pub(crate) struct State {
    pub(crate) role: Option<String>,
    issued: Option<Issued>,
    /// Every credential set issued and not yet expired, with its role: what
    /// the STS emulator accepts as callers (as AWS accepts credentials until
    /// they expire, whatever IMDS serves now).
    history: Vec<(String, Credentials)>,
    tokens: HashMap<String, SystemTime>,
    pub(crate) tokens_required: bool,
    pub(crate) enabled: bool,
    pub(crate) extended: bool,
    pub(crate) skew_seconds: i64,
    /// The partition in `iam/info`'s instance-profile ARN.
    pub(crate) partition: String,
    faults: Vec<ActiveFault>,
    counts: RequestCounts,
}

pub(crate) struct Shared {
    settings: Settings,
    pub(crate) clock: SharedTimeSource,
    state: Mutex<State>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockImdsState").finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(
        settings: Settings,
        clock: SharedTimeSource,
        role: Option<String>,
        tokens_required: bool,
        extended: bool,
    ) -> Self {
        Self {
            settings,
            clock,
            state: Mutex::new(State {
                role,
                issued: None,
                history: Vec::new(),
                tokens: HashMap::new(),
                tokens_required,
                enabled: true,
                extended,
                skew_seconds: 0,
                partition: "aws".to_owned(),
                faults: Vec::new(),
                counts: RequestCounts::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.lock())
    }

    pub(crate) fn set_role(&self, role: Option<String>) {
        let mut state = self.lock();
        if state.role != role {
            state.issued = None;
        }
        state.role = role;
    }

    pub(crate) fn role(&self) -> Option<String> {
        self.lock().role.clone()
    }

    pub(crate) fn rotate(&self) {
        self.lock().issued = None;
    }

    /// The credentials served now, issuing new ones when none exist yet or
    /// the rotation interval has passed (EC2 makes new credentials available
    /// well before the old ones expire).
    pub(crate) fn current_credentials(&self) -> Option<Credentials> {
        let now = self.clock.now();
        let mut state = self.lock();
        state.role.as_ref()?;
        let stale = match &state.issued {
            None => true,
            Some(issued) => {
                issued
                    .issued_at
                    .checked_add(self.settings.rotation)
                    .is_none_or(|due| now >= due)
                    || now < issued.issued_at
            }
        };
        if stale {
            let credentials = fresh_credentials(now, self.settings.lifetime);
            let role = state.role.clone().unwrap_or_default();
            state.history.retain(|(_, c)| c.expiration() > now);
            state.history.truncate(MAX_HISTORY - 1);
            state.history.insert(0, (role, credentials.clone()));
            state.issued = Some(Issued {
                credentials,
                issued_at: now,
            });
        }
        state.issued.as_ref().map(|i| i.credentials.clone())
    }

    /// Credentials this emulator issued with `access_key_id`, and their role,
    /// expired or not (the caller decides), while they are remembered.
    pub(crate) fn issued_credentials(&self, access_key_id: &str) -> Option<(String, Credentials)> {
        self.lock()
            .history
            .iter()
            .find(|(_, c)| c.access_key_id() == access_key_id)
            .cloned()
    }

    pub(crate) fn issue_token(&self, ttl: Duration) -> String {
        let now = self.clock.now();
        let token = random_string(56, TOKEN_ALPHABET);
        let mut state = self.lock();
        state.tokens.retain(|_, expires| *expires > now);
        // The TTL is at most 6 hours; a clock at the end of time gets a
        // token that is never valid rather than a panic.
        if let Some(expires) = now.checked_add(ttl) {
            state.tokens.insert(token.clone(), expires);
        }
        token
    }

    pub(crate) fn token_valid(&self, token: &str) -> bool {
        let now = self.clock.now();
        self.lock()
            .tokens
            .get(token)
            .is_some_and(|expires| *expires > now)
    }

    pub(crate) fn count(&self, method: &str, path: &str) {
        let mut state = self.lock();
        state.counts.total += 1;
        *state
            .counts
            .by_route
            .entry(format!("{method} {path}"))
            .or_default() += 1;
    }

    pub(crate) fn request_counts(&self) -> RequestCounts {
        self.lock().counts.clone()
    }

    pub(crate) fn reset_request_counts(&self) {
        self.lock().counts = RequestCounts::default();
    }

    pub(crate) fn inject(&self, fault: Fault, duration: FaultDuration) {
        let (remaining, until) = match duration {
            FaultDuration::Requests(n) => (Some(n), None),
            // A duration past what the clock can hold lasts until cleared.
            FaultDuration::For(d) => (None, tokio::time::Instant::now().checked_add(d)),
            FaultDuration::Forever => (None, None),
        };
        self.lock().faults.push(ActiveFault {
            fault,
            remaining,
            until,
        });
    }

    pub(crate) fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// The fault to apply to a request of `kind`, if any; consumes one use.
    pub(crate) fn take_fault(&self, kind: RequestKind) -> Option<Fault> {
        let now = tokio::time::Instant::now();
        let mut state = self.lock();
        state
            .faults
            .retain(|f| f.remaining != Some(0) && f.until.is_none_or(|until| until > now));
        let active = state.faults.iter_mut().find(|f| f.fault.applies_to(kind))?;
        if let Some(remaining) = active.remaining.as_mut() {
            *remaining -= 1;
        }
        Some(active.fault.clone())
    }
}

/// How many issued credential sets are remembered for the STS emulator.
const MAX_HISTORY: usize = 256;

pub(crate) const KEY_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
pub(crate) const SECRET_ALPHABET: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const TOKEN_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

pub(crate) fn random_string(len: usize, alphabet: &[u8]) -> String {
    (0..len)
        .map(|_| alphabet[fastrand::usize(..alphabet.len())] as char)
        .collect()
}

/// Credentials shaped like STS's: `ASIA` + 16 characters, a 40-character
/// secret, a long session token, whole-second times.
fn fresh_credentials(now: SystemTime, lifetime: Duration) -> Credentials {
    let whole = |t: SystemTime| {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    };
    let issued = whole(now);
    Credentials::new(
        format!("ASIA{}", random_string(16, KEY_ALPHABET)),
        random_string(40, SECRET_ALPHABET),
        format!("IQoJb3JpZ2luX2Vj{}", random_string(600, SECRET_ALPHABET)),
        issued.checked_add(lifetime).unwrap_or(issued),
    )
    .with_last_updated(issued)
    .with_account_id("123456789012")
}
