//! The credential socket's long-poll: `ETag`, `?wait=SECONDS&since=ETAG`.
//!
//! Most SDKs read credentials once and never look again, so an application
//! that wants to follow rotations would otherwise poll `GET /credentials`
//! on a timer. With a long-poll it asks once and is answered the moment
//! what it would be served changes (a rotation, a role replacement, a
//! detach, the recovery after an outage, its consumer's new STS session),
//! or when its wait ends.
//!
//! - Every `GET /credentials` answer carries an `ETag`: a tag of *what* is
//!   served. For credentials it is derived from their non-secret identity
//!   (role, access key id, expiry), hashed with a key drawn at random when
//!   the agent starts (SipHash, [`RandomState`]), so it never depends on the
//!   secret key or the session token, and a tag from a previous run of the
//!   agent never matches. For an error answer it is derived from its status
//!   and message.
//! - `since=ETAG` alone is a conditional `GET`: `304 Not Modified` if the
//!   tag is still current, else the full answer.
//! - `wait=SECONDS` (a whole number from 1 to [`MAX_WAIT`]) with `since`
//!   holds the request while the tag is still current, up to `SECONDS`, and
//!   then answers `304 Not Modified` with the same `ETag`. A `since` that is
//!   not current (changed, from a previous run, or malformed) is answered
//!   at once. `wait` without `since` is answered at once.
//!
//! Why bounded so: a waiting client holds one connection, counted against
//! its user's share like any other (`http_listener`); the connection's
//! lifetime is stretched to cover the wait and no more; waiting costs a
//! clone of a `watch` receiver, never a queue; and a stopping agent answers
//! every waiting client at once (503) instead of waiting them out.

use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::OnceLock;
use std::time::Duration;

use imds_client::RoleCredentials;

/// The longest `wait` a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// How much longer than its wait a long-poll's connection may stay open:
/// time to answer after the wait ends.
pub(crate) const LIFETIME_MARGIN: Duration = Duration::from_secs(10);

/// A tag of what `GET /credentials` serves, sent as `ETag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ETag(u64);

impl ETag {
    /// The tag of credentials: their role, access key id and expiry, never
    /// their secret key or session token.
    pub fn of_credentials(credentials: &RoleCredentials) -> Self {
        Self::keyed(|h| {
            "credentials".hash(h);
            credentials.role.as_str().hash(h);
            credentials.credentials.access_key_id().hash(h);
            credentials.credentials.expiration().hash(h);
        })
    }

    /// The tag of an error answer: its status and message.
    pub fn of_error(status: u16, message: &str) -> Self {
        Self::keyed(|h| {
            "error".hash(h);
            status.hash(h);
            message.hash(h);
        })
    }

    fn keyed(feed: impl FnOnce(&mut std::hash::DefaultHasher)) -> Self {
        static KEY: OnceLock<RandomState> = OnceLock::new();
        let mut hasher = KEY.get_or_init(RandomState::new).build_hasher();
        feed(&mut hasher);
        Self(hasher.finish())
    }

    /// Whether `since`, as a client sent it (quoted, `%22`-quoted, or bare),
    /// names this tag.
    fn matches(self, since: &str) -> bool {
        let bare = since
            .strip_prefix("%22")
            .and_then(|s| s.strip_suffix("%22"))
            .or_else(|| since.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
            .unwrap_or(since);
        bare == self.hex()
    }

    fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

impl std::fmt::Display for ETag {
    /// The header value: a strong entity tag, `"` + 16 hex digits + `"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", self.hex())
    }
}

/// What a `GET /credentials` asks of the long-poll.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// `wait`: how long to hold the request while `since` is current.
    pub wait: Option<Duration>,
    /// `since`: the tag the client holds.
    pub since: Option<String>,
}

impl Request {
    /// Parses the query string (`None`: no query). Refuses, with a message
    /// for a 400 naming the parameter and what it takes: a `wait` that is
    /// not a whole number from 1 to [`MAX_WAIT`] seconds, a parameter given
    /// twice, and any other parameter (a typo such as `wiat` would otherwise
    /// be answered at once, and a client would poll in a tight loop).
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut request = Self::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "wait" if request.wait.is_none() => request.wait = Some(parse_wait(value)?),
                "since" if request.since.is_none() => request.since = Some(value.to_owned()),
                "wait" | "since" => return Err(format!("query parameter {name} is given twice")),
                other => {
                    return Err(format!(
                        "unknown query parameter {:?}: GET /credentials takes wait=SECONDS \
                         (1 to {}) and since=ETAG",
                        shorten(other),
                        MAX_WAIT.as_secs()
                    ));
                }
            }
        }
        Ok(request)
    }

    /// Whether `since` is given and names `current`: the client holds what
    /// is served now.
    pub fn holds(&self, current: ETag) -> bool {
        self.since.as_deref().is_some_and(|s| current.matches(s))
    }
}

fn parse_wait(value: &str) -> Result<Duration, String> {
    let max = MAX_WAIT.as_secs();
    value
        .parse::<u64>()
        .ok()
        .filter(|s| value.bytes().all(|b| b.is_ascii_digit()) && (1..=max).contains(s))
        .map(Duration::from_secs)
        .ok_or_else(|| {
            format!(
                "query parameter wait must be a whole number of seconds from 1 to {max}, got {:?}",
                shorten(value)
            )
        })
}

