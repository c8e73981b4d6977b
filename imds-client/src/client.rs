//! The IMDSv2 client: "GET a metadata path with a session token".
//!
//! [`ImdsClient`] owns the HTTP connection pool, the session-token cache
//! ([`token`]) and the retry policy ([`RetryPolicy`]). Typed helpers sit on top
//! of [`ImdsClient::get`]. The client never goes through an HTTP proxy
//! (whatever `HTTP_PROXY` says), never sends `X-Forwarded-For`, and reads at
//! most [`MAX_RESPONSE_BYTES`] of any answer. It never follows a redirect:
//! IMDS does not send them, and following one would hand the session token
//! to another host.
//!
//! Retry delays are jittered from a generator seeded per process (backon's
//! `std` feature), so a fleet failing together does not retry in lock-step.

pub mod token;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use reqwest::{Method, StatusCode};
use tokio::time::Instant;

use crate::config::{
    ATTEMPTS_RANGE, EndpointMode, Env, ProfileKeys, TIMEOUT_RANGE, TOKEN_TTL_RANGE,
    UNREACHABLE_MEMO_RANGE, check_count, check_duration, invalid, is_iam_role_name, parse_bool,
    parse_count, parse_seconds,
};
use crate::credentials::Credentials;
use crate::error::{Error, ErrorKind};
use crate::provider::{BoxFuture, CredentialsSource, FetchedCredentials, FetchedRole};
use crate::secret::SecretString;
use token::{MaybeToken, TokenCache};

/// Default connect timeout. IMDS is a link-local service: it answers in
/// milliseconds or not at all.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default timeout for a whole request after connecting.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Default number of attempts for a request (the first one included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// Default session-token lifetime: the maximum IMDS allows, 6 hours.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(21_600);
/// The most of a response body the client will read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How long an endpoint that did not answer (nothing listening, or a token
/// request never answered) is remembered by default, so that a caller's retry
/// loop fails at once instead of waiting for a timeout each time.
pub const UNREACHABLE_MEMO: Duration = Duration::from_secs(30);

const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const ROLE_LIST_PATH: &str = "/latest/meta-data/iam/security-credentials/";
const EXTENDED_PATH: &str = "/latest/meta-data/iam/security-credentials-extended/";

/// Which statuses and failures are tried again, and how.
///
/// | outcome | retried? |
/// |---|---|
/// | 5xx | yes, exponential backoff with jitter |
/// | 429 Too Many Requests | yes, with a four times longer backoff |
/// | timeout after connecting, connection reset | yes |
/// | 401 | once, at once, with a new token (outside the attempt budget) |
/// | 400, 403, 404, other 4xx | no |
/// | nothing listening (connect refused, or the handshake not done within the connect timeout) | no: [`ErrorKind::Unreachable`], remembered for [`UNREACHABLE_MEMO`] |
/// | 3xx redirect | no, and never followed: [`ErrorKind::Redirected`] |
/// | token request connects but never answers | no: the hop-limit symptom, reported as [`ErrorKind::TokenTimeout`] and remembered like an unreachable endpoint |
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    max_attempts: u32,
    base_delay: Duration,
}

impl RetryPolicy {
    /// How many times a request is sent at most (first try included).
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The first backoff delay; later ones grow exponentially, with jitter,
    /// up to 5 s.
    pub fn base_delay(&self) -> Duration {
        self.base_delay
    }

    /// Whether a request that failed with `error` is tried again (the table
    /// above).
    pub fn is_retried(error: &Error) -> bool {
        matches!(
            error.kind(),
            ErrorKind::ServerError { .. }
                | ErrorKind::Throttled
                | ErrorKind::Timeout
                | ErrorKind::Connection
        )
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.base_delay)
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
    }
}

