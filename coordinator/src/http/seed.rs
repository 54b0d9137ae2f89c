//! Seed 001's endpoints, with its exact paths and response shapes, plus the agents'
//! `/internal/*` protocol.

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{BodyBytes, JsonBody, QueryParams, parse_json, task_id_from_path};
use super::views;
use crate::engine::unix_now;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use lull_shared::{
    HeartbeatRequest, HeartbeatResponse, MAX_RESULT_BATCH, PullResponse, ReportItemAck,
    ReportVerdict, ResultsAck, RunId, RunReport, RunReportAck, SubmitRequest, TaskId, TaskStatus,
};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// Seed 001 says `"version": "1.0.0"`: the version of the API it documents, which we keep.
pub const API_VERSION: &str = "1.0.0";

/// Most results or tasks one page may hold.
pub const MAX_PAGE: u32 = 1000;
/// Default page size.
pub const DEFAULT_PAGE: u32 = 100;
/// Longest long-poll an agent may ask for.
const MAX_PULL_WAIT_SECS: f64 = 60.0;

pub async fn root(State(app): State<AppState>) -> Json<Value> {
    let (total, pending, _) = app.engine.counts();
    Json(json!({
        "service": "Idle Computing Scheduler",
        "status": "running",
        "version": API_VERSION,
        "server_id": app.engine.server_id(),
        "task_count": total,
        "pending_tasks": pending,
    }))
}

pub async fn submit(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<SubmitRequest>,
) -> Result<Json<Value>, ApiError> {
    let task_id = app.engine.submit_by(request, caller.key_id).await?.task_id;
    Ok(Json(json!({
        "task_id": task_id,
        "status": "submitted",
        "server_id": app.engine.server_id(),
        "message": format!("Task {task_id} has been queued"),
    })))
}

