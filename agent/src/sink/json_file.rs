//! The `credential_process` JSON file output.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use imds_client::RoleCredentials;

use super::atomic::{FileOptions, Output};
use super::credentials_file::check_complete;
use crate::format::credential_process_json;
use crate::sink::Sink;

/// Keeps a JSON file in the `credential_process` format current.
#[derive(Debug)]
pub struct JsonFileSink {
    output: Output,
}

impl JsonFileSink {
    /// A sink writing to `path`.
    pub fn new(path: PathBuf, options: FileOptions) -> anyhow::Result<Self> {
        Ok(Self {
            output: Output::new(path, options)?,
        })
    }
}

impl Sink for JsonFileSink {
    fn name(&self) -> &str {
        "json-file"
    }

    fn prepare(&self, started: SystemTime) -> anyhow::Result<()> {
        self.output
            .remove_stale_temp_files(started)
            .with_context(|| format!("preparing {}", self.output.path().display()))?;
        Ok(())
    }

    fn publish(&self, current: &RoleCredentials) -> anyhow::Result<()> {
        check_complete(current)?;
        let json = credential_process_json(current) + "\n";
        self.output
            .publish(|_| Ok(Some(json.into_bytes())))
            .with_context(|| format!("writing credentials to {}", self.output.path().display()))?;
        Ok(())
    }

    /// Removes the file, if it is the one this sink wrote.
    fn withdraw(&self) -> anyhow::Result<()> {
        self.output
            .withdraw(|_| Ok(None))
            .with_context(|| format!("removing {}", self.output.path().display()))?;
        Ok(())
    }
}