/// Builds an [`ImdsClient`]. Every setter's default is stated in its docs;
/// unset values come from the environment (see [`crate::config`]).
#[derive(Debug, Default)]
#[must_use]
pub struct ImdsClientBuilder {
    endpoint: Option<String>,
    endpoint_mode: Option<EndpointMode>,
    connect_timeout: Option<Duration>,
    read_timeout: Option<Duration>,
    max_attempts: Option<u32>,
    token_ttl: Option<Duration>,
    imdsv1_fallback: Option<bool>,
    profile_name: Option<String>,
    unreachable_memo: Option<Duration>,
    env: Env,
}

impl ImdsClientBuilder {
    /// The IMDS endpoint URL, e.g. `http://127.0.0.1:8080`. Default: from the
    /// endpoint mode. Fails unless it is an `http` or `https` URL with a host.
    pub fn endpoint(mut self, url: impl AsRef<str>) -> Result<Self, Error> {
        self.endpoint = Some(validate_endpoint(url.as_ref(), "endpoint")?);
        Ok(self)
    }

    /// IPv4 (`http://169.254.169.254`, the default) or IPv6 (`http://[fd00:ec2::254]`).
    pub fn endpoint_mode(mut self, mode: EndpointMode) -> Self {
        self.endpoint_mode = Some(mode);
        self
    }

