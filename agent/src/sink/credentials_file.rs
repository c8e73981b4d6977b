//! The AWS shared-credentials file output (`~/.aws/credentials` format).

use std::path::PathBuf;

use anyhow::{Context, bail};
use imds_client::RoleCredentials;

use super::atomic::{FileOptions, update_file};
use super::ini::replace_section;
use crate::sink::Sink;

/// Keeps one profile of a shared-credentials file current; the rest of the
/// file is left as its owner wrote it.
#[derive(Debug)]
pub struct CredentialsFileSink {
    path: PathBuf,
    profile: String,
    options: FileOptions,
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
            path,
            profile,
            options,
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
        update_file(&self.path, &self.options, |old| {
            // Thin adaptation until update_file passes bytes.
            let new = replace_section(old.unwrap_or("").as_bytes(), &self.profile, Some(&body))?;
            Ok(Some(String::from_utf8(new)?))
        })
        .with_context(|| format!("writing credentials to {}", self.path.display()))?;
        Ok(())
    }

    fn withdraw(&self) -> anyhow::Result<()> {
        update_file(&self.path, &self.options, |old| {
            // Thin adaptation until update_file passes bytes.
            let Some(old) = old else { return Ok(None) };
            let rest = String::from_utf8(replace_section(old.as_bytes(), &self.profile, None)?)?;
            Ok((!rest.trim().is_empty()).then_some(rest))
        })
        .with_context(|| format!("removing credentials from {}", self.path.display()))?;
        Ok(())
    }
}
