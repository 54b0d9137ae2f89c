//! The web console at `/ui`: server-rendered pages (askama templates compiled into the
//! binary) and one small script, `console.js`, that keeps them live from `WS /ws/updates`.
//!
//! Two kinds of routes:
//! - **Shells** (`GET /ui`, `/ui/submit`, `/ui/tasks`, `/ui/tasks/{id}`, `/ui/nodes`,
//!   `/ui/operations`, `/ui/static/*`): public, since a browser's page load carries no key.
//!   With authentication off a shell also carries the first render of its data; with it on
//!   it carries none.
//! - **Parts** (`GET /ui/part/*`): HTML fragments of data, authenticated like any read. The
//!   script fetches them with the key's headers (signed for a signed key), swaps them in,
//!   and fetches them again when the feed says something they show has changed.
//!
//! Actions (submit, cancel, drain, ...) are the JSON API's own endpoints, called by the
//! script: the console has no write path of its own.
//!
//! Architecture Invariant: the console reads only through the [`Engine`]; it decides nothing
//! and holds no state.
//!
//! [`Engine`]: crate::engine::Engine

mod chart;
mod pages;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{QueryParams, page_limit, status_filter, task_id_from_path};
use crate::engine::unix_now;
use crate::keys::Role;
use crate::store::{CommandQuery, TaskQuery};
use askama::Template;
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use chart::{Chart, ChartKind};
use lull_shared::{TaskId, TaskStatus};
use pages::*;
use serde::Deserialize;
use serde_json::json;

const SCRIPT: &str = include_str!("static/console.js");
const STYLE: &str = include_str!("static/console.css");

/// Tasks per page of the task list.
const TASKS_PER_PAGE: u32 = 50;
/// Commands shown on the nodes page.
const COMMANDS_SHOWN: u32 = 50;
/// What the charts cover, in seconds.
const CHART_WINDOW: f64 = 30.0 * 60.0;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(overview_page))
        .route("/ui/", get(|| async { Redirect::permanent("/ui") }))
        .route("/ui/submit", get(submit_page))
        .route("/ui/tasks", get(tasks_page))
        .route("/ui/tasks/{task_id}", get(task_page))
        .route("/ui/nodes", get(nodes_page))
        .route("/ui/operations", get(operations_page))
        .route("/ui/static/console.js", get(script))
        .route("/ui/static/console.css", get(style))
        .route("/ui/part/session", get(session))
        .route("/ui/part/overview", get(overview_part))
        .route("/ui/part/tasks", get(tasks_part))
        .route("/ui/part/task/{task_id}", get(task_part))
        .route("/ui/part/nodes", get(nodes_part))
        .route("/ui/part/commands", get(commands_part))
}

fn render(template: &impl Template) -> Result<String, ApiError> {
    template.render().map_err(|e| {
        tracing::error!(error = %e, "console template failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the console could not render this page",
        )
    })
}

fn html(template: &impl Template) -> Result<Html<String>, ApiError> {
    render(template).map(Html)
}

/// The shell's first render of a part: with authentication off, the part itself (or what
/// went wrong), as anyone sees it (nobody is scoped then); with it on, nothing (the script
/// fetches it with the key).
async fn first_render<F>(app: &AppState, part: F) -> String
where
    F: std::future::Future<Output = Result<String, ApiError>>,
{
    if app.auth.enabled {
        return String::new();
    }
    match part.await {
        Ok(html) => html,
        Err(e) => render(&ErrorPart { detail: &e.detail }).unwrap_or_default(),
    }
}

