//! Role credentials: the type, and the IMDS JSON it is parsed from.
//!
//! IMDS answers `GET /latest/meta-data/iam/security-credentials/ROLE` with a
//! JSON document (`Code`, `LastUpdated`, `Type`, `AccessKeyId`,
//! `SecretAccessKey`, `Token`, `Expiration`, and on the extended path
//! `AccountId`). See the EC2 user guide, "Retrieve security credentials from
//! instance metadata". [`Credentials::from_imds_json`] turns that into a
//! [`Credentials`] or a typed [`Error`]; it never panics and never puts any part
//! of the document into the error, since the document holds secrets.

use std::fmt;
use std::sync::Arc;
#[cfg(test)]
use std::sync::Weak;
use std::time::SystemTime;

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{Error, ErrorKind};
use crate::secret::SecretString;

/// Temporary role credentials from IMDS.
///
/// `Debug` and `Display` show the access key id and expiry, never the secret
/// access key or the session token; both secrets are zeroed when the last
/// clone is dropped. Cloning is cheap (one shared, immutable value): a cached
/// call hands out a clone without copying any secret.
#[derive(Clone)]
pub struct Credentials {
    parts: Arc<Parts>,
}

/// [`Credentials`] that are not kept alive by this handle: once the last
/// clone is dropped the secrets are zeroed, and [`WeakCredentials::upgrade`]
/// answers `None`.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct WeakCredentials(Weak<Parts>);

#[cfg(test)]
impl WeakCredentials {
    /// The credentials, if a clone still holds them.
    #[inline]
    pub(crate) fn upgrade(&self) -> Option<Credentials> {
        self.0.upgrade().map(|parts| Credentials { parts })
    }
}

#[derive(Clone, PartialEq, Eq)]
struct Parts {
    access_key_id: String,
    secret_access_key: SecretString,
    session_token: SecretString,
    expiration: SystemTime,
    last_updated: Option<SystemTime>,
    account_id: Option<String>,
}

impl PartialEq for Credentials {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.parts, &other.parts) || self.parts == other.parts
    }
}

impl Eq for Credentials {}

