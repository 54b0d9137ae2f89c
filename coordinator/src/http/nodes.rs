//! `/api/v1/nodes`: the pool as operators see it (seed 004's shapes).

use super::AppState;
use super::error::ApiError;
use super::extract::{QueryParams, status_filter};
use super::views;
use axum::Json;
use axum::extract::State;
use lull_shared::NodeStatus;
use serde::Deserialize;
use serde_json::{Value, json};

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
