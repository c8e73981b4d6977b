//! The `credential_process` JSON file output.

use std::path::PathBuf;

use anyhow::Context;
use imds_client::RoleCredentials;

use super::atomic::{FileOptions, update_file};
use super::credentials_file::check_complete;
use crate::format::credential_process_json;
use crate::sink::Sink;

/// Keeps a JSON file in the `credential_process` format current.
#[derive(Debug)]
pub struct JsonFileSink {
    path: PathBuf,
    options: FileOptions,
}

impl JsonFileSink {
    /// A sink writing to `path`.
    pub fn new(path: PathBuf, options: FileOptions) -> anyhow::Result<Self> {
        Ok(Self { path, options })
    }
}

impl Sink for JsonFileSink {
    fn name(&self) -> &str {
        "json-file"
    }

    fn publish(&self, current: &RoleCredentials) -> anyhow::Result<()> {
        check_complete(current)?;
        let json = credential_process_json(current) + "\n";
        update_file(&self.path, &self.options, |_| Ok(Some(json)))
            .with_context(|| format!("writing credentials to {}", self.path.display()))?;
        Ok(())
    }

    fn withdraw(&self) -> anyhow::Result<()> {
        update_file(&self.path, &self.options, |_| Ok(None))
            .with_context(|| format!("removing {}", self.path.display()))?;
        Ok(())
    }
}
