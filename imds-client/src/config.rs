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

use std::collections::HashMap;
use std::sync::Arc;

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
}

/// The keys of one profile of the shared config file.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProfileKeys(HashMap<String, String>);

impl ProfileKeys {
    /// Reads the profile `AWS_PROFILE` (else `default`) from `AWS_CONFIG_FILE`
    /// (else `$HOME/.aws/config`). A missing file is an empty profile.
    pub(crate) fn load(env: &Env) -> Self {
        let path = env
            .get("AWS_CONFIG_FILE")
            .or_else(|| env.get("HOME").map(|home| format!("{home}/.aws/config")));
        let profile = env.get("AWS_PROFILE").unwrap_or_else(|| "default".into());
        match path.and_then(|p| std::fs::read_to_string(p).ok()) {
            Some(text) => Self::parse(&text, &profile),
            None => Self::default(),
        }
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
