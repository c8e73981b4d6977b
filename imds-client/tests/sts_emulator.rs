//! The STS emulator's fidelity, checked with a client we did not write: the
//! AWS SDK for Rust's `aws-sdk-sts`, signing with static credentials taken
//! from the IMDS emulator and pointed at the STS emulator by `endpoint_url`.
#![cfg(feature = "mock")]

use std::time::{Duration, SystemTime};

use aws_sdk_sts::config::retry::RetryConfig;
use aws_sdk_sts::config::{BehaviorVersion, Credentials as SdkCredentials, Region};
use aws_sdk_sts::error::ProvideErrorMetadata;
use aws_sdk_sts::types::{PolicyDescriptorType, Tag};
use imds_client::mock::{FaultDuration, MockImds, MockSts, StsFault};
use imds_client::{Credentials, ManualTimeSource, SharedTimeSource, TimeSource};

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/billing";
const SESSION: &str = "billing@i-0a1b2c3d4e5f60718";

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

/// An SDK client signing with `key`/`secret`/`token`, retries off unless
/// `retries` is set.
fn sdk(sts: &MockSts, key: &str, secret: &str, token: &str, retries: bool) -> aws_sdk_sts::Client {
    let retry = if retries {
        RetryConfig::standard()
            .with_max_attempts(3)
            .with_initial_backoff(Duration::from_millis(1))
    } else {
        RetryConfig::disabled()
    };
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("eu-west-1"))
        .endpoint_url(sts.endpoint())
        .credentials_provider(SdkCredentials::new(
            key,
            secret,
            Some(token.to_owned()),
            None,
            "test",
        ))
        .retry_config(retry)
        .build();
    aws_sdk_sts::Client::from_conf(config)
}

fn sdk_with(sts: &MockSts, creds: &Credentials) -> aws_sdk_sts::Client {
    sdk(
        sts,
        creds.access_key_id(),
        creds.secret_access_key(),
        creds.session_token(),
        false,
    )
}

fn instance_credentials(e: &Emulators) -> Credentials {
    e.imds
        .current_credentials()
        .expect("the IMDS emulator has a role attached")
}

/// The error code the SDK parsed from the emulator's answer.
fn code<E, R>(result: Result<impl std::fmt::Debug, aws_sdk_sts::error::SdkError<E, R>>) -> String
where
    E: ProvideErrorMetadata + std::fmt::Debug,
    R: std::fmt::Debug,
{
    let error = result.expect_err("expected an error answer");
    error
        .as_service_error()
        .and_then(|e| e.code())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("expected a service error with a code, got {error:?}"))
}

#[tokio::test]
async fn assume_role_succeeds_and_the_sdk_parses_every_field() {
    let e = emulators().await;
    let creds = instance_credentials(&e);
    let policy = r#"{ "Version": "2012-10-17",
        "Statement": [ { "Effect": "Allow", "Action": "s3:GetObject", "Resource": "*" } ] }"#;
    let before = imds_client::SystemTimeSource.now();
    let out = sdk_with(&e.sts, &creds)
        .assume_role()
        .role_arn(ROLE_ARN)
        .role_session_name(SESSION)
        .duration_seconds(900)
        .policy(policy)
        .policy_arns(
            PolicyDescriptorType::builder()
                .arn("arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess")
                .build(),
        )
        .tags(
            Tag::builder()
                .key("imds-agent:consumer")
                .value("billing")
                .build()
                .unwrap(),
        )
        .tags(
            Tag::builder()
                .key("imds-agent:uid")
                .value("1001")
                .build()
                .unwrap(),
        )
        .source_identity("billing")
        .send()
        .await
        .expect("AssumeRole with instance credentials succeeds");

    let issued = out.credentials().expect("the answer carries credentials");
    assert!(
        issued.access_key_id().starts_with("ASIA"),
        "expected an ASIA key, got {}",
        issued.access_key_id()
    );
    let expiry = SystemTime::try_from(*issued.expiration()).unwrap();
    let lifetime = expiry.duration_since(before).unwrap_or_default();
    assert!(
        (Duration::from_secs(898)..=Duration::from_secs(901)).contains(&lifetime),
        "expected credentials valid for 900 s, got {lifetime:?}"
    );
    let user = out
        .assumed_role_user()
        .expect("the answer names the session");
    assert_eq!(
        user.arn(),
        format!("arn:aws:sts::123456789012:assumed-role/billing/{SESSION}")
    );
    assert!(
        user.assumed_role_id().ends_with(&format!(":{SESSION}")),
        "{}",
        user.assumed_role_id()
    );
    assert_eq!(out.source_identity(), Some("billing"));
    assert!(out.packed_policy_size().is_some_and(|p| p > 0));

    let calls = e.sts.assume_role_calls();
    assert_eq!(calls.len(), 1, "expected one recorded call, got {calls:?}");
    let call = &calls[0];
    assert_eq!(call.outcome, Ok(issued.access_key_id().to_owned()));
    assert_eq!(
        call.caller_access_key_id.as_deref(),
        Some(creds.access_key_id())
    );
    assert_eq!(call.role_arn.as_deref(), Some(ROLE_ARN));
    assert_eq!(call.role_session_name.as_deref(), Some(SESSION));
    assert_eq!(call.duration_seconds.as_deref(), Some("900"));
    assert_eq!(call.policy.as_deref(), Some(policy));
    assert_eq!(
        call.policy_arns,
        ["arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"]
    );
    assert_eq!(
        call.tags,
        [
            ("imds-agent:consumer".to_owned(), "billing".to_owned()),
            ("imds-agent:uid".to_owned(), "1001".to_owned())
        ]
    );
    assert_eq!(call.source_identity.as_deref(), Some("billing"));

    // The issued session is a caller in its own right.
    let chained = sdk(
        &e.sts,
        issued.access_key_id(),
        issued.secret_access_key(),
        issued.session_token(),
        false,
    );
    let me = chained.get_caller_identity().send().await.unwrap();
    assert_eq!(me.arn(), Some(user.arn()));
    assert_eq!(me.account(), Some("123456789012"));
}

