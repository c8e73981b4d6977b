//! STS `AssumeRole`, signed with the instance role's credentials.
//!
//! The broker gives each local consumer a role session of its own: it calls
//! STS `AssumeRole` with the instance credentials `imds-client` provides,
//! optionally narrowing the session with a session policy, managed policy
//! ARNs, session tags and a source identity. This module is the STS client;
//! caching, single flight and retries belong to the broker, which consumes
//! the [`AssumeRole`] trait.
//!
//! # Why `aws-sigv4` over `reqwest`, not `aws-sdk-sts`
//!
//! - **One HTTP stack.** The agent already speaks HTTP with `reqwest` (and
//!   serves with `hyper`); the SDK brings its own orchestrator, HTTP client,
//!   retry and identity-cache runtime for one operation.
//! - **Control of retries.** The broker owns the retry budget, jittered
//!   backoff on `Throttling` and static stability; the SDK's retry strategy
//!   would retry underneath it. Here one call is one HTTP request.
//! - **Binary size and build time.** `aws-sigv4` is the SDK's own signer, so
//!   the signature is the SDK's; the Query protocol for one action is a form
//!   body out and a small XML document in, parsed with `aws-smithy-xml`, the
//!   crate the SDK itself parses it with.
//!
//! The SDK stays a dev-dependency: the STS emulator's fidelity is checked
//! with it (`imds-client/tests/sts_emulator.rs`).
//!
//! # Endpoint
//!
//! [`StsClientBuilder`] resolves the endpoint in this order:
//! 1. [`StsClientBuilder::endpoint_url`];
//! 2. `AWS_ENDPOINT_URL_STS`, then `AWS_ENDPOINT_URL`, as every AWS SDK does;
//! 3. the regional endpoint `https://sts.{region}.amazonaws.com`, or
//!    `https://sts.{region}.amazonaws.com.cn` for `cn-*` regions (the `aws`,
//!    `aws-us-gov` and `aws-cn` partitions). The isolated partitions
//!    (`us-iso*`, `eu-isoe-*`) have other domains: there an endpoint URL
//!    must be set, and the error says so.
//!
//! and the region: [`StsClientBuilder::region`], then `AWS_REGION`, then
//! [`StsClientBuilder::instance_region`] (what IMDS says). An endpoint URL
//! must be `https://`, or `http://` to a loopback address only (the emulator,
//! a local proxy): a signed request carries the session token, and plain
//! HTTP across a network would expose it. No proxy is used (the
//! `*_PROXY` variables are ignored, as by the AWS SDK for Rust's default
//! client): in a private subnet, reach STS through its VPC interface
//! endpoint, named by `AWS_ENDPOINT_URL_STS` or the regional name. Redirects
//! are not followed.
//!
//! # Limits, checked before any call
//!
//! [`AssumeRoleRequest::check`] refuses, naming the setting and the fix:
//! a role ARN that is not `arn:PARTITION:iam::ACCOUNT:role/NAME`; a session
//! name or source identity outside `[\w+=,.@-]{2,64}`; a duration outside
//! 900..=43200 s, or above 3600 s under role chaining (always the case
//! here: instance-role credentials are a role session, and AWS caps a role
//! assumed with them at one hour); more than 10 policy ARNs; more than 50
//! session tags; a session policy that is not JSON; a packed size over 2048
//! (see [`packed_size`]).
//!
//! # Errors
//!
//! [`StsError::kind`] tells the caller what to do:
//!
//! | kind | from | what to do |
//! |---|---|---|
//! | [`Transient`](StsErrorKind::Transient) | 5xx, `Throttling` and kin, timeouts, connection errors | retry with jittered backoff within the retry budget; keep serving valid sessions |
//! | [`AccessDenied`](StsErrorKind::AccessDenied) | `AccessDenied` | log once with the hint (trust policy, `sts:AssumeRole`, `sts:TagSession`, `sts:SetSourceIdentity`); retry slowly, not hot |
//! | [`CallerCredentials`](StsErrorKind::CallerCredentials) | `InvalidClientTokenId`, `ExpiredToken`, `SignatureDoesNotMatch`, ... | reload the instance credentials from IMDS, then retry once; check the host clock |
//! | [`InvalidConfiguration`](StsErrorKind::InvalidConfiguration) | the checks above, a bad endpoint or region, `ValidationError`, `MalformedPolicyDocument`, `PackedPolicyTooLarge`, `RegionDisabledException` | report; fix the configuration |
//! | [`UnexpectedResponse`](StsErrorKind::UnexpectedResponse) | an answer that is not STS's XML, or an unknown error code | retry slowly |
//!
//! # Secrets
//!
//! Credentials are `imds_client::Credentials` (secrets redacted in `Debug`,
//! zeroed on drop). The response body is read into a zeroed-on-drop buffer.
//! Signed headers are marked sensitive. `aws-sigv4` logs the canonical
//! request, session token included, at trace level, so signing runs with
//! no `tracing` subscriber. Errors carry STS's code and message, never a
//! request or response body.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_xml::decode::{Document, ScopedDecoder, try_data};
use imds_client::config::Env;
use imds_client::credentials::parse_rfc3339;
use imds_client::{Credentials, RoleCredentials, SharedTimeSource};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tracing::debug;
use zeroize::Zeroizing;

/// The shortest session STS grants.
pub const MIN_DURATION: Duration = Duration::from_secs(900);
/// The longest session STS grants (a role's maximum session duration may be
/// lower; STS then refuses with `ValidationError`).
pub const MAX_DURATION: Duration = Duration::from_secs(43_200);
/// The longest session under role chaining: every session assumed with
/// instance-role credentials.
pub const MAX_CHAINED_DURATION: Duration = Duration::from_secs(3_600);
/// The default session length, as STS's.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(3_600);
/// The most managed policy ARNs one `AssumeRole` may carry.
pub const MAX_POLICY_ARNS: usize = 10;
/// The most session tags one `AssumeRole` may carry.
pub const MAX_SESSION_TAGS: usize = 50;
/// The largest [`packed_size`] accepted.
pub const MAX_PACKED_SIZE: usize = 2048;
/// STS's limit on a role session name, in characters.
pub const MAX_SESSION_NAME: usize = 64;
/// The session tag naming the consumer.
pub const TAG_CONSUMER: &str = "imds-agent:consumer";
/// The session tag naming the peer's uid.
pub const TAG_UID: &str = "imds-agent:uid";
/// Default timeout of one STS request, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest STS answer read; STS's are a few KiB.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
const API_VERSION: &str = "2011-06-15";

