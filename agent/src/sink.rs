//! Outputs the daemon fans the provider's state out to.
//!
//! A sink never calls IMDS: the daemon hands it the credentials to publish, or
//! tells it to withdraw them when the role is detached. Sinks do blocking file
//! I/O; the daemon calls them from `spawn_blocking`.
//!
//! File sinks reach their files only through checked directory descriptors
//! ([`crate::trust`]), and a withdrawal removes only the file the sink itself
//! wrote (see [`Output`]).

use std::fmt;
use std::time::SystemTime;

use imds_client::RoleCredentials;

/// One output of the agent (a credentials file, a JSON file, ...).
pub trait Sink: Send + Sync + fmt::Debug {
    /// A short name for logs and metrics, for example `credentials-file`.
    fn name(&self) -> &str;

    /// Called once at start, before the first publish: checks what can be
    /// checked early and removes this sink's own temp files left by an
    /// earlier run that was killed (last modified before `started`).
    fn prepare(&self, started: SystemTime) -> anyhow::Result<()> {
        let _ = started;
        Ok(())
    }

    /// Makes `current` the published credentials. Called when they change.
    /// On error nothing already published may be damaged.
    fn publish(&self, current: &RoleCredentials) -> anyhow::Result<()>;

    /// Removes our credentials (the role was detached).
    fn withdraw(&self) -> anyhow::Result<()>;
}

mod atomic;
mod credentials_file;
pub mod ini;
mod json_file;

pub use atomic::{FileOptions, LOCK_WAIT, Outcome, Output, update_file};
pub use credentials_file::CredentialsFileSink;
pub use json_file::JsonFileSink;

#[cfg(test)]
mod tests {
    use super::*;
    use imds_client::Credentials;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn set(n: u32) -> RoleCredentials {
        RoleCredentials {
            role: "r".into(),
            credentials: Arc::new(Credentials::new(
                format!("ASIAKEY{n:013}"),
                format!("secret-{n:033}"),
                format!("token-{n:0200}"),
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + u64::from(n)),
            )),
        }
    }

    #[test]
    fn credentials_file_keeps_other_profiles_and_withdraws_only_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(&path, "# mine\n[dev]\naws_access_key_id = DEV\n").unwrap();
        let sink = CredentialsFileSink::new(path.clone(), "default".into(), FileOptions::default())
            .unwrap();
        sink.publish(&set(1)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# mine\n[dev]\naws_access_key_id = DEV\n"),
            "{text}"
        );
        let ours = ini::section_values(text.as_ref(), "default").unwrap();
        assert_eq!(
            ours[0],
            ("aws_access_key_id".into(), "ASIAKEY0000000000001".into())
        );
        sink.withdraw().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim_end(),
            "# mine\n[dev]\naws_access_key_id = DEV"
        );

        let alone =
            CredentialsFileSink::new(dir.path().join("alone"), "p".into(), FileOptions::default())
                .unwrap();
        alone.publish(&set(2)).unwrap();
        alone.withdraw().unwrap();
        assert!(
            !dir.path().join("alone").exists(),
            "a file holding only our profile is removed"
        );
        alone.withdraw().unwrap();
    }

    #[test]
    fn incomplete_credentials_are_refused_and_the_file_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        let sink = CredentialsFileSink::new(path.clone(), "default".into(), FileOptions::default())
            .unwrap();
        sink.publish(&set(1)).unwrap();
        let before = std::fs::read(&path).unwrap();
        let empty = RoleCredentials {
            role: "r".into(),
            credentials: Arc::new(Credentials::new("ASIAX", "", "t", SystemTime::UNIX_EPOCH)),
        };
        assert!(sink.publish(&empty).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(CredentialsFileSink::new(path, "a]b".into(), FileOptions::default()).is_err());
    }

    #[test]
    fn readers_never_see_a_partial_or_mixed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        let sink = CredentialsFileSink::new(path.clone(), "default".into(), FileOptions::default())
            .unwrap();
        sink.publish(&set(0)).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (path, done) = (path.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut reads = 0;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        let text = std::fs::read_to_string(&path).unwrap();
                        let values =
                            ini::section_values(text.as_ref(), "default").expect("complete file");
                        assert_eq!(values.len(), 3, "{text}");
                        let n = &values[0].1[7..];
                        assert!(
                            values[1].1.ends_with(n) && values[2].1.ends_with(n),
                            "mixed: {text}"
                        );
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for n in 1..=200 {
            sink.publish(&set(n)).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().unwrap() > 0);
        }
    }

    #[test]
    fn json_file_is_the_credential_process_document_and_is_removed_on_withdraw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.json");
        let sink = JsonFileSink::new(path.clone(), FileOptions::default()).unwrap();
        sink.publish(&set(7)).unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(doc["Version"], 1);
        assert_eq!(doc["AccessKeyId"], "ASIAKEY0000000000007");
        sink.withdraw().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn withdrawal_leaves_a_file_this_sink_did_not_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.json");
        std::fs::write(&path, "a file from before a restart").unwrap();
        let sink = JsonFileSink::new(path.clone(), FileOptions::default()).unwrap();
        sink.withdraw().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "a file from before a restart"
        );
        sink.publish(&set(3)).unwrap();
        // Someone puts another file in its place: it is not ours to delete.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's").unwrap();
        sink.withdraw().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's");
    }
}
