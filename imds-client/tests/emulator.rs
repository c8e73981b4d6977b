//! The emulator behaves like IMDSv2 where a client could tell (issue 2),
//! shown with a plain HTTP client and with the AWS SDK for Rust.
#![cfg(feature = "mock")]

use std::time::{Duration, SystemTime};

use imds_client::mock::{Fault, FaultDuration, MockImds};
use imds_client::{Credentials, ManualTimeSource, SharedTimeSource};
use reqwest::{Method, StatusCode};

const TOKEN_PATH: &str = "/latest/api/token";
const CREDS_LIST: &str = "/latest/meta-data/iam/security-credentials/";

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn token(imds: &MockImds) -> String {
    let response = http()
        .put(format!("{}{TOKEN_PATH}", imds.endpoint()))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["x-aws-ec2-metadata-token-ttl-seconds"],
        "21600"
    );
    response.text().await.unwrap()
}

async fn get(imds: &MockImds, path: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut request = http().get(format!("{}{path}", imds.endpoint()));
    if let Some(token) = token {
        request = request.header("X-aws-ec2-metadata-token", token);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

async fn control(imds: &MockImds, method: Method, path: &str, body: &str) -> StatusCode {
    http()
        .request(method, format!("{}/_mock/{path}", imds.endpoint()))
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .status()
}

async fn put_token(imds: &MockImds, path: &str, ttl: Option<&str>, forwarded: bool) -> StatusCode {
    let mut request = http().put(format!("{}{path}", imds.endpoint()));
    if let Some(ttl) = ttl {
        request = request.header("X-aws-ec2-metadata-token-ttl-seconds", ttl);
    }
    if forwarded {
        request = request.header("X-Forwarded-For", "203.0.113.9");
    }
    request.send().await.unwrap().status()
}

#[tokio::test]
async fn token_requests_follow_imdsv2_rules() {
    let imds = MockImds::builder().start().await.unwrap();
    assert_eq!(
        put_token(&imds, TOKEN_PATH, Some("1"), false).await,
        StatusCode::OK
    );
    assert_eq!(
        put_token(&imds, TOKEN_PATH, Some("21600"), false).await,
        StatusCode::OK
    );
    for bad in [None, Some("0"), Some("21601"), Some("-5"), Some("soon")] {
        assert_eq!(
            put_token(&imds, TOKEN_PATH, bad, false).await,
            StatusCode::BAD_REQUEST,
            "{bad:?}"
        );
    }
    assert_eq!(
        put_token(&imds, TOKEN_PATH, Some("60"), true).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        put_token(&imds, "/2021-03-23/api/token", Some("60"), false).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        put_token(&imds, "/latest/api/token/", Some("60"), false).await,
        StatusCode::FORBIDDEN
    );
    let (status, body) = get(&imds, TOKEN_PATH, None).await;
    assert_ne!(
        status,
        StatusCode::OK,
        "a GET must not issue a token: {body}"
    );
}

#[tokio::test]
async fn responses_carry_a_date_header_that_can_be_skewed() {
    let clock = ManualTimeSource::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000));
    let imds = MockImds::builder()
        .time_source(SharedTimeSource::new(clock.clone()))
        .start()
        .await
        .unwrap();
    let date = |r: &reqwest::Response| {
        httpdate::parse_http_date(r.headers()["date"].to_str().unwrap()).unwrap()
    };
    let url = format!("{}{TOKEN_PATH}", imds.endpoint());
    let put = || {
        http()
            .put(&url)
            .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
            .send()
    };
    assert_eq!(date(&put().await.unwrap()), clock.now());
    assert_eq!(
        control(&imds, Method::PUT, "skew", "-300").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        date(&put().await.unwrap()),
        clock.now() - Duration::from_secs(300)
    );
    assert_eq!(
        control(&imds, Method::PUT, "skew", "later").await,
        StatusCode::BAD_REQUEST
    );
}

use imds_client::TimeSource as _;