impl Credentials {
    /// Builds credentials from their parts (for tests, and for credentials
    /// obtained elsewhere).
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: impl Into<String>,
        expiration: SystemTime,
    ) -> Self {
        Self {
            parts: Arc::new(Parts {
                access_key_id: access_key_id.into(),
                secret_access_key: SecretString::new(secret_access_key),
                session_token: SecretString::new(session_token),
                expiration,
                last_updated: None,
                account_id: None,
            }),
        }
    }

    /// Sets the account id (known from the extended credentials path).
    pub fn with_account_id(mut self, account_id: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.parts).account_id = Some(account_id.into());
        self
    }

    /// Sets when IMDS says these credentials were issued.
    pub fn with_last_updated(mut self, last_updated: SystemTime) -> Self {
        Arc::make_mut(&mut self.parts).last_updated = Some(last_updated);
        self
    }

    /// Parses the IMDS credentials document.
    ///
    /// A `Code` other than `Success` becomes [`ErrorKind::CredentialsUnavailable`];
    /// invalid JSON, a missing or empty field, or an unparseable time becomes
    /// [`ErrorKind::MalformedResponse`].
    pub fn from_imds_json(body: &[u8]) -> Result<Self, Error> {
        let doc: ImdsCredentialsDocument = serde_json::from_slice(body).map_err(|e| {
            // serde_json's own message can quote the offending value, which may
            // be a secret: keep only its category and position.
            malformed(format!(
                "credentials document is not valid JSON ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        let code = doc.code.unwrap_or_default();
        if code != "Success" {
            return Err(Error::new(ErrorKind::CredentialsUnavailable {
                code: if code.is_empty() {
                    "<missing>".into()
                } else {
                    code
                },
                message: doc.message.unwrap_or_default(),
            }));
        }
        // What IMDS hands out ends up in INI files and HTTP headers: refuse
        // anything an AWS key could not contain (a newline would inject lines
        // into a credentials file) rather than pass it on.
        let access_key_id = required(doc.access_key_id, "AccessKeyId")?;
        plausible(&access_key_id, "AccessKeyId", 16..=128, |c| {
            c.is_ascii_alphanumeric()
        })?;
        let secret_access_key = required(doc.secret_access_key, "SecretAccessKey")?;
        plausible(&secret_access_key, "SecretAccessKey", 16..=1024, |c| {
            c.is_ascii_graphic()
        })?;
        let session_token = required(doc.token, "Token")?;
        plausible(&session_token, "Token", 16..=MAX_TOKEN_LEN, |c| {
            c.is_ascii_graphic()
        })?;
        let expiration = parse_rfc3339(&required(doc.expiration, "Expiration")?)
            .ok_or_else(|| malformed("Expiration is not an RFC 3339 time"))?;
        let mut credentials =
            Self::new(access_key_id, secret_access_key, session_token, expiration);
        let parts = Arc::make_mut(&mut credentials.parts);
        parts.last_updated = doc.last_updated.as_deref().and_then(parse_rfc3339);
        parts.account_id = doc.account_id.filter(|id| {
            !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_digit())
        });
        Ok(credentials)
    }

    /// A handle that does not keep the secrets alive: it gives the
    /// credentials back only while some clone still holds them.
    #[cfg(test)]
    pub(crate) fn downgrade(&self) -> WeakCredentials {
        WeakCredentials(Arc::downgrade(&self.parts))
    }

    /// A copy with its own reference count (the secrets copied once), so
    /// that threads cloning different copies never write the same count.
    pub(crate) fn separate_copy(&self) -> Self {
        Self {
            parts: Arc::new((*self.parts).clone()),
        }
    }

    /// The access key id (not secret: it names the key, like a user name).
    pub fn access_key_id(&self) -> &str {
        &self.parts.access_key_id
    }

    /// The secret access key. Each caller is a place the secret leaves this type.
    pub fn secret_access_key(&self) -> &str {
        self.parts.secret_access_key.expose()
    }

    /// The session token. Each caller is a place the secret leaves this type.
    pub fn session_token(&self) -> &str {
        self.parts.session_token.expose()
    }

    /// When the credentials expire, as IMDS reported it.
    pub fn expiration(&self) -> SystemTime {
        self.parts.expiration
    }

    /// The expiry as an RFC 3339 UTC string (`2026-11-28T18:00:00Z`).
    pub fn expiration_rfc3339(&self) -> String {
        format_rfc3339(self.parts.expiration)
    }

    /// When IMDS says the credentials were issued, if it said.
    pub fn last_updated(&self) -> Option<SystemTime> {
        self.parts.last_updated
    }

    /// The AWS account id, when IMDS served the extended document.
    pub fn account_id(&self) -> Option<&str> {
        self.parts.account_id.as_deref()
    }

    /// Converts to the AWS SDK for Rust's credentials type, naming
    /// `provider_name` as their source.
    pub fn to_aws_credentials(
        &self,
        provider_name: &'static str,
    ) -> aws_credential_types::Credentials {
        let mut builder = aws_credential_types::Credentials::builder()
            .access_key_id(self.parts.access_key_id.clone())
            .secret_access_key(self.parts.secret_access_key.expose())
            .session_token(self.parts.session_token.expose())
            .expiry(self.parts.expiration)
            .provider_name(provider_name);
        if let Some(account_id) = &self.parts.account_id {
            builder = builder.account_id(account_id.as_str());
        }
        builder.build()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.parts.access_key_id)
            .field("secret_access_key", &self.parts.secret_access_key)
            .field("session_token", &self.parts.session_token)
            .field("expiration", &self.expiration_rfc3339())
            .field("account_id", &self.parts.account_id)
            .finish()
    }
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "credentials {} (expire {})",
            self.parts.access_key_id,
            self.expiration_rfc3339()
        )
    }
}

/// The IMDS credentials document, every field optional so that a missing one
/// is our typed error rather than serde's (which could quote a secret).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ImdsCredentialsDocument {
    code: Option<String>,
    message: Option<String>,
    last_updated: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    token: Option<String>,
    expiration: Option<String>,
    account_id: Option<String>,
}