fn layout(app: &AppState, page: &'static str, title: String) -> Layout {
    Layout {
        page,
        title,
        auth: if app.auth.enabled { "on" } else { "off" },
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

// ---------------------------------------------------------------------------------------------
// Session: what the caller's key may do
// ---------------------------------------------------------------------------------------------

/// `GET /ui/part/session`: `{"auth", "role"}`. With authentication off anyone is an admin.
async fn session(State(app): State<AppState>, caller: Caller) -> Json<serde_json::Value> {
    let role = caller.role.unwrap_or(Role::Admin);
    Json(json!({"auth": app.auth.enabled, "role": role.as_str()}))
}

// ---------------------------------------------------------------------------------------------
// Overview
// ---------------------------------------------------------------------------------------------

async fn overview_page(State(app): State<AppState>) -> Result<Html<String>, ApiError> {
    let first = first_render(&app, overview_html(&app)).await;
    html(&OverviewPage {
        layout: layout(&app, "overview", "Overview".into()),
        first,
    })
}

async fn overview_part(State(app): State<AppState>) -> Result<Html<String>, ApiError> {
    overview_html(&app).await.map(Html)
}

async fn overview_html(app: &AppState) -> Result<String, ApiError> {
    let now = unix_now();
    let from = now - CHART_WINDOW;
    let stats = app.engine.stats().await?;
    let (_, pending, nodes) = app.engine.counts();
    let per_minute: Vec<(f64, f64)> = app
        .engine
        .completed_per_minute(from)
        .await?
        .into_iter()
        .map(|(minute, n)| (minute as f64 * 60.0, n as f64))
        .collect();
    let queue: Vec<(f64, f64)> = app
        .engine
        .queue_samples(from)
        .into_iter()
        .map(|s| (s.at, s.pending as f64))
        .collect();
    let count = |s: TaskStatus| stats.count(s);
    let counters = vec![
        Counter::new("Tasks", stats.total.to_string(), ""),
        Counter::new("Pending", pending.to_string(), "pending"),
        Counter::new(
            "Running",
            (count(TaskStatus::Running) + count(TaskStatus::Assigned)).to_string(),
            "running",
        ),
        Counter::new(
            "Completed",
            count(TaskStatus::Completed).to_string(),
            "completed",
        ),
        Counter::new("Failed", count(TaskStatus::Failed).to_string(), "failed"),
        Counter::new(
            "Cancelled",
            count(TaskStatus::Cancelled).to_string(),
            "cancelled",
        ),
        Counter::new(
            "Avg run time",
            stats.avg_time.map_or("–".into(), seconds),
            "",
        ),
        Counter::new("Finished / hour", stats.finished_last_hour.to_string(), ""),
        Counter::new(
            "Compute hours",
            format!("{:.2}", stats.compute_seconds / 3600.0),
            "",
        ),
    ];
    let node_counts = [
        ("idle", nodes.idle),
        ("busy", nodes.busy),
        ("paused", nodes.paused),
        ("draining", nodes.draining),
        ("drained", nodes.drained),
        ("offline", nodes.offline),
        ("removed", nodes.removed),
    ]
    .into_iter()
    .map(|(status, n)| Counter::new(status, n.to_string(), status))
    .collect();
    let throughput = Chart {
        kind: ChartKind::Bars { bar_width: 60 },
        label: "Tasks completed per minute, last 30 minutes",
        unit: "tasks completed",
        from,
        to: now,
        points: &per_minute,
    }
    .svg();
    let queue_chart = Chart {
        kind: ChartKind::Line,
        label: "Queue length (pending tasks), last 30 minutes",
        unit: "pending",
        from,
        to: now,
        points: &queue,
    }
    .svg();
    let completed_now = per_minute
        .last()
        .filter(|(t, _)| now - t < 60.0)
        .map_or(0.0, |p| p.1);
    render(&OverviewPart {
        counters,
        node_total: nodes.total,
        node_counts,
        throughput,
        throughput_now: format!("{completed_now:.0}"),
        queue: queue_chart,
        queue_now: pending,
    })
}

// ---------------------------------------------------------------------------------------------
// Submit
// ---------------------------------------------------------------------------------------------

async fn submit_page(State(app): State<AppState>) -> Result<Html<String>, ApiError> {
    let limits = &app.engine.config().limits;
    html(&SubmitPage {
        layout: layout(&app, "submit", "Submit".into()),
        max_code: limits.max_code_chars,
        max_timeout: limits.max_timeout_secs,
    })
}

// ---------------------------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksParams {
    status: Option<String>,
    #[serde(default)]
    offset: u64,
    limit: Option<u32>,
}

/// A validated task-list query: newest first, `offset` counted from the newest.
struct TasksView {
    status: Option<TaskStatus>,
    offset: u64,
    limit: u32,
}

impl TasksView {
    fn parse(params: TasksParams) -> Result<TasksView, ApiError> {
        let status = status_filter(
            params.status.as_deref().filter(|s| !s.is_empty()),
            &TaskStatus::ALL,
            TaskStatus::as_str,
        )?;
        let limit = page_limit(Some(params.limit.unwrap_or(TASKS_PER_PAGE)))?;
        Ok(TasksView {
            status,
            offset: params.offset,
            limit,
        })
    }

    fn url(&self, offset: u64) -> String {
        let mut url = format!("/ui/part/tasks?offset={offset}");
        if let Some(s) = self.status {
            url.push_str("&status=");
            url.push_str(s.as_str());
        }
        if self.limit != TASKS_PER_PAGE {
            url.push_str(&format!("&limit={}", self.limit));
        }
        url
    }
}

async fn tasks_page(
    State(app): State<AppState>,
    QueryParams(params): QueryParams<TasksParams>,
) -> Result<Html<String>, ApiError> {
    let view = TasksView::parse(params)?;
    let first = first_render(&app, tasks_html(&app, Caller::ANYONE, &view)).await;
    let status = view.status.map_or("", TaskStatus::as_str);
    html(&TasksPage {
        layout: layout(&app, "tasks", "Tasks".into()),
        part_url: view.url(view.offset),
        statuses: TaskStatus::ALL
            .iter()
            .map(|s| (s.as_str(), s.as_str() == status))
            .collect(),
        first,
    })
}

async fn tasks_part(
    State(app): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<TasksParams>,
) -> Result<Html<String>, ApiError> {
    let view = TasksView::parse(params)?;
    tasks_html(&app, caller, &view).await.map(Html)
}

/// The task list as `caller` may see it (a submitter: its own tasks).
async fn tasks_html(app: &AppState, caller: Caller, view: &TasksView) -> Result<String, ApiError> {
    // The store pages oldest first; the console shows newest first: the page `offset` from
    // the newest is the store's page ending `offset` before the total.
    let own = caller.only_tasks_of();
    let total = app.engine.count_tasks(view.status, own).await?;
    let end = total.saturating_sub(view.offset);
    let start = end.saturating_sub(u64::from(view.limit));
    let mut tasks = if end == 0 {
        Vec::new()
    } else {
        app.engine
            .tasks(&TaskQuery {
                status: view.status,
                limit: (end - start) as u32,
                offset: start,
                after: None,
                submitted_by: own,
            })
            .await?
    };
    tasks.reverse();
    let now = unix_now();
    let rows = tasks.iter().map(|t| TaskRow::of(t, now)).collect();
    let shown = tasks.len() as u64;
    let newer = (view.offset > 0).then(|| view.url(view.offset.saturating_sub(view.limit.into())));
    let older = (view.offset + shown < total).then(|| view.url(view.offset + shown));
    render(&TasksPart {
        rows,
        first: if shown == 0 { 0 } else { view.offset + 1 },
        last: view.offset + shown,
        total,
        filtered: view.status.map(TaskStatus::as_str),
        newer,
        older,
    })
}

async fn task_page(
    State(app): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Html<String>, ApiError> {
    let task_id = task_id_from_path(&raw)?;
    let first = first_render(&app, task_html(&app, Caller::ANYONE, task_id)).await;
    html(&TaskPage {
        layout: layout(&app, "tasks", format!("Task {task_id}")),
        task_id,
        first,
    })
}

async fn task_part(
    State(app): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Html<String>, ApiError> {
    let task_id = task_id_from_path(&raw)?;
    task_html(&app, caller, task_id).await.map(Html)
}

/// A task and its runs, if `caller` may see it (else the same 404 as an unknown task).
async fn task_html(app: &AppState, caller: Caller, task_id: TaskId) -> Result<String, ApiError> {
    let task = super::tasks::visible_task(app, caller, task_id).await?;
    let runs = app.engine.runs(task_id).await?;
    render(&TaskPart::of(&task, &runs, unix_now()))
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

async fn nodes_page(State(app): State<AppState>) -> Result<Html<String>, ApiError> {
    let first = first_render(&app, nodes_html(&app)).await;
    let commands = first_render(&app, commands_html(&app)).await;
    html(&NodesPage {
        layout: layout(&app, "nodes", "Nodes".into()),
        first,
        commands,
    })
}

async fn nodes_part(State(app): State<AppState>) -> Result<Html<String>, ApiError> {
    nodes_html(&app).await.map(Html)
}

async fn nodes_html(app: &AppState) -> Result<String, ApiError> {
    let now = unix_now();
    let mut nodes = app.engine.nodes();
    nodes.sort_by(|a, b| a.record.node_id.cmp(&b.record.node_id));
    let max_timeout = app.engine.config().limits.max_timeout_secs;
    render(&NodesPart {
        rows: nodes.iter().map(|n| NodeRow::of(n, now)).collect(),
        max_timeout,
    })
}

async fn commands_part(State(app): State<AppState>) -> Result<Html<String>, ApiError> {
    commands_html(&app).await.map(Html)
}

async fn commands_html(app: &AppState) -> Result<String, ApiError> {
    let commands = app
        .engine
        .commands(&CommandQuery {
            limit: COMMANDS_SHOWN,
            ..CommandQuery::default()
        })
        .await?;
    render(&CommandsPart {
        rows: commands.iter().map(CommandRow::of).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// Operations (scale-out, shrink) are drawn by the script from `GET /api/v1/operations`:
/// the shell holds the forms and an empty list.
async fn operations_page(State(app): State<AppState>) -> Result<Html<String>, ApiError> {
    html(&OperationsPage {
        layout: layout(&app, "operations", "Operations".into()),
    })
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.1} min", s / 60.0)
    }
}
