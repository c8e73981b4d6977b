//! Where the client's settings come from.
//!
//! Each setting is resolved in this order (the AWS SDKs' precedence):
//! 1. the value given to [`ImdsClientBuilder`](crate::client::ImdsClientBuilder);
//! 2. the standard environment variable, read through [`Env`];
//! 3. the key in the shared config file (`AWS_CONFIG_FILE`, else
//!    `~/.aws/config`), in the profile named by `AWS_PROFILE` (else `default`);
//! 4. the built-in default (the `DEFAULT_*` constants).
//!
//! | setting | environment variable | config file key |
//! |---|---|---|
//! | IMDS disabled (no I/O at all) | `AWS_EC2_METADATA_DISABLED` | |
//! | endpoint | `AWS_EC2_METADATA_SERVICE_ENDPOINT` | `ec2_metadata_service_endpoint` |
//! | endpoint mode (`IPv4`, `IPv6`, any case) | `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE` | `ec2_metadata_service_endpoint_mode` |
//! | IMDSv1 fallback forbidden | `AWS_EC2_METADATA_V1_DISABLED` | `ec2_metadata_v1_disabled` |
//! | timeout, seconds | `AWS_METADATA_SERVICE_TIMEOUT` | `metadata_service_timeout` |
//! | attempts | `AWS_METADATA_SERVICE_NUM_ATTEMPTS` | `metadata_service_num_attempts` |
//! | role name (skips discovery) | `AWS_EC2_INSTANCE_PROFILE_NAME` | |
//!
//! An endpoint (from any source) wins over an endpoint mode.
//!
//! Every value, whatever its source, is checked against its accepted range
//! before the client is built, and a refusal names the setting as the user
//! spelled it and the range: a bad value is an error, never a panic.
//!
//! | setting | accepted |
//! |---|---|
//! | timeouts (connect, read, `AWS_METADATA_SERVICE_TIMEOUT`) | 0.001 to 3600 seconds |
//! | attempts | 1 to 20 |
//! | session-token lifetime | 1 to 21600 whole seconds |
//! | unreachable memo | 0 to 3600 seconds |
//! | role name | 1 to 64 of `A-Z a-z 0-9 + = , . @ _ -` (what IAM allows) |
//! | shared config file | a UTF-8 file (or `/dev/null`) of at most 1 MiB |

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// The environment, injectable so tests need not touch the process's.
#[derive(Debug, Clone, Default)]
pub struct Env {
    fake: Option<Arc<HashMap<String, String>>>,
}

impl Env {
    /// The real process environment.
    pub fn real() -> Self {
        Self::default()
    }

    /// An environment with nothing set (and so no shared config file either).
    pub fn empty() -> Self {
        Self::from_pairs::<String, String>([])
    }

    /// A fixed environment holding only `pairs`.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            fake: Some(Arc::new(
                pairs
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            )),
        }
    }

    /// The value of `key`, if set (and valid UTF-8).
    pub fn get(&self, key: &str) -> Option<String> {
        match &self.fake {
            Some(map) => map.get(key).cloned(),
            None => std::env::var(key).ok(),
        }
    }

    /// The value of `key`, if set; a value that is not UTF-8 is an error
    /// naming the variable rather than a setting silently ignored.
    pub(crate) fn lookup(&self, key: &str) -> Result<Option<String>, Error> {
        match &self.fake {
            Some(map) => Ok(map.get(key).cloned()),
            None => match std::env::var(key) {
                Ok(value) => Ok(Some(value)),
                Err(std::env::VarError::NotPresent) => Ok(None),
                Err(std::env::VarError::NotUnicode(_)) => {
                    Err(invalid(key, "the value is not valid UTF-8"))
                }
            },
        }
    }
}

