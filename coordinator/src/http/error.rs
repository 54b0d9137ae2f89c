//! `ApiError`: the one error type at the HTTP edge, rendered as `{"detail": "..."}`.

use crate::engine::EngineError;
use crate::scheduler::SchedulerError;
use crate::store::StoreError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lull_shared::ErrorBody;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
    /// What was wrong with the credentials, for a 401 or 403 from authentication: the
    /// status alone does not tell, and seed 000's envelope answers a code for each.
    pub refusal: Option<Refusal>,
}

/// Why authentication refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `token` header and no `Authorization: Bearer`, or one that cannot be read.
    MissingCredentials,
    /// No such key, or it was revoked.
    UnknownKey,
    /// A signed key's `sign_str` is missing or does not match.
    BadSignature,
    /// A signed key's `timestamp` is missing, not milliseconds, or outside the window.
    BadTimestamp,
    /// The key's role may not make this request.
    Forbidden,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: detail.into(),
            refusal: None,
        }
    }

    /// The same error, saying why authentication refused it.
    pub fn refused(mut self, refusal: Refusal) -> ApiError {
        self.refusal = Some(refusal);
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn unprocessable(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                detail: self.detail,
            }),
        )
            .into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::Invalid(v) => ApiError::unprocessable(v.0),
            EngineError::Scheduler(s) => {
                let status = match &s {
                    SchedulerError::TaskNotFound(_) | SchedulerError::NodeNotFound(_) => {
                        StatusCode::NOT_FOUND
                    }
                    SchedulerError::StaleLease { .. }
                    | SchedulerError::AlreadyFinished { .. }
                    | SchedulerError::NoLegacyLease(_)
                    | SchedulerError::NodeUnavailable(..)
                    | SchedulerError::NodeRemoved(_)
                    | SchedulerError::AlreadyMember(_)
                    | SchedulerError::NotHeld(..)
                    | SchedulerError::NoHeartbeatYet(_) => StatusCode::CONFLICT,
                };
                ApiError::new(status, s.to_string())
            }
            EngineError::Store(e) => {
                // The store failing is ours, not the client's: say so without internals.
                tracing::error!(error = %e, "store error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage is unavailable; try again",
                )
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::from(EngineError::Store(e))
    }
}
