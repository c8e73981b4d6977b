//! The JSON documents the agent hands out.
//!
//! Two shapes, both read by every AWS SDK:
//! - the `credential_process` document (`Version: 1`), used by `GET /credentials`
//!   on the Unix socket, the `--json-file` output and `imds-agent credential-process`,
//!   with `AccountId` when IMDS's extended credentials document gives it
//!   (botocore and the AWS SDK for Rust read it);
//! - the container-credentials document (`AccessKeyId`, `SecretAccessKey`,
//!   `Token`, `Expiration`, and `RoleArn`, `AccountId` when known), served on
//!   the container endpoint.
//!
//! These functions are the only places the agent serialises secrets.

use imds_client::RoleCredentials;
use serde::Serialize;

use crate::container::InstanceProfile;

/// The `credential_process` output document (AWS CLI / SDK "sourcing
/// credentials with an external process").
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialProcessDocument<'a> {
    version: u8,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    session_token: &'a str,
    expiration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
}

/// The container-credentials endpoint document.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerCredentialsDocument<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
}

/// Renders `current` as a `credential_process` JSON document (`Version` 1).
pub fn credential_process_json(current: &RoleCredentials) -> String {
    let creds = &current.credentials;
    let doc = CredentialProcessDocument {
        version: 1,
        access_key_id: creds.access_key_id(),
        secret_access_key: creds.secret_access_key(),
        session_token: creds.session_token(),
        expiration: creds.expiration_rfc3339(),
        account_id: creds.account_id(),
    };
    serde_json::to_string_pretty(&doc).expect("a struct of strings always serialises")
}

/// Renders `current` as a container-credentials JSON document. `RoleArn`
/// needs the partition and account of the instance's `profile` (read from
/// `iam/info`) and is left out without it; `AccountId` comes from the
/// credentials (IMDS's extended document), else from the profile.
pub fn container_credentials_json(
    current: &RoleCredentials,
    profile: Option<&InstanceProfile>,
) -> String {
    let creds = &current.credentials;
    let doc = ContainerCredentialsDocument {
        access_key_id: creds.access_key_id(),
        secret_access_key: creds.secret_access_key(),
        token: creds.session_token(),
        expiration: creds.expiration_rfc3339(),
        role_arn: profile.map(|p| p.role_arn(&current.role)),
        account_id: creds
            .account_id()
            .or_else(|| profile.map(InstanceProfile::account)),
    };
    serde_json::to_string_pretty(&doc).expect("a struct of strings always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use imds_client::Credentials;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn sample() -> RoleCredentials {
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        RoleCredentials {
            role: "app-role".into(),
            credentials: Arc::new(
                Credentials::new(
                    "ASIAEXAMPLEEXAMPLE12",
                    "secret/key",
                    "session-token",
                    expiry,
                )
                .with_account_id("123456789012"),
            ),
        }
    }

    fn without_account(mut current: RoleCredentials) -> RoleCredentials {
        let c = &current.credentials;
        current.credentials = Arc::new(Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            c.session_token(),
            c.expiration(),
        ));
        current
    }

    #[test]
    fn credential_process_document_has_version_1_and_all_fields() {
        let doc: serde_json::Value =
            serde_json::from_str(&credential_process_json(&sample())).unwrap();
        assert_eq!(doc["Version"], 1);
        assert_eq!(doc["AccessKeyId"], "ASIAEXAMPLEEXAMPLE12");
        assert_eq!(doc["SecretAccessKey"], "secret/key");
        assert_eq!(doc["SessionToken"], "session-token");
        assert_eq!(doc["Expiration"], "2026-11-18T11:06:40Z");
        assert_eq!(doc["AccountId"], "123456789012");
    }

    #[test]
    fn credential_process_document_leaves_an_unknown_account_out() {
        let doc: serde_json::Value =
            serde_json::from_str(&credential_process_json(&without_account(sample()))).unwrap();
        assert_eq!(doc.get("AccountId"), None, "expected no AccountId in {doc}");
    }

    #[test]
    fn container_document_names_the_role_arn_in_the_instance_partition() {
        let profile =
            InstanceProfile::from_arn("arn:aws-cn:iam::210987654321:instance-profile/p").unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&container_credentials_json(&sample(), Some(&profile))).unwrap();
        assert_eq!(doc["Token"], "session-token");
        assert_eq!(doc["RoleArn"], "arn:aws-cn:iam::210987654321:role/app-role");
        // The credentials' own account wins (they are the same on EC2).
        assert_eq!(doc["AccountId"], "123456789012");

        let doc: serde_json::Value = serde_json::from_str(&container_credentials_json(
            &without_account(sample()),
            Some(&profile),
        ))
        .unwrap();
        assert_eq!(doc["AccountId"], "210987654321");
    }

    #[test]
    fn container_document_leaves_the_role_arn_out_without_the_instance_profile() {
        let doc: serde_json::Value =
            serde_json::from_str(&container_credentials_json(&sample(), None)).unwrap();
        assert_eq!(doc.get("RoleArn"), None, "expected no RoleArn in {doc}");
        assert_eq!(doc["AccountId"], "123456789012");
        let doc: serde_json::Value = serde_json::from_str(&container_credentials_json(
            &without_account(sample()),
            None,
        ))
        .unwrap();
        assert_eq!(doc.get("RoleArn"), None, "expected no RoleArn in {doc}");
        assert_eq!(doc.get("AccountId"), None, "expected no AccountId in {doc}");
    }
}