    /// How long the TCP handshake may take, 1 ms to 3600 s. A handshake that
    /// does not complete in time is [`ErrorKind::Unreachable`] (not on EC2).
    /// Default: [`DEFAULT_CONNECT_TIMEOUT`] (or `AWS_METADATA_SERVICE_TIMEOUT`).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// How long the answer to one request may take once connected, 1 ms to
    /// 3600 s (the whole request is bounded by connect plus read timeout).
    /// A token request that connects but gets no answer in time is
    /// [`ErrorKind::TokenTimeout`] (the hop-limit symptom). Default:
    /// [`DEFAULT_READ_TIMEOUT`] (or `AWS_METADATA_SERVICE_TIMEOUT`).
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = Some(timeout);
        self
    }

    /// Attempts per request, the first included: 1 to 20. Default:
    /// [`DEFAULT_MAX_ATTEMPTS`] (or `AWS_METADATA_SERVICE_NUM_ATTEMPTS`).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Session-token lifetime, 1 s to 21600 s. Default: [`DEFAULT_TOKEN_TTL`].
    pub fn token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = Some(ttl);
        self
    }

    /// Whether to fall back to IMDSv1 when the token request answers 403,
    /// 404 or 405 (never on a timeout). Default: false.
    /// `AWS_EC2_METADATA_V1_DISABLED=true` forbids it whatever this says.
    pub fn imdsv1_fallback(mut self, enabled: bool) -> Self {
        self.imdsv1_fallback = Some(enabled);
        self
    }

    /// Use this role name instead of discovering it: 1 to 64 of the
    /// characters IAM allows (`A-Z a-z 0-9 + = , . @ _ -`); empty means
    /// discover. Default: discover (or `AWS_EC2_INSTANCE_PROFILE_NAME`).
    pub fn profile_name(mut self, name: impl Into<String>) -> Self {
        self.profile_name = Some(name.into());
        self
    }

    /// How long an endpoint that did not answer (nothing listening, or a
    /// token request never answered) is remembered: calls within that time
    /// fail at once with the same error instead of waiting for a timeout
    /// again. 0 to 3600 s. Default: [`UNREACHABLE_MEMO`]; `Duration::ZERO` turns it off
    /// (for a caller with its own schedule, like the agent's poll).
    pub fn unreachable_memo(mut self, memo: Duration) -> Self {
        self.unreachable_memo = Some(memo);
        self
    }

    /// Where environment settings are read from. Default: the process environment.
    pub fn env(mut self, env: Env) -> Self {
        self.env = env;
        self
    }

    /// Resolves every setting and builds the client. No I/O happens here
    /// but reading the shared config file. Every value is checked against
    /// its accepted range (see [`crate::config`]): a value out of range is
    /// [`ErrorKind::InvalidConfiguration`] naming the setting and the range.
    pub fn build(self) -> Result<ImdsClient, Error> {
        let env = &self.env;
        let file = ProfileKeys::load(env)?;
        // Environment first, then the shared config file; the name reported in
        // errors is the one the value came from.
        let setting = |var: &'static str,
                       key: &'static str|
         -> Result<Option<(String, &'static str)>, Error> {
            Ok(match env.lookup(var)? {
                Some(v) => Some((v, var)),
                None => file.get(key).map(|v| (v, key)),
            })
        };
        let disabled = match env.lookup("AWS_EC2_METADATA_DISABLED")? {
            Some(v) => parse_bool(&v, "AWS_EC2_METADATA_DISABLED")?,
            None => false,
        };
        let endpoint = match self.endpoint {
            Some(endpoint) => endpoint,
            None => match setting(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                "ec2_metadata_service_endpoint",
            )? {
                Some((v, name)) => validate_endpoint(&v, name)?,
                None => {
                    let mode = match self.endpoint_mode {
                        Some(mode) => mode,
                        None => match setting(
                            "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
                            "ec2_metadata_service_endpoint_mode",
                        )? {
                            Some((v, name)) => EndpointMode::parse(&v, name)?,
                            None => EndpointMode::default(),
                        },
                    };
                    mode.endpoint().to_owned()
                }
            },
        };
        let env_timeout = match setting("AWS_METADATA_SERVICE_TIMEOUT", "metadata_service_timeout")?
        {
            Some((v, name)) => Some(parse_seconds(&v, name, TIMEOUT_RANGE)?),
            None => None,
        };
        let max_attempts = match self.max_attempts {
            Some(n) => check_count(n, "max_attempts", ATTEMPTS_RANGE)?,
            None => match setting(
                "AWS_METADATA_SERVICE_NUM_ATTEMPTS",
                "metadata_service_num_attempts",
            )? {
                Some((v, name)) => parse_count(&v, name, ATTEMPTS_RANGE)?,
                None => DEFAULT_MAX_ATTEMPTS,
            },
        };
        let token_ttl = self.token_ttl.unwrap_or(DEFAULT_TOKEN_TTL);
        let (min_ttl, max_ttl) = TOKEN_TTL_RANGE;
        if !(min_ttl..=max_ttl).contains(&token_ttl.as_secs()) || token_ttl.subsec_nanos() != 0 {
            return Err(invalid(
                "token_ttl",
                format!(
                    "expected a whole number of seconds from {min_ttl} to {max_ttl}, got {} seconds",
                    token_ttl.as_secs_f64()
                ),
            ));
        }
        let v1_disabled = match setting("AWS_EC2_METADATA_V1_DISABLED", "ec2_metadata_v1_disabled")?
        {
            Some((v, name)) => parse_bool(&v, name)?,
            None => false,
        };
        let profile_name = match self.profile_name {
            Some(name) => Some((name, "profile_name")),
            None => env
                .lookup("AWS_EC2_INSTANCE_PROFILE_NAME")?
                .map(|name| (name, "AWS_EC2_INSTANCE_PROFILE_NAME")),
        };
        let profile_name = match profile_name {
            Some((name, setting)) => match name.trim() {
                "" => None,
                name if is_iam_role_name(name) => Some(name.to_owned()),
                _ => {
                    return Err(invalid(
                        setting,
                        format!(
                            "expected an IAM role name (1 to 64 of A-Z a-z 0-9 + = , . @ _ -), got {name:?}"
                        ),
                    ));
                }
            },
            None => None,
        };
        let connect_timeout = match self.connect_timeout {
            Some(t) => check_duration(t, "connect_timeout", TIMEOUT_RANGE)?,
            None => env_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        };
        let read_timeout = match self.read_timeout {
            Some(t) => check_duration(t, "read_timeout", TIMEOUT_RANGE)?,
            None => env_timeout.unwrap_or(DEFAULT_READ_TIMEOUT),
        };
        let unreachable_memo = match self.unreachable_memo {
            Some(memo) => check_duration(memo, "unreachable_memo", UNREACHABLE_MEMO_RANGE)?,
            None => UNREACHABLE_MEMO,
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            // IMDS never redirects; following one would send the session
            // token to whatever host the Location names.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .user_agent(concat!("imds-client/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(4)
            .build()
            .map_err(|e| {
                let kind = ErrorKind::InvalidConfiguration {
                    setting: "http client".into(),
                    reason: "could not be built".into(),
                };
                Error::with_source(kind, e)
            })?;
        Ok(ImdsClient {
            inner: Arc::new(Inner {
                http,
                endpoint: endpoint.trim_end_matches('/').to_owned(),
                request_timeout: connect_timeout.saturating_add(read_timeout),
                retry: RetryPolicy {
                    max_attempts,
                    base_delay: Duration::from_millis(100),
                },
                token_ttl,
                v1_fallback: self.imdsv1_fallback.unwrap_or(false) && !v1_disabled,
                disabled,
                profile_name,
                tokens: TokenCache::default(),
                unreachable_memo,
                unreachable_until: Mutex::new(None),
                credentials_path: AtomicU8::new(PATH_UNKNOWN),
                #[cfg(test)]
                requested_sleeps: Mutex::default(),
            }),
        })
    }
}

