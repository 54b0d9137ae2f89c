//! `/api/v1/tasks`: the RESTful task API (seed 001's version plan).

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{
    BodyBytes, JsonBody, QueryParams, page_limit, parse_json, status_filter, task_id_from_path,
};
use super::views;
use crate::engine::EngineError;
use crate::model::TaskRecord;
use crate::scheduler::SchedulerError;
use crate::store::TaskQuery;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use lull_shared::{MAX_TASK_BATCH, SubmitRequest, TaskId, TaskStatus};
use serde::{Deserialize, Serialize};
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

#[derive(Debug, Deserialize)]
pub struct CreateParams {
    /// Seconds to wait for the new task to finish before answering (at most 60, and at most
    /// a second short of the request timeout): the answer is then the task with its runs, as
    /// `GET /api/v1/tasks/{id}?wait=` gives it. Other query parameters are ignored, as they
    /// always were on this route.
    wait: Option<f64>,
}

/// `POST /api/v1/tasks`: 201 with the task once it is durably accepted; with `?wait=S`, 201
/// with the task and its runs once it has finished or `S` seconds have passed — a client that
/// wants the result makes one request instead of a submission and a wait.
pub async fn create(
    State(app): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<CreateParams>,
    JsonBody(request): JsonBody<SubmitRequest>,
) -> Result<Response, ApiError> {
    // Checked first: a bad `wait` refuses the request before the task exists.
    let wait = wait_param(params.wait)?;
    let Some(wait) = wait else {
        let task = app.engine.submit_by(request, caller.key_id).await?;
        return Ok((StatusCode::CREATED, Json(views::task(&task))).into_response());
    };
    let wait = wait.min(app.longest_submit_wait);
    // The caller submitted it: it sees it.
    let (task, runs) = app
        .engine
        .submit_and_wait(request, caller.key_id, wait)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(views::task_with_runs(&task, &runs)),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    tasks: Vec<SubmitRequest>,
}

/// The same body with each task kept as JSON, read only when [`BatchRequest`] did not parse,
/// to name the malformed task by its index.
#[derive(Debug, Deserialize)]
pub struct LooseBatchRequest {
    tasks: Vec<Value>,
}

/// `POST /api/v1/tasks/batch`: 1 to [`MAX_TASK_BATCH`] tasks, all or none, in one durable
/// commit. Answers 201 with the new ids in the order given.
pub async fn create_batch(
    State(app): State<AppState>,
    caller: Caller,
    BodyBytes(body): BodyBytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let requests = match parse_json::<BatchRequest>(&body) {
        Ok(batch) => batch.tasks,
        Err(error) => return Err(locate_bad_task(&body).unwrap_or(error)),
    };
    let n = requests.len();
    if n == 0 {
        return Err(ApiError::unprocessable(
            "tasks is empty; a batch holds 1 to 1000 tasks",
        ));
    }
    if n > MAX_TASK_BATCH {
        return Err(ApiError::unprocessable(format!(
            "a batch holds at most {MAX_TASK_BATCH} tasks, got {n}; split it into several"
        )));
    }
    let task_ids = app.engine.submit_batch(requests, caller.key_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "task_ids": task_ids,
            "count": task_ids.len(),
        })),
    ))
}

/// The first task of a batch that is not a valid task, as a 422 naming its index; `None`
/// when the tasks are not where the error is.
fn locate_bad_task(body: &[u8]) -> Option<ApiError> {
    let loose: LooseBatchRequest = serde_json::from_slice(body).ok()?;
    loose
        .tasks
        .into_iter()
        .enumerate()
        .find_map(|(index, task)| {
            serde_json::from_value::<SubmitRequest>(task)
                .err()
                .map(|e| ApiError::unprocessable(format!("tasks[{index}]: invalid task: {e}")))
        })
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
) -> Result<Response, ApiError> {
    let task_id = task_id_from_path(&raw)?;
    let (task, runs) = match wait_param(params.wait) {
        Ok(Some(wait)) => {
            app.engine
                .wait_finished(task_id, wait, |task| caller.sees(task.spec.submitted_by))
                .await?
        }
        no_wait => {
            let (task, runs) = app.engine.task_with_runs(task_id).await?;
            if !caller.sees(task.spec.submitted_by) {
                return Err(EngineError::Scheduler(SchedulerError::TaskNotFound(task_id)).into());
            }
            // A bad `wait` is told only to a caller who may see the task.
            no_wait?;
            (task, runs)
        }
    };
    Ok(Json(views::task_with_runs(&task, &runs)).into_response())
}

