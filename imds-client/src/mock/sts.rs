//! An STS emulator beside the IMDS one: `AssumeRole` and `GetCallerIdentity`
//! over the AWS Query protocol, verifying SigV4 against the credentials the
//! IMDS emulator issued.
//!
//! # Why its own listener
//!
//! [`MockSts::for_imds`] starts it on a loopback port of its own, sharing the
//! IMDS emulator's state (issued credentials, wall clock). Real STS answers
//! `POST /` on a host of its own, so a client is pointed at it exactly as at
//! a real endpoint (`AWS_ENDPOINT_URL_STS=http://127.0.0.1:PORT`, no path),
//! and IMDS request counts and faults stay apart from STS ones.
//!
//! # Fidelity
//!
//! Shapes follow the STS API reference (`AssumeRole`, `GetCallerIdentity`,
//! "Common Errors"): results in `<{Action}Response><{Action}Result>`, errors
//! in `<ErrorResponse><Error><Type/><Code/><Message/></Error><RequestId/>`,
//! `Content-Type: text/xml` and an `x-amzn-RequestId` header. The checks, in
//! the order STS makes them:
//!
//! 1. injected faults ([`StsFault`]): `Throttling` (400) or a 5xx;
//! 2. authentication: a missing `Authorization` is `MissingAuthenticationToken`
//!    (403); a malformed one `IncompleteSignature` (400); an access key this
//!    emulator never issued, or a session token that is not the key's,
//!    `InvalidClientTokenId` (403); expired credentials `ExpiredToken` (400);
//!    an `X-Amz-Date` more than 15 minutes from the clock, a scope for another
//!    service, or a signature that differs from the one recomputed with
//!    `aws-sigv4` from the received method, path, query, signed headers and
//!    body, `SignatureDoesNotMatch` (403);
//! 3. parameters: `ValidationError` (400) for a bad role ARN, a session name
//!    outside `[\w+=,.@-]{2,64}`, `DurationSeconds` outside 900..=43200, more
//!    than 10 policy ARNs, more than 50 tags, a source identity outside
//!    `[\w+=,.@-]{2,64}`, and for more than 3600 s under role chaining;
//!    `MalformedPolicyDocument` (400) for a policy that is not JSON;
//!    `PackedPolicyTooLarge` (400) when the packed size exceeds 2048 (see
//!    [`packed_size`]);
//! 4. authorisation: `AccessDenied` (403) for roles marked with
//!    [`MockSts::deny_assume_role`], and for session tags or a source
//!    identity on roles marked with [`MockSts::deny_tag_session`] or
//!    [`MockSts::deny_set_source_identity`].
//!
//! # Control surface
//!
//! Paths real STS never serves, on the same listener: `GET`/`DELETE
//! /_mock/calls` (the recorded calls as JSON / forget them), `POST /_mock/fault`
//! (`{"fault": "throttling"}` or `{"fault": "server-error", "status": 503}`,
//! plus `"requests": N` or `"seconds": S`, else until cleared), `DELETE
//! /_mock/fault`, and `PUT`/`DELETE /_mock/deny` with a role ARN as the body.
//!
//! # Role chaining
//!
//! Every caller this emulator knows holds role credentials: IMDS serves the
//! instance role's session, and `AssumeRole` answers with a role session. AWS
//! treats assuming a role with either as role chaining ("The requested
//! DurationSeconds exceeds the 1 hour session limit for roles assumed by role
//! chaining", seen by every tool that assumes a role from an instance
//! profile), so `DurationSeconds` above 3600 is refused by default.
//! [`MockStsBuilder::instance_credentials_chain`]`(false)` treats the IMDS
//! credentials as long-term ones, to exercise the 12-hour range; credentials
//! the STS emulator issued are always chained.
//!
//! # Packed policy size
//!
//! STS compresses the session policy, the managed policy ARNs and the session
//! tags into a packed form of undocumented size. The emulator approximates it
//! as [`packed_size`]: the length of the policy with insignificant whitespace
//! removed, plus each policy ARN's length, plus each tag's key and value
//! lengths; more than 2048 is `PackedPolicyTooLarge`. 2048 is STS's documented
//! limit on the plaintext of the inline and managed session policies.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use aws_sigv4::http_request::{
    SessionTokenMode, SignableBody, SignableRequest, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::MockImds;
use super::control::fault_duration;
use super::fault::FaultDuration;
use super::routes::{ACCOUNT_ID, INSTANCE_ID};
use super::state::{KEY_ALPHABET, SECRET_ALPHABET, Shared, random_string};
use crate::credentials::{Credentials, format_rfc3339};

