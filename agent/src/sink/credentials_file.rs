//! The AWS shared-credentials file output (`~/.aws/credentials` format).
//!
//! Our profile holds the three keys, and `aws_account_id` when IMDS names
//! the account (its extended credentials document), as botocore and the
//! AWS SDK for Rust read it.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, bail};
use imds_client::RoleCredentials;

use super::atomic::{FileOptions, Output};
use super::ini::replace_section;
use crate::sink::Sink;

/// Keeps one profile of a shared-credentials file current; the rest of the
/// file is left as its owner wrote it.
#[derive(Debug)]
pub struct CredentialsFileSink {
    output: Output,
    profile: String,
}

impl CredentialsFileSink {
    /// A sink for `profile` in the file at `path`.
    pub fn new(path: PathBuf, profile: String, options: FileOptions) -> anyhow::Result<Self> {
        // `#` and `;` start a comment in the SDKs' parsers, which would cut
        // the header short; brackets and control characters break it.
        if profile.trim().is_empty()
            || profile.contains(['[', ']', '#', ';'])
            || profile.chars().any(char::is_control)
            || profile != profile.trim()
        {
            bail!("invalid profile name {profile:?}: use letters, digits, '-' or '_'");
        }
        Ok(Self {
            output: Output::shared(path, options)?,
            profile,
        })
    }
}

/// Refuses credentials with an empty field: an output never gets empty values.
pub(crate) fn check_complete(current: &RoleCredentials) -> anyhow::Result<()> {
    let c = &current.credentials;
    if c.access_key_id().is_empty()
        || c.secret_access_key().is_empty()
        || c.session_token().is_empty()
    {
        bail!(
            "refusing to publish incomplete credentials for role {}",
            current.role
        );
    }
    Ok(())
}

impl Sink for CredentialsFileSink {
    fn name(&self) -> &str {
        "credentials-file"
    }

    fn prepare(&self, started: SystemTime) -> anyhow::Result<()> {
        self.output
            .remove_stale_temp_files(started)
            .with_context(|| format!("preparing {}", self.output.path().display()))?;
        Ok(())
    }

    fn publish(&self, current: &RoleCredentials) -> anyhow::Result<()> {
        check_complete(current)?;
        let c = &current.credentials;
        let mut body = format!(
            "# managed by imds-agent: role {}, expires {}\n\
             aws_access_key_id = {}\n\
             aws_secret_access_key = {}\n\
             aws_session_token = {}\n",
            current.role,
            c.expiration_rfc3339(),
            c.access_key_id(),
            c.secret_access_key(),
            c.session_token()
        );
        // botocore and the AWS SDK for Rust read the account from here
        // (account-based endpoints); IMDS gives it on the extended path.
        if let Some(account) = c.account_id() {
            body.push_str(&format!("aws_account_id = {account}\n"));
        }
        self.output
            .publish(|old| {
                replace_section(old.unwrap_or_default(), &self.profile, Some(&body)).map(Some)
            })
            .with_context(|| format!("writing credentials to {}", self.output.path().display()))?;
        Ok(())
    }

    fn withdraw(&self) -> anyhow::Result<()> {
        self.output
            .withdraw(|old| {
                let Some(old) = old else { return Ok(None) };
                let rest = replace_section(old, &self.profile, None)?;
                // Nothing left but blank lines (and perhaps the BOM another
                // tool wrote): the file held only our profile.
                let left = rest.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&rest);
                Ok((!left.iter().all(u8::is_ascii_whitespace)).then_some(rest))
            })
            .with_context(|| {
                format!("removing credentials from {}", self.output.path().display())
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use imds_client::Credentials;

    use super::*;
    use crate::sink::ini::section_values;

    fn published(account: Option<&str>) -> Vec<(String, String)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        let sink =
            CredentialsFileSink::new(path.clone(), "p".into(), FileOptions::default()).unwrap();
        let mut credentials = Credentials::new(
            "ASIAEXAMPLEEXAMPLE12",
            "secret",
            "token",
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        );
        if let Some(account) = account {
            credentials = credentials.with_account_id(account);
        }
        sink.publish(&RoleCredentials {
            role: "r".into(),
            credentials: Arc::new(credentials),
        })
        .unwrap();
        let text = std::fs::read(&path).unwrap();
        section_values(&text, "p").expect("our profile is in the file")
    }

    #[test]
    fn the_profile_names_the_account_when_imds_gives_it() {
        let values = published(Some("123456789012"));
        assert!(
            values.contains(&("aws_account_id".into(), "123456789012".into())),
            "expected aws_account_id = 123456789012 in {values:?}"
        );
        let values = published(None);
        assert!(
            values.iter().all(|(k, _)| k != "aws_account_id"),
            "expected no aws_account_id in {values:?}"
        );
        assert_eq!(values.len(), 3, "the three keys, got {values:?}");
    }
}