fn validate_endpoint(url: &str, setting: &str) -> Result<String, Error> {
    let parsed = reqwest::Url::parse(url.trim())
        .map_err(|e| invalid(setting, format!("{url:?} is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(invalid(
            setting,
            format!("{url:?} is not an http:// URL with a host"),
        ));
    }
    Ok(url.trim().trim_end_matches('/').to_owned())
}

/// Whether `path` names a role's credentials document (not the list of
/// roles, which holds only names).
fn returns_secrets(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let normalized = path.trim_start_matches('/');
    [
        "latest/meta-data/iam/security-credentials/",
        "latest/meta-data/iam/security-credentials-extended/",
    ]
    .iter()
    .any(|prefix| {
        normalized
            .strip_prefix(prefix)
            .is_some_and(|role| !role.trim_matches('/').is_empty())
    })
}

const PATH_UNKNOWN: u8 = 0;
const PATH_EXTENDED: u8 = 1;
const PATH_CLASSIC: u8 = 2;

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    endpoint: String,
    /// Connect timeout plus read timeout: reqwest's per-request timeout runs
    /// from the start of connecting, so it must outlast the connect timeout
    /// for a handshake that never completes to be reported as what it is
    /// (`Unreachable`, from the connect timeout) rather than as a request
    /// that connected and got no answer (`Timeout`, `TokenTimeout`).
    request_timeout: Duration,
    retry: RetryPolicy,
    token_ttl: Duration,
    v1_fallback: bool,
    disabled: bool,
    profile_name: Option<String>,
    tokens: TokenCache,
    unreachable_memo: Duration,
    /// Until when, and which failure (`Unreachable` or `TokenTimeout`).
    unreachable_until: Mutex<Option<(Instant, ErrorKind)>>,
    credentials_path: AtomicU8,
    /// Every retry delay the backoff handed out, for tests of the jitter.
    #[cfg(test)]
    requested_sleeps: Mutex<Vec<Duration>>,
}

/// A response body and the server's `Date`.
#[derive(Debug)]
struct Answer {
    body: String,
    server_time: Option<SystemTime>,
}

/// An IMDSv2 client. Cheap to clone: clones share the connection pool and the
/// token cache.
///
/// ```no_run
/// # async fn demo() -> Result<(), imds_client::Error> {
/// let client = imds_client::ImdsClient::builder().build()?;
/// println!("running on {}", client.instance_id().await?);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ImdsClient {
    inner: Arc<Inner>,
}