/// The session name for `consumer` on `instance_id`: `<consumer>@<instance-id>`,
/// with characters STS refuses replaced by `-` and cut to 64 characters.
pub fn session_name(consumer: &str, instance_id: &str) -> String {
    let mut name: String = format!("{consumer}@{instance_id}")
        .chars()
        .map(|c| if is_name_char(c) { c } else { '-' })
        .take(MAX_SESSION_NAME)
        .collect();
    while name.chars().count() < 2 {
        name.push('-');
    }
    name
}

/// The session tags naming a consumer (and the peer's uid, when known).
pub fn consumer_tags(consumer: &str, uid: Option<u32>) -> Vec<SessionTag> {
    let mut tags = vec![SessionTag::new(TAG_CONSUMER, consumer)];
    if let Some(uid) = uid {
        tags.push(SessionTag::new(TAG_UID, uid.to_string()));
    }
    tags
}

/// The packed policy size this client checks, an approximation of STS's
/// (which compresses the session policy, policy ARNs and tags into a form
/// of undocumented size): the policy's length with insignificant whitespace
/// removed, plus each policy ARN's length, plus each tag's key and value
/// lengths. 2048 is STS's documented limit on the plaintext of the session
/// policies. `None` when the policy is not JSON. One rule, shared with the
/// STS emulator ([`imds_client::mock::sts::packed_size`]), so the client
/// refuses exactly what the emulator would.
pub fn packed_size(
    policy: Option<&str>,
    policy_arns: &[String],
    tags: &[SessionTag],
) -> Option<usize> {
    let tags: Vec<(String, String)> = tags
        .iter()
        .map(|t| (t.key.clone(), t.value.clone()))
        .collect();
    imds_client::mock::sts::packed_size(policy, policy_arns, &tags)
}

/// A session tag (`Tags.member.N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTag {
    /// 1 to 128 characters.
    pub key: String,
    /// 0 to 256 characters.
    pub value: String,
}

impl SessionTag {
    /// A tag `key` = `value`.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// What to assume, and how narrowly.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AssumeRoleRequest {
    /// `arn:aws:iam::123456789012:role/billing`.
    pub role_arn: String,
    /// See [`session_name`].
    pub session_name: String,
    /// Whole seconds, 900..=43200 (3600 under role chaining).
    pub duration: Duration,
    /// An inline session policy (JSON).
    pub policy: Option<String>,
    /// Managed session policies, at most 10.
    pub policy_arns: Vec<String>,
    /// Set only when the configuration asks: the role's trust policy must
    /// allow `sts:SetSourceIdentity`.
    pub source_identity: Option<String>,
    /// Set only when the configuration asks: the role's trust policy must
    /// allow `sts:TagSession`. See [`consumer_tags`].
    pub tags: Vec<SessionTag>,
}

impl AssumeRoleRequest {
    /// A request for `role_arn` as `session_name`, one hour, unnarrowed.
    pub fn new(role_arn: impl Into<String>, session_name: impl Into<String>) -> Self {
        Self {
            role_arn: role_arn.into(),
            session_name: session_name.into(),
            duration: DEFAULT_DURATION,
            policy: None,
            policy_arns: Vec::new(),
            source_identity: None,
            tags: Vec::new(),
        }
    }

    /// Sets the session length.
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// Sets the inline session policy.
    pub fn policy(mut self, policy: impl Into<String>) -> Self {
        self.policy = Some(policy.into());
        self
    }

    /// Sets the managed session policy ARNs.
    pub fn policy_arns(mut self, arns: Vec<String>) -> Self {
        self.policy_arns = arns;
        self
    }

    /// Sets the source identity.
    pub fn source_identity(mut self, identity: impl Into<String>) -> Self {
        self.source_identity = Some(identity.into());
        self
    }

    /// Sets the session tags.
    pub fn tags(mut self, tags: Vec<SessionTag>) -> Self {
        self.tags = tags;
        self
    }

    /// Checks STS's limits without calling it. `chained`: the caller's
    /// credentials are a role session (instance-role credentials are), which
    /// caps the duration at one hour. Each refusal is an
    /// [`InvalidConfiguration`](StsErrorKind::InvalidConfiguration) error
    /// naming the setting (`role_arn`, `session_name`, `duration_seconds`,
    /// `session_policy`, `policy_arns`, `source_identity`, `tags`) and the fix.
    pub fn check(&self, chained: bool) -> Result<(), StsError> {
        let refuse = |setting: &str, problem: String| {
            Err(StsError::config(format!(
                "{setting} of the session for {}: {problem}",
                self.role_arn
            )))
        };
        if !is_iam_arn(&self.role_arn, "role/") {
            return Err(StsError::config(format!(
                "role_arn {:?} is not a role ARN: use arn:aws:iam::ACCOUNT_ID:role/NAME",
                self.role_arn
            )));
        }
        if !is_name(&self.session_name) {
            return refuse(
                "session_name",
                format!(
                    "{:?} must be 2 to 64 characters from letters, digits and _+=,.@-",
                    self.session_name
                ),
            );
        }
        let secs = self.duration.as_secs();
        if self.duration.subsec_nanos() != 0
            || !(MIN_DURATION.as_secs()..=MAX_DURATION.as_secs()).contains(&secs)
        {
            return refuse(
                "duration_seconds",
                format!(
                    "{} s is outside what STS grants: use whole seconds from 900 to 43200",
                    self.duration.as_secs_f64()
                ),
            );
        }
        if chained && self.duration > MAX_CHAINED_DURATION {
            return refuse(
                "duration_seconds",
                format!(
                    "{secs} s exceeds the 1-hour limit STS sets for role chaining (a role assumed \
                     with instance-role credentials): use 3600 or less"
                ),
            );
        }
        if self.policy_arns.len() > MAX_POLICY_ARNS {
            return refuse(
                "policy_arns",
                format!(
                    "{} ARNs, STS accepts at most {MAX_POLICY_ARNS}: merge some into the session policy",
                    self.policy_arns.len()
                ),
            );
        }
        if let Some(bad) = self.policy_arns.iter().find(|a| !is_iam_arn(a, "policy/")) {
            return refuse(
                "policy_arns",
                format!(
                    "{bad:?} is not a policy ARN: use arn:aws:iam::aws:policy/NAME or arn:aws:iam::ACCOUNT_ID:policy/NAME"
                ),
            );
        }
        if let Some(identity) = &self.source_identity
            && (!is_name(identity) || identity.starts_with("aws:"))
        {
            return refuse(
                "source_identity",
                format!(
                    "{identity:?} must be 2 to 64 characters from letters, digits and _+=,.@-, not starting with aws:"
                ),
            );
        }
        if self.tags.len() > MAX_SESSION_TAGS {
            return refuse(
                "tags",
                format!(
                    "{} session tags, STS accepts at most {MAX_SESSION_TAGS}",
                    self.tags.len()
                ),
            );
        }
        for (i, tag) in self.tags.iter().enumerate() {
            let key_len = tag.key.chars().count();
            if !(1..=128).contains(&key_len)
                || tag.value.chars().count() > 256
                || !tag.key.chars().all(is_tag_char)
                || !tag.value.chars().all(is_tag_char)
                || tag.key.to_ascii_lowercase().starts_with("aws:")
            {
                return refuse(
                    "tags",
                    format!(
                        "tag {:?} must have a key of 1 to 128 and a value of up to 256 letters, \
                         digits, spaces and _.:/=+-@, and a key not starting with aws:",
                        tag.key
                    ),
                );
            }
            if self.tags[..i]
                .iter()
                .any(|t| t.key.eq_ignore_ascii_case(&tag.key))
            {
                return refuse(
                    "tags",
                    format!(
                        "tag key {:?} appears twice (keys are case-insensitive)",
                        tag.key
                    ),
                );
            }
        }
        match packed_size(self.policy.as_deref(), &self.policy_arns, &self.tags) {
            None => refuse(
                "session_policy",
                "is not valid JSON: STS would answer MalformedPolicyDocument".to_owned(),
            ),
            Some(size) if size > MAX_PACKED_SIZE => refuse(
                "session_policy",
                format!(
                    "the session policy, policy ARNs and tags take {size} characters (whitespace \
                     removed), over STS's {MAX_PACKED_SIZE}: shorten the policy or move statements \
                     into a managed policy"
                ),
            ),
            Some(_) => Ok(()),
        }
    }