/// The shortest session STS grants, in seconds.
pub const MIN_DURATION_SECONDS: u32 = 900;
/// The longest session STS grants without role chaining, in seconds.
pub const MAX_DURATION_SECONDS: u32 = 43_200;
/// The longest session STS grants under role chaining, in seconds.
pub const MAX_CHAINED_DURATION_SECONDS: u32 = 3_600;
/// The most managed policy ARNs one `AssumeRole` may carry.
pub const MAX_POLICY_ARNS: usize = 10;
/// The most session tags one `AssumeRole` may carry.
pub const MAX_SESSION_TAGS: usize = 50;
/// The largest accepted [`packed_size`].
pub const MAX_PACKED_SIZE: usize = 2048;
/// How far `X-Amz-Date` may be from the clock, either way.
const MAX_REQUEST_SKEW: Duration = Duration::from_secs(15 * 60);
const XMLNS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";

/// The emulator's approximation of STS's packed policy size: the policy's
/// length with insignificant whitespace removed (as JSON, compacted), plus
/// each policy ARN's length, plus each session tag's key and value lengths.
/// `None` when the policy is not JSON.
pub fn packed_size(
    policy: Option<&str>,
    policy_arns: &[String],
    tags: &[(String, String)],
) -> Option<usize> {
    let policy = match policy {
        Some(text) => serde_json::from_str::<serde_json::Value>(text)
            .ok()?
            .to_string()
            .chars()
            .count(),
        None => 0,
    };
    Some(
        policy
            + policy_arns.iter().map(|a| a.chars().count()).sum::<usize>()
            + tags
                .iter()
                .map(|(k, v)| k.chars().count() + v.chars().count())
                .sum::<usize>(),
    )
}

/// A misbehaviour of STS. As JSON (control surface):
/// `{"fault": "throttling"}`, `{"fault": "server-error", "status": 503}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum StsFault {
    /// `400 Throttling` ("Rate exceeded"), what STS answers over its quota.
    Throttling,
    /// A server error: 500 `InternalFailure`, 503 `ServiceUnavailable`, any
    /// other 5xx `InternalFailure` with that status. Statuses outside
    /// 500..=599 are answered as 500.
    ServerError {
        /// The HTTP status.
        status: u16,
    },
}

/// One request the emulator answered, for tests to inspect.
///
/// Holds no secret: the caller is named by its access key id only.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct StsCall {
    /// `AssumeRole`, `GetCallerIdentity`, or what the request named.
    pub action: String,
    /// The access key id the request was signed with, if it had one.
    pub caller_access_key_id: Option<String>,
    /// `RoleArn`.
    pub role_arn: Option<String>,
    /// `RoleSessionName`.
    pub role_session_name: Option<String>,
    /// `DurationSeconds`, as sent.
    pub duration_seconds: Option<String>,
    /// `Policy`, as sent.
    pub policy: Option<String>,
    /// `PolicyArns.member.N.arn`, in order.
    pub policy_arns: Vec<String>,
    /// `Tags.member.N.Key` / `.Value`, in order.
    pub tags: Vec<(String, String)>,
    /// `SourceIdentity`.
    pub source_identity: Option<String>,
    /// The access key id issued, or the error `Code` answered.
    pub outcome: Result<String, String>,
}

/// Configures and starts a [`MockSts`].
#[derive(Debug)]
pub struct MockStsBuilder {
    imds: Arc<Shared>,
    listen: SocketAddr,
    instance_credentials_chain: bool,
}

impl MockStsBuilder {
    /// Where to listen. Default: `127.0.0.1:0` (an ephemeral loopback port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Whether IMDS-issued credentials count as a role session, capping
    /// `DurationSeconds` at 3600 (role chaining). Default: true, as on AWS.
    pub fn instance_credentials_chain(mut self, chain: bool) -> Self {
        self.instance_credentials_chain = chain;
        self
    }

    /// Binds the listener and starts serving in a spawned task.
    pub async fn start(self) -> std::io::Result<MockSts> {
        let listener = TcpListener::bind(self.listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(StsShared {
            imds: self.imds,
            instance_credentials_chain: self.instance_credentials_chain,
            state: Mutex::new(StsState::default()),
        });
        let stop = CancellationToken::new();
        let app = Router::new()
            .route(
                "/_mock/calls",
                get(control_calls).delete(control_clear_calls),
            )
            .route(
                "/_mock/fault",
                post(control_inject).delete(control_clear_faults),
            )
            .route("/_mock/deny", put(control_deny).delete(control_allow))
            .fallback(handle)
            .with_state(shared.clone());
        let server_stop = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(server_stop.cancelled_owned())
                .await;
        });
        Ok(MockSts {
            shared,
            local_addr,
            stop,
            task: Some(task),
        })
    }
}