impl ImdsClient {
    /// Starts configuring a client.
    pub fn builder() -> ImdsClientBuilder {
        ImdsClientBuilder::default()
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// How this client retries (see [`RetryPolicy`] for the table).
    pub fn retry_policy(&self) -> RetryPolicy {
        self.inner.retry
    }

    /// GETs a metadata path (e.g. `/latest/meta-data/instance-id`) and
    /// returns the body.
    ///
    /// A path that returns secrets (a role's credentials under
    /// `iam/security-credentials/ROLE` or `iam/security-credentials-extended/ROLE`)
    /// is refused with [`ErrorKind::InvalidConfiguration`], before anything
    /// is sent: a plain `String` would carry them into logs and `Debug`
    /// output. Use [`ImdsClient::get_secret`] for those, or the typed
    /// credentials of the provider.
    pub async fn get(&self, path: &str) -> Result<String, Error> {
        if returns_secrets(path) {
            return Err(Error::new(ErrorKind::InvalidConfiguration {
                setting: "path".into(),
                reason: format!(
                    "{path} returns credentials: use ImdsClient::get_secret, which returns a \
                     SecretString, or the credentials provider"
                ),
            }));
        }
        self.fetch(path).await.map(|a| a.body)
    }

    /// GETs a metadata path whose body is secret (a role's credentials
    /// document), as a [`SecretString`] that zeroizes its memory on drop and
    /// shows `[redacted]` in `Debug`.
    pub async fn get_secret(&self, path: &str) -> Result<SecretString, Error> {
        self.fetch(path).await.map(|a| SecretString::new(a.body))
    }

    /// The instance id.
    pub async fn instance_id(&self) -> Result<String, Error> {
        self.get("/latest/meta-data/instance-id").await
    }

    /// The region the instance runs in.
    pub async fn region(&self) -> Result<String, Error> {
        self.get("/latest/meta-data/placement/region").await
    }

    /// The instance identity document (JSON text).
    pub async fn instance_identity_document(&self) -> Result<String, Error> {
        self.get("/latest/dynamic/instance-identity/document").await
    }

    /// The IAM info document (`InstanceProfileArn`, `InstanceProfileId`).
    /// [`ErrorKind::NoRoleAttached`] when no role is attached.
    pub async fn iam_info(&self) -> Result<String, Error> {
        self.get("/latest/meta-data/iam/info")
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound { .. } => Error::new(ErrorKind::NoRoleAttached),
                _ => e,
            })
    }

    /// The attached role's name; the configured one (no request) when a
    /// profile name is set. [`ErrorKind::NoRoleAttached`] when none is attached.
    pub async fn role_name(&self) -> Result<String, Error> {
        self.fetch_role_name().await.map(|f| f.role)
    }

    /// The role name with the answer's `Date` (for the provider's skew).
    async fn fetch_role_name(&self) -> Result<FetchedRole, Error> {
        if let Some(name) = &self.inner.profile_name {
            return Ok(FetchedRole {
                role: name.clone(),
                server_time: None,
            });
        }
        match self.fetch(ROLE_LIST_PATH).await {
            Ok(Answer { body, server_time }) => {
                let role = body
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .ok_or_else(|| Error::new(ErrorKind::NoRoleAttached))?;
                // Anything IAM would not allow would end up in URLs, logs and
                // file comments: refuse it.
                if !is_iam_role_name(role) {
                    return Err(Error::new(ErrorKind::MalformedResponse {
                        what: "the role list holds a name IAM does not allow".into(),
                    }));
                }
                Ok(FetchedRole {
                    role: role.to_owned(),
                    server_time,
                })
            }
            Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {
                Err(Error::new(ErrorKind::NoRoleAttached))
            }
            Err(e) => Err(e),
        }
    }

    /// The credentials of `role`. Tries the extended path (which adds the
    /// account id) first; on 404, or when the first answer there is any
    /// other error status but 401 and 429 (moto answers 500), the classic
    /// one, remembering which this endpoint serves.
    pub async fn role_credentials(&self, role: &str) -> Result<Credentials, Error> {
        self.fetch_credentials(role).await.map(|f| f.credentials)
    }

    async fn fetch_credentials(&self, role: &str) -> Result<FetchedCredentials, Error> {
        if !is_iam_role_name(role) {
            return Err(invalid(
                "role name",
                format!(
                    "expected an IAM role name (1 to 64 of A-Z a-z 0-9 + = , . @ _ -), got {role:?}"
                ),
            ));
        }
        let inner = &self.inner;
        let mut answer = None;
        let path = inner.credentials_path.load(Ordering::Relaxed);
        if path != PATH_CLASSIC {
            match self.fetch(&format!("{EXTENDED_PATH}{role}")).await {
                Ok(a) => {
                    inner
                        .credentials_path
                        .store(PATH_EXTENDED, Ordering::Relaxed);
                    answer = Some(a);
                }
                // 404: the classic path is served instead (or the role is
                // gone; the classic path says which).
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {}
                // The first time, any other answer *to this path* (moto's
                // 500 for paths it does not know, a 400, 403, 405) also
                // means "try the classic one"; a timeout, 401 or 429 says
                // nothing about the path, and a transport failure or a
                // redirect would fail there too.
                Err(e) if path == PATH_UNKNOWN && extended_path_refused(&e) => {
                    tracing::debug!(error = %e, "the extended credentials path failed; using the classic one");
                }
                Err(e) => return Err(e),
            }
        }
        let answer = match answer {
            Some(a) => a,
            None => match self.fetch(&format!("{ROLE_LIST_PATH}{role}")).await {
                Ok(a) => {
                    inner
                        .credentials_path
                        .store(PATH_CLASSIC, Ordering::Relaxed);
                    a
                }
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {
                    return Err(match &inner.profile_name {
                        Some(name) => Error::new(ErrorKind::RoleNotFound { role: name.clone() }),
                        None => Error::new(ErrorKind::NoRoleAttached),
                    });
                }
                Err(e) => return Err(e),
            },
        };
        Ok(FetchedCredentials {
            credentials: Credentials::from_imds_json(answer.body.as_bytes())?,
            server_time: answer.server_time,
        })
    }

    /// One metadata GET with retries, the token and the unreachable memo.
    async fn fetch(&self, path: &str) -> Result<Answer, Error> {
        let inner = &self.inner;
        if inner.disabled {
            return Err(Error::new(ErrorKind::Disabled));
        }
        let memo = inner
            .unreachable_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some((until, kind)) = memo
            && Instant::now() < until
        {
            return Err(Error::new(kind));
        }
        let policy = inner.retry;
        let result = (|| self.attempt(path))
            .retry(policy.backoff())
            .when(RetryPolicy::is_retried)
            .adjust(|error: &Error, delay| match error.kind() {
                ErrorKind::Throttled => delay.map(|d| d * 4),
                _ => delay,
            })
            .notify(|error: &Error, delay| {
                #[cfg(test)]
                inner
                    .requested_sleeps
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(delay);
                tracing::debug!(%path, error = %error, ?delay, "retrying IMDS request");
            })
            .await;
        if let Err(e) = &result
            && matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::TokenTimeout)
            && !inner.unreachable_memo.is_zero()
        {
            *inner
                .unreachable_until
                .lock()
                .unwrap_or_else(|e| e.into_inner()) =
                Some((Instant::now() + inner.unreachable_memo, e.kind().clone()));
        }
        result
    }

    /// One attempt: token, GET, and on 401 one more try with a new token.
    async fn attempt(&self, path: &str) -> Result<Answer, Error> {
        let token = self.token().await?;
        let response = self.send(Method::GET, path, token.as_ref(), None).await?;
        let response = if response.status() == StatusCode::UNAUTHORIZED && token.is_some() {
            tracing::debug!("IMDS rejected the session token; fetching a new one");
            self.inner.tokens.invalidate().await;
            let token = self.token().await?;
            self.send(Method::GET, path, token.as_ref(), None).await?
        } else {
            response
        };
        let status = response.status();
        let server_time = response
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        match status.as_u16() {
            200 => Ok(Answer {
                body: read_bounded(response).await?,
                server_time,
            }),
            401 => Err(Error::new(ErrorKind::Unauthorized)),
            404 => Err(Error::new(ErrorKind::NotFound {
                path: path.to_owned(),
            })),
            429 => Err(Error::new(ErrorKind::Throttled)),
            300..=399 => Err(redirected(&response)),
            s @ 500..=599 => Err(Error::new(ErrorKind::ServerError { status: s })),
            s => Err(Error::new(ErrorKind::UnexpectedStatus { status: s })),
        }
    }

    async fn token(&self) -> Result<MaybeToken, Error> {
        let inner = &self.inner;
        inner
            .tokens
            .get_or_fetch(inner.token_ttl, || self.fetch_token())
            .await
    }

    async fn fetch_token(&self) -> Result<MaybeToken, Error> {
        let ttl = self.inner.token_ttl.as_secs().to_string();
        let response = match self.send(Method::PUT, TOKEN_PATH, None, Some(&ttl)).await {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), ErrorKind::Timeout) => {
                return Err(Error::new(ErrorKind::TokenTimeout));
            }
            Err(e) => return Err(e),
        };
        match response.status().as_u16() {
            200 => {
                let token = read_bounded(response).await?;
                if token.trim().is_empty() {
                    return Err(Error::new(ErrorKind::MalformedResponse {
                        what: "the session token is empty".into(),
                    }));
                }
                Ok(Some(SecretString::new(token.trim().to_owned())))
            }
            s @ (403..=405) if self.inner.v1_fallback => {
                tracing::warn!(
                    status = s,
                    "IMDS refused a session token; falling back to IMDSv1 as configured"
                );
                Ok(None)
            }
            300..=399 => Err(redirected(&response)),
            400 => Err(Error::new(ErrorKind::UnexpectedStatus { status: 400 })),
            s @ (403..=405) => Err(Error::new(ErrorKind::TokenRejected { status: s })),
            429 => Err(Error::new(ErrorKind::Throttled)),
            s @ 500..=599 => Err(Error::new(ErrorKind::ServerError { status: s })),
            s => Err(Error::new(ErrorKind::UnexpectedStatus { status: s })),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        ttl: Option<&str>,
    ) -> Result<reqwest::Response, Error> {
        let inner = &self.inner;
        let mut request = inner
            .http
            .request(method, format!("{}{path}", inner.endpoint))
            .timeout(inner.request_timeout);
        if let Some(token) = token {
            let mut value =
                reqwest::header::HeaderValue::from_str(token.expose()).map_err(|_| {
                    Error::new(ErrorKind::MalformedResponse {
                        what: "the session token is not a valid header value".into(),
                    })
                })?;
            value.set_sensitive(true);
            request = request.header(TOKEN_HEADER, value);
        }
        if let Some(ttl) = ttl {
            request = request.header(TTL_HEADER, ttl);
        }
        request.send().await.map_err(classify_transport)
    }
}