    /// The Query-protocol form body.
    fn form_body(&self) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("Action", "AssumeRole")
            .append_pair("Version", API_VERSION)
            .append_pair("RoleArn", &self.role_arn)
            .append_pair("RoleSessionName", &self.session_name)
            .append_pair("DurationSeconds", &self.duration.as_secs().to_string());
        if let Some(policy) = &self.policy {
            form.append_pair("Policy", policy);
        }
        for (n, arn) in self.policy_arns.iter().enumerate() {
            form.append_pair(&format!("PolicyArns.member.{}.arn", n + 1), arn);
        }
        if let Some(identity) = &self.source_identity {
            form.append_pair("SourceIdentity", identity);
        }
        for (n, tag) in self.tags.iter().enumerate() {
            form.append_pair(&format!("Tags.member.{}.Key", n + 1), &tag.key);
            form.append_pair(&format!("Tags.member.{}.Value", n + 1), &tag.value);
        }
        form.finish()
    }
}

/// The session STS granted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AssumedRole {
    /// The session's credentials (secrets redacted in `Debug`, zeroed on drop).
    pub credentials: Credentials,
    /// `arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION`: what CloudTrail shows.
    pub assumed_role_arn: String,
    /// `AROA...:SESSION`.
    pub assumed_role_id: String,
    /// The source identity STS recorded, if one was set.
    pub source_identity: Option<String>,
    /// The packed policy size as a percentage of STS's limit, when STS sent it.
    pub packed_policy_percent: Option<u32>,
}

/// Assumes a role with the instance credentials: what the broker consumes.
///
/// One call is one attempt: the implementation does not retry; the broker
/// decides from [`StsError::kind`]. Implemented by [`StsClient`]; tests can
/// provide their own.
pub trait AssumeRole: Send + Sync {
    /// Assumes `request.role_arn` signed with `with`'s credentials, after
    /// checking `request` against STS's limits (role chaining applies: `with`
    /// is a role session).
    fn assume_role(
        &self,
        request: &AssumeRoleRequest,
        with: &RoleCredentials,
    ) -> impl Future<Output = Result<AssumedRole, StsError>> + Send;
}

impl<T: AssumeRole> AssumeRole for Arc<T> {
    fn assume_role(
        &self,
        request: &AssumeRoleRequest,
        with: &RoleCredentials,
    ) -> impl Future<Output = Result<AssumedRole, StsError>> + Send {
        (**self).assume_role(request, with)
    }
}

/// What an [`StsError`] means for the caller; see the module docs' table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StsErrorKind {
    /// Retry with jittered backoff: 5xx, throttling, timeouts, connection errors.
    Transient,
    /// STS refused the caller the role: trust policy or permissions.
    AccessDenied,
    /// STS refused the instance credentials or their signature.
    CallerCredentials,
    /// The request or the client's settings are wrong; fix the configuration.
    InvalidConfiguration,
    /// The answer was not what STS sends.
    UnexpectedResponse,
}

/// An STS failure. `Display` says what failed and, where known, the fix;
/// never a secret.
#[derive(Debug)]
pub struct StsError {
    kind: StsErrorKind,
    code: Option<String>,
    status: Option<u16>,
    message: String,
    hint: Option<&'static str>,
    source: Option<reqwest::Error>,
}

const ACCESS_DENIED_HINT: &str = "the role's trust policy must allow the instance role \
    sts:AssumeRole (and sts:TagSession when session tags are sent, sts:SetSourceIdentity when a \
    source identity is), and the instance role's policy must allow sts:AssumeRole on the role";
const CALLER_HINT: &str = "STS refused the instance credentials: they are reloaded from IMDS \
    before the next attempt; if this persists, check the host clock (signatures expire after \
    15 minutes of skew)";
const REGION_HINT: &str = "STS is not activated in this region: activate it in the IAM \
    account settings, or set AWS_ENDPOINT_URL_STS to an active region's endpoint";

impl StsError {
    fn config(message: String) -> Self {
        Self {
            kind: StsErrorKind::InvalidConfiguration,
            code: None,
            status: None,
            message,
            hint: None,
            source: None,
        }
    }

    fn unexpected(message: String, status: u16) -> Self {
        Self {
            kind: StsErrorKind::UnexpectedResponse,
            code: None,
            status: Some(status),
            message,
            hint: None,
            source: None,
        }
    }

    fn http(role_arn: &str, error: reqwest::Error) -> Self {
        let what = if error.is_timeout() {
            "timed out"
        } else if error.is_connect() {
            "could not connect"
        } else {
            "failed"
        };
        Self {
            kind: StsErrorKind::Transient,
            code: None,
            status: None,
            message: format!("STS AssumeRole of {role_arn} {what}"),
            hint: None,
            source: Some(error),
        }
    }

