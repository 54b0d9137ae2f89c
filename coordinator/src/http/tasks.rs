//! `/api/v1/tasks`: the RESTful task API (seed 001's version plan).

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{JsonBody, QueryParams, page_limit, status_filter, task_id_from_path};
use super::views;
use crate::engine::EngineError;
use crate::model::TaskRecord;
use crate::scheduler::SchedulerError;
use crate::store::TaskQuery;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use lull_shared::{SubmitRequest, TaskId, TaskStatus};
use serde::Deserialize;
use serde_json::{Value, json};

/// The task, if `caller` may see it; otherwise the same 404 as an unknown task, so a
/// submitter learns nothing about others' tasks (not even that they exist).
pub async fn visible_task(
    app: &AppState,
    caller: Caller,
    task_id: TaskId,
) -> Result<TaskRecord, ApiError> {
    let task = app.engine.task(task_id).await?;
    if caller.sees(task.spec.submitted_by) {
        Ok(task)
    } else {
        Err(EngineError::Scheduler(SchedulerError::TaskNotFound(task_id)).into())
    }
}

pub async fn create(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<SubmitRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let task_id = app.engine.submit_by(request, caller.key_id).await?;
    let task = app.engine.task(task_id).await?;
    Ok((StatusCode::CREATED, Json(views::task(&task))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    status: Option<String>,
    limit: Option<u32>,
    #[serde(default)]
    offset: u64,
    after: Option<TaskId>,
}

pub async fn list(
    State(app): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let status = status_filter(
        params.status.as_deref(),
        &TaskStatus::ALL,
        TaskStatus::as_str,
    )?;
    let limit = page_limit(params.limit)?;
    let query = TaskQuery {
        status,
        limit,
        offset: params.offset,
        after: params.after,
        submitted_by: caller.only_tasks_of(),
    };
    let tasks = app.engine.tasks(&query).await?;
    let total = app
        .engine
        .count_tasks(status, caller.only_tasks_of())
        .await?;
    let next_after = if tasks.len() as u32 == limit {
        tasks.last().map(|t| t.task_id)
    } else {
        None
    };
    Ok(Json(json!({
        "items": tasks.iter().map(views::task).collect::<Vec<_>>(),
        "count": tasks.len(),
        "total": total,
        "limit": limit,
        "offset": params.offset,
        "next_after": next_after,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetParams {
    /// Seconds to wait for the task to finish before answering (at most 60).
    wait: Option<f64>,
}

pub async fn get(
    State(app): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
    QueryParams(params): QueryParams<GetParams>,
) -> Result<Json<Value>, ApiError> {
    let task_id = task_id_from_path(&raw)?;
    visible_task(&app, caller, task_id).await?;
    let task = match params.wait {
        None => app.engine.task(task_id).await?,
        Some(w) if w.is_finite() && w >= 0.0 => {
            app.engine
                .wait_finished(task_id, std::time::Duration::from_secs_f64(w.min(60.0)))
                .await?
        }
        Some(_) => {
            return Err(ApiError::unprocessable(
                "wait must be a non-negative number of seconds",
            ));
        }
    };
    let runs = app.engine.runs(task_id).await?;
    Ok(Json(views::task_with_runs(&task, &runs)))
}

pub async fn cancel(
    State(app): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let task_id = task_id_from_path(&raw)?;
    // Who submitted a task never changes: checked once, it holds for the cancel.
    visible_task(&app, caller, task_id).await?;
    let task = app.engine.cancel(task_id).await?;
    let runs = app.engine.runs(task_id).await?;
    Ok(Json(views::task_with_runs(&task, &runs)))
}

/// `GET /api/v1/tasks/{id}/explain`: why a pending task is not running (each node's verdict
/// and one sentence), or what an active or finished task is doing.
pub async fn explain(
    State(app): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let task_id = task_id_from_path(&raw)?;
    visible_task(&app, caller, task_id).await?;
    let explanation = app.engine.explain(task_id).await?;
    Ok(Json(views::explanation(&explanation)))
}