/// Whether the first answer to the extended credentials path means this
/// endpoint does not serve it, so the classic path is used from then on.
fn extended_path_refused(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ServerError { .. } | ErrorKind::UnexpectedStatus { .. }
    )
}

/// The error for a 3xx answer: its status and (the start of) its `Location`.
fn redirected(response: &reqwest::Response) -> Error {
    let location = response.headers().get(reqwest::header::LOCATION).map(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .chars()
            .take(256)
            .collect()
    });
    Error::new(ErrorKind::Redirected {
        status: response.status().as_u16(),
        location,
    })
}

fn classify_transport(error: reqwest::Error) -> Error {
    // reqwest's messages name the URL, never headers, so the token stays out.
    let kind = if error.is_connect() {
        ErrorKind::Unreachable
    } else if error.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connection
    };
    Error::with_source(kind, error)
}

async fn read_bounded(mut response: reqwest::Response) -> Result<String, Error> {
    if response
        .content_length()
        .is_some_and(|len| len > MAX_RESPONSE_BYTES as u64)
    {
        return Err(Error::new(ErrorKind::ResponseTooLarge {
            limit: MAX_RESPONSE_BYTES,
        }));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify_transport)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(Error::new(ErrorKind::ResponseTooLarge {
                limit: MAX_RESPONSE_BYTES,
            }));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| {
        Error::new(ErrorKind::MalformedResponse {
            what: "the response is not UTF-8 text".into(),
        })
    })
}