    /// Classifies STS's error answer.
    fn from_answer(role_arn: &str, status: u16, code: String, message: String) -> Self {
        let (kind, hint) = match code.as_str() {
            _ if status >= 500 => (StsErrorKind::Transient, None),
            "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "PriorRequestNotComplete"
            | "RequestTimeout"
            | "RequestTimeoutException"
            | "IDPCommunicationError" => (StsErrorKind::Transient, None),
            _ if status == 429 => (StsErrorKind::Transient, None),
            "AccessDenied" | "AccessDeniedException" => {
                (StsErrorKind::AccessDenied, Some(ACCESS_DENIED_HINT))
            }
            "InvalidClientTokenId"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature"
            | "MissingAuthenticationToken"
            | "UnrecognizedClientException"
            | "InvalidSignatureException" => (StsErrorKind::CallerCredentials, Some(CALLER_HINT)),
            "RegionDisabledException" => (StsErrorKind::InvalidConfiguration, Some(REGION_HINT)),
            "ValidationError"
            | "MalformedPolicyDocument"
            | "PackedPolicyTooLarge"
            | "InvalidParameterValue"
            | "InvalidParameterCombination"
            | "MissingParameter" => (StsErrorKind::InvalidConfiguration, None),
            _ => (StsErrorKind::UnexpectedResponse, None),
        };
        Self {
            kind,
            message: format!("STS refused AssumeRole of {role_arn}: {code}: {message}"),
            code: Some(code),
            status: Some(status),
            hint,
            source: None,
        }
    }

    /// What the caller should do about it.
    pub fn kind(&self) -> StsErrorKind {
        self.kind
    }

    /// Whether retrying soon may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind == StsErrorKind::Transient
    }

    /// STS's error code (`AccessDenied`, `Throttling`, ...), when STS answered one.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The HTTP status STS answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// What to change, when the cause is known.
    pub fn hint(&self) -> Option<&'static str> {
        self.hint
    }

    /// Whether the request timed out.
    pub fn is_timeout(&self) -> bool {
        self.source.as_ref().is_some_and(reqwest::Error::is_timeout)
    }
}

impl fmt::Display for StsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for StsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Configures an [`StsClient`]; the resolution order is in the module docs.
#[derive(Debug)]
pub struct StsClientBuilder {
    region: Option<String>,
    instance_region: Option<String>,
    endpoint_url: Option<String>,
    env: Env,
    timeout: Duration,
    connect_timeout: Duration,
    clock: SharedTimeSource,
}

impl Default for StsClientBuilder {
    fn default() -> Self {
        Self {
            region: None,
            instance_region: None,
            endpoint_url: None,
            env: Env::real(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            clock: SharedTimeSource::default(),
        }
    }
}

impl StsClientBuilder {
    /// The region, overriding `AWS_REGION` and IMDS. Default: unset.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// The instance's region from IMDS, used when neither
    /// [`region`](Self::region) nor `AWS_REGION` is set.
    pub fn instance_region(mut self, region: impl Into<String>) -> Self {
        self.instance_region = Some(region.into());
        self
    }

    /// The endpoint, overriding `AWS_ENDPOINT_URL_STS`. Default: unset.
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// Where `AWS_REGION`, `AWS_ENDPOINT_URL_STS` and `AWS_ENDPOINT_URL` are
    /// read. Default: the process environment.
    pub fn env(mut self, env: Env) -> Self {
        self.env = env;
        self
    }

    /// Timeout of one request, connection included. Default: 10 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connect timeout. Default: 3 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The wall clock signatures are dated with. Default: the system clock.
    pub fn time_source(mut self, clock: SharedTimeSource) -> Self {
        self.clock = clock;
        self
    }

    /// Resolves the region and endpoint; an
    /// [`InvalidConfiguration`](StsErrorKind::InvalidConfiguration) error
    /// names the setting that is wrong.
    pub fn build(self) -> Result<StsClient, StsError> {
        let (region, region_from) = match (&self.region, self.env.get("AWS_REGION")) {
            (Some(region), _) => (region.clone(), "the configured region"),
            (None, Some(region)) if !region.is_empty() => (region, "AWS_REGION"),
            _ => match &self.instance_region {
                Some(region) => (region.clone(), "the instance's region (IMDS)"),
                None => {
                    return Err(StsError::config(
                        "no region for STS: set AWS_REGION, or let the agent read it from IMDS"
                            .to_owned(),
                    ));
                }
            },
        };
        if region.is_empty()
            || region.len() > 64
            || !region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(StsError::config(format!(
                "{region_from} {region:?} is not a region name such as us-east-1"
            )));
        }
        let explicit = [
            ("the configured endpoint_url", self.endpoint_url.clone()),
            ("AWS_ENDPOINT_URL_STS", self.env.get("AWS_ENDPOINT_URL_STS")),
            ("AWS_ENDPOINT_URL", self.env.get("AWS_ENDPOINT_URL")),
        ]
        .into_iter()
        .find_map(|(from, url)| url.filter(|u| !u.is_empty()).map(|u| (from, u)));
        let endpoint = match explicit {
            Some((from, url)) => parse_endpoint(from, &url)?,
            None => regional_endpoint(&region)?,
        };
        let http = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| StsError::config(format!("cannot build the HTTPS client for STS: {e}")))?;
        Ok(StsClient {
            http,
            endpoint,
            region,
            clock: self.clock,
        })
    }
}

fn parse_endpoint(from: &str, url: &str) -> Result<reqwest::Url, StsError> {
    let bad = |problem: &str| {
        Err(StsError::config(format!(
            "{from} {url:?} {problem}: use https://HOST[:PORT] (http:// only to 127.0.0.1, ::1 or localhost)"
        )))
    };
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return bad("is not a URL");
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return bad("carries credentials");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return bad("has a query or fragment");
    }
    let Some(host) = parsed.host_str() else {
        return bad("has no host");
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if loopback => Ok(parsed),
        "http" => bad("is plain HTTP to a non-loopback host, which would expose the session token"),
        _ => bad("is neither https:// nor http://"),
    }
}

fn regional_endpoint(region: &str) -> Result<reqwest::Url, StsError> {
    let isolated = ["us-iso-", "us-isob-", "us-isof-", "eu-isoe-"];
    if isolated.iter().any(|p| region.starts_with(p)) {
        return Err(StsError::config(format!(
            "region {region} is in an isolated partition whose STS domain this agent does not \
             know: set AWS_ENDPOINT_URL_STS to its STS endpoint"
        )));
    }
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    reqwest::Url::parse(&format!("https://sts.{region}.{suffix}"))
        .map_err(|_| StsError::config(format!("region {region:?} gives no valid STS endpoint")))
}

/// An STS client: `AssumeRole` signed with SigV4 (`aws-sigv4`) over `reqwest`.
#[derive(Debug, Clone)]
pub struct StsClient {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    region: String,
    clock: SharedTimeSource,
}