#[tokio::test]
async fn get_caller_identity_names_the_instance_role_session() {
    let e = emulators().await;
    let me = sdk_with(&e.sts, &instance_credentials(&e))
        .get_caller_identity()
        .send()
        .await
        .unwrap();
    assert_eq!(
        me.arn(),
        Some("arn:aws:sts::123456789012:assumed-role/instance-role/i-0a1b2c3d4e5f60718")
    );
    assert!(me.user_id().is_some_and(|u| u.starts_with("AROA")));
}

#[tokio::test]
async fn a_wrong_secret_gets_signature_does_not_match() {
    let e = emulators().await;
    let creds = instance_credentials(&e);
    let client = sdk(
        &e.sts,
        creds.access_key_id(),
        "wrongwrongwrongwrongwrongwrongwrongwrong",
        creds.session_token(),
        false,
    );
    let result = client
        .assume_role()
        .role_arn(ROLE_ARN)
        .role_session_name(SESSION)
        .send()
        .await;
    assert_eq!(code(result), "SignatureDoesNotMatch");
    let calls = e.sts.calls();
    assert_eq!(calls[0].outcome, Err("SignatureDoesNotMatch".to_owned()));
}

#[tokio::test]
async fn an_unknown_key_or_a_foreign_session_token_gets_invalid_client_token_id() {
    let e = emulators().await;
    let creds = instance_credentials(&e);
    let unknown = sdk(
        &e.sts,
        "ASIAUNKNOWNUNKNOWN00",
        creds.secret_access_key(),
        creds.session_token(),
        false,
    );
    let result = unknown.get_caller_identity().send().await;
    assert_eq!(code(result), "InvalidClientTokenId");
    let foreign_token = sdk(
        &e.sts,
        creds.access_key_id(),
        creds.secret_access_key(),
        "IQoJb3JpZ2luX2VjEOTHERTOKEN",
        false,
    );
    let result = foreign_token.get_caller_identity().send().await;
    assert_eq!(code(result), "InvalidClientTokenId");
}

#[tokio::test]
async fn rotated_instance_credentials_are_accepted_until_they_expire() {
    let clock = ManualTimeSource::new(imds_client::SystemTimeSource.now());
    let imds = MockImds::builder()
        .role("instance-role")
        .credential_lifetime(Duration::from_secs(3600))
        .time_source(SharedTimeSource::new(clock.clone()))
        .start()
        .await
        .unwrap();
    let sts = MockSts::for_imds(&imds).start().await.unwrap();
    let old = imds.current_credentials().unwrap();
    imds.rotate();
    let new = imds.current_credentials().unwrap();
    assert_ne!(old.access_key_id(), new.access_key_id());
    sdk_with(&sts, &old)
        .get_caller_identity()
        .send()
        .await
        .expect("credentials rotated away but unexpired still work, as on AWS");
    clock.advance(Duration::from_secs(3601));
    let result = sdk_with(&sts, &old).get_caller_identity().send().await;
    assert_eq!(code(result), "ExpiredToken");
}

