//! Seed 000: `POST /api/deployment/task/change_points {"task_id", "points"}`, with the
//! seed's headers (`token`, `timestamp`, `version`, `sign_str`) and its envelope
//! `{"code", "message", "data"}` for every answer: `"0000"` and HTTP 200 on success, a
//! [`Code`] with the HTTP status that fits otherwise. The README lists the codes.
//!
//! Credentials are checked by the auth middleware like everywhere; on this path it renders
//! its refusals through [`refusal`] instead of `{"detail"}`. `version` is this endpoint's
//! own header and is checked here, with auth on or off.

use super::AppState;
use super::error::{ApiError, Refusal};
use super::extract::JsonBody;
use crate::engine::EngineError;
use crate::scheduler::SchedulerError;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use lull_shared::TaskId;
use serde::Deserialize;
use serde_json::{Value, json};

/// The path, exactly as seed 000 gives it.
pub const PATH: &str = "/api/deployment/task/change_points";

/// The header naming the API version the caller speaks (seed 000: `1.0.0`).
pub const VERSION_HEADER: &str = "version";

pub fn is_its_path(path: &str) -> bool {
    path == PATH
}

/// Every outcome of the endpoint, as seed 000's envelope states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Success,
    MissingToken,
    UnknownToken,
    BadSignature,
    BadTimestamp,
    RoleRefused,
    MissingVersion,
    UnsupportedVersion,
    MalformedBody,
    InvalidBody,
    BodyTooLarge,
    PointsOutOfRange,
    UnknownTask,
    TaskFinished,
    MethodNotAllowed,
    RateLimited,
    Unavailable,
    Internal,
}

impl Code {
    pub const ALL: [Code; 18] = [
        Code::Success,
        Code::MissingToken,
        Code::UnknownToken,
        Code::BadSignature,
        Code::BadTimestamp,
        Code::RoleRefused,
        Code::MissingVersion,
        Code::UnsupportedVersion,
        Code::MalformedBody,
        Code::InvalidBody,
        Code::BodyTooLarge,
        Code::PointsOutOfRange,
        Code::UnknownTask,
        Code::TaskFinished,
        Code::MethodNotAllowed,
        Code::RateLimited,
        Code::Unavailable,
        Code::Internal,
    ];