/// A running STS emulator. Dropping it stops the server.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use imds_client::mock::{MockImds, MockSts};
/// let imds = MockImds::builder().role("app-role").start().await?;
/// let sts = MockSts::for_imds(&imds).start().await?;
/// // AWS_ENDPOINT_URL_STS=<sts.endpoint()>, credentials from IMDS.
/// sts.deny_assume_role("arn:aws:iam::123456789012:role/forbidden");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MockSts {
    shared: Arc<StsShared>,
    local_addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MockSts {
    /// Starts configuring an STS emulator that accepts the credentials
    /// `imds` issues (and those it issues itself), on `imds`'s wall clock.
    pub fn for_imds(imds: &MockImds) -> MockStsBuilder {
        MockStsBuilder {
            imds: imds.shared.clone(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            instance_credentials_chain: true,
        }
    }

    /// The base URL to point a client at, e.g. `http://127.0.0.1:40124`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// The address the emulator listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every request answered so far, oldest first.
    pub fn calls(&self) -> Vec<StsCall> {
        self.shared.lock().calls.clone()
    }

    /// The `AssumeRole` requests answered so far, oldest first.
    pub fn assume_role_calls(&self) -> Vec<StsCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.action == "AssumeRole")
            .collect()
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&self) {
        self.shared.lock().calls.clear();
    }

    /// `AssumeRole` of `role_arn` answers `AccessDenied` from now on (its
    /// trust policy does not name the caller).
    pub fn deny_assume_role(&self, role_arn: impl Into<String>) {
        self.shared.lock().denied.insert(role_arn.into());
    }

    /// Undoes [`deny_assume_role`](Self::deny_assume_role).
    pub fn allow_assume_role(&self, role_arn: &str) {
        self.shared.lock().denied.remove(role_arn);
    }

    /// `AssumeRole` of `role_arn` with session tags answers `AccessDenied`
    /// (its trust policy lacks `sts:TagSession`).
    pub fn deny_tag_session(&self, role_arn: impl Into<String>) {
        self.shared.lock().deny_tags.insert(role_arn.into());
    }

    /// `AssumeRole` of `role_arn` with a `SourceIdentity` answers
    /// `AccessDenied` (its trust policy lacks `sts:SetSourceIdentity`).
    pub fn deny_set_source_identity(&self, role_arn: impl Into<String>) {
        self.shared
            .lock()
            .deny_source_identity
            .insert(role_arn.into());
    }

    /// Injects `fault` for `duration` (requests count every STS request).
    /// Faults stack; the oldest applicable one wins.
    pub fn inject(&self, fault: StsFault, duration: FaultDuration) {
        self.shared.inject(fault, duration);
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Credentials this emulator issued with `access_key_id`, if any.
    pub fn issued_credentials(&self, access_key_id: &str) -> Option<Credentials> {
        self.shared
            .lock()
            .sessions
            .get(access_key_id)
            .map(|s| s.credentials.clone())
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockSts {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct ActiveFault {
    fault: StsFault,
    remaining: Option<u32>,
    until: Option<tokio::time::Instant>,
}

/// A role session the emulator issued.
struct Session {
    credentials: Credentials,
    assumed_role_arn: String,
    assumed_role_id: String,
}

#[derive(Default)]
struct StsState {
    sessions: HashMap<String, Session>,
    denied: HashSet<String>,
    deny_tags: HashSet<String>,
    deny_source_identity: HashSet<String>,
    faults: Vec<ActiveFault>,
    calls: Vec<StsCall>,
}

struct StsShared {
    imds: Arc<Shared>,
    instance_credentials_chain: bool,
    state: Mutex<StsState>,
}

impl std::fmt::Debug for StsShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockStsState").finish_non_exhaustive()
    }
}

impl StsShared {
    fn lock(&self) -> MutexGuard<'_, StsState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn inject(&self, fault: StsFault, duration: FaultDuration) {
        let (remaining, until) = match duration {
            FaultDuration::Requests(n) => (Some(n), None),
            FaultDuration::For(d) => (None, tokio::time::Instant::now().checked_add(d)),
            FaultDuration::Forever => (None, None),
        };
        self.lock().faults.push(ActiveFault {
            fault,
            remaining,
            until,
        });
    }

    fn take_fault(&self) -> Option<StsFault> {
        let now = tokio::time::Instant::now();
        let mut state = self.lock();
        state
            .faults
            .retain(|f| f.remaining != Some(0) && f.until.is_none_or(|until| until > now));
        let active = state.faults.first_mut()?;
        if let Some(remaining) = active.remaining.as_mut() {
            *remaining -= 1;
        }
        Some(active.fault.clone())
    }
}