/// At most 32 characters of what a client sent, for an error message.
fn shorten(value: &str) -> String {
    let mut short: String = value.chars().take(32).collect();
    if short.len() < value.len() {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;
    use imds_client::Credentials;
    use std::sync::Arc;
    use std::time::SystemTime;

    fn creds(role: &str, key: &str, expires: u64) -> RoleCredentials {
        RoleCredentials {
            role: role.into(),
            credentials: Arc::new(Credentials::new(
                key,
                "wJalrXUtnFEMI-the-secret",
                "FwoGZXIvYXdz-the-token",
                SystemTime::UNIX_EPOCH + Duration::from_secs(expires),
            )),
        }
    }

    #[test]
    fn the_same_credentials_have_the_same_tag_and_any_change_a_new_one() {
        let first = creds("r", "ASIAFIRST", 2_000);
        assert_eq!(
            ETag::of_credentials(&first),
            ETag::of_credentials(&first.clone())
        );
        let changes = [
            ("a rotation", creds("r", "ASIASECOND", 3_000)),
            ("a new key, same expiry", creds("r", "ASIASECOND", 2_000)),
            ("a new expiry, same key", creds("r", "ASIAFIRST", 3_000)),
            ("a replacement", creds("other", "ASIAFIRST", 2_000)),
        ];
        for (what, changed) in changes {
            assert_ne!(
                ETag::of_credentials(&first),
                ETag::of_credentials(&changed),
                "{what} must change the tag"
            );
        }
        assert_ne!(
            ETag::of_error(404, "no IAM role is attached to this instance"),
            ETag::of_error(503, "no IAM role is attached to this instance"),
        );
    }

    #[test]
    fn a_tag_depends_on_no_secret_and_shows_none() {
        let c = creds("r", "ASIAFIRST", 2_000);
        let other_secrets = RoleCredentials {
            role: "r".into(),
            credentials: Arc::new(Credentials::new(
                "ASIAFIRST",
                "another-secret",
                "another-token",
                SystemTime::UNIX_EPOCH + Duration::from_secs(2_000),
            )),
        };
        // The tag is not derived from the secrets: different secrets, same tag.
        assert_eq!(
            ETag::of_credentials(&c),
            ETag::of_credentials(&other_secrets)
        );
        let shown = ETag::of_credentials(&c).to_string();
        assert_eq!(shown.len(), 18, "a quoted 16-digit tag, got {shown}");
        for secret in ["wJalrXUtnFEMI", "FwoGZXIvYXdz", "ASIAFIRST"] {
            assert!(!shown.contains(secret), "{shown} shows {secret}");
        }
    }

    #[test]
    fn since_names_a_tag_quoted_or_bare() {
        let tag = ETag::of_error(404, "x");
        let bare = tag.hex();
        for since in [tag.to_string(), bare.clone(), format!("%22{bare}%22")] {
            assert!(
                Request::parse(Some(&format!("since={since}")))
                    .unwrap()
                    .holds(tag),
                "{since}"
            );
        }
        for since in ["", "W/x", "%22%22", "\"", "0123"] {
            assert!(
                !Request::parse(Some(&format!("since={since}")))
                    .unwrap()
                    .holds(tag),
                "{since}"
            );
        }
        assert!(!Request::parse(None).unwrap().holds(tag));
    }

    #[test]
    fn wait_is_whole_seconds_from_1_to_max() {
        assert_eq!(Request::parse(None).unwrap(), Request::default());
        assert_eq!(Request::parse(Some("")).unwrap(), Request::default());
        let ok = Request::parse(Some("wait=300&since=%22abc%22")).unwrap();
        assert_eq!(ok.wait, Some(MAX_WAIT));
        assert_eq!(ok.since.as_deref(), Some("%22abc%22"));
        assert_eq!(
            Request::parse(Some("wait=1")).unwrap().wait,
            Some(Duration::from_secs(1))
        );
        for bad in [
            "0", "301", "100000", "abc", "", "-1", "+5", "1.5", " 5", "5s", "0x10",
        ] {
            let err = Request::parse(Some(&format!("wait={bad}"))).unwrap_err();
            assert!(
                err.contains("wait") && err.contains("from 1 to 300"),
                "wait={bad}: {err}"
            );
        }
        let long = "9".repeat(5000);
        let err = Request::parse(Some(&format!("wait={long}"))).unwrap_err();
        assert!(err.len() < 200, "the message echoes a bounded part: {err}");
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused_by_name() {
        let err = Request::parse(Some("wiat=60")).unwrap_err();
        assert!(
            err.contains("\"wiat\"") && err.contains("wait=SECONDS"),
            "{err}"
        );
        let err = Request::parse(Some("wait=5&wait=6")).unwrap_err();
        assert!(err.contains("wait is given twice"), "{err}");
        let err = Request::parse(Some("since=a&since=b")).unwrap_err();
        assert!(err.contains("since is given twice"), "{err}");
    }
}
