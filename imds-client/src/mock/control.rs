//! The control surface under `/_mock/`: paths real IMDS never serves.
//!
//! Tests and demos drive the emulator through it over HTTP (or through the
//! same operations on [`MockImds`](super::MockImds)). Control requests are not
//! counted as IMDS requests. Documented in `imds-client/MOCK.md`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use super::MAX_SKEW_SECONDS;
use super::fault::{Fault, FaultDuration};
use super::routes::App;

pub(crate) fn router() -> Router<App> {
    Router::new()
        .route("/role", put(attach).delete(detach))
        .route("/rotate", post(rotate))
        .route("/requests", get(requests).delete(reset_requests))
        .route("/fault", post(inject).delete(clear_faults))
        .route("/tokens", put(tokens))
        .route("/endpoint", put(endpoint))
        .route("/skew", put(skew))
        .route("/state", get(state))
}

fn bad_request(why: &str) -> Response {
    (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response()
}

async fn attach(State(app): State<App>, body: String) -> Response {
    let role = body.trim();
    if role.is_empty() || role.contains('/') {
        return bad_request("the body must be a role name");
    }
    app.shared.set_role(Some(role.to_owned()));
    StatusCode::NO_CONTENT.into_response()
}

async fn detach(State(app): State<App>) -> StatusCode {
    app.shared.set_role(None);
    StatusCode::NO_CONTENT
}

async fn rotate(State(app): State<App>) -> Response {
    app.shared.rotate();
    match app.shared.current_credentials() {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => (StatusCode::CONFLICT, "no role attached\n").into_response(),
    }
}

async fn requests(State(app): State<App>) -> Response {
    Json(app.shared.request_counts()).into_response()
}

async fn reset_requests(State(app): State<App>) -> StatusCode {
    app.shared.reset_request_counts();
    StatusCode::NO_CONTENT
}

/// `POST /_mock/fault` body: a [`Fault`] (tagged by `"fault"`) plus an
/// optional `"requests"` count or `"seconds"` duration (else until cleared).
#[derive(Deserialize)]
struct FaultRequest {
    #[serde(flatten)]
    fault: Fault,
    requests: Option<u32>,
    seconds: Option<f64>,
}

async fn inject(State(app): State<App>, body: String) -> Response {
    let request: FaultRequest = match serde_json::from_str(&body) {
        Ok(request) => request,
        Err(e) => return bad_request(&format!("invalid fault: {e}")),
    };
    if let Err(why) = request.fault.check() {
        return bad_request(&format!("invalid fault: {why}"));
    }
    match fault_duration(request.requests, request.seconds) {
        Ok(duration) => {
            app.shared.inject(request.fault, duration);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(why) => bad_request(&format!("invalid fault: {why}")),
    }
}

/// The longest timed fault: one day (longer is "until cleared": omit both).
const MAX_FAULT_SECONDS: f64 = 86_400.0;
/// The shortest timed fault.
const MIN_FAULT_SECONDS: f64 = 0.001;

/// A fault's `requests` / `seconds` as a [`FaultDuration`]; the error names
/// the field and its range. Never panics, whatever the numbers.
pub(super) fn fault_duration(
    requests: Option<u32>,
    seconds: Option<f64>,
) -> Result<FaultDuration, String> {
    match (requests, seconds) {
        (Some(_), Some(_)) => Err("give either requests or seconds, not both".into()),
        (Some(0), None) => {
            Err("requests must be a whole number from 1 to 4294967295, got 0".into())
        }
        (Some(n), None) => Ok(FaultDuration::Requests(n)),
        (None, Some(s)) => {
            let range = || {
                format!(
                    "seconds must be from {MIN_FAULT_SECONDS} to {MAX_FAULT_SECONDS} \
                     (omit it for a fault that lasts until cleared), got {s}"
                )
            };
            if !(MIN_FAULT_SECONDS..=MAX_FAULT_SECONDS).contains(&s) {
                return Err(range());
            }
            Duration::try_from_secs_f64(s)
                .map(FaultDuration::For)
                .map_err(|_| range())
        }
        (None, None) => Ok(FaultDuration::Forever),
    }
}

async fn clear_faults(State(app): State<App>) -> StatusCode {
    app.shared.clear_faults();
    StatusCode::NO_CONTENT
}

async fn tokens(State(app): State<App>, body: String) -> Response {
    let required = match body.trim() {
        "required" => true,
        "optional" => false,
        _ => return bad_request("the body must be `required` or `optional`"),
    };
    app.shared.with_state(|s| s.tokens_required = required);
    StatusCode::NO_CONTENT.into_response()
}

async fn endpoint(State(app): State<App>, body: String) -> Response {
    let enabled = match body.trim() {
        "enabled" => true,
        "disabled" => false,
        _ => return bad_request("the body must be `enabled` or `disabled`"),
    };
    app.shared.with_state(|s| s.enabled = enabled);
    StatusCode::NO_CONTENT.into_response()
}

async fn skew(State(app): State<App>, body: String) -> Response {
    match parse_skew(&body) {
        Ok(seconds) => {
            app.shared.with_state(|s| s.skew_seconds = seconds);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(why) => bad_request(&why),
    }
}

/// A skew body: whole seconds within ±[`MAX_SKEW_SECONDS`].
fn parse_skew(body: &str) -> Result<i64, String> {
    body.trim()
        .parse::<i64>()
        .ok()
        .filter(|s| s.unsigned_abs() <= MAX_SKEW_SECONDS.unsigned_abs())
        .ok_or_else(|| {
            format!(
                "the body must be a whole number of seconds from -{MAX_SKEW_SECONDS} to \
                 {MAX_SKEW_SECONDS} (10 years), e.g. -300; got {:?}",
                body.trim()
            )
        })
}

/// A secret-free summary: role, access key id, expiry, switches.
async fn state(State(app): State<App>) -> Response {
    let creds = app.shared.current_credentials();
    let (tokens_required, enabled) = app.shared.with_state(|s| (s.tokens_required, s.enabled));
    Json(serde_json::json!({
        "role": app.shared.role(),
        "access_key_id": creds.as_ref().map(|c| c.access_key_id().to_owned()),
        "expiration": creds.as_ref().map(|c| c.expiration_rfc3339()),
        "tokens_required": tokens_required,
        "enabled": enabled,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_fault_duration_is_accepted_in_range_or_refused_by_name(
            requests in proptest::option::of(any::<u32>()),
            seconds in proptest::option::of(prop_oneof![
                any::<f64>(),
                Just(1e30),
                Just(1e300),
                Just(f64::MIN_POSITIVE / 2.0),
                Just(-0.0),
            ]),
        ) {
            match fault_duration(requests, seconds) {
                Ok(FaultDuration::Requests(n)) => prop_assert!(n >= 1 && seconds.is_none()),
                Ok(FaultDuration::For(d)) => prop_assert!(
                    requests.is_none()
                        && (Duration::from_millis(1)..=Duration::from_secs(86_400)).contains(&d)
                ),
                Ok(FaultDuration::Forever) => prop_assert!(requests.is_none() && seconds.is_none()),
                Err(why) => prop_assert!(
                    why.contains("requests") || why.contains("seconds"),
                    "the refusal names the field: {why}"
                ),
            }
        }

        #[test]
        fn any_skew_is_accepted_within_ten_years_or_refused_with_the_range(
            body in prop_oneof![
                any::<i64>().prop_map(|s| s.to_string()),
                any::<f64>().prop_map(|s| s.to_string()),
                any::<String>(),
            ],
        ) {
            match parse_skew(&body) {
                Ok(s) => prop_assert!(s.unsigned_abs() <= 315_360_000),
                Err(why) => prop_assert!(why.contains("315360000"), "{why}"),
            }
        }
    }
}