impl StsClient {
    /// Starts configuring a client.
    pub fn builder() -> StsClientBuilder {
        StsClientBuilder::default()
    }

    /// The endpoint requests go to.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// The region requests are signed for.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Checks `request` (role chaining applies), signs it with
    /// `credentials` and sends it once.
    pub async fn assume_role_with(
        &self,
        request: &AssumeRoleRequest,
        credentials: &Credentials,
    ) -> Result<AssumedRole, StsError> {
        request.check(true)?;
        let body = request.form_body();
        let headers = self.signed_headers(&body, credentials)?;
        debug!(
            role_arn = %request.role_arn,
            session_name = %request.session_name,
            duration_seconds = request.duration.as_secs(),
            caller_access_key_id = %credentials.access_key_id(),
            endpoint = %self.endpoint,
            "calling STS AssumeRole"
        );
        let mut response = self
            .http
            .post(self.endpoint.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| StsError::http(&request.role_arn, e))?;
        let status = response.status().as_u16();
        let mut bytes = Zeroizing::new(Vec::new());
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(StsError::unexpected(
                            format!(
                                "STS answered AssumeRole of {} with more than {MAX_RESPONSE_BYTES} bytes",
                                request.role_arn
                            ),
                            status,
                        ));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(StsError::http(&request.role_arn, e)),
            }
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            StsError::unexpected(
                format!(
                    "STS answered AssumeRole of {} with non-UTF-8",
                    request.role_arn
                ),
                status,
            )
        })?;
        if status == 200 {
            let assumed = parse_assume_role(text).ok_or_else(|| {
                StsError::unexpected(
                    format!(
                        "STS answered AssumeRole of {} with HTTP 200 but no AssumeRoleResult \
                         with credentials",
                        request.role_arn
                    ),
                    status,
                )
            })?;
            debug!(
                role_arn = %request.role_arn,
                assumed_role_arn = %assumed.assumed_role_arn,
                access_key_id = %assumed.credentials.access_key_id(),
                expiration = %assumed.credentials.expiration_rfc3339(),
                "STS AssumeRole succeeded"
            );
            return Ok(assumed);
        }
        let error = match parse_error(text) {
            Some((code, message)) => {
                StsError::from_answer(&request.role_arn, status, code, message)
            }
            None if status >= 500 || status == 429 => StsError {
                kind: StsErrorKind::Transient,
                code: None,
                status: Some(status),
                message: format!(
                    "STS answered AssumeRole of {} with HTTP {status}",
                    request.role_arn
                ),
                hint: None,
                source: None,
            },
            None => StsError::unexpected(
                format!(
                    "STS answered AssumeRole of {} with HTTP {status} and no STS error document",
                    request.role_arn
                ),
                status,
            ),
        };
        debug!(
            role_arn = %request.role_arn,
            status,
            code = error.code().unwrap_or(""),
            "STS AssumeRole failed"
        );
        Err(error)
    }

    /// The headers to send: `Content-Type` plus what the signer adds
    /// (`X-Amz-Date`, `X-Amz-Security-Token`, `Authorization`).
    fn signed_headers(&self, body: &str, credentials: &Credentials) -> Result<HeaderMap, StsError> {
        const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
        let identity = credentials.to_aws_credentials("imds-agent").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("sts")
            .time(self.clock.now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| StsError::config(format!("cannot sign for STS: {e}")))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            self.endpoint.as_str(),
            [("content-type", CONTENT_TYPE)].into_iter(),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| StsError::config(format!("cannot sign for STS {}: {e}", self.endpoint)))?;
        // aws-sigv4 logs the canonical request, session token included, at
        // trace level: sign with no subscriber.
        let signed =
            tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
                sign(signable, &params)
            })
            .map_err(|e| StsError::config(format!("cannot sign for STS {}: {e}", self.endpoint)))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static(CONTENT_TYPE),
        );
        let (instructions, _signature) = signed.into_parts();
        for (name, value) in instructions.headers() {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| StsError::config(format!("signer produced header {name:?}")))?;
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| StsError::config(format!("signer produced a bad {name} value")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Ok(headers)
    }
}

impl AssumeRole for StsClient {
    fn assume_role(
        &self,
        request: &AssumeRoleRequest,
        with: &RoleCredentials,
    ) -> impl Future<Output = Result<AssumedRole, StsError>> + Send {
        let credentials = with.credentials.clone();
        async move { self.assume_role_with(request, &credentials).await }
    }
}

/// The text of an element (empty for an empty one); `None` when it holds
/// elements instead.
fn text_of(tag: &mut ScopedDecoder<'_, '_>) -> Option<String> {
    try_data(tag).ok().map(Cow::into_owned)
}

/// Parses `AssumeRoleResponse/AssumeRoleResult`. `None` when the document
/// is not one, or lacks credentials.
fn parse_assume_role(text: &str) -> Option<AssumedRole> {
    let mut doc = Document::new(text);
    let mut root = doc.root_element().ok()?;
    if !root.start_el().matches("AssumeRoleResponse") {
        return None;
    }
    let (mut key, mut secret, mut token, mut expiration) = (None, None, None, None);
    let (mut arn, mut role_id, mut source_identity, mut packed) = (None, None, None, None);
    while let Some(mut tag) = root.next_tag() {
        if !tag.start_el().matches("AssumeRoleResult") {
            continue;
        }
        while let Some(mut field) = tag.next_tag() {
            if field.start_el().matches("Credentials") {
                while let Some(mut part) = field.next_tag() {
                    let name = part.start_el().local().to_owned();
                    let value = Zeroizing::new(text_of(&mut part)?);
                    match name.as_str() {
                        "AccessKeyId" => key = Some(value.trim().to_owned()),
                        "SecretAccessKey" => secret = Some(Zeroizing::new(value.trim().to_owned())),
                        "SessionToken" => token = Some(Zeroizing::new(value.trim().to_owned())),
                        "Expiration" => expiration = parse_rfc3339(value.trim()),
                        _ => {}
                    }
                }
            } else if field.start_el().matches("AssumedRoleUser") {
                while let Some(mut part) = field.next_tag() {
                    if part.start_el().matches("Arn") {
                        arn = text_of(&mut part);
                    } else if part.start_el().matches("AssumedRoleId") {
                        role_id = text_of(&mut part);
                    }
                }
            } else if field.start_el().matches("SourceIdentity") {
                source_identity = text_of(&mut field);
            } else if field.start_el().matches("PackedPolicySize") {
                packed = text_of(&mut field).and_then(|t| t.trim().parse().ok());
            }
        }
    }
    let (key, secret, token, expiration) = (key?, secret?, token?, expiration?);
    if key.is_empty() || secret.is_empty() || token.is_empty() {
        return None;
    }
    let arn: String = arn.unwrap_or_default().trim().to_owned();
    let mut credentials = Credentials::new(key, secret.as_str(), token.as_str(), expiration);
    if let Some(account) = arn.split(':').nth(4).filter(|a| !a.is_empty()) {
        credentials = credentials.with_account_id(account);
    }
    Some(AssumedRole {
        credentials,
        assumed_role_arn: arn,
        assumed_role_id: role_id.unwrap_or_default().trim().to_owned(),
        source_identity: source_identity.map(|s| s.trim().to_owned()),
        packed_policy_percent: packed,
    })
}