// The control surface: paths real STS never serves (it answers `POST /`).

async fn control_calls(State(sts): State<Arc<StsShared>>) -> Json<Vec<StsCall>> {
    Json(sts.lock().calls.clone())
}

async fn control_clear_calls(State(sts): State<Arc<StsShared>>) -> StatusCode {
    sts.lock().calls.clear();
    StatusCode::NO_CONTENT
}

/// `POST /_mock/fault` body: a [`StsFault`] plus an optional `"requests"`
/// count or `"seconds"` duration (else until cleared).
#[derive(serde::Deserialize)]
struct FaultRequest {
    #[serde(flatten)]
    fault: StsFault,
    requests: Option<u32>,
    seconds: Option<f64>,
}

async fn control_inject(State(sts): State<Arc<StsShared>>, body: String) -> Response {
    let bad =
        |why: String| (StatusCode::BAD_REQUEST, format!("invalid fault: {why}\n")).into_response();
    let request: FaultRequest = match serde_json::from_str(&body) {
        Ok(request) => request,
        Err(e) => return bad(e.to_string()),
    };
    if let StsFault::ServerError { status } = request.fault
        && !(500..=599).contains(&status)
    {
        return bad(format!("status must be from 500 to 599, got {status}"));
    }
    match fault_duration(request.requests, request.seconds) {
        Ok(duration) => {
            sts.inject(request.fault, duration);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(why) => bad(why),
    }
}

async fn control_clear_faults(State(sts): State<Arc<StsShared>>) -> StatusCode {
    sts.lock().faults.clear();
    StatusCode::NO_CONTENT
}

/// `PUT /_mock/deny` body: a role ARN whose `AssumeRole` is denied.
async fn control_deny(State(sts): State<Arc<StsShared>>, body: String) -> StatusCode {
    sts.lock().denied.insert(body.trim().to_owned());
    StatusCode::NO_CONTENT
}

/// `DELETE /_mock/deny` body: a role ARN assumable again.
async fn control_allow(State(sts): State<Arc<StsShared>>, body: String) -> StatusCode {
    sts.lock().denied.remove(body.trim());
    StatusCode::NO_CONTENT
}

/// An STS error answer.
struct StsError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl StsError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ValidationError", message)
    }

    fn into_response(self, request_id: &str) -> Response {
        let kind = if self.status.is_server_error() {
            "Receiver"
        } else {
            "Sender"
        };
        let body = format!(
            "<ErrorResponse xmlns=\"{XMLNS}\">\n  <Error>\n    <Type>{kind}</Type>\n    \
             <Code>{}</Code>\n    <Message>{}</Message>\n  </Error>\n  \
             <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n",
            self.code,
            escape(&self.message)
        );
        xml_response(self.status, request_id, body)
    }
}

fn xml_response(status: StatusCode, request_id: &str, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/xml".to_owned()),
            (
                header::HeaderName::from_static("x-amzn-requestid"),
                request_id.to_owned(),
            ),
        ],
        body,
    )
        .into_response()
}

/// Escapes text for an XML element.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

fn request_id() -> String {
    let hex = random_string(32, b"0123456789abcdef");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The request's parameters: the form body of a POST, the query of a GET.
#[derive(Default)]
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `Prefix.member.N.suffix` values in N order, stopping at the first gap.
    fn members(&self, prefix: &str, suffix: &str) -> Vec<String> {
        (1..)
            .map_while(|n| self.get(&format!("{prefix}.member.{n}.{suffix}")))
            .map(str::to_owned)
            .collect()
    }
}

/// The caller, once authenticated.
struct Caller {
    arn: String,
    user_id: String,
    chained: bool,
}

async fn handle(
    State(sts): State<Arc<StsShared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = request_id();
    let mut params = Params::default();
    if let Some(query) = uri.query() {
        params
            .0
            .extend(form_urlencoded::parse(query.as_bytes()).into_owned());
    }
    if method == Method::POST {
        params.0.extend(form_urlencoded::parse(&body).into_owned());
    }
    let mut call = StsCall {
        action: params.get("Action").unwrap_or_default().to_owned(),
        caller_access_key_id: None,
        role_arn: params.get("RoleArn").map(str::to_owned),
        role_session_name: params.get("RoleSessionName").map(str::to_owned),
        duration_seconds: params.get("DurationSeconds").map(str::to_owned),
        policy: params.get("Policy").map(str::to_owned),
        policy_arns: params.members("PolicyArns", "arn"),
        tags: params
            .members("Tags", "Key")
            .into_iter()
            .zip(params.members("Tags", "Value"))
            .collect(),
        source_identity: params.get("SourceIdentity").map(str::to_owned),
        outcome: Err(String::new()),
    };
    let result = answer(&sts, &method, &uri, &headers, &body, &params, &mut call);
    let response = match result {
        Ok((issued, body)) => {
            call.outcome = Ok(issued);
            xml_response(StatusCode::OK, &request_id, body)
        }
        Err(error) => {
            call.outcome = Err(error.code.to_owned());
            error.into_response(&request_id)
        }
    };
    sts.lock().calls.push(call);
    response
}