#[tokio::test]
async fn throttling_is_surfaced_as_throttling_and_retried_by_the_sdk() {
    let e = emulators().await;
    let creds = instance_credentials(&e);
    e.sts
        .inject(StsFault::Throttling, FaultDuration::Requests(1));
    let result = sdk_with(&e.sts, &creds)
        .assume_role()
        .role_arn(ROLE_ARN)
        .role_session_name(SESSION)
        .send()
        .await;
    assert_eq!(code(result), "Throttling");

    // The SDK's standard retry strategy classifies it as retryable.
    e.sts.clear_calls();
    e.sts
        .inject(StsFault::Throttling, FaultDuration::Requests(1));
    let retrying = sdk(
        &e.sts,
        creds.access_key_id(),
        creds.secret_access_key(),
        creds.session_token(),
        true,
    );
    retrying
        .assume_role()
        .role_arn(ROLE_ARN)
        .role_session_name(SESSION)
        .send()
        .await
        .expect("the retry after one Throttling succeeds");
    let outcomes: Vec<_> = e
        .sts
        .calls()
        .into_iter()
        .map(|c| c.outcome.is_ok())
        .collect();
    assert_eq!(outcomes, [false, true], "expected Throttling then success");
}

#[tokio::test]
async fn server_errors_carry_their_status_and_code() {
    let e = emulators().await;
    let creds = instance_credentials(&e);
    e.sts.inject(
        StsFault::ServerError { status: 503 },
        FaultDuration::Forever,
    );
    let result = sdk_with(&e.sts, &creds).get_caller_identity().send().await;
    let error = result.expect_err("503 is an error");
    let raw = error.raw_response().expect("a raw response");
    assert_eq!(raw.status().as_u16(), 503);
    assert_eq!(
        error.as_service_error().and_then(|e| e.code()),
        Some("ServiceUnavailable")
    );
}

#[tokio::test]
async fn sts_limits_and_denied_roles_get_the_real_error_codes() {
    let e = emulators().await;
    let creds = instance_credentials(&e);
    let client = sdk_with(&e.sts, &creds);
    let base = || {
        client
            .assume_role()
            .role_arn(ROLE_ARN)
            .role_session_name(SESSION)
    };

    assert_eq!(
        code(base().duration_seconds(899).send().await),
        "ValidationError"
    );
    // Instance credentials are a role session: more than an hour is chaining.
    assert_eq!(
        code(base().duration_seconds(3601).send().await),
        "ValidationError"
    );
    assert_eq!(
        code(
            client
                .assume_role()
                .role_arn(ROLE_ARN)
                .role_session_name("a b")
                .send()
                .await
        ),
        "ValidationError"
    );
    let mut eleven = base();
    for n in 0..11 {
        eleven = eleven.policy_arns(
            PolicyDescriptorType::builder()
                .arn(format!("arn:aws:iam::aws:policy/P{n}"))
                .build(),
        );
    }
    assert_eq!(code(eleven.send().await), "ValidationError");
    let big = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":"{}"}}]}}"#,
        "x".repeat(2048)
    );
    assert_eq!(
        code(base().policy(big).send().await),
        "PackedPolicyTooLarge"
    );
    assert_eq!(
        code(base().policy("{not json").send().await),
        "MalformedPolicyDocument"
    );

    e.sts.deny_assume_role(ROLE_ARN);
    let denied = base().send().await;
    let message = denied
        .as_ref()
        .err()
        .and_then(|e| e.as_service_error())
        .and_then(|e| e.message())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(code(denied), "AccessDenied");
    assert!(
        message.contains("sts:AssumeRole") && message.contains(ROLE_ARN),
        "the message names the action and the role: {message}"
    );
    let outcomes: Vec<_> = e.sts.calls().into_iter().map(|c| c.outcome).collect();
    assert_eq!(outcomes.last(), Some(&Err("AccessDenied".to_owned())));
}

#[tokio::test]
async fn long_sessions_need_credentials_that_are_not_a_role_session() {
    let imds = MockImds::builder()
        .role("instance-role")
        .start()
        .await
        .unwrap();
    let sts = MockSts::for_imds(&imds)
        .instance_credentials_chain(false)
        .start()
        .await
        .unwrap();
    let creds = imds.current_credentials().unwrap();
    let out = sdk_with(&sts, &creds)
        .assume_role()
        .role_arn(ROLE_ARN)
        .role_session_name(SESSION)
        .duration_seconds(43_200)
        .send()
        .await
        .expect("12 hours without chaining");
    let issued = out.credentials().unwrap();
    // The session it issued is a role session: chaining caps it at an hour.
    let result = sdk(
        &sts,
        issued.access_key_id(),
        issued.secret_access_key(),
        issued.session_token(),
        false,
    )
    .assume_role()
    .role_arn(ROLE_ARN)
    .role_session_name(SESSION)
    .duration_seconds(3601)
    .send()
    .await;
    assert_eq!(code(result), "ValidationError");
}

