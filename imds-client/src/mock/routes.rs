//! The IMDS side of the emulator: token issuing and metadata paths.
//!
//! Rules follow the EC2 user guide, "How Instance Metadata Service Version 2
//! works" and "Retrieve instance metadata" (error codes table):
//! - the token is obtained with `PUT /latest/api/token` carrying
//!   `X-aws-ec2-metadata-token-ttl-seconds` (1 to 21600); a missing or
//!   invalid TTL is `400 Bad Request`;
//! - a `PUT` token request carrying `X-Forwarded-For` is refused (`403`), so
//!   a proxy cannot obtain tokens for others;
//! - metadata `GET`s with an invalid or expired token get `401 Unauthorized`;
//!   without a token they get `401` when tokens are required, and are served
//!   when IMDSv1 is allowed;
//! - with the endpoint turned off, requests get `403 Forbidden`;
//! - responses carry a `Date` header.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

use super::control;
use super::fault::{Fault, RequestKind};
use super::state::Shared;

pub(crate) const TOKEN_PATH: &str = "/latest/api/token";
pub(crate) const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub(crate) const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const MAX_TTL_SECONDS: u64 = 21_600;
const CREDENTIALS_PREFIX: &str = "/latest/meta-data/iam/security-credentials/";
const EXTENDED_PREFIX: &str = "/latest/meta-data/iam/security-credentials-extended/";
pub(crate) const INSTANCE_ID: &str = "i-0a1b2c3d4e5f60718";
pub(crate) const REGION: &str = "us-east-1";
pub(crate) const ACCOUNT_ID: &str = "123456789012";

#[derive(Clone)]
pub(crate) struct App {
    pub(crate) shared: Arc<Shared>,
    stop: CancellationToken,
}

pub(crate) fn router(shared: Arc<Shared>, stop: CancellationToken) -> Router {
    Router::new()
        .nest("/_mock", control::router())
        .fallback(imds)
        .with_state(App { shared, stop })
}

async fn imds(State(app): State<App>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_owned();
    app.shared.count(method.as_str(), &path);
    let kind = if is_token_path(&path) {
        RequestKind::Token
    } else if path.starts_with(EXTENDED_PREFIX) {
        RequestKind::ExtendedCredentials
    } else if path.starts_with(CREDENTIALS_PREFIX) {
        RequestKind::Credentials
    } else {
        RequestKind::Metadata
    };
    let fault = app.shared.take_fault(kind);
    if let Some(Fault::Latency { millis }) = &fault {
        tokio::time::sleep(Duration::from_millis(*millis)).await;
    }
    let mut response = match fault {
        Some(Fault::Status { status } | Fault::ExtendedPathStatus { status }) => {
            StatusCode::from_u16(status)
                .ok()
                .filter(|s| (200..=599).contains(&s.as_u16()))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                .into_response()
        }
        Some(Fault::Redirect { status, location }) => {
            let status = StatusCode::from_u16(status)
                .ok()
                .filter(StatusCode::is_redirection)
                .unwrap_or(StatusCode::TEMPORARY_REDIRECT);
            let mut response = status.into_response();
            if let Ok(location) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Some(Fault::Drop) => dropped_connection(),
        Some(Fault::TokenRejected) => StatusCode::UNAUTHORIZED.into_response(),
        Some(Fault::TokenBlackhole) => {
            // Never answer; give up only when the emulator stops.
            app.stop.cancelled().await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        other => handle(&app, &method, &path, &headers, other),
    };
    let skew = app.shared.with_state(|s| s.skew_seconds);
    if let Some(date) = http_date(app.shared.clock.now(), skew)
        && let Ok(value) = HeaderValue::from_str(&date)
    {
        response.headers_mut().insert(header::DATE, value);
    }
    response
}

/// The `Date` header for `now` shifted by `skew` seconds, or `None` when that
/// is not a date HTTP can carry (before 1970 or after 9999): never a panic.
fn http_date(now: SystemTime, skew: i64) -> Option<String> {
    let shift = Duration::from_secs(skew.unsigned_abs());
    let date = if skew >= 0 {
        now.checked_add(shift)?
    } else {
        now.checked_sub(shift)?
    };
    // httpdate panics outside 1970-01-01 ..= 9999-12-31.
    const YEAR_10000: Duration = Duration::from_secs(253_402_300_800);
    let since_epoch = date.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    (since_epoch < YEAR_10000).then(|| httpdate::fmt_http_date(date))
}

/// A response whose body fails at once: hyper aborts the connection, so the
/// client sees it closed before the response completes.
fn dropped_connection() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<axum::body::Bytes, _>(std::io::Error::other(
            "connection dropped by fault injection",
        ))
    });
    Response::new(Body::from_stream(failing))
}