/// `wait=S`: how long to wait for tasks to finish, at most 60 s; `None` when absent.
fn wait_param(wait: Option<f64>) -> Result<Option<std::time::Duration>, ApiError> {
    match wait {
        None => Ok(None),
        Some(w) if w.is_finite() && w >= 0.0 => {
            Ok(Some(std::time::Duration::from_secs_f64(w.min(60.0))))
        }
        Some(_) => Err(ApiError::unprocessable(
            "wait must be a non-negative number of seconds",
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitManyParams {
    /// Task ids separated by commas: 1 to [`MAX_TASK_BATCH`].
    ids: Option<String>,
    /// Seconds to wait for all of them to finish before answering (at most 60).
    wait: Option<f64>,
}

/// `GET /api/v1/tasks/wait?ids=1,2,3&wait=60`: the listed tasks, each as
/// `GET /api/v1/tasks/{id}` shows it (runs included) and in the order given, once every one
/// has finished or when `wait` seconds have passed (0, the default: at once). How a client
/// collects a batch's results in one request. An unknown id is a 404, as for one task.
pub async fn wait_many(
    State(app): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<WaitManyParams>,
) -> Result<Response, ApiError> {
    let task_ids = task_ids_from_list(params.ids.as_deref())?;
    let wait = wait_param(params.wait)?.unwrap_or_default();
    let tasks = app
        .engine
        .wait_all_finished(&task_ids, wait, |task| caller.sees(task.spec.submitted_by))
        .await?;
    let finished = tasks
        .iter()
        .filter(|(task, _)| task.state.status.is_terminal())
        .count();
    Ok(Json(WaitManyView {
        count: tasks.len(),
        finished,
        items: tasks
            .iter()
            .map(|(task, runs)| views::task_with_runs(task, runs))
            .collect(),
    })
    .into_response())
}

/// The answer of [`wait_many`] (its keys sorted, as a `serde_json::Value` would have them).
#[derive(Debug, Serialize)]
struct WaitManyView<'a> {
    count: usize,
    finished: usize,
    items: Vec<views::TaskView<'a>>,
}

/// `ids=1,2,3`: 1 to [`MAX_TASK_BATCH`] task ids, or a 422 that says what is wrong.
fn task_ids_from_list(ids: Option<&str>) -> Result<Vec<TaskId>, ApiError> {
    let Some(ids) = ids.filter(|ids| !ids.trim().is_empty()) else {
        return Err(ApiError::unprocessable(
            "ids is required: task ids separated by commas, e.g. ids=1,2,3",
        ));
    };
    let task_ids = ids
        .split(',')
        .map(|id| {
            let id = id.trim();
            id.parse::<TaskId>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| {
                    ApiError::unprocessable(format!(
                        "ids: {id:?} is not a task id (a positive integer)"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if task_ids.len() > MAX_TASK_BATCH {
        return Err(ApiError::unprocessable(format!(
            "ids lists at most {MAX_TASK_BATCH} tasks, got {}; wait for them in several requests",
            task_ids.len()
        )));
    }
    Ok(task_ids)
}

pub async fn cancel(
    State(app): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let task_id = task_id_from_path(&raw)?;
    // Who submitted a task never changes: checked once, it holds for the cancel.
    visible_task(&app, caller, task_id).await?;
    let task = app.engine.cancel(task_id).await?;
    let runs = app.engine.runs(task_id).await?;
    Ok(Json(views::task_with_runs(&task, &runs)).into_response())
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
