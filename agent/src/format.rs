//! The JSON documents the agent hands out.
//!
//! Two shapes, both read by every AWS SDK:
//! - the `credential_process` document (`Version: 1`), used by `GET /credentials`
//!   on the Unix socket, the `--json-file` output and `imds-agent credential-process`;
//! - the container-credentials document (`AccessKeyId`, `SecretAccessKey`,
//!   `Token`, `Expiration`), served on the container endpoint.
//!
//! These functions are the only places the agent serialises secrets.

use imds_client::RoleCredentials;
use serde::Serialize;

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

/// Renders `current` as a container-credentials JSON document, with the role
/// ARN when the account id is known.
pub fn container_credentials_json(current: &RoleCredentials) -> String {
    let creds = &current.credentials;
    let doc = ContainerCredentialsDocument {
        access_key_id: creds.access_key_id(),
        secret_access_key: creds.secret_access_key(),
        token: creds.session_token(),
        expiration: creds.expiration_rfc3339(),
        role_arn: creds
            .account_id()
            .map(|account| format!("arn:aws:iam::{account}:role/{}", current.role)),
        account_id: creds.account_id(),
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

    #[test]
    fn credential_process_document_has_version_1_and_all_fields() {
        let doc: serde_json::Value =
            serde_json::from_str(&credential_process_json(&sample())).unwrap();
        assert_eq!(doc["Version"], 1);
        assert_eq!(doc["AccessKeyId"], "ASIAEXAMPLEEXAMPLE12");
        assert_eq!(doc["SecretAccessKey"], "secret/key");
        assert_eq!(doc["SessionToken"], "session-token");
        assert_eq!(doc["Expiration"], "2026-11-18T11:06:40Z");
    }

    #[test]
    fn container_document_names_the_role_arn() {
        let doc: serde_json::Value =
            serde_json::from_str(&container_credentials_json(&sample())).unwrap();
        assert_eq!(doc["Token"], "session-token");
        assert_eq!(doc["RoleArn"], "arn:aws:iam::123456789012:role/app-role");
    }
}
