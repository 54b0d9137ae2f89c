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
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: detail.into(),
        }
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