/// Timeouts accepted from any source: 1 ms to 1 hour. IMDS is link-local and
/// answers in milliseconds; an hour is already "wait forever".
pub(crate) const TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(1), Duration::from_secs(3600));
/// Attempts per request accepted from any source.
pub(crate) const ATTEMPTS_RANGE: (u32, u32) = (1, 20);
/// Session-token lifetimes IMDS accepts, in whole seconds.
pub(crate) const TOKEN_TTL_RANGE: (u64, u64) = (1, 21_600);
/// How long an unreachable endpoint may be remembered.
pub(crate) const UNREACHABLE_MEMO_RANGE: (Duration, Duration) =
    (Duration::ZERO, Duration::from_secs(3600));
/// The largest shared config file read.
const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// `d` as seconds, the way a user would write it (`0.001`, `3600`).
fn seconds(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

/// Checks a duration against `(min, max)`; the error names `setting` and the range.
pub(crate) fn check_duration(
    value: Duration,
    setting: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, Error> {
    if value < min || value > max {
        return Err(invalid(
            setting,
            format!(
                "expected from {} to {} seconds, got {} seconds",
                seconds(min),
                seconds(max),
                seconds(value)
            ),
        ));
    }
    Ok(value)
}

/// Parses a number of seconds (`1`, `0.25`, `2e0`) within `(min, max)`.
/// NaN, infinities, negatives and values too large for a [`Duration`] are
/// errors naming `setting` and the range, never a panic.
pub(crate) fn parse_seconds(
    value: &str,
    setting: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, Error> {
    let refuse = || {
        invalid(
            setting,
            format!(
                "expected a number of seconds from {} to {}, got {value:?}",
                seconds(min),
                seconds(max)
            ),
        )
    };
    let number: f64 = value.trim().parse().map_err(|_| refuse())?;
    let duration = Duration::try_from_secs_f64(number).map_err(|_| refuse())?;
    if duration < min || duration > max {
        return Err(refuse());
    }
    Ok(duration)
}

/// Checks a count against `(min, max)`; the error names `setting` and the range.
pub(crate) fn check_count(value: u32, setting: &str, (min, max): (u32, u32)) -> Result<u32, Error> {
    if !(min..=max).contains(&value) {
        return Err(invalid(
            setting,
            format!("expected a whole number from {min} to {max}, got {value}"),
        ));
    }
    Ok(value)
}

/// Parses a whole number within `(min, max)`.
pub(crate) fn parse_count(
    value: &str,
    setting: &str,
    (min, max): (u32, u32),
) -> Result<u32, Error> {
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            invalid(
                setting,
                format!("expected a whole number from {min} to {max}, got {value:?}"),
            )
        })
}

/// Whether IAM would accept `name` as a role name: 1 to 64 of
/// `[A-Za-z0-9+=,.@_-]`. Anything else would end up in URLs and logs.
pub(crate) fn is_iam_role_name(name: &str) -> bool {
    let iam_char = |c: char| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c);
    (1..=64).contains(&name.len()) && name.chars().all(iam_char)
}

/// The keys of one profile of the shared config file.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProfileKeys(HashMap<String, String>);