/// POSTs `sent` to the emulator with a SigV4 signature computed over
/// `signed`, for `service` at `at`; returns the status and body.
async fn raw_post(
    sts: &MockSts,
    creds: &Credentials,
    signed: &str,
    sent: &str,
    service: &str,
    at: SystemTime,
) -> (u16, String) {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
    let identity = creds.to_aws_credentials("test").into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name(service)
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let url = format!("{}/", sts.endpoint());
    let request = SignableRequest::new(
        "POST",
        url.as_str(),
        [("content-type", CONTENT_TYPE)].into_iter(),
        SignableBody::Bytes(signed.as_bytes()),
    )
    .unwrap();
    let (instructions, _) = sign(request, &params).unwrap().into_parts();
    let mut builder = reqwest::Client::new()
        .post(&url)
        .header("content-type", CONTENT_TYPE)
        .body(sent.to_owned());
    for (name, value) in instructions.headers() {
        builder = builder.header(name, value);
    }
    let response = builder.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn the_signature_covers_the_body_the_date_and_the_service() {
    let clock = ManualTimeSource::new(imds_client::SystemTimeSource.now());
    let imds = MockImds::builder()
        .role("instance-role")
        .time_source(SharedTimeSource::new(clock.clone()))
        .start()
        .await
        .unwrap();
    let sts = MockSts::for_imds(&imds).start().await.unwrap();
    let creds = imds.current_credentials().unwrap();
    let now = clock.now();
    let body = "Action=GetCallerIdentity&Version=2011-06-15";

    let (status, text) = raw_post(&sts, &creds, body, body, "sts", now).await;
    assert_eq!(status, 200, "a correct signature is accepted: {text}");
    assert!(text.contains("<GetCallerIdentityResult>"), "{text}");

    let tampered = "Action=GetCallerIdentity&Version=2011-06-15&Extra=1";
    let (status, text) = raw_post(&sts, &creds, body, tampered, "sts", now).await;
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("<Code>SignatureDoesNotMatch</Code>"),
        "{text}"
    );

    let stale = now - Duration::from_secs(16 * 60);
    let (status, text) = raw_post(&sts, &creds, body, body, "sts", stale).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("Signature expired"), "{text}");

    let (status, text) = raw_post(&sts, &creds, body, body, "s3", now).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("correct service: 'sts'"), "{text}");

    let response = reqwest::Client::new()
        .post(format!("{}/", sts.endpoint()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    let text = response.text().await.unwrap();
    assert!(
        text.contains("<Code>MissingAuthenticationToken</Code>"),
        "{text}"
    );
    assert!(
        text.contains("<Type>Sender</Type>") && text.contains("<RequestId>"),
        "{text}"
    );
}

#[tokio::test]
async fn the_control_surface_denies_roles_injects_faults_and_lists_calls() {
    let e = emulators().await;
    let creds = instance_credentials(&e);
    let http = reqwest::Client::new();
    let control = |path: &str| format!("{}/_mock/{path}", e.sts.endpoint());
    let status = |r: reqwest::Response| r.status().as_u16();

    let denied = http
        .put(control("deny"))
        .body(ROLE_ARN)
        .send()
        .await
        .unwrap();
    assert_eq!(status(denied), 204);
    let client = sdk_with(&e.sts, &creds);
    let assume = || {
        client
            .assume_role()
            .role_arn(ROLE_ARN)
            .role_session_name(SESSION)
    };
    assert_eq!(code(assume().send().await), "AccessDenied");
    let allowed = http
        .delete(control("deny"))
        .body(ROLE_ARN)
        .send()
        .await
        .unwrap();
    assert_eq!(status(allowed), 204);

    let fault = r#"{"fault": "throttling", "requests": 1}"#;
    let injected = http
        .post(control("fault"))
        .body(fault)
        .send()
        .await
        .unwrap();
    assert_eq!(status(injected), 204);
    assert_eq!(code(assume().send().await), "Throttling");
    assume().send().await.expect("the fault lasted one request");

    for bad in [
        r#"{"fault": "server-error", "status": 404}"#,
        r#"{"fault": "throttling", "requests": 0}"#,
        r#"{"fault": "nonsense"}"#,
    ] {
        let refused = http.post(control("fault")).body(bad).send().await.unwrap();
        assert_eq!(status(refused), 400, "{bad} should be refused");
    }

    let listed = http.get(control("calls")).send().await.unwrap();
    let calls: serde_json::Value = serde_json::from_str(&listed.text().await.unwrap()).unwrap();
    let outcomes: Vec<String> = calls
        .as_array()
        .expect("a JSON array of calls")
        .iter()
        .map(|c| c["outcome"].to_string())
        .collect();
    assert_eq!(outcomes.len(), 3, "{calls}");
    assert!(
        outcomes[0].contains("AccessDenied") && outcomes[1].contains("Throttling"),
        "{calls}"
    );
    assert_eq!(calls[2]["role_session_name"], SESSION);
    assert!(!calls.to_string().contains(creds.secret_access_key()));
    let cleared = http.delete(control("calls")).send().await.unwrap();
    assert_eq!(status(cleared), 204);
    assert!(e.sts.calls().is_empty());
}