impl CredentialsSource for ImdsClient {
    fn role_name(&self) -> BoxFuture<'_, Result<FetchedRole, Error>> {
        Box::pin(self.fetch_role_name())
    }

    fn role_credentials<'a>(
        &'a self,
        role: &'a str,
    ) -> BoxFuture<'a, Result<FetchedCredentials, Error>> {
        Box::pin(self.fetch_credentials(role))
    }
}

#[cfg(all(test, feature = "mock"))]
mod tests {
    use super::*;
    use crate::config::Env;
    use crate::mock::{Fault, FaultDuration, MockImds};

    /// Set in a child process: print the requested sleeps and stop.
    const CHILD: &str = "IMDS_CLIENT_TEST_PRINT_SLEEPS";

    /// The retry delays a new client asks for while IMDS answers 503 to
    /// everything (four attempts: three delays).
    async fn requested_sleeps() -> Vec<Duration> {
        let imds = MockImds::builder().start().await.unwrap();
        imds.inject(Fault::Status { status: 503 }, FaultDuration::Forever);
        let client = ImdsClient::builder()
            .env(Env::empty())
            .endpoint(imds.endpoint())
            .unwrap()
            .build()
            .unwrap();
        let err = client.instance_id().await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::ServerError { status: 503 });
        let sleeps = client.inner.requested_sleeps.lock().unwrap().clone();
        assert_eq!(sleeps.len(), 3, "{sleeps:?}");
        sleeps
    }

    #[tokio::test]
    async fn two_clients_retry_on_different_schedules() {
        let (a, b) = tokio::join!(requested_sleeps(), requested_sleeps());
        assert_ne!(a, b, "two clients slept the same jittered delays");
    }

    #[test]
    fn each_process_retries_on_its_own_schedule() {
        let sleeps = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(requested_sleeps())
        };
        if std::env::var_os(CHILD).is_some() {
            println!("sleeps: {:?}", sleeps());
            return;
        }
        let child = || {
            let output = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "client::tests::each_process_retries_on_its_own_schedule",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            assert!(output.status.success(), "child failed: {stdout}");
            stdout
                .lines()
                .find_map(|l| l.split_once("sleeps: ").map(|(_, s)| s.to_owned()))
                .unwrap_or_else(|| panic!("no schedule in the child's output: {stdout}"))
        };
        let (first, second) = (child(), child());
        assert_ne!(
            first, second,
            "two processes slept the same jittered delays: jitter is not seeded per process"
        );
    }
}

#[cfg(test)]
mod secret_path_tests {
    use super::returns_secrets;

    #[test]
    fn credentials_documents_are_secret_paths_and_the_role_list_is_not() {
        for (path, secret) in [
            ("/latest/meta-data/iam/security-credentials/", false),
            ("/latest/meta-data/iam/security-credentials", false),
            ("/latest/meta-data/iam/security-credentials/role", true),
            ("latest/meta-data/iam/security-credentials/role/", true),
            (
                "/latest/meta-data/iam/security-credentials-extended/role",
                true,
            ),
            ("//latest/meta-data/iam/security-credentials/role?x=1", true),
            ("/latest/meta-data/iam/info", false),
            ("/latest/meta-data/instance-id", false),
        ] {
            assert_eq!(returns_secrets(path), secret, "{path}");
        }
    }
}
