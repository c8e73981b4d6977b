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
    let duration = match (request.requests, request.seconds) {
        (Some(_), Some(_)) => return bad_request("give either requests or seconds, not both"),
        (Some(n), None) => FaultDuration::Requests(n),
        (None, Some(s)) if s.is_finite() && s > 0.0 => {
            FaultDuration::For(Duration::from_secs_f64(s))
        }
        (None, Some(_)) => return bad_request("seconds must be positive"),
        (None, None) => FaultDuration::Forever,
    };
    app.shared.inject(request.fault, duration);
    StatusCode::NO_CONTENT.into_response()
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
    match body.trim().parse::<i64>() {
        Ok(seconds) => {
            app.shared.with_state(|s| s.skew_seconds = seconds);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(_) => bad_request("the body must be a whole number of seconds, e.g. -300"),
    }
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
