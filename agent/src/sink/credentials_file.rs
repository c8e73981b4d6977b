//! The AWS shared-credentials file output (`~/.aws/credentials` format).

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, bail};
use imds_client::RoleCredentials;

use super::atomic::{FileOptions, Output};
use crate::sink::Sink;

// --- shim: remove when `ini` works on bytes ---------------------------------
// `ini::replace_section` takes and returns `str` today; the INI-merge work
// makes it `(&[u8], &str, Option<&str>) -> anyhow::Result<Vec<u8>>`, this
// function's signature, so that bytes outside our profile are kept as they
// are. Until then a file that is not UTF-8 is refused (and left untouched).
fn replace_section(existing: &[u8], profile: &str, body: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let text = std::str::from_utf8(existing).map_err(|e| {
        anyhow::anyhow!(
            "the file is not UTF-8 text (invalid byte at offset {}); it was left as it is. \
             Fix: remove the non-UTF-8 bytes, or give the agent a file of its own",
            e.valid_up_to()
        )
    })?;
    Ok(super::ini::replace_section(text, profile, body).into_bytes())
}
// --- end of shim -------------------------------------------------------------

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
        if profile.trim().is_empty()
            || profile.contains(['[', ']', '\n', '\r'])
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
        let body = format!(
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
                Ok((!rest.iter().all(u8::is_ascii_whitespace)).then_some(rest))
            })
            .with_context(|| {
                format!("removing credentials from {}", self.output.path().display())
            })?;
        Ok(())
    }
}