#[tokio::test]
async fn metadata_needs_a_valid_unexpired_token_unless_v1_is_allowed() {
    let clock = ManualTimeSource::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000));
    let imds = MockImds::builder()
        .role("app-role")
        .time_source(SharedTimeSource::new(clock.clone()))
        .start()
        .await
        .unwrap();
    let (status, _) = get(&imds, CREDS_LIST, None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "tokens are required by default"
    );
    let (status, _) = get(&imds, CREDS_LIST, Some("made-up-token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let short = {
        let r = http()
            .put(format!("{}{TOKEN_PATH}", imds.endpoint()))
            .header("X-aws-ec2-metadata-token-ttl-seconds", "10")
            .send()
            .await
            .unwrap();
        r.text().await.unwrap()
    };
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&short)).await,
        (StatusCode::OK, "app-role".into())
    );
    clock.advance(Duration::from_secs(11));
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&short)).await.0,
        StatusCode::UNAUTHORIZED,
        "expired"
    );

    assert_eq!(
        control(&imds, Method::PUT, "tokens", "optional").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        get(&imds, CREDS_LIST, None).await,
        (StatusCode::OK, "app-role".into())
    );
    assert_eq!(
        get(&imds, CREDS_LIST, Some("made-up")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        control(&imds, Method::PUT, "tokens", "required").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        get(&imds, CREDS_LIST, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        control(&imds, Method::PUT, "tokens", "maybe").await,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn credentials_look_real_and_the_extended_path_adds_the_account() {
    let imds = MockImds::builder().role("app-role").start().await.unwrap();
    let token = token(&imds).await;
    let (status, body) = get(
        &imds,
        "/latest/meta-data/iam/security-credentials/app-role",
        Some(&token),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    let key = doc["AccessKeyId"].as_str().unwrap();
    assert!(key.starts_with("ASIA") && key.len() == 20, "{key}");
    assert!(
        key.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    );
    assert_eq!(doc["SecretAccessKey"].as_str().unwrap().len(), 40);
    assert!(doc["Token"].as_str().unwrap().len() > 300);
    assert!(
        doc.get("AccountId").is_none(),
        "classic path has no AccountId"
    );
    let creds = Credentials::from_imds_json(body.as_bytes()).unwrap();
    let lifetime = creds
        .expiration()
        .duration_since(creds.last_updated().unwrap())
        .unwrap();
    assert_eq!(lifetime, Duration::from_secs(6 * 3600));
    assert!(doc["Expiration"].as_str().unwrap().ends_with('Z'));

    let (status, body) = get(
        &imds,
        "/latest/meta-data/iam/security-credentials-extended/app-role",
        Some(&token),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let extended: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(extended["AccountId"], "123456789012");
    assert_eq!(extended["AccessKeyId"], doc["AccessKeyId"]);
    assert_eq!(
        get(
            &imds,
            "/latest/meta-data/iam/security-credentials/other-role",
            Some(&token)
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );

    let off = MockImds::builder()
        .role("r")
        .extended_credentials(false)
        .start()
        .await
        .unwrap();
    let token = self::token(&off).await;
    assert_eq!(
        get(
            &off,
            "/latest/meta-data/iam/security-credentials-extended/r",
            Some(&token)
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn instance_paths_are_served() {
    let imds = MockImds::builder().role("app-role").start().await.unwrap();
    let token = token(&imds).await;
    let (status, id) = get(&imds, "/latest/meta-data/instance-id", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(id.starts_with("i-"));
    assert_eq!(
        get(&imds, "/latest/meta-data/placement/region", Some(&token))
            .await
            .1,
        "us-east-1"
    );
    let (_, doc) = get(
        &imds,
        "/latest/dynamic/instance-identity/document",
        Some(&token),
    )
    .await;
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["instanceId"], id.as_str());
    assert_eq!(doc["region"], "us-east-1");
    let (status, info) = get(&imds, "/latest/meta-data/iam/info", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["Code"], "Success");
    assert!(
        info["InstanceProfileArn"]
            .as_str()
            .unwrap()
            .ends_with("instance-profile/app-role")
    );
    assert!(info["InstanceProfileId"].is_string());
    assert!(info["LastUpdated"].is_string());
    assert_eq!(
        get(&imds, "/latest/meta-data/no-such-thing", Some(&token))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn role_attach_replace_detach_through_the_control_surface() {
    let imds = MockImds::builder().start().await.unwrap();
    let token = token(&imds).await;
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&token)).await.0,
        StatusCode::NOT_FOUND,
        "no role yet"
    );
    assert_eq!(
        get(&imds, "/latest/meta-data/iam/info", Some(&token))
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    assert_eq!(
        control(&imds, Method::PUT, "role", "first-role").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(get(&imds, CREDS_LIST, Some(&token)).await.1, "first-role");
    let first = imds.current_credentials().unwrap();

    assert_eq!(
        control(&imds, Method::PUT, "role", "second-role").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(get(&imds, CREDS_LIST, Some(&token)).await.1, "second-role");
    let (status, body) = get(&imds, &format!("{CREDS_LIST}second-role"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    let second = Credentials::from_imds_json(body.as_bytes()).unwrap();
    assert_ne!(
        second.access_key_id(),
        first.access_key_id(),
        "a new role gets new credentials"
    );
    assert_eq!(
        get(&imds, &format!("{CREDS_LIST}first-role"), Some(&token))
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    assert_eq!(
        control(&imds, Method::DELETE, "role", "").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&token)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&imds, &format!("{CREDS_LIST}second-role"), Some(&token))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert!(imds.role().is_none());
    assert_eq!(
        control(&imds, Method::PUT, "role", "  ").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        control(&imds, Method::POST, "rotate", "").await,
        StatusCode::CONFLICT,
        "nothing to rotate"
    );
}

#[tokio::test]
async fn credentials_rotate_on_schedule_and_on_demand() {
    let clock = ManualTimeSource::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000));
    let imds = MockImds::builder()
        .role("r")
        .credential_lifetime(Duration::from_secs(60))
        .rotation_interval(Duration::from_secs(20))
        .time_source(SharedTimeSource::new(clock.clone()))
        .start()
        .await
        .unwrap();
    let first = imds.current_credentials().unwrap();
    assert_eq!(first.expiration(), clock.now() + Duration::from_secs(60));
    clock.advance(Duration::from_secs(19));
    assert_eq!(imds.current_credentials().unwrap(), first, "not yet due");
    clock.advance(Duration::from_secs(1));
    let second = imds.current_credentials().unwrap();
    assert_ne!(second.access_key_id(), first.access_key_id());
    assert!(
        second.expiration() > first.expiration(),
        "new ones issued well before the old expire"
    );
    assert!(first.expiration() > clock.now() + Duration::from_secs(30));

    assert_eq!(
        control(&imds, Method::POST, "rotate", "").await,
        StatusCode::NO_CONTENT
    );
    let token = token(&imds).await;
    let (_, body) = get(&imds, &format!("{CREDS_LIST}r"), Some(&token)).await;
    let third = Credentials::from_imds_json(body.as_bytes()).unwrap();
    assert_ne!(third.access_key_id(), second.access_key_id());
}

#[tokio::test]
async fn requests_are_counted_per_route_and_control_calls_are_not() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let token = token(&imds).await;
    get(&imds, CREDS_LIST, Some(&token)).await;
    get(&imds, CREDS_LIST, Some(&token)).await;
    let counts = http()
        .get(format!("{}/_mock/requests", imds.endpoint()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counts: serde_json::Value = serde_json::from_str(&counts).unwrap();
    assert_eq!(counts["total"], 3);
    assert_eq!(counts["by_route"][format!("PUT {TOKEN_PATH}")], 1);
    assert_eq!(counts["by_route"][format!("GET {CREDS_LIST}")], 2);
    assert_eq!(imds.request_counts().count("GET", CREDS_LIST), 2);
    assert_eq!(
        control(&imds, Method::DELETE, "requests", "").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(imds.request_counts().total, 0);
}

async fn fault(imds: &MockImds, json: &str) {
    assert_eq!(
        control(imds, Method::POST, "fault", json).await,
        StatusCode::NO_CONTENT,
        "{json}"
    );
}

#[tokio::test]
async fn status_faults_last_for_the_requested_count() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let token = token(&imds).await;
    fault(&imds, r#"{"fault":"status","status":503,"requests":2}"#).await;
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&token)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&token)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&imds, CREDS_LIST, Some(&token)).await.0, StatusCode::OK);
    fault(&imds, r#"{"fault":"status","status":429}"#).await;
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&token)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        control(&imds, Method::DELETE, "fault", "").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(get(&imds, CREDS_LIST, Some(&token)).await.0, StatusCode::OK);
    assert_eq!(
        control(&imds, Method::POST, "fault", r#"{"fault":"volcano"}"#).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        control(
            &imds,
            Method::POST,
            "fault",
            r#"{"fault":"drop","requests":1,"seconds":2}"#
        )
        .await,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test(start_paused = true)]
async fn timed_faults_and_latency_follow_the_tokio_clock() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let token = token(&imds).await;
    imds.inject(
        Fault::Status { status: 500 },
        FaultDuration::For(Duration::from_secs(30)),
    );
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&token)).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(get(&imds, CREDS_LIST, Some(&token)).await.0, StatusCode::OK);

    fault(&imds, r#"{"fault":"latency","millis":5000,"requests":1}"#).await;
    let started = tokio::time::Instant::now();
    assert_eq!(get(&imds, CREDS_LIST, Some(&token)).await.0, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn dropped_connections_and_blackholed_tokens() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let token = token(&imds).await;
    fault(&imds, r#"{"fault":"drop","requests":1}"#).await;
    let dropped = async {
        let response = http()
            .get(format!("{}{CREDS_LIST}", imds.endpoint()))
            .header("X-aws-ec2-metadata-token", &token)
            .send()
            .await?;
        response.text().await
    };
    assert!(dropped.await.is_err(), "the connection must fail");
    assert_eq!(get(&imds, CREDS_LIST, Some(&token)).await.0, StatusCode::OK);

    fault(&imds, r#"{"fault":"token-blackhole","requests":1}"#).await;
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&token)).await.0,
        StatusCode::OK,
        "GETs unaffected"
    );
    let hung = http()
        .put(format!("{}{TOKEN_PATH}", imds.endpoint()))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(
        hung.unwrap_err().is_timeout(),
        "the token request connects but never answers"
    );
}

#[tokio::test]
async fn credential_document_faults() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let token = token(&imds).await;
    let path = format!("{CREDS_LIST}r");

    fault(&imds, r#"{"fault":"truncated-body","requests":1}"#).await;
    let (status, body) = get(&imds, &path, Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).is_err(),
        "truncated: {body}"
    );

    fault(&imds, r#"{"fault":"malformed-json","requests":1}"#).await;
    assert!(
        Credentials::from_imds_json(get(&imds, &path, Some(&token)).await.1.as_bytes()).is_err()
    );

    fault(
        &imds,
        r#"{"fault":"code","code":"AssumeRoleUnauthorizedAccess","message":"EC2 cannot assume the role r.","requests":1}"#,
    )
    .await;
    let (status, body) = get(&imds, &path, Some(&token)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "AWS sends failure codes with HTTP 200"
    );
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["Code"], "AssumeRoleUnauthorizedAccess");
    assert!(doc.get("SecretAccessKey").is_none());
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&token)).await.0,
        StatusCode::OK,
        "list unaffected"
    );
    assert!(
        Credentials::from_imds_json(get(&imds, &path, Some(&token)).await.1.as_bytes()).is_ok()
    );
}

#[tokio::test]
async fn a_disabled_endpoint_refuses_everything() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let token = token(&imds).await;
    assert_eq!(
        control(&imds, Method::PUT, "endpoint", "disabled").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        put_token(&imds, TOKEN_PATH, Some("60"), false).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(&imds, CREDS_LIST, Some(&token)).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        control(&imds, Method::PUT, "endpoint", "enabled").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(get(&imds, CREDS_LIST, Some(&token)).await.0, StatusCode::OK);
    assert_eq!(
        control(&imds, Method::PUT, "endpoint", "off").await,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn state_endpoint_shows_no_secrets() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let creds = imds.current_credentials().unwrap();
    let body = http()
        .get(format!("{}/_mock/state", imds.endpoint()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains(creds.access_key_id()));
    assert!(!body.contains(creds.secret_access_key()) && !body.contains(creds.session_token()));
}

/// A JSON number (or not-quite-number) a hostile caller might send.
fn hostile_number() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        any::<f64>().prop_map(|f| format!("{f:e}")),
        any::<f64>().prop_map(|f| f.to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|i| i.to_string()),
        prop::sample::select(vec![
            "1e30",
            "1e300",
            "-1",
            "0",
            "-0",
            "5e-324",
            "1e-9",
            "0.5",
            "86400",
            "86401",
            "18446744073709551615",
            "3600000",
            "3600001",
            "302",
            "500",
            "999",
            "\"x\"",
            "null",
        ])
        .prop_map(String::from),
    ]
}

type Shared = std::sync::OnceLock<(tokio::runtime::Runtime, MockImds)>;

/// One runtime and emulator per property test, kept across its cases (each
/// test its own: one test's faults must not reach the other's requests).
fn runtime_and_emulator(shared: &'static Shared) -> &'static (tokio::runtime::Runtime, MockImds) {
    shared.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let imds = runtime
            .block_on(MockImds::builder().role("r").start())
            .unwrap();
        (runtime, imds)
    })
}

/// The emulator still answers: its control surface and a token request.
async fn still_serving(imds: &MockImds) -> Result<reqwest::Response, String> {
    let state = http()
        .get(format!("{}/_mock/state", imds.endpoint()))
        .send()
        .await
        .map_err(|e| format!("the emulator stopped answering: {e}"))?;
    if state.status() != StatusCode::OK {
        return Err(format!("/_mock/state answered {}", state.status()));
    }
    http()
        .put(format!("{}{TOKEN_PATH}", imds.endpoint()))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .send()
        .await
        .map_err(|e| format!("a token request failed: {e}"))
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(128))]

    #[test]
    fn any_fault_control_value_is_accepted_or_refused_by_name_never_a_crash(
        kind in proptest::sample::select(vec![
            "status", "latency", "drop", "token-blackhole", "redirect",
            "extended-path-status", "code", "truncated-body", "bogus",
        ]),
        status in hostile_number(),
        millis in hostile_number(),
        seconds in proptest::option::of(hostile_number()),
        requests in proptest::option::of(hostile_number()),
        location in proptest::sample::select(vec![
            "\"http://127.0.0.1:9/x\"", "\"\"", "\"a\\u0000b\"", "\"\\n\"", "7",
        ]),
    ) {
        static SHARED: Shared = Shared::new();
        let (runtime, imds) = runtime_and_emulator(&SHARED);
        let mut body = format!(
            r#"{{"fault":"{kind}","status":{status},"millis":{millis},"location":{location},"code":"C","message":"M""#
        );
        if let Some(seconds) = &seconds {
            body += &format!(r#","seconds":{seconds}"#);
        }
        if let Some(requests) = &requests {
            body += &format!(r#","requests":{requests}"#);
        }
        body += "}";
        let outcome: Result<(), String> = runtime.block_on(async {
            let response = http()
                .post(format!("{}/_mock/fault", imds.endpoint()))
                .body(body.clone())
                .send()
                .await
                .map_err(|e| format!("the control request failed: {e}"))?;
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            match status {
                StatusCode::NO_CONTENT => {}
                StatusCode::BAD_REQUEST if text.starts_with("invalid fault: ") && text.len() > 16 => {}
                other => return Err(format!("expected 204 or a 400 saying why, got {other}: {text}")),
            }
            assert_eq!(
                control(imds, Method::DELETE, "fault", "").await,
                StatusCode::NO_CONTENT
            );
            still_serving(imds).await.map(drop)
        });
        proptest::prop_assert!(outcome.is_ok(), "{}: {:?}", body, outcome);
    }

    #[test]
    fn any_skew_control_value_is_accepted_or_refused_never_a_crash(body in proptest::prop_oneof![
        hostile_number(),
        proptest::prelude::any::<String>(),
    ]) {
        static SHARED: Shared = Shared::new();
        let (runtime, imds) = runtime_and_emulator(&SHARED);
        let outcome: Result<(), String> = runtime.block_on(async {
            let status = control(imds, Method::PUT, "skew", &body).await;
            let answer = still_serving(imds).await?;
            let date = answer.headers().get("date").map(|d| d.to_str().unwrap_or("").to_owned());
            match status {
                StatusCode::NO_CONTENT if date.is_some() => Ok(()),
                StatusCode::BAD_REQUEST => Ok(()),
                other => Err(format!("expected 204 (with a Date) or 400, got {other}, Date {date:?}")),
            }
        });
        runtime.block_on(control(imds, Method::PUT, "skew", "0"));
        proptest::prop_assert!(outcome.is_ok(), "{:?}: {:?}", body, outcome);
    }
}

#[tokio::test]
async fn out_of_range_control_values_are_refused_with_the_field_and_range() {
    let imds = MockImds::builder().role("r").start().await.unwrap();
    let refusal = |path: &'static str, method: Method, body: &'static str| {
        let url = format!("{}/_mock/{path}", imds.endpoint());
        async move {
            let response = http().request(method, url).body(body).send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    };
    for (path, method, body, names) in [
        (
            "fault",
            Method::POST,
            r#"{"fault":"status","status":503,"seconds":1e30}"#,
            ["seconds", "86400"],
        ),
        (
            "fault",
            Method::POST,
            r#"{"fault":"status","status":503,"seconds":-1}"#,
            ["seconds", "0.001"],
        ),
        (
            "fault",
            Method::POST,
            r#"{"fault":"latency","millis":18446744073709551615}"#,
            ["millis", "3600000"],
        ),
        (
            "fault",
            Method::POST,
            r#"{"fault":"status","status":1000}"#,
            ["status", "599"],
        ),
        (
            "fault",
            Method::POST,
            r#"{"fault":"redirect","status":200,"location":"http://127.0.0.1:9/"}"#,
            ["status", "399"],
        ),
        (
            "fault",
            Method::POST,
            r#"{"fault":"status","status":503,"requests":0}"#,
            ["requests", "1"],
        ),
        (
            "skew",
            Method::PUT,
            "9223372036854775807",
            ["seconds", "315360000"],
        ),
        ("skew", Method::PUT, "-1e30", ["seconds", "315360000"]),
    ] {
        let (status, text) = refusal(path, method, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        for name in names {
            assert!(
                text.contains(name),
                "{body}: expected the refusal to name {name:?}: {text}"
            );
        }
    }
    // Ten years either way is served, with a Date ten years off.
    let unskewed = still_serving(&imds).await.unwrap();
    let now = httpdate::parse_http_date(unskewed.headers()["date"].to_str().unwrap()).unwrap();
    for skew in ["-315360000", "315360000"] {
        assert_eq!(
            control(&imds, Method::PUT, "skew", skew).await,
            StatusCode::NO_CONTENT
        );
        let response = still_serving(&imds).await.unwrap();
        let date = httpdate::parse_http_date(response.headers()["date"].to_str().unwrap()).unwrap();
        let off = date.duration_since(now).unwrap_or_else(|e| e.duration());
        assert!(
            off >= Duration::from_secs(315_359_000),
            "{skew}: Date {date:?}"
        );
    }
    // The builder's periods are checked too.
    let err = MockImds::builder()
        .credential_lifetime(Duration::MAX)
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("credential_lifetime"), "{err}");
    let err = MockImds::builder()
        .rotation_interval(Duration::ZERO)
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("rotation_interval"), "{err}");
}