/// `(Code, Message)` of an `ErrorResponse/Error` document.
fn parse_error(text: &str) -> Option<(String, String)> {
    let mut doc = Document::new(text);
    let mut root = doc.root_element().ok()?;
    if !root.start_el().matches("ErrorResponse") {
        return None;
    }
    let (mut code, mut message) = (None, String::new());
    while let Some(mut tag) = root.next_tag() {
        if !tag.start_el().matches("Error") {
            continue;
        }
        while let Some(mut field) = tag.next_tag() {
            if field.start_el().matches("Code") {
                code = text_of(&mut field);
            } else if field.start_el().matches("Message") {
                message = text_of(&mut field).unwrap_or_default();
            }
        }
    }
    let code = code?.trim().to_owned();
    (!code.is_empty()).then(|| (code, message.trim().chars().take(512).collect()))
}

/// `[\w+=,.@-]{2,64}`, STS's pattern for session names and source identities.
fn is_name(text: &str) -> bool {
    (2..=MAX_SESSION_NAME).contains(&text.chars().count()) && text.chars().all(is_name_char)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

/// `[\p{L}\p{Z}\p{N}_.:/=+\-@]`, STS's pattern for tag keys and values.
fn is_tag_char(c: char) -> bool {
    c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c)
}

/// `arn:PARTITION:iam::ACCOUNT:{kind}NAME`, 20 to 2048 characters; the
/// account may be `aws` for AWS-managed policies.
fn is_iam_arn(arn: &str, kind: &str) -> bool {
    if !(20..=2048).contains(&arn.len()) {
        return false;
    }
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = parts[..] else {
        return false;
    };
    let account_ok = (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()))
        || (kind == "policy/" && account == "aws");
    prefix == "arn"
        && (partition == "aws" || partition.starts_with("aws-"))
        && service == "iam"
        && region.is_empty()
        && account_ok
        && resource
            .strip_prefix(kind)
            .and_then(|r| r.rsplit('/').next())
            .is_some_and(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use imds_client::mock::{FaultDuration, MockImds, MockSts, StsFault};
    use std::io::Write;
    use std::sync::Mutex;

    const ROLE: &str = "arn:aws:iam::123456789012:role/billing";
    const INSTANCE: &str = "i-0a1b2c3d4e5f60718";

    struct Emulators {
        imds: MockImds,
        sts: MockSts,
    }

    async fn emulators() -> Emulators {
        let imds = MockImds::builder()
            .role("instance-role")
            .start()
            .await
            .unwrap();
        let sts = MockSts::for_imds(&imds).start().await.unwrap();
        Emulators { imds, sts }
    }

    fn instance(e: &Emulators) -> RoleCredentials {
        RoleCredentials {
            role: "instance-role".into(),
            credentials: Arc::new(e.imds.current_credentials().expect("a role is attached")),
        }
    }

    /// A client pointed at `sts` the way the agent is: `AWS_ENDPOINT_URL_STS`.
    fn client(sts: &MockSts) -> StsClient {
        StsClient::builder()
            .env(Env::from_pairs([("AWS_ENDPOINT_URL_STS", sts.endpoint())]))
            .instance_region("eu-west-1")
            .build()
            .expect("a loopback endpoint override is accepted")
    }

    fn request() -> AssumeRoleRequest {
        AssumeRoleRequest::new(ROLE, session_name("billing", INSTANCE))
    }

    #[test]
    fn session_names_are_consumer_at_instance_cut_to_stss_limits() {
        assert_eq!(
            session_name("billing", INSTANCE),
            "billing@i-0a1b2c3d4e5f60718"
        );
        let long = session_name(&"c".repeat(60), INSTANCE);
        assert_eq!(long.chars().count(), 64, "{long}");
        assert!(long.starts_with(&"c".repeat(60)), "{long}");
        assert_eq!(session_name("web app/1", "i-1"), "web-app-1@i-1");
        assert!(is_name(&session_name("é", "")), "{}", session_name("é", ""));
    }

    #[tokio::test]
    async fn assume_role_succeeds_with_the_instance_credentials() {
        let e = emulators().await;
        let with = instance(&e);
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#;
        let request = request()
            .duration(Duration::from_secs(900))
            .policy(policy)
            .policy_arns(vec![
                "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess".into(),
            ])
            .source_identity("billing")
            .tags(consumer_tags("billing", Some(1001)));
        let assumed = client(&e.sts)
            .assume_role(&request, &with)
            .await
            .expect("AssumeRole succeeds");

        let issued = e
            .sts
            .issued_credentials(assumed.credentials.access_key_id())
            .expect("the emulator issued the returned key");
        assert_eq!(
            assumed.credentials, issued,
            "secret, token and expiry as issued"
        );
        assert_eq!(assumed.credentials.account_id(), Some("123456789012"));
        assert_eq!(
            assumed.assumed_role_arn,
            format!("arn:aws:sts::123456789012:assumed-role/billing/billing@{INSTANCE}")
        );
        assert_eq!(assumed.source_identity.as_deref(), Some("billing"));
        assert!(assumed.packed_policy_percent.is_some());

        let calls = e.sts.assume_role_calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        let call = &calls[0];
        assert_eq!(
            call.caller_access_key_id.as_deref(),
            Some(with.credentials.access_key_id())
        );
        assert_eq!(call.role_arn.as_deref(), Some(ROLE));
        assert_eq!(
            call.role_session_name.as_deref(),
            Some("billing@i-0a1b2c3d4e5f60718")
        );
        assert_eq!(call.duration_seconds.as_deref(), Some("900"));
        assert_eq!(call.policy.as_deref(), Some(policy));
        assert_eq!(
            call.policy_arns,
            ["arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"]
        );
        assert_eq!(call.source_identity.as_deref(), Some("billing"));
        assert_eq!(
            call.tags,
            [
                (TAG_CONSUMER.to_owned(), "billing".to_owned()),
                (TAG_UID.to_owned(), "1001".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn without_options_no_tags_source_identity_or_policy_are_sent() {
        let e = emulators().await;
        client(&e.sts)
            .assume_role(&request(), &instance(&e))
            .await
            .unwrap();
        let call = &e.sts.assume_role_calls()[0];
        assert_eq!(
            (
                &call.policy,
                &call.policy_arns,
                &call.tags,
                &call.source_identity
            ),
            (&None, &vec![], &vec![], &None)
        );
        assert_eq!(call.duration_seconds.as_deref(), Some("3600"));
    }

    #[tokio::test]
    async fn every_limit_is_refused_before_any_call() {
        let e = emulators().await;
        let with = instance(&e);
        let big = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":"{}"}}]}}"#,
            "x".repeat(2000)
        );
        let cases: Vec<(&str, AssumeRoleRequest)> = vec![
            (
                "duration_seconds",
                request().duration(Duration::from_secs(899)),
            ),
            (
                "duration_seconds",
                request().duration(Duration::from_secs(43_201)),
            ),
            (
                "role chaining",
                request().duration(Duration::from_secs(3601)),
            ),
            (
                "duration_seconds",
                request().duration(Duration::from_millis(1_000_500)),
            ),
            (
                "policy_arns",
                request().policy_arns(
                    (0..11)
                        .map(|n| format!("arn:aws:iam::aws:policy/P{n}"))
                        .collect(),
                ),
            ),
            (
                "policy_arns",
                request().policy_arns(vec!["s3:GetObject".into()]),
            ),
            ("session_policy", request().policy(big)),
            ("session_policy", request().policy("{not json")),
            ("session_name", AssumeRoleRequest::new(ROLE, "a b")),
            ("session_name", AssumeRoleRequest::new(ROLE, "x")),
            ("role_arn", AssumeRoleRequest::new("billing", "s1")),
            (
                "role_arn",
                AssumeRoleRequest::new("arn:aws:iam::123456789012:user/bob", "s1"),
            ),
            ("source_identity", request().source_identity("aws:me")),
            (
                "tags",
                request().tags(
                    (0..51)
                        .map(|n| SessionTag::new(format!("k{n}"), "v"))
                        .collect(),
                ),
            ),
            ("tags", request().tags(vec![SessionTag::new("", "v")])),
            (
                "tags",
                request().tags(vec![SessionTag::new("k", "v"), SessionTag::new("K", "w")]),
            ),
            ("tags", request().tags(vec![SessionTag::new("aws:x", "v")])),
        ];
        let client = client(&e.sts);
        for (setting, request) in cases {
            let error = client
                .assume_role(&request, &with)
                .await
                .expect_err("a request over STS's limits is refused");
            assert_eq!(
                error.kind(),
                StsErrorKind::InvalidConfiguration,
                "{setting}: {error}"
            );
            assert!(
                error.to_string().contains(setting),
                "expected the error to name {setting}, got: {error}"
            );
        }
        assert_eq!(e.sts.calls(), vec![], "no request may reach STS");
    }

    #[tokio::test]
    async fn access_denied_is_typed_and_hints_at_the_trust_policy() {
        let e = emulators().await;
        let with = instance(&e);
        e.sts.deny_assume_role(ROLE);
        let error = client(&e.sts)
            .assume_role(&request(), &with)
            .await
            .expect_err("a denied role is an error");
        assert_eq!(error.kind(), StsErrorKind::AccessDenied, "{error}");
        assert_eq!(error.code(), Some("AccessDenied"));
        assert_eq!(error.status(), Some(403));
        let text = error.to_string();
        for needle in ["trust policy", "sts:AssumeRole", "sts:TagSession", ROLE] {
            assert!(text.contains(needle), "expected {needle:?} in: {text}");
        }
        assert!(!error.is_transient());

        e.sts.allow_assume_role(ROLE);
        e.sts.deny_tag_session(ROLE);
        let tagged = request().tags(consumer_tags("billing", None));
        let error = client(&e.sts)
            .assume_role(&tagged, &with)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), StsErrorKind::AccessDenied, "{error}");
        assert!(error.to_string().contains("sts:TagSession"), "{error}");
        client(&e.sts)
            .assume_role(&request(), &with)
            .await
            .expect("the same role without tags is allowed");
    }

    #[tokio::test]
    async fn throttling_and_server_errors_are_transient() {
        let e = emulators().await;
        let with = instance(&e);
        let client = client(&e.sts);
        e.sts
            .inject(StsFault::Throttling, FaultDuration::Requests(1));
        let error = client.assume_role(&request(), &with).await.unwrap_err();
        assert_eq!(
            (error.kind(), error.code(), error.status()),
            (StsErrorKind::Transient, Some("Throttling"), Some(400)),
            "{error}"
        );
        e.sts.inject(
            StsFault::ServerError { status: 503 },
            FaultDuration::Requests(1),
        );
        let error = client.assume_role(&request(), &with).await.unwrap_err();
        assert_eq!(
            (error.kind(), error.code(), error.status()),
            (
                StsErrorKind::Transient,
                Some("ServiceUnavailable"),
                Some(503)
            ),
            "{error}"
        );
        client
            .assume_role(&request(), &with)
            .await
            .expect("one attempt per call: the next call, fault spent, succeeds");
        assert_eq!(e.sts.calls().len(), 3, "no retries underneath the caller");
    }

    #[tokio::test]
    async fn refused_instance_credentials_are_told_apart() {
        let e = emulators().await;
        let good = e.imds.current_credentials().unwrap();
        let forged = RoleCredentials {
            role: "instance-role".into(),
            credentials: Arc::new(Credentials::new(
                good.access_key_id(),
                "wrongwrongwrongwrongwrongwrongwrongwrong",
                good.session_token(),
                good.expiration(),
            )),
        };
        let error = client(&e.sts)
            .assume_role(&request(), &forged)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), StsErrorKind::CallerCredentials, "{error}");
        assert_eq!(error.code(), Some("SignatureDoesNotMatch"));
        assert!(error.hint().is_some_and(|h| h.contains("IMDS")));
    }

    #[test]
    fn endpoints_resolve_in_the_documented_order() {
        let build = |b: StsClientBuilder| {
            b.build()
                .map(|c| (c.endpoint().to_owned(), c.region().to_owned()))
        };
        let env = |pairs: &[(&str, &str)]| Env::from_pairs(pairs.iter().map(|(k, v)| (*k, *v)));
        let ok = |b, url: &str, region: &str| {
            let got = build(b).unwrap_or_else(|e| panic!("expected {url}, got {e}"));
            assert_eq!(got, (url.to_owned(), region.to_owned()));
        };
        ok(
            StsClient::builder()
                .env(env(&[]))
                .instance_region("eu-west-1"),
            "https://sts.eu-west-1.amazonaws.com/",
            "eu-west-1",
        );
        ok(
            StsClient::builder()
                .env(env(&[("AWS_REGION", "us-east-2")]))
                .instance_region("eu-west-1"),
            "https://sts.us-east-2.amazonaws.com/",
            "us-east-2",
        );
        ok(
            StsClient::builder()
                .env(env(&[("AWS_REGION", "us-east-2")]))
                .region("ap-south-1"),
            "https://sts.ap-south-1.amazonaws.com/",
            "ap-south-1",
        );
        ok(
            StsClient::builder()
                .env(env(&[]))
                .instance_region("cn-north-1"),
            "https://sts.cn-north-1.amazonaws.com.cn/",
            "cn-north-1",
        );
        ok(
            StsClient::builder()
                .env(env(&[]))
                .instance_region("us-gov-west-1"),
            "https://sts.us-gov-west-1.amazonaws.com/",
            "us-gov-west-1",
        );
        ok(
            StsClient::builder()
                .env(env(&[("AWS_ENDPOINT_URL", "https://proxy.example:8443")]))
                .instance_region("eu-west-1"),
            "https://proxy.example:8443/",
            "eu-west-1",
        );
        ok(
            StsClient::builder()
                .env(env(&[
                    ("AWS_ENDPOINT_URL", "https://proxy.example:8443"),
                    ("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:4566"),
                ]))
                .instance_region("eu-west-1"),
            "http://127.0.0.1:4566/",
            "eu-west-1",
        );
        ok(
            StsClient::builder()
                .env(env(&[("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:4566")]))
                .endpoint_url("http://[::1]:9000")
                .instance_region("eu-west-1"),
            "http://[::1]:9000/",
            "eu-west-1",
        );
    }

    #[test]
    fn bad_endpoint_overrides_and_regions_are_refused_by_name() {
        let refused = |pairs: &[(&str, &str)], region: Option<&str>, needle: &str| {
            let mut b =
                StsClient::builder().env(Env::from_pairs(pairs.iter().map(|(k, v)| (*k, *v))));
            if let Some(region) = region {
                b = b.instance_region(region);
            }
            let error = b.build().expect_err("expected a refusal");
            assert_eq!(error.kind(), StsErrorKind::InvalidConfiguration);
            assert!(
                error.to_string().contains(needle),
                "expected {needle:?} in: {error}"
            );
        };
        let r = Some("eu-west-1");
        refused(
            &[("AWS_ENDPOINT_URL_STS", "not a url")],
            r,
            "AWS_ENDPOINT_URL_STS",
        );
        refused(
            &[("AWS_ENDPOINT_URL_STS", "ftp://127.0.0.1")],
            r,
            "neither https",
        );
        refused(
            &[("AWS_ENDPOINT_URL_STS", "http://10.0.0.1:4566")],
            r,
            "expose the session token",
        );
        refused(
            &[("AWS_ENDPOINT_URL_STS", "https://u:p@sts.example")],
            r,
            "carries credentials",
        );
        refused(
            &[("AWS_ENDPOINT_URL", "http://sts.example")],
            r,
            "AWS_ENDPOINT_URL",
        );
        refused(&[], None, "no region");
        refused(&[], Some("US East"), "not a region name");
        refused(&[], Some("us-iso-east-1"), "AWS_ENDPOINT_URL_STS");
    }

    #[tokio::test]
    async fn an_unreachable_or_silent_endpoint_is_transient() {
        let e = emulators().await;
        let with = instance(&e);
        // A port nobody listens on any more.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let unreachable = StsClient::builder()
            .env(Env::empty())
            .endpoint_url(format!("http://{closed}"))
            .instance_region("eu-west-1")
            .build()
            .unwrap();
        let error = unreachable
            .assume_role(&request(), &with)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), StsErrorKind::Transient, "{error}");
        assert!(error.to_string().contains("could not connect"), "{error}");

        // A listener that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
            }
        });
        let slow = StsClient::builder()
            .env(Env::empty())
            .endpoint_url(format!("http://{addr}"))
            .instance_region("eu-west-1")
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let error = slow.assume_role(&request(), &with).await.unwrap_err();
        assert!(error.is_timeout() && error.is_transient(), "{error}");
    }

    #[test]
    fn error_and_success_documents_parse_and_junk_does_not() {
        let error = "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error>\
            <Type>Sender</Type><Code>ExpiredToken</Code><Message>The security token included in \
            the request is expired</Message></Error><RequestId>r</RequestId></ErrorResponse>";
        assert_eq!(
            parse_error(error),
            Some((
                "ExpiredToken".to_owned(),
                "The security token included in the request is expired".to_owned()
            ))
        );
        assert_eq!(parse_error("<html>503</html>"), None);
        assert_eq!(parse_error("not xml"), None);
        assert!(
            parse_assume_role("<AssumeRoleResponse><AssumeRoleResult/></AssumeRoleResponse>")
                .is_none()
        );
        let classified = StsError::from_answer(ROLE, 400, "ExpiredToken".into(), String::new());
        assert_eq!(classified.kind(), StsErrorKind::CallerCredentials);
        let classified =
            StsError::from_answer(ROLE, 400, "RegionDisabledException".into(), String::new());
        assert_eq!(classified.kind(), StsErrorKind::InvalidConfiguration);
        assert!(classified.to_string().contains("activate"), "{classified}");
    }

    /// Collects every trace-level event of every crate on this thread.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn no_secret_reaches_a_trace_level_log_debug_or_an_error() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let e = emulators().await;
        let with = instance(&e);
        let client = client(&e.sts);
        let assumed = client
            .assume_role(&request().tags(consumer_tags("billing", Some(1001))), &with)
            .await
            .unwrap();
        e.sts.deny_assume_role(ROLE);
        let denied = client.assume_role(&request(), &with).await.unwrap_err();
        let shown = format!("{assumed:?} {denied:?} {denied} {client:?}");

        let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        assert!(
            log.contains("calling STS AssumeRole") && log.contains("AssumeRole succeeded"),
            "the capture works (expected the client's own events):\n{log}"
        );
        let secrets = [
            ("instance secret key", with.credentials.secret_access_key()),
            ("instance session token", with.credentials.session_token()),
            ("issued secret key", assumed.credentials.secret_access_key()),
            ("issued session token", assumed.credentials.session_token()),
        ];
        for (what, secret) in secrets {
            assert!(!log.contains(secret), "the {what} is in the trace log");
            assert!(!shown.contains(secret), "the {what} is in Debug or Display");
        }
    }
}