/// The answer's body and the access key id issued (empty when none).
fn answer(
    sts: &StsShared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    params: &Params,
    call: &mut StsCall,
) -> Result<(String, String), StsError> {
    match sts.take_fault() {
        Some(StsFault::Throttling) => {
            return Err(StsError::new(
                StatusCode::BAD_REQUEST,
                "Throttling",
                "Rate exceeded",
            ));
        }
        Some(StsFault::ServerError { status }) => {
            let status = StatusCode::from_u16(status)
                .ok()
                .filter(StatusCode::is_server_error)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let code = if status == StatusCode::SERVICE_UNAVAILABLE {
                "ServiceUnavailable"
            } else {
                "InternalFailure"
            };
            return Err(StsError::new(
                status,
                code,
                "The request processing has failed because of an unknown error, exception or failure.",
            ));
        }
        None => {}
    }
    if *method != Method::POST && *method != Method::GET {
        return Err(StsError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "InvalidAction",
            "Only POST and GET are supported.",
        ));
    }
    let caller = authenticate(sts, method, uri, headers, body, call)?;
    match params.get("Action") {
        Some("AssumeRole") => assume_role(sts, &caller, params),
        Some("GetCallerIdentity") => Ok((
            String::new(),
            format!(
                "<GetCallerIdentityResponse xmlns=\"{XMLNS}\">\n  <GetCallerIdentityResult>\n    \
                 <Arn>{}</Arn>\n    <UserId>{}</UserId>\n    <Account>{ACCOUNT_ID}</Account>\n  \
                 </GetCallerIdentityResult>\n  <ResponseMetadata>\n    <RequestId>{}</RequestId>\n  \
                 </ResponseMetadata>\n</GetCallerIdentityResponse>\n",
                escape(&caller.arn),
                escape(&caller.user_id),
                request_id()
            ),
        )),
        Some(other) => Err(StsError::new(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            format!("Could not find operation {other} for version 2011-06-15"),
        )),
        None => Err(StsError::new(
            StatusCode::BAD_REQUEST,
            "MissingAction",
            "Missing Action",
        )),
    }
}

/// The parts of `Authorization: AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request, SignedHeaders=a;b, Signature=hex`.
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Option<Authorization<'_>> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (key, value) = part.trim().split_once('=')?;
        match key {
            "Credential" => credential = Some(value),
            "SignedHeaders" => signed = Some(value),
            "Signature" => signature = Some(value),
            _ => return None,
        }
    }
    let mut scope = credential?.split('/');
    let auth = Authorization {
        access_key_id: scope.next()?,
        date: scope.next()?,
        region: scope.next()?,
        service: scope.next()?,
        signed_headers: signed?.split(';').collect(),
        signature: signature?,
    };
    (scope.next()? == "aws4_request" && scope.next().is_none()).then_some(auth)
}

fn parse_amz_date(text: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let at = time::PrimitiveDateTime::parse(text, &format).ok()?;
    Some(at.assume_utc().into())
}