pub async fn get_task(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(match app.engine.legacy_get_task().await? {
        Some(lease) => json!({
            "task_id": lease.task_id,
            "code": lease.code,
            "status": "assigned",
            "created_at": lease.created_at,
            "message": format!("Task {} assigned for execution", lease.task_id),
            "run_id": lease.run_id,
            "timeout": lease.timeout,
        }),
        None => json!({
            "task_id": null,
            "code": null,
            "status": "no_tasks",
            "message": "No pending tasks available",
        }),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitResultRequest {
    task_id: TaskId,
    #[serde(default)]
    result: Option<String>,
    /// The lease from `/get_task`; when given, a result for an older lease is refused.
    #[serde(default)]
    run_id: Option<RunId>,
    /// A worker that failed to run the code says why here; the task is then `failed`.
    #[serde(default)]
    error: Option<String>,
}

pub async fn submit_result(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<SubmitResultRequest>,
) -> Result<Json<Value>, ApiError> {
    let task_id = body.task_id;
    app.engine
        .legacy_submit_result(
            task_id,
            body.run_id,
            body.result.unwrap_or_default(),
            body.error,
        )
        .await?;
    Ok(Json(json!({
        "status": "ok",
        "task_id": task_id,
        "message": format!("Result for task {task_id} recorded"),
    })))
}

pub async fn status(
    State(app): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let task_id = task_id_from_path(&raw)?;
    let task = super::tasks::visible_task(&app, caller, task_id).await?;
    let runs = app.engine.runs(task_id).await?;
    Ok(Json(json!({
        "task_id": task.task_id,
        "status": task.state.status.as_str(),
        "result": task.state.result,
        "created_at": task.created_at,
        "completed_at": task.state.completed_at,
        "error": task.state.error,
        "started_at": task.state.started_at,
        "node_id": task.state.node_id,
        "attempts": task.state.attempts,
        "points": task.state.points,
        "runs": runs.iter().map(views::run_summary).collect::<Vec<_>>(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    limit: Option<u32>,
    #[serde(default)]
    offset: u64,
    /// Keyset cursor: only entries with a larger task id (cheaper than deep offsets).
    after: Option<TaskId>,
}

impl PageParams {
    pub fn limit(&self) -> Result<u32, ApiError> {
        super::extract::page_limit(self.limit)
    }
}

pub async fn results(
    State(app): State<AppState>,
    caller: Caller,
    QueryParams(page): QueryParams<PageParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit()?;
    let own = caller.only_tasks_of();
    let rows = app
        .engine
        .results(limit, page.offset, page.after, own)
        .await?;
    let total = app
        .engine
        .count_tasks(Some(TaskStatus::Completed), own)
        .await?;
    let next_after = if rows.len() as u32 == limit {
        rows.last().map(|r| r.task_id)
    } else {
        None
    };
    let results: Vec<Value> = rows
        .iter()
        .map(|r| json!({"task_id": r.task_id, "result": r.result, "completed_at": r.completed_at}))
        .collect();
    Ok(Json(json!({
        "count": results.len(),
        "results": results,
        "server_id": app.engine.server_id(),
        "total": total,
        "limit": limit,
        "offset": page.offset,
        "next_after": next_after,
    })))
}

pub async fn health(State(app): State<AppState>) -> (axum::http::StatusCode, Json<Value>) {
    let store_ok = app.engine.ping_store().await.is_ok();
    let feed = app.engine.feed();
    let status = if store_ok { "healthy" } else { "unhealthy" };
    let code = if store_ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({
            "status": status,
            "timestamp": unix_now(),
            "server_id": app.engine.server_id(),
            "components": {
                "task_queue": "healthy",
                // Seed 001's name for the component that keeps tasks; ours is SQLite.
                "memory_storage": status,
                "database": status,
            },
            "waiting_pulls": app.engine.waiting_pulls(),
            "feed": {
                "subscribers": feed.subscribers(),
                "newest_seq": feed.newest_seq(),
                "slowest_backlog": feed.slowest_backlog(),
                "buffer": feed.buffer(),
            },
        })),
    )
}

pub async fn stats(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let stats = app.engine.stats().await?;
    let (_, _, nodes) = app.engine.counts();
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(Json(json!({
        "time_period": "all_time",
        "tasks": {
            "total": stats.total,
            "completed": stats.count(TaskStatus::Completed),
            "pending": stats.count(TaskStatus::Pending),
            "failed": stats.count(TaskStatus::Failed),
            "assigned": stats.count(TaskStatus::Assigned),
            "running": stats.count(TaskStatus::Running),
            "cancelled": stats.count(TaskStatus::Cancelled),
            "avg_time": round(stats.avg_time.unwrap_or(0.0)),
        },
        "nodes": {
            "total": nodes.total,
            "idle": nodes.idle,
            "busy": nodes.busy,
            "offline": nodes.offline,
            "paused": nodes.paused,
            "draining": nodes.draining,
            "drained": nodes.drained,
            "removed": nodes.removed,
        },
        "throughput": {
            "tasks_per_hour": stats.finished_last_hour,
            "compute_hours": round(stats.compute_seconds / 3600.0),
        },
    })))
}

// -----------------------------------------------------------------------------------------------
// Agents
// -----------------------------------------------------------------------------------------------

pub async fn heartbeat(
    State(app): State<AppState>,
    JsonBody(hb): JsonBody<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    if hb.node_id.trim().is_empty() || hb.node_id.len() > 128 {
        return Err(ApiError::unprocessable(
            "node_id must be 1 to 128 characters",
        ));
    }
    let r = hb.resources;
    if !(r.cpu_cores.is_finite()
        && r.cpu_cores >= 0.0
        && r.memory_mb.is_finite()
        && r.memory_mb >= 0.0)
    {
        return Err(ApiError::unprocessable(
            "resources.cpu_cores and resources.memory_mb must be non-negative numbers",
        ));
    }
    Ok(Json(app.engine.heartbeat(hb).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullParams {
    node_id: Option<String>,
    /// Seconds to wait for work (default 0: answer at once).
    #[serde(default)]
    wait: f64,
    /// Most runs to hand out in this answer.
    max: Option<usize>,
}

pub async fn pull(
    State(app): State<AppState>,
    QueryParams(params): QueryParams<PullParams>,
) -> Result<Json<PullResponse>, ApiError> {
    let node_id = params.node_id.filter(|id| !id.is_empty()).ok_or_else(|| {
        ApiError::unprocessable(
            "node_id is required: send a heartbeat first, then pull with ?node_id=ID",
        )
    })?;
    if !params.wait.is_finite() || params.wait < 0.0 {
        return Err(ApiError::unprocessable(
            "wait must be a non-negative number of seconds",
        ));
    }
    let wait = Duration::from_secs_f64(params.wait.min(MAX_PULL_WAIT_SECS));
    let max = params.max.unwrap_or(1).clamp(1, 256);
    Ok(Json(app.engine.pull(&node_id, wait, max).await?))
}

pub async fn result(
    State(app): State<AppState>,
    JsonBody(report): JsonBody<RunReport>,
) -> Result<Json<RunReportAck>, ApiError> {
    Ok(Json(app.engine.report(report).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsRequest {
    results: Vec<RunReport>,
}

/// The same body with each report kept as JSON, read only when [`ResultsRequest`] did not
/// parse, so that a malformed report is rejected alone and the others are still settled.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LooseResultsRequest {
    results: Vec<Value>,
}

/// `?node_id=..&max=..` on `POST /internal/results`: hand that node new runs with the answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefillParams {
    node_id: Option<String>,
    max: Option<usize>,
}

/// `POST /internal/results`: several runs' outcomes in one commit. Each report is settled
/// on its own, as `POST /internal/result` would settle it alone; the answer lists them in
/// order. Only a storage failure (503) or a malformed envelope fails the whole request.
/// With `?node_id=&max=`, the answer also carries the runs a pull would hand that node now
/// (leased in the same commit), so an agent refills its slots without another round trip.
pub async fn results_batch(
    State(app): State<AppState>,
    QueryParams(refill): QueryParams<RefillParams>,
    BodyBytes(body): BodyBytes,
) -> Result<Json<ResultsAck>, ApiError> {
    let refill = match (refill.node_id.filter(|id| !id.is_empty()), refill.max) {
        (Some(node_id), max) => Some((node_id, max.unwrap_or(1).clamp(1, 256))),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ApiError::unprocessable(
                "max needs node_id: the node to hand new runs to",
            ));
        }
    };
    // Each entry: a report to settle, or the answer for one that is malformed.
    let entries: Vec<Result<RunReport, ReportItemAck>> = match parse_json::<ResultsRequest>(&body) {
        Ok(batch) => batch.results.into_iter().map(Ok).collect(),
        Err(error) => match parse_json::<LooseResultsRequest>(&body) {
            Ok(loose) => loose
                .results
                .into_iter()
                .enumerate()
                .map(|(index, value)| loose_report(index, value))
                .collect(),
            Err(_) => return Err(error),
        },
    };
    let n = entries.len();
    if n == 0 {
        return Err(ApiError::unprocessable(
            "results is empty; send 1 to 1000 reports",
        ));
    }
    if n > MAX_RESULT_BATCH {
        return Err(ApiError::unprocessable(format!(
            "a batch holds at most {MAX_RESULT_BATCH} reports, got {n}; split it into several"
        )));
    }
    let mut acks: Vec<Option<ReportItemAck>> = Vec::with_capacity(n);
    let mut reports = Vec::with_capacity(n);
    for entry in entries {
        match entry {
            Ok(report) => {
                acks.push(None);
                reports.push(report);
            }
            Err(rejected) => acks.push(Some(rejected)),
        }
    }
    let (outcomes, pulled) = app
        .engine
        .report_batch(
            &reports,
            refill
                .as_ref()
                .map(|(node_id, max)| (node_id.as_str(), *max)),
        )
        .await?;
    let mut settled = reports.iter().zip(outcomes).map(|(report, outcome)| {
        let (status, code, detail) = match outcome {
            Ok(()) => (ReportVerdict::Accepted, StatusCode::OK, None),
            Err(e) => {
                let error = ApiError::from(crate::engine::EngineError::from(e));
                let verdict = if error.status == StatusCode::UNPROCESSABLE_ENTITY {
                    ReportVerdict::Rejected
                } else {
                    ReportVerdict::Refused
                };
                (verdict, error.status, Some(error.detail))
            }
        };
        ReportItemAck {
            status,
            code: code.as_u16(),
            task_id: Some(report.task_id),
            run_id: Some(report.run_id),
            detail,
        }
    });
    // One outcome per well-formed report, in order, fills the gaps between rejected ones.
    let results = acks
        .into_iter()
        .filter_map(|ack| ack.or_else(|| settled.next()))
        .collect();
    Ok(Json(ResultsAck {
        results,
        tasks: pulled.tasks,
        cancel: pulled.cancel,
    }))
}

/// One report of a batch that did not parse as a whole: the report, or why it is rejected.
fn loose_report(index: usize, value: Value) -> Result<RunReport, ReportItemAck> {
    let id = |field: &str| value.get(field).and_then(Value::as_i64);
    let (task_id, run_id) = (id("task_id"), id("run_id"));
    serde_json::from_value::<RunReport>(value).map_err(|e| ReportItemAck {
        status: ReportVerdict::Rejected,
        code: StatusCode::UNPROCESSABLE_ENTITY.as_u16(),
        task_id,
        run_id,
        detail: Some(format!("results[{index}]: invalid report: {e}")),
    })
}