fn handle(
    app: &App,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    fault: Option<Fault>,
) -> Response {
    let (enabled, tokens_required, extended) = app
        .shared
        .with_state(|s| (s.enabled, s.tokens_required, s.extended));
    if !enabled {
        return StatusCode::FORBIDDEN.into_response();
    }
    if is_token_path(path) {
        return token(app, method, path, headers);
    }
    if method != Method::GET && method != Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let authorised = match headers.get(TOKEN_HEADER) {
        Some(token) => token.to_str().is_ok_and(|t| app.shared.token_valid(t)),
        None => !tokens_required,
    };
    if !authorised {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    metadata(app, path, extended, fault)
}

/// Token paths, including versioned ones and a trailing slash (which real
/// IMDS refuses with 403 rather than treating as metadata).
fn is_token_path(path: &str) -> bool {
    path.trim_end_matches('/').ends_with("/api/token")
}

fn token(app: &App, method: &Method, path: &str, headers: &HeaderMap) -> Response {
    if method != Method::PUT {
        // Only PUT issues tokens; a GET on the token path is not a token request.
        // Real IMDS answers `405 Not Allowed` with `Allow: OPTIONS, PUT`.
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "OPTIONS, PUT")],
        )
            .into_response();
    }
    if path != TOKEN_PATH {
        // Tokens are only issued on exactly `/latest/api/token`: versioned
        // paths and a trailing slash are refused with 403.
        return StatusCode::FORBIDDEN.into_response();
    }
    if headers.contains_key("x-forwarded-for") {
        return StatusCode::FORBIDDEN.into_response();
    }
    let ttl = headers
        .get(TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ttl| (1..=MAX_TTL_SECONDS).contains(ttl));
    let Some(ttl) = ttl else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let token = app.shared.issue_token(Duration::from_secs(ttl));
    (StatusCode::OK, [(TTL_HEADER, ttl.to_string())], token).into_response()
}

fn metadata(app: &App, path: &str, extended: bool, fault: Option<Fault>) -> Response {
    let role = app.shared.role();
    let not_found = || StatusCode::NOT_FOUND.into_response();
    let text = |body: String| {
        (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
    };
    let (prefix_extended, name) = if let Some(name) = path.strip_prefix(CREDENTIALS_PREFIX) {
        (false, Some(name))
    } else if let Some(name) = path.strip_prefix(EXTENDED_PREFIX) {
        (true, Some(name))
    } else {
        (false, None)
    };
    if let Some(name) = name {
        if prefix_extended && !extended {
            return not_found();
        }
        let Some(role) = role else { return not_found() };
        if name.is_empty() {
            return text(role);
        }
        if name != role {
            return not_found();
        }
        return credentials_document(app, prefix_extended, fault);
    }
    match path {
        "/latest/meta-data/" | "/latest/meta-data" => text(
            [
                "ami-id",
                "hostname",
                "iam/",
                "instance-id",
                "instance-type",
                "placement/",
            ]
            .join("\n"),
        ),
        "/latest/meta-data/instance-id" => text(INSTANCE_ID.into()),
        "/latest/meta-data/placement/region" => text(REGION.into()),
        "/latest/meta-data/placement/availability-zone" => text(format!("{REGION}a")),
        "/latest/meta-data/iam/info" => match role {
            None => not_found(),
            Some(role) => json(serde_json::json!({
                "Code": "Success",
                "LastUpdated": last_updated(app),
                "InstanceProfileArn": format!(
                    "arn:{}:iam::{ACCOUNT_ID}:instance-profile/{role}",
                    app.shared.with_state(|s| s.partition.clone())
                ),
                "InstanceProfileId": "AIPAEXAMPLEPROFILEID0",
            })),
        },
        "/latest/dynamic/instance-identity/document" => json(serde_json::json!({
            "accountId": ACCOUNT_ID,
            "architecture": "x86_64",
            "availabilityZone": format!("{REGION}a"),
            "imageId": "ami-0abcdef1234567890",
            "instanceId": INSTANCE_ID,
            "instanceType": "t3.micro",
            "pendingTime": "2026-11-28T00:00:00Z",
            "privateIp": "10.0.0.12",
            "region": REGION,
            "version": "2017-09-30",
        })),
        _ => not_found(),
    }
}

fn last_updated(app: &App) -> String {
    app.shared
        .current_credentials()
        .and_then(|c| c.last_updated())
        .map(crate::credentials::format_rfc3339)
        .unwrap_or_default()
}

fn credentials_document(app: &App, extended: bool, fault: Option<Fault>) -> Response {
    if let Some(Fault::Code { code, message }) = fault {
        // AWS answers such failures with HTTP 200 and a non-Success Code.
        return json(serde_json::json!({
            "Code": code,
            "Message": message,
            "LastUpdated": last_updated(app),
        }));
    }
    let Some(creds) = app.shared.current_credentials() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut doc = serde_json::json!({
        "Code": "Success",
        "LastUpdated": creds.last_updated().map(crate::credentials::format_rfc3339),
        "Type": "AWS-HMAC",
        "AccessKeyId": creds.access_key_id(),
        "SecretAccessKey": creds.secret_access_key(),
        "Token": creds.session_token(),
        "Expiration": creds.expiration_rfc3339(),
    });
    if extended {
        doc["AccountId"] = serde_json::Value::from(ACCOUNT_ID);
    }
    let body = serde_json::to_string_pretty(&doc).unwrap_or_default();
    let body = match fault {
        Some(Fault::TruncatedBody) => body[..body.len() / 2].to_owned(),
        Some(Fault::MalformedJson) => "<html><body>Internal error</body></html>".to_owned(),
        _ => body,
    };
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

fn json(value: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        serde_json::to_string_pretty(&value).unwrap_or_default(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_clock_and_skew_give_a_date_or_none_never_a_panic(
            secs in any::<u64>(),
            skew in any::<i64>(),
        ) {
            let now = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs));
            if let Some(now) = now && let Some(date) = http_date(now, skew) {
                prop_assert!(httpdate::parse_http_date(&date).is_ok(), "{date}");
            }
        }
    }

    #[test]
    fn a_ten_year_skew_still_gives_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_633_600); // 2025-12-02
        for skew in [
            -super::super::MAX_SKEW_SECONDS,
            super::super::MAX_SKEW_SECONDS,
        ] {
            assert!(http_date(now, skew).is_some(), "{skew}");
        }
    }
}