fn required(value: Option<String>, field: &str) -> Result<String, Error> {
    match value {
        Some(v) if !v.trim().is_empty() => Ok(v),
        Some(_) => Err(malformed(format!("{field} is empty"))),
        None => Err(malformed(format!("{field} is missing"))),
    }
}

/// The longest session token accepted (real ones are 1-2 KB).
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Checks a field's length and characters; the error names the field and
/// the rule, never the value (it may be a secret).
fn plausible(
    value: &str,
    field: &str,
    length: std::ops::RangeInclusive<usize>,
    allowed: impl Fn(char) -> bool,
) -> Result<(), Error> {
    if !length.contains(&value.len()) {
        return Err(malformed(format!(
            "{field} is {} characters long; expected {} to {}",
            value.len(),
            length.start(),
            length.end()
        )));
    }
    if !value.chars().all(allowed) {
        return Err(malformed(format!(
            "{field} has characters an AWS credential never has (whitespace, control or non-ASCII)"
        )));
    }
    Ok(())
}

fn malformed(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::MalformedResponse { what: what.into() })
}

/// Parses an RFC 3339 time (`2026-11-28T18:00:00Z`).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// Formats a time as RFC 3339 in UTC, whole seconds (`2026-11-28T18:00:00Z`).
pub fn format_rfc3339(at: SystemTime) -> String {
    let at = OffsetDateTime::from(at);
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&Rfc3339)
        .unwrap_or_else(|_| String::from("<unrepresentable time>"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY";
    const TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLETOKENxyz";

    fn doc(code: &str) -> String {
        format!(
            r#"{{"Code":"{code}","LastUpdated":"2026-11-28T12:00:00Z","Type":"AWS-HMAC",
               "AccessKeyId":"ASIAEXAMPLE123456789","SecretAccessKey":"{SECRET}",
               "Token":"{TOKEN}","Expiration":"2026-11-28T18:00:00Z","AccountId":"123456789012"}}"#
        )
    }

    #[test]
    fn parses_a_success_document() {
        let creds = Credentials::from_imds_json(doc("Success").as_bytes()).unwrap();
        assert_eq!(creds.access_key_id(), "ASIAEXAMPLE123456789");
        assert_eq!(creds.secret_access_key(), SECRET);
        assert_eq!(creds.session_token(), TOKEN);
        assert_eq!(creds.account_id(), Some("123456789012"));
        assert_eq!(creds.expiration_rfc3339(), "2026-11-28T18:00:00Z");
        assert_eq!(
            creds
                .expiration()
                .duration_since(creds.last_updated().unwrap())
                .unwrap(),
            Duration::from_secs(6 * 3600)
        );
    }

    #[test]
    fn debug_and_display_hide_secrets() {
        let creds = Credentials::from_imds_json(doc("Success").as_bytes()).unwrap();
        for shown in [
            format!("{creds:?}"),
            format!("{creds:#?}"),
            creds.to_string(),
        ] {
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(!shown.contains(TOKEN), "{shown}");
            assert!(shown.contains("ASIAEXAMPLE123456789"), "{shown}");
        }
    }

    #[test]
    fn a_failure_code_is_a_typed_error() {
        let err = Credentials::from_imds_json(
            br#"{"Code":"AssumeRoleUnauthorizedAccess","Message":"EC2 cannot assume the role"}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.kind(),
            &ErrorKind::CredentialsUnavailable {
                code: "AssumeRoleUnauthorizedAccess".into(),
                message: "EC2 cannot assume the role".into()
            }
        );
    }

    #[test]
    fn malformed_documents_are_typed_errors_without_secrets() {
        let truncated = &doc("Success")[..120];
        let cases: Vec<Vec<u8>> = vec![
            truncated.as_bytes().to_vec(),
            b"not json".to_vec(),
            format!(r#"{{"Code":"Success","AccessKeyId":"A","SecretAccessKey":"{SECRET}"}}"#).into_bytes(),
            format!(r#"{{"Code":"Success","AccessKeyId":"A","SecretAccessKey":"{SECRET}","Token":"{TOKEN}","Expiration":"tomorrow"}}"#).into_bytes(),
            format!(r#"{{"Code":"Success","AccessKeyId":"","SecretAccessKey":"{SECRET}","Token":"{TOKEN}","Expiration":"2026-11-28T18:00:00Z"}}"#).into_bytes(),
            format!(r#"{{"Code":"Success","AccessKeyId":7,"SecretAccessKey":"{SECRET}"}}"#).into_bytes(),
            format!(r#"{{"Code":"Success","AccessKeyId":"{SECRET}","SecretAccessKey":["{SECRET}"]}}"#).into_bytes(),
        ];
        for body in cases {
            let err = Credentials::from_imds_json(&body).unwrap_err();
            assert!(
                matches!(err.kind(), ErrorKind::MalformedResponse { .. }),
                "{err:?}"
            );
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains(SECRET) && !shown.contains(TOKEN), "{shown}");
        }
    }

    #[test]
    fn values_no_aws_credential_has_are_refused_without_being_quoted() {
        let with = |key: &str, secret: &str, token: &str| {
            serde_json::json!({
                "Code": "Success",
                "AccessKeyId": key,
                "SecretAccessKey": secret,
                "Token": token,
                "Expiration": "2026-11-28T18:00:00Z",
            })
            .to_string()
        };
        let injected = format!("{TOKEN}\n[evil]\ncredential_process = /bin/sh");
        let cases = [
            with("ASIAEXAMPLE123456789", SECRET, &injected),
            with("ASIAEXAMPLE123456789", &format!("{SECRET} x"), TOKEN),
            with("ASIAEXAMPLE12345678\u{e9}", SECRET, TOKEN),
            with("ASIA\nEXAMPLE123456789", SECRET, TOKEN),
            with("ASIA", SECRET, TOKEN),
            with("ASIAEXAMPLE123456789", SECRET, &"t".repeat(20_000)),
        ];
        for body in cases {
            let err = Credentials::from_imds_json(body.as_bytes()).unwrap_err();
            assert!(
                matches!(err.kind(), ErrorKind::MalformedResponse { .. }),
                "{err:?}"
            );
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains(SECRET) && !shown.contains(TOKEN), "{shown}");
        }
    }

    #[test]
    fn converts_to_sdk_credentials() {
        let creds = Credentials::from_imds_json(doc("Success").as_bytes()).unwrap();
        let sdk = creds.to_aws_credentials("imds-client");
        assert_eq!(sdk.access_key_id(), "ASIAEXAMPLE123456789");
        assert_eq!(sdk.secret_access_key(), SECRET);
        assert_eq!(sdk.session_token(), Some(TOKEN));
        assert_eq!(sdk.expiry(), Some(creds.expiration()));
        assert_eq!(sdk.account_id().map(|a| a.as_str()), Some("123456789012"));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever IMDS sends, parsing returns a value or a typed error.
        #[test]
        fn parsing_never_panics_on_any_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Credentials::from_imds_json(&body);
        }

        #[test]
        fn parsing_never_panics_on_json_shaped_input(
            code in prop_oneof![Just("Success".to_owned()), "[A-Za-z]{0,12}"],
            key in "[ -~]{0,24}",
            secret in "[ -~\n]{0,48}",
            expiration in prop_oneof![Just("2026-11-28T18:00:00Z".to_owned()), "[ -~]{0,24}"],
            drop_field in 0usize..6,
        ) {
            let mut fields = vec![
                format!("\"Code\":{}", serde_json::to_string(&code).unwrap()),
                format!("\"AccessKeyId\":{}", serde_json::to_string(&key).unwrap()),
                format!("\"SecretAccessKey\":{}", serde_json::to_string(&secret).unwrap()),
                format!("\"Token\":{}", serde_json::to_string(&secret).unwrap()),
                format!("\"Expiration\":{}", serde_json::to_string(&expiration).unwrap()),
            ];
            if drop_field < fields.len() { fields.remove(drop_field); }
            let body = format!("{{{}}}", fields.join(","));
            match Credentials::from_imds_json(body.as_bytes()) {
                // Whatever is accepted is safe to write into an INI line.
                Ok(c) => {
                    for field in [c.access_key_id(), c.secret_access_key(), c.session_token()] {
                        prop_assert!(!field.is_empty());
                        prop_assert!(field.chars().all(|ch| ch.is_ascii_graphic()));
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
