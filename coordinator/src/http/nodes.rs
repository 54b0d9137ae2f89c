//! `/api/v1/nodes`: the pool as operators see it and manage it (seed 004's paths and shapes):
//! list, drain, undrain, restart, metadata, and the commands sent to nodes.

use super::AppState;
use super::error::ApiError;
use super::extract::{JsonBody, OptionalJsonBody, QueryParams, page_limit, status_filter};
use super::views;
use crate::store::CommandQuery;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use lull_shared::{CommandStatus, NodeStatus};
use serde::Deserialize;
use serde_json::{Map, Value, json};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(rename = "type")]
    node_type: Option<String>,
    status: Option<String>,
}

pub async fn list(
    State(app): State<AppState>,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let status = status_filter(
        params.status.as_deref(),
        &NodeStatus::ALL,
        NodeStatus::as_str,
    )?;
    let node_type = params.node_type.filter(|t| !t.is_empty());
    let items: Vec<Value> = app
        .engine
        .nodes()
        .iter()
        .filter(|n| status.is_none_or(|s| n.record.status == s))
        .filter(|n| node_type.as_ref().is_none_or(|t| &n.record.node_type == t))
        .map(views::node)
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// A node and the command that acted on it: the answer to drain, undrain and restart.
fn node_and_command(
    app: &AppState,
    command: &crate::model::CommandRecord,
) -> Result<Json<Value>, ApiError> {
    let node = app.engine.node(&command.node_id)?;
    Ok(Json(json!({
        "node": views::node(&node),
        "command": views::command(command),
    })))
}

/// Body of `POST /api/v1/nodes/{id}/drain` (seed 004's `NodeDrainRequest`); may be empty.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainBody {
    /// Seconds running runs may take to finish; absent or `null`: no deadline; `0`: stop
    /// them now.
    #[serde(default)]
    timeout: Option<f64>,
}

pub async fn drain(
    State(app): State<AppState>,
    Path(node_id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<DrainBody>,
) -> Result<Json<Value>, ApiError> {
    let max = app.engine.config().limits.max_timeout_secs;
    if let Some(t) = body.timeout
        && !(t.is_finite() && (0.0..=max).contains(&t))
    {
        return Err(ApiError::unprocessable(format!(
            "timeout must be a number of seconds between 0 and {max}, got {t}"
        )));
    }
    let command = app.engine.drain(&node_id, body.timeout).await?;
    node_and_command(&app, &command)
}

/// The body of an action that takes no arguments (seed 004's `NodeActionRequest` has only
/// the path's id): empty or `{}`; anything else is a 422 naming what was not expected.
fn no_args(body: &Map<String, Value>) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = body.keys().map(String::as_str).collect();
    Err(ApiError::unprocessable(format!(
        "this action takes no arguments, got {}",
        names.join(", ")
    )))
}

pub async fn undrain(
    State(app): State<AppState>,
    Path(node_id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    no_args(&body)?;
    let command = app.engine.undrain(&node_id).await?;
    node_and_command(&app, &command)
}

/// 202: the agent restarts when it next heartbeats; follow the command's status.
pub async fn restart(
    State(app): State<AppState>,
    Path(node_id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<Map<String, Value>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    no_args(&body)?;
    let command = app.engine.restart(&node_id).await?;
    Ok((StatusCode::ACCEPTED, node_and_command(&app, &command)?))
}

pub async fn get_meta(
    State(app): State<AppState>,
    Path(node_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = app.engine.node_meta(&node_id)?;
    Ok(Json(json!({ "meta": Value::Object(meta) })))
}

/// Body of `PUT /api/v1/nodes/{id}/meta` (seed 004's `NodeMetaUpdateRequest`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaBody {
    meta: Option<Value>,
}

/// Replaces the node's metadata with the given object (`{}` clears it).
pub async fn put_meta(
    State(app): State<AppState>,
    Path(node_id): Path<String>,
    JsonBody(body): JsonBody<MetaBody>,
) -> Result<Json<Value>, ApiError> {
    let meta = match body.meta {
        Some(Value::Object(map)) => map,
        None | Some(Value::Null) => {
            return Err(ApiError::unprocessable(
                "meta is required: a JSON object ({} clears it)",
            ));
        }
        Some(other) => {
            return Err(ApiError::unprocessable(format!(
                "meta must be a JSON object, got {}",
                json_kind(&other)
            )));
        }
    };
    let meta = app.engine.set_node_meta(&node_id, meta).await?;
    Ok(Json(json!({ "meta": Value::Object(meta) })))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsParams {
    node_id: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

/// `GET /api/v1/nodes/commands`: node commands, newest first (`limit` default 100, at most
/// 1000), optionally for one node or one status.
pub async fn commands(
    State(app): State<AppState>,
    QueryParams(params): QueryParams<CommandsParams>,
) -> Result<Json<Value>, ApiError> {
    let status = status_filter(
        params.status.as_deref(),
        &CommandStatus::ALL,
        CommandStatus::as_str,
    )?;
    let limit = page_limit(params.limit)?;
    let query = CommandQuery {
        node_id: params.node_id.filter(|n| !n.is_empty()),
        status,
        limit,
    };
    let items: Vec<Value> = app
        .engine
        .commands(&query)
        .await?
        .iter()
        .map(views::command)
        .collect();
    Ok(Json(json!({ "items": items })))
}