fn authenticate(
    sts: &StsShared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    call: &mut StsCall,
) -> Result<Caller, StsError> {
    let Some(authorization) = headers.get(header::AUTHORIZATION) else {
        return Err(StsError::new(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationToken",
            "Request is missing Authentication Token",
        ));
    };
    let incomplete = || {
        StsError::new(
            StatusCode::BAD_REQUEST,
            "IncompleteSignature",
            "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' parameters in AWS4-HMAC-SHA256 form.",
        )
    };
    let auth = authorization
        .to_str()
        .ok()
        .and_then(parse_authorization)
        .ok_or_else(incomplete)?;
    call.caller_access_key_id = Some(auth.access_key_id.to_owned());
    let invalid_token = || {
        StsError::new(
            StatusCode::FORBIDDEN,
            "InvalidClientTokenId",
            "The security token included in the request is invalid.",
        )
    };
    // The caller: credentials IMDS issued, or a session issued here.
    let (credentials, caller) =
        if let Some((role, credentials)) = sts.imds.issued_credentials(auth.access_key_id) {
            let caller = Caller {
                arn: format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}/{INSTANCE_ID}"),
                user_id: format!("AROA{}:{INSTANCE_ID}", role_id(&role)),
                chained: sts.instance_credentials_chain,
            };
            (credentials, caller)
        } else {
            let state = sts.lock();
            let session = state
                .sessions
                .get(auth.access_key_id)
                .ok_or_else(invalid_token)?;
            let caller = Caller {
                arn: session.assumed_role_arn.clone(),
                user_id: session.assumed_role_id.clone(),
                chained: true,
            };
            (session.credentials.clone(), caller)
        };
    let token = headers
        .get("x-amz-security-token")
        .and_then(|v| v.to_str().ok());
    if token != Some(credentials.session_token()) {
        return Err(invalid_token());
    }
    let now = sts.imds.clock.now();
    if credentials.expiration() <= now {
        return Err(StsError::new(
            StatusCode::BAD_REQUEST,
            "ExpiredToken",
            "The security token included in the request is expired",
        ));
    }
    if auth.service != "sts" {
        return Err(StsError::new(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            format!(
                "Credential should be scoped to correct service: 'sts'. (got '{}')",
                auth.service
            ),
        ));
    }
    let amz_date = headers.get("x-amz-date").and_then(|v| v.to_str().ok());
    let Some(signed_at) = amz_date.and_then(parse_amz_date) else {
        return Err(incomplete());
    };
    let skew = now
        .duration_since(signed_at)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap_or_default();
    if skew > MAX_REQUEST_SKEW {
        return Err(StsError::new(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            format!(
                "Signature expired: {} is now earlier than {} ({} - 15 min.)",
                amz_date.unwrap_or_default(),
                format_rfc3339(now),
                format_rfc3339(now)
            ),
        ));
    }
    if !amz_date.is_some_and(|d| d.starts_with(auth.date)) {
        return Err(StsError::new(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP",
        ));
    }
    let expected = recompute_signature(&credentials, &auth, signed_at, method, uri, headers, body);
    if expected.as_deref() != Some(auth.signature) {
        return Err(StsError::new(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
        ));
    }
    Ok(caller)
}

/// The signature of the received request under `credentials`, computed by
/// `aws-sigv4` from the headers the client said it signed.
fn recompute_signature(
    credentials: &Credentials,
    auth: &Authorization<'_>,
    signed_at: SystemTime,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<String> {
    // The signer adds X-Amz-Date and the session token itself.
    let mut signed = Vec::new();
    for name in &auth.signed_headers {
        if matches!(*name, "x-amz-date" | "x-amz-security-token") {
            continue;
        }
        let values: Vec<&str> = headers
            .get_all(*name)
            .iter()
            .map(|v| v.to_str())
            .collect::<Result<_, _>>()
            .ok()?;
        if values.is_empty() {
            return None;
        }
        signed.push((*name, values.join(",")));
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("http://{host}{path_and_query}");
    let mut settings = SigningSettings::default();
    settings.excluded_headers = Some(Vec::new());
    if !auth.signed_headers.contains(&"x-amz-security-token") {
        settings.session_token_mode = SessionTokenMode::Exclude;
    }
    let identity = credentials.to_aws_credentials("mock-sts").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(auth.region)
        .name("sts")
        .time(signed_at)
        .settings(settings)
        .build()
        .ok()?
        .into();
    let request = SignableRequest::new(
        method.as_str(),
        url,
        signed.iter().map(|(k, v)| (*k, v.as_str())),
        SignableBody::Bytes(body),
    )
    .ok()?;
    // aws-sigv4 logs the canonical request, session token included, at
    // trace level: sign with no subscriber so no log ever holds it.
    let output =
        tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
            sign(request, &params)
        })
        .ok()?;
    Some(output.signature().to_owned())
}

/// A stable made-up unique id for a role name (`AROA` + 17 characters).
fn role_id(role: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in role.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..17)
        .map(|i| KEY_ALPHABET[((hash >> (i * 3)) % KEY_ALPHABET.len() as u64) as usize] as char)
        .collect()
}

/// Whether `text` matches `[\w+=,.@-]{min,max}`.
fn is_name(text: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&text.chars().count())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
}