    /// The envelope's `code`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Success => "0000",
            Code::MissingToken => "1001",
            Code::UnknownToken => "1002",
            Code::BadSignature => "1003",
            Code::BadTimestamp => "1004",
            Code::RoleRefused => "1005",
            Code::MissingVersion => "1006",
            Code::UnsupportedVersion => "1007",
            Code::MalformedBody => "2001",
            Code::InvalidBody => "2002",
            Code::BodyTooLarge => "2003",
            Code::PointsOutOfRange => "2004",
            Code::UnknownTask => "3001",
            Code::TaskFinished => "3002",
            Code::MethodNotAllowed => "4005",
            Code::RateLimited => "4029",
            Code::Unavailable => "5003",
            Code::Internal => "5000",
        }
    }

    /// The HTTP status the envelope is sent with.
    pub fn status(self) -> StatusCode {
        match self {
            Code::Success => StatusCode::OK,
            Code::MissingToken | Code::UnknownToken | Code::BadSignature | Code::BadTimestamp => {
                StatusCode::UNAUTHORIZED
            }
            Code::RoleRefused => StatusCode::FORBIDDEN,
            Code::MissingVersion | Code::UnsupportedVersion | Code::MalformedBody => {
                StatusCode::BAD_REQUEST
            }
            Code::InvalidBody | Code::PointsOutOfRange => StatusCode::UNPROCESSABLE_ENTITY,
            Code::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::UnknownTask => StatusCode::NOT_FOUND,
            Code::TaskFinished => StatusCode::CONFLICT,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code for an `ApiError` raised before the handler decided anything (by the auth
    /// middleware or an extractor).
    fn of(e: &ApiError) -> Code {
        match e.refusal {
            Some(Refusal::MissingCredentials) => return Code::MissingToken,
            Some(Refusal::UnknownKey) => return Code::UnknownToken,
            Some(Refusal::BadSignature) => return Code::BadSignature,
            Some(Refusal::BadTimestamp) => return Code::BadTimestamp,
            Some(Refusal::Forbidden) => return Code::RoleRefused,
            None => {}
        }
        match e.status {
            StatusCode::BAD_REQUEST => Code::MalformedBody,
            StatusCode::UNPROCESSABLE_ENTITY => Code::InvalidBody,
            StatusCode::PAYLOAD_TOO_LARGE => Code::BodyTooLarge,
            StatusCode::UNAUTHORIZED => Code::UnknownToken,
            StatusCode::FORBIDDEN => Code::RoleRefused,
            StatusCode::METHOD_NOT_ALLOWED => Code::MethodNotAllowed,
            StatusCode::TOO_MANY_REQUESTS => Code::RateLimited,
            StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
            _ => Code::Internal,
        }
    }
}

/// Seed 000's envelope. The middleware puts back a throttled request's `Retry-After`.
fn envelope(code: Code, message: impl Into<String>) -> Response {
    (
        code.status(),
        Json(json!({"code": code.as_str(), "message": message.into(), "data": null})),
    )
        .into_response()
}

/// The envelope for a request refused before the handler (credentials, role, body).
pub fn refusal(e: ApiError) -> Response {
    let code = Code::of(&e);
    tracing::info!(code = code.as_str(), detail = %e.detail, "change_points refused");
    envelope(code, e.detail)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangePointsRequest {
    task_id: TaskId,
    /// Signed and wide, so that `-1` or `1e10`-sized numbers are "out of range", not a
    /// type error.
    points: i64,
}

/// Accepts `1`, `1.0`, `1.0.0`, `1.2.3`: any version of major 1. A refusal is its code and
/// message.
fn check_version(headers: &HeaderMap) -> Result<(), (Code, String)> {
    let version = headers
        .get(VERSION_HEADER)
        .map(|raw| raw.to_str().map(str::trim).unwrap_or_default())
        .unwrap_or_default();
    if version.is_empty() {
        return Err((
            Code::MissingVersion,
            "missing version header: send the API version, e.g. `version: 1.0.0`".into(),
        ));
    }
    if version.split('.').next() != Some("1") {
        return Err((
            Code::UnsupportedVersion,
            format!("unsupported version {version:?}: this server speaks 1.0.0"),
        ));
    }
    Ok(())
}

pub async fn change_points(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<JsonBody<serde_json::Map<String, Value>>, ApiError>,
) -> Response {
    if let Err((code, message)) = check_version(&headers) {
        return envelope(code, message);
    }
    // An object first (serde would take `[388, 1]` for the struct), then its fields.
    let request = match body.and_then(|JsonBody(object)| {
        serde_json::from_value::<ChangePointsRequest>(Value::Object(object))
            .map_err(|e| ApiError::unprocessable(format!("invalid request: {e}")))
    }) {
        Ok(request) => request,
        Err(e) => return refusal(e),
    };
    let task_id = request.task_id;
    let max = app.engine.config().limits.max_points;
    let Ok(points) = u32::try_from(request.points) else {
        return envelope(
            Code::PointsOutOfRange,
            format!("points must be between 1 and {max}, got {}", request.points),
        );
    };
    match app.engine.change_points(task_id, points).await {
        Ok(()) => envelope(Code::Success, "success"),
        Err(e) => {
            let code = match &e {
                EngineError::Invalid(_) => Code::PointsOutOfRange,
                EngineError::Scheduler(SchedulerError::TaskNotFound(_)) => Code::UnknownTask,
                EngineError::Scheduler(SchedulerError::AlreadyFinished { .. }) => {
                    Code::TaskFinished
                }
                EngineError::Scheduler(_) => Code::Internal,
                EngineError::Store(_) => Code::Unavailable,
            };
            let message = match e {
                EngineError::Store(e) => {
                    tracing::error!(task_id, error = %e, "store error");
                    "storage is unavailable; try again".to_string()
                }
                other => other.to_string(),
            };
            tracing::info!(
                task_id,
                points,
                code = code.as_str(),
                message,
                "change_points refused"
            );
            envelope(code, message)
        }
    }
}

/// Any other method on the path.
pub async fn method_not_allowed() -> Response {
    envelope(
        Code::MethodNotAllowed,
        format!("method not allowed: use POST {PATH}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_only_success_is_0000() {
        let mut seen = std::collections::BTreeSet::new();
        for code in Code::ALL {
            assert!(seen.insert(code.as_str()), "{code:?} repeats a code");
            assert_eq!(code == Code::Success, code.as_str() == "0000");
            assert_eq!(code == Code::Success, code.status() == StatusCode::OK);
        }
    }
}
