//! Where the container document's `RoleArn` gets its partition and account.
//!
//! IMDS names the role (`security-credentials/`) but not its ARN, and the
//! ARN's partition differs by region group: `aws`, `aws-cn`, `aws-us-gov`
//! and the isolated ones. `iam/info`'s `InstanceProfileArn` carries both the
//! partition and the account, and an instance profile, like the role in it,
//! always lives in the instance's own account and partition, so they hold
//! for every role the instance will ever have.
//!
//! [`follow`] reads `iam/info` until one read succeeds (at start, then at
//! each change the provider reports, since a read fails while no role is
//! attached), and never again: a replaced role keeps the instance's
//! partition and account. It runs in a task of the container endpoint's
//! own: the daemon loop never waits for it, and the provider stays the only
//! thing asking IMDS for credentials. Until a read succeeds `RoleArn` is
//! left out rather than guessed.

use imds_client::{ErrorKind, ImdsClient, ProviderState};
use tokio::sync::watch;

/// The partition and account of the instance's profile, from
/// `arn:PARTITION:iam::ACCOUNT:instance-profile/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceProfile {
    partition: String,
    account: String,
}

impl InstanceProfile {
    /// Parses an instance-profile ARN; `None` unless it is one, with a
    /// partition of lowercase letters, digits and `-` and a 12-digit account.
    pub fn from_arn(arn: &str) -> Option<Self> {
        let mut parts = arn.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let partition_ok = !partition.is_empty()
            && partition.len() <= 32
            && partition
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
        (partition_ok && account_ok && resource.starts_with("instance-profile/")).then(|| Self {
            partition: partition.to_owned(),
            account: account.to_owned(),
        })
    }

    /// Parses the `iam/info` document: its `InstanceProfileArn`, when its
    /// `Code` is `Success`.
    pub fn from_iam_info(document: &str) -> Option<Self> {
        let doc: serde_json::Value = serde_json::from_str(document).ok()?;
        if doc.get("Code").is_some_and(|c| c != "Success") {
            return None;
        }
        Self::from_arn(doc.get("InstanceProfileArn")?.as_str()?)
    }

    /// The ARN of `role` in this partition and account. IMDS gives the
    /// role's name only, so a role created under a path is named without it.
    pub fn role_arn(&self, role: &str) -> String {
        format!("arn:{}:iam::{}:role/{role}", self.partition, self.account)
    }

    /// The partition, such as `aws` or `aws-cn`.
    pub fn partition(&self) -> &str {
        &self.partition
    }

    /// The 12-digit account id.
    pub fn account(&self) -> &str {
        &self.account
    }
}

/// Reads `iam/info` until a read succeeds: at start, then at each change the
/// provider reports (a read fails while no role is attached, or while IMDS
/// is down), publishing what it learns in `known`. Returns once it knows,
/// or when the provider is gone.
pub(crate) async fn follow(
    imds: ImdsClient,
    mut state: watch::Receiver<ProviderState>,
    known: watch::Sender<Option<InstanceProfile>>,
) {
    loop {
        state.borrow_and_update();
        match imds.iam_info().await {
            Ok(document) => match InstanceProfile::from_iam_info(&document) {
                Some(profile) => {
                    tracing::info!(
                        partition = profile.partition(),
                        account = profile.account(),
                        "instance profile read from iam/info: the container endpoint names the role's ARN"
                    );
                    known.send_replace(Some(profile));
                    return;
                }
                None => tracing::warn!(
                    "iam/info has no usable InstanceProfileArn: the container endpoint leaves RoleArn out"
                ),
            },
            Err(e) if matches!(e.kind(), ErrorKind::NoRoleAttached) => {}
            Err(e) => tracing::debug!(
                cause = %e,
                "reading iam/info failed; RoleArn waits for the next read"
            ),
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_and_account_come_from_the_instance_profile_arn() {
        let p = InstanceProfile::from_arn("arn:aws-cn:iam::123456789012:instance-profile/x")
            .expect("a valid instance-profile ARN");
        assert_eq!(
            p.role_arn("app"),
            "arn:aws-cn:iam::123456789012:role/app",
            "partition and account from the ARN"
        );
        let gov = InstanceProfile::from_arn(
            "arn:aws-us-gov:iam::210987654321:instance-profile/path/to/profile",
        )
        .unwrap();
        assert_eq!(gov.role_arn("r"), "arn:aws-us-gov:iam::210987654321:role/r");
    }

    #[test]
    fn anything_but_an_instance_profile_arn_is_refused() {
        for bad in [
            "",
            "arn:aws:iam::123456789012:role/x",
            "arn:aws:iam::12345678901:instance-profile/x",
            "arn:aws:iam::1234567890123:instance-profile/x",
            "arn:aws:iam:us-east-1:123456789012:instance-profile/x",
            "arn:AWS:iam::123456789012:instance-profile/x",
            "arn::iam::123456789012:instance-profile/x",
            "arn:aws:sts::123456789012:instance-profile/x",
            "arn:a/b:iam::123456789012:instance-profile/x",
        ] {
            assert_eq!(InstanceProfile::from_arn(bad), None, "accepted {bad:?}");
        }
    }

    #[test]
    fn the_iam_info_document_is_read_only_when_successful() {
        let ok = r#"{"Code":"Success","LastUpdated":"2026-11-28T00:00:00Z",
            "InstanceProfileArn":"arn:aws-iso:iam::123456789012:instance-profile/p",
            "InstanceProfileId":"AIPAEXAMPLE"}"#;
        assert_eq!(
            InstanceProfile::from_iam_info(ok).map(|p| p.role_arn("r")),
            Some("arn:aws-iso:iam::123456789012:role/r".to_owned())
        );
        let failed = r#"{"Code":"Failure","InstanceProfileArn":"arn:aws:iam::123456789012:instance-profile/p"}"#;
        assert_eq!(InstanceProfile::from_iam_info(failed), None);
        assert_eq!(InstanceProfile::from_iam_info("<html>"), None);
    }
}