impl ProfileKeys {
    /// Reads the profile `AWS_PROFILE` (else `default`) from `AWS_CONFIG_FILE`
    /// (else `$HOME/.aws/config`). A missing or unreadable file is an empty
    /// profile (so is `/dev/null`); a directory, FIFO or socket, or a file
    /// larger than 1 MiB or not UTF-8, is an error naming where its path
    /// came from.
    pub(crate) fn load(env: &Env) -> Result<Self, Error> {
        let (path, setting) = match env.lookup("AWS_CONFIG_FILE")? {
            Some(path) => (path, "AWS_CONFIG_FILE"),
            None => match env.lookup("HOME")? {
                Some(home) => (format!("{home}/.aws/config"), "the shared config file"),
                None => return Ok(Self::default()),
            },
        };
        let profile = env
            .lookup("AWS_PROFILE")?
            .unwrap_or_else(|| "default".into());
        let refuse = |why: &str| invalid(setting, format!("{path:?} {why}"));
        // Looked at before opening: opening a FIFO would wait for a writer.
        // A character device is read (bounded): `AWS_CONFIG_FILE=/dev/null`
        // is the usual way to say "no config file".
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => return Err(refuse("is a directory, not a file")),
            #[cfg(unix)]
            Ok(meta)
                if {
                    use std::os::unix::fs::FileTypeExt as _;
                    let kind = meta.file_type();
                    kind.is_fifo() || kind.is_socket() || kind.is_block_device()
                } =>
            {
                return Err(refuse("is not a regular file"));
            }
            Ok(_) => {}
            Err(_) => return Ok(Self::default()),
        }
        let Ok(file) = std::fs::File::open(&path) else {
            return Ok(Self::default());
        };
        let mut bytes = Vec::new();
        if file
            .take(MAX_CONFIG_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .is_err()
        {
            return Ok(Self::default());
        }
        if bytes.len() as u64 > MAX_CONFIG_FILE_BYTES {
            return Err(refuse("is larger than 1 MiB"));
        }
        let text = String::from_utf8(bytes).map_err(|_| refuse("is not UTF-8 text"))?;
        Ok(Self::parse(&text, &profile))
    }

    /// The keys of `[profile]` (or `[profile NAME]`; `[default]` for default).
    pub(crate) fn parse(text: &str, profile: &str) -> Self {
        let mut keys = HashMap::new();
        let mut in_ours = false;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
                continue;
            }
            if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
                let header = header.trim();
                let name = header
                    .strip_prefix("profile ")
                    .map(str::trim)
                    .unwrap_or(header);
                in_ours = name == profile;
                continue;
            }
            if in_ours && let Some((k, v)) = line.split_once('=') {
                keys.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        Self(keys)
    }

    /// A key's value, if set.
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
}

/// Which IMDS address to use when no endpoint is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointMode {
    /// `http://169.254.169.254` (the default).
    #[default]
    IpV4,
    /// `http://[fd00:ec2::254]` (Nitro instances with IPv6 IMDS enabled).
    IpV6,
}

impl EndpointMode {
    /// The endpoint this mode stands for.
    pub fn endpoint(self) -> &'static str {
        match self {
            EndpointMode::IpV4 => "http://169.254.169.254",
            EndpointMode::IpV6 => "http://[fd00:ec2::254]",
        }
    }

    /// Parses `IPv4` / `IPv6` in any case; `setting` names the source for errors.
    pub fn parse(value: &str, setting: &str) -> Result<Self, Error> {
        match value.trim().to_ascii_lowercase().as_str() {
            "ipv4" => Ok(EndpointMode::IpV4),
            "ipv6" => Ok(EndpointMode::IpV6),
            _ => Err(invalid(
                setting,
                format!("expected IPv4 or IPv6, got {value:?}"),
            )),
        }
    }
}

pub(crate) fn invalid(setting: &str, reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConfiguration {
        setting: setting.to_owned(),
        reason: reason.into(),
    })
}

/// Parses a boolean setting the way the AWS SDKs do (`true`/`false`, any case).
pub(crate) fn parse_bool(value: &str, setting: &str) -> Result<bool, Error> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(
            setting,
            format!("expected true or false, got {value:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_mode_is_case_insensitive_and_errors_name_the_setting() {
        assert_eq!(
            EndpointMode::parse("ipV6", "X").unwrap(),
            EndpointMode::IpV6
        );
        let err =
            EndpointMode::parse("ipv5", "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE").unwrap_err();
        assert!(
            err.to_string()
                .contains("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"),
            "{err}"
        );
    }

    #[test]
    fn fake_env_is_isolated() {
        let env = Env::from_pairs([("A", "1")]);
        assert_eq!(env.get("A").as_deref(), Some("1"));
        assert_eq!(env.get("PATH"), None);
    }
}