/// `(partition, role name)` of `arn:PARTITION:iam::ACCOUNT:role/PATH/NAME`.
fn parse_role_arn(arn: &str) -> Option<(&str, &str)> {
    if !(20..=2048).contains(&arn.len()) {
        return None;
    }
    let mut parts = arn.splitn(6, ':');
    let (prefix, partition, service, region, account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    let name = resource.strip_prefix("role/")?.rsplit('/').next()?;
    (prefix == "arn"
        && partition.starts_with("aws")
        && service == "iam"
        && region.is_empty()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && !name.is_empty())
    .then_some((partition, name))
}

fn assume_role(
    sts: &StsShared,
    caller: &Caller,
    params: &Params,
) -> Result<(String, String), StsError> {
    let role_arn = params.get("RoleArn").unwrap_or_default();
    let Some((partition, role_name)) = parse_role_arn(role_arn) else {
        return Err(StsError::validation(format!(
            "{role_arn} is invalid: RoleArn must be arn:aws:iam::ACCOUNT:role/NAME"
        )));
    };
    let session_name = params.get("RoleSessionName").unwrap_or_default();
    if !is_name(session_name, 2, 64) {
        return Err(StsError::validation(format!(
            "1 validation error detected: Value '{session_name}' at 'roleSessionName' failed to \
             satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]* \
             and have length between 2 and 64"
        )));
    }
    let duration = match params.get("DurationSeconds") {
        None => 3600,
        Some(text) => text.parse::<u32>().map_err(|_| {
            StsError::validation(format!("DurationSeconds '{text}' is not an integer"))
        })?,
    };
    if !(MIN_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&duration) {
        return Err(StsError::validation(format!(
            "1 validation error detected: Value '{duration}' at 'durationSeconds' failed to \
             satisfy constraint: Member must have value between {MIN_DURATION_SECONDS} and \
             {MAX_DURATION_SECONDS}"
        )));
    }
    if caller.chained && duration > MAX_CHAINED_DURATION_SECONDS {
        return Err(StsError::validation(
            "The requested DurationSeconds exceeds the 1 hour session limit for roles assumed by role chaining.",
        ));
    }
    let policy_arns = params.members("PolicyArns", "arn");
    if policy_arns.len() > MAX_POLICY_ARNS {
        return Err(StsError::validation(format!(
            "1 validation error detected: Value at 'policyArns' failed to satisfy constraint: \
             Member must have length less than or equal to {MAX_POLICY_ARNS}"
        )));
    }
    let keys = params.members("Tags", "Key");
    let values = params.members("Tags", "Value");
    if keys.len() != values.len() {
        return Err(StsError::validation(
            "each session tag needs a Key and a Value",
        ));
    }
    if keys.len() > MAX_SESSION_TAGS {
        return Err(StsError::validation(format!(
            "1 validation error detected: Value at 'tags' failed to satisfy constraint: \
             Member must have length less than or equal to {MAX_SESSION_TAGS}"
        )));
    }
    let tags: Vec<(String, String)> = keys.into_iter().zip(values).collect();
    let source_identity = params.get("SourceIdentity");
    if let Some(identity) = source_identity
        && (!is_name(identity, 2, 64) || identity.starts_with("aws:"))
    {
        return Err(StsError::validation(format!(
            "1 validation error detected: Value '{identity}' at 'sourceIdentity' failed to \
             satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]*"
        )));
    }
    let policy = params.get("Policy");
    let Some(packed) = packed_size(policy, &policy_arns, &tags) else {
        return Err(StsError::new(
            StatusCode::BAD_REQUEST,
            "MalformedPolicyDocument",
            "The policy is not in the valid JSON format.",
        ));
    };
    if packed > MAX_PACKED_SIZE {
        return Err(StsError::new(
            StatusCode::BAD_REQUEST,
            "PackedPolicyTooLarge",
            format!(
                "Packed policy consumes {}% of allotted space, please use smaller policy for test.",
                packed * 100 / MAX_PACKED_SIZE
            ),
        ));
    }
    let denied = |action: &str| {
        StsError::new(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            format!(
                "User: {} is not authorized to perform: {action} on resource: {role_arn}",
                caller.arn
            ),
        )
    };
    {
        let state = sts.lock();
        if state.denied.contains(role_arn) {
            return Err(denied("sts:AssumeRole"));
        }
        if !tags.is_empty() && state.deny_tags.contains(role_arn) {
            return Err(denied("sts:TagSession"));
        }
        if source_identity.is_some() && state.deny_source_identity.contains(role_arn) {
            return Err(denied("sts:SetSourceIdentity"));
        }
    }
    let now = sts.imds.clock.now();
    let issued_at = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        );
    let expiration = issued_at + Duration::from_secs(duration.into());
    let credentials = Credentials::new(
        format!("ASIA{}", random_string(16, KEY_ALPHABET)),
        random_string(40, SECRET_ALPHABET),
        format!("FwoGZXIvYXdzE{}", random_string(400, SECRET_ALPHABET)),
        expiration,
    )
    .with_account_id(ACCOUNT_ID);
    let assumed_role_id = format!("AROA{}:{session_name}", role_id(role_name));
    let assumed_role_arn =
        format!("arn:{partition}:sts::{ACCOUNT_ID}:assumed-role/{role_name}/{session_name}");
    let mut body = format!("<AssumeRoleResponse xmlns=\"{XMLNS}\">\n  <AssumeRoleResult>\n");
    if let Some(identity) = source_identity {
        body += &format!(
            "    <SourceIdentity>{}</SourceIdentity>\n",
            escape(identity)
        );
    }
    body += &format!(
        "    <AssumedRoleUser>\n      <AssumedRoleId>{}</AssumedRoleId>\n      <Arn>{}</Arn>\n    \
         </AssumedRoleUser>\n    <Credentials>\n      <AccessKeyId>{}</AccessKeyId>\n      \
         <SecretAccessKey>{}</SecretAccessKey>\n      <SessionToken>{}</SessionToken>\n      \
         <Expiration>{}</Expiration>\n    </Credentials>\n",
        escape(&assumed_role_id),
        escape(&assumed_role_arn),
        credentials.access_key_id(),
        escape(credentials.secret_access_key()),
        escape(credentials.session_token()),
        credentials.expiration_rfc3339(),
    );
    if policy.is_some() || !policy_arns.is_empty() || !tags.is_empty() {
        body += &format!(
            "    <PackedPolicySize>{}</PackedPolicySize>\n",
            packed * 100 / MAX_PACKED_SIZE
        );
    }
    body += &format!(
        "  </AssumeRoleResult>\n  <ResponseMetadata>\n    <RequestId>{}</RequestId>\n  \
         </ResponseMetadata>\n</AssumeRoleResponse>\n",
        request_id()
    );
    let access_key_id = credentials.access_key_id().to_owned();
    sts.lock().sessions.insert(
        access_key_id.clone(),
        Session {
            credentials,
            assumed_role_arn,
            assumed_role_id,
        },
    );
    Ok((access_key_id, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packed_size_ignores_insignificant_whitespace() {
        let spaced = "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": []\n}";
        let compact = "{\"Version\":\"2012-10-17\",\"Statement\":[]}";
        assert_eq!(packed_size(Some(spaced), &[], &[]), Some(compact.len()));
        assert_eq!(
            packed_size(
                Some(compact),
                &["arn:x".into()],
                &[("k".into(), "vv".into())]
            ),
            Some(compact.len() + 5 + 3)
        );
        assert_eq!(packed_size(Some("{not json"), &[], &[]), None);
    }

    #[test]
    fn authorization_headers_are_parsed_or_refused() {
        let auth = parse_authorization(
            "AWS4-HMAC-SHA256 Credential=ASIAX/20261202/us-east-1/sts/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=abc",
        )
        .expect("a well-formed header parses");
        assert_eq!(
            (auth.access_key_id, auth.date, auth.region, auth.service),
            ("ASIAX", "20261202", "us-east-1", "sts")
        );
        assert_eq!(auth.signed_headers, ["host", "x-amz-date"]);
        assert_eq!(auth.signature, "abc");
        for bad in [
            "AWS4-HMAC-SHA256 Credential=ASIAX/20261202/us-east-1/sts, SignedHeaders=host, Signature=abc",
            "AWS3 Credential=ASIAX/20261202/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=abc",
            "AWS4-HMAC-SHA256 Credential=ASIAX/20261202/us-east-1/sts/aws4_request, Signature=abc",
        ] {
            assert!(parse_authorization(bad).is_none(), "accepted {bad}");
        }
    }

    #[test]
    fn role_arns_and_names_follow_the_sts_patterns() {
        assert_eq!(
            parse_role_arn("arn:aws:iam::123456789012:role/path/billing"),
            Some(("aws", "billing"))
        );
        assert_eq!(
            parse_role_arn("arn:aws-cn:iam::123456789012:role/b"),
            Some(("aws-cn", "b"))
        );
        assert_eq!(parse_role_arn("arn:aws:iam::12345:role/b"), None);
        assert_eq!(parse_role_arn("arn:aws:s3:::123456789012:role/b"), None);
        assert!(is_name("billing@i-0a1b2c3d4e5f60718", 2, 64));
        assert!(!is_name("a", 2, 64));
        assert!(!is_name("has space", 2, 64));
        assert!(!is_name(&"a".repeat(65), 2, 64));
    }
}
