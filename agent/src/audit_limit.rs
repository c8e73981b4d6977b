//! One rule for how often a refusal is an audit record, on the credential
//! socket and the container endpoint alike.
//!
//! Every hand-out is an audit record ([`crate::broker::handout`]). A
//! refusal (`denied`) or an error (`error`) is too, but a client looping on
//! a request it will never get (a user the config refuses, a container
//! holding the agent's own token under `unmatched = "deny"`, a consumer
//! whose role cannot be assumed) would otherwise write one record per
//! request and push real records past journald's rate limit. So such a
//! record is written in full at most once per peer, result and reason per
//! [`REFUSAL_SUMMARY_INTERVAL`]; the ones between are counted, and the next
//! full record is preceded by one record of how many were not written. The
//! peer is its uid when the kernel names one (a socket peer, a local
//! process on loopback), else its address (a container behind a bridge):
//! [`PeerKey`], as the connection caps count them.
//!
//! The tracking is bounded: at most [`MAX_TRACKED`] entries. When it is
//! full, entries quiet for a whole interval are pruned (their counts, if
//! any, written as summaries first), and if it is still full a new peer is
//! counted in one shared "other peers" entry, so a flood from many
//! addresses costs a fixed amount of memory. Counting in `/metrics` is the
//! caller's and never limited.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

use crate::http_listener::PeerKey;
pub(crate) use crate::http_listener::REFUSAL_SUMMARY_INTERVAL;

/// Entries tracked at most, the shared "other peers" one included.
pub(crate) const MAX_TRACKED: usize = 4096;

/// What an entry counts: a peer, a result (`denied`, `error`) and a reason.
type Key = (PeerKey, &'static str, String);

/// The audit records of one result and reason for one peer.
#[derive(Debug)]
struct Entry {
    /// When its last full record was written.
    at: Instant,
    /// Records not written since.
    skipped: u64,
}

/// The limiter: one per endpoint (module docs).
#[derive(Debug, Default)]
pub(crate) struct AuditLimit {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// When quiet entries were last pruned: at most once a second, so a
    /// flood of new peers at the cap does not scan the map per request.
    pruned: Option<Instant>,
}

/// A count of records not written, to be written as one summary.
struct Skipped {
    peer: PeerKey,
    result: &'static str,
    reason: String,
    count: u64,
}

impl Skipped {
    fn write(&self, output: &str) {
        let noun = match self.result {
            "denied" => "refusals",
            "error" => "errors",
            _ => "records",
        };
        let (uid, addr) = match self.peer {
            PeerKey::Uid(uid) => (i64::from(uid), String::new()),
            PeerKey::Addr(addr) => (-1, addr.to_string()),
            PeerKey::Other => (-1, String::new()),
        };
        tracing::warn!(
            target: "imds_agent::audit",
            audit = true,
            output,
            uid,
            addr,
            result = self.result,
            reason = self.reason,
            refused = self.count,
            "{} more {noun} of {} for this reason were counted, not recorded one by one",
            self.count,
            self.peer,
        );
    }
}

impl AuditLimit {
    /// Whether to write the full audit record of this `result` (`denied`,
    /// `error`) for `reason` to `peer` on `output` now. When it is, a
    /// record of the ones not written since is written first; when it is
    /// not, it is counted.
    pub(crate) fn admit(
        &self,
        peer: PeerKey,
        output: &str,
        result: &'static str,
        reason: &str,
    ) -> bool {
        let now = Instant::now();
        let mut summaries = Vec::new();
        let admitted = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let mut key = (peer, result, reason.to_owned());
            // One place is kept for the shared entry.
            if !inner.entries.contains_key(&key) && inner.entries.len() >= MAX_TRACKED - 1 {
                inner.prune(now, &mut summaries);
                if inner.entries.len() >= MAX_TRACKED - 1 {
                    key = (PeerKey::Other, result, String::new());
                }
            }
            match inner.entries.get_mut(&key) {
                Some(entry) if now.duration_since(entry.at) < REFUSAL_SUMMARY_INTERVAL => {
                    entry.skipped += 1;
                    false
                }
                Some(entry) => {
                    entry.at = now;
                    let count = std::mem::take(&mut entry.skipped);
                    if count > 0 {
                        summaries.push(Skipped {
                            peer: key.0,
                            result,
                            reason: key.2,
                            count,
                        });
                    }
                    true
                }
                None => {
                    inner.entries.insert(
                        key,
                        Entry {
                            at: now,
                            skipped: 0,
                        },
                    );
                    true
                }
            }
        };
        for summary in &summaries {
            summary.write(output);
        }
        admitted
    }

    /// Entries tracked now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }
}

impl Inner {
    /// Forgets entries quiet for a whole interval, keeping their counts
    /// in `summaries`; at most once a second.
    fn prune(&mut self, now: Instant, summaries: &mut Vec<Skipped>) {
        if self
            .pruned
            .is_some_and(|at| now.duration_since(at) < std::time::Duration::from_secs(1))
        {
            return;
        }
        self.pruned = Some(now);
        self.entries.retain(|(peer, result, reason), entry| {
            let keep = now.duration_since(entry.at) < REFUSAL_SUMMARY_INTERVAL;
            if !keep && entry.skipped > 0 {
                summaries.push(Skipped {
                    peer: *peer,
                    result,
                    reason: reason.clone(),
                    count: entry.skipped,
                });
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn addr(n: u32) -> PeerKey {
        PeerKey::Addr(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)))
    }

    /// A flood from 10,000 addresses, each refused: the tracking never
    /// holds more than its cap; the peers past it share one entry, so
    /// their refusals are still limited, not written one by one.
    #[tokio::test(start_paused = true)]
    async fn ten_thousand_peers_never_grow_the_tracking_past_its_cap() {
        let limit = AuditLimit::default();
        let mut written = 0;
        for n in 0..10_000 {
            if limit.admit(addr(n), "container", "denied", "the reason") {
                written += 1;
            }
            assert!(
                limit.len() <= MAX_TRACKED,
                "after {} peers the tracking holds {} entries, more than {MAX_TRACKED}",
                n + 1,
                limit.len()
            );
        }
        assert_eq!(
            written, MAX_TRACKED,
            "one full record per tracked peer and one for all the others"
        );
        // An interval later, the quiet entries make room again.
        tokio::time::advance(REFUSAL_SUMMARY_INTERVAL).await;
        assert!(limit.admit(addr(20_000), "container", "denied", "the reason"));
        assert!(limit.len() <= MAX_TRACKED);
        assert!(
            limit.inner.lock().unwrap().entries.contains_key(&(
                addr(20_000),
                "denied",
                "the reason".to_owned()
            )),
            "a new peer is tracked on its own once the quiet ones are pruned"
        );
    }

    /// Each peer, result and reason is limited on its own.
    #[tokio::test(start_paused = true)]
    async fn another_peer_or_reason_is_recorded_on_its_own() {
        let limit = AuditLimit::default();
        assert!(limit.admit(PeerKey::Uid(1000), "socket", "denied", "a"));
        assert!(!limit.admit(PeerKey::Uid(1000), "socket", "denied", "a"));
        assert!(limit.admit(PeerKey::Uid(1001), "socket", "denied", "a"));
        assert!(limit.admit(PeerKey::Uid(1000), "socket", "denied", "b"));
        assert!(limit.admit(PeerKey::Uid(1000), "socket", "error", "a"));
        assert!(limit.admit(addr(1), "socket", "denied", "a"));
        assert!(!limit.admit(addr(1), "socket", "denied", "a"));
    }
}
