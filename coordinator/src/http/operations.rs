//! Scale-out (seed 002), shrink (seed 003) and the operations they create.
//!
//! `POST /api/v1/cluster/scale_out` answers seed 002's envelope, errors included;
//! `POST /api/v1/cluster/shrink` seed 003's `202 {"job_id"}`; the reads of operations the
//! usual JSON with `{"detail"}` errors.

use super::AppState;
use super::error::ApiError;
use super::extract::{JsonBody, QueryParams, page_limit, status_filter};
use super::views;
use crate::operations::driver::{OperationError, ScaleOutRequest, ShrinkRequest};
use crate::operations::plan::{self, AgentAddress};
use crate::operations::{OperationKind, OperationState};
use crate::store::OperationQuery;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::time::{Duration, Instant};

impl From<OperationError> for ApiError {
    fn from(e: OperationError) -> ApiError {
        let detail = e.to_string();
        let status = match e {
            OperationError::Engine(inner) => return ApiError::from(inner),
            OperationError::NotConfigured => StatusCode::SERVICE_UNAVAILABLE,
            OperationError::Busy(_) => StatusCode::CONFLICT,
            OperationError::InvalidShrink(_) | OperationError::RetryMismatch(_) => {
                StatusCode::BAD_REQUEST
            }
            OperationError::NothingToRetry(_) => StatusCode::NOT_FOUND,
            OperationError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, detail)
    }
}

/// Seed 002's answer: `successful`, `timestamp`, `duration` (ms), `status`, `traceId`,
/// `data`, `error` (`code`, `message`, `subErrors`).
fn envelope(started: Instant, outcome: Result<Value, (ApiError, Vec<String>)>) -> Response {
    let trace_id = hex::encode(rand::random::<[u8; 8]>());
    let duration = started.elapsed().as_millis() as u64;
    let timestamp = views::rfc3339(crate::engine::unix_now());
    let (status, body) = match outcome {
        Ok(data) => (
            StatusCode::OK,
            json!({
                "successful": true,
                "timestamp": timestamp,
                "duration": duration,
                "status": 200,
                "traceId": trace_id,
                "data": data,
                "error": null,
            }),
        ),
        Err((error, sub_errors)) => {
            if error.status.is_server_error() {
                tracing::warn!(status = %error.status, detail = %error.detail, "scale-out refused");
            }
            (
                error.status,
                json!({
                    "successful": false,
                    "timestamp": timestamp,
                    "duration": duration,
                    "status": error.status.as_u16(),
                    "traceId": trace_id,
                    "data": null,
                    "error": {
                        "code": error_code(error.status),
                        "message": error.detail,
                        "subErrors": sub_errors,
                    },
                }),
            )
        }
    };
    (status, Json(body)).into_response()
}

/// The envelope's `error.code` for a status (documented in the README).
fn error_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "BAD_REQUEST",
        StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
        StatusCode::FORBIDDEN => "FORBIDDEN",
        StatusCode::NOT_FOUND => "NOT_FOUND",
        StatusCode::CONFLICT => "CONFLICT",
        StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
        StatusCode::UNPROCESSABLE_ENTITY => "INVALID_ARGUMENT",
        StatusCode::SERVICE_UNAVAILABLE => "UNAVAILABLE",
        _ => "INTERNAL",
    }
}

/// A validation failure: its message and, per field, what is wrong (`subErrors`).
fn invalid(problems: Vec<String>) -> (ApiError, Vec<String>) {
    let message = match problems.as_slice() {
        [one] => one.clone(),
        _ => format!("{} problems in the request", problems.len()),
    };
    (ApiError::unprocessable(message), problems)
}

/// `POST /api/v1/cluster/scale_out`.
pub async fn scale_out(State(app): State<AppState>, body: Bytes) -> Response {
    let started = Instant::now();
    let request = match parse_scale_out(&body) {
        Ok(request) => request,
        Err(e) => return envelope(started, Err(e)),
    };
    let outcome = match app.operations.scale_out(request).await {
        Ok(operation) => Ok(views::operation(&operation)),
        Err(e) => Err((ApiError::from(e), Vec::new())),
    };
    envelope(started, outcome)
}

/// The keys `configs` may carry for the coordinator itself (not passed on as settings):
/// how long to wait for the first heartbeat, and the URL the agent should reach this
/// coordinator at (when it differs from `--advertise-url`, e.g. across a NAT).
const COORDINATOR_CONFIGS: [&str; 2] = ["heartbeat_timeout", "coordinator_url"];

fn parse_scale_out(body: &[u8]) -> Result<ScaleOutRequest, (ApiError, Vec<String>)> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err((
            ApiError::bad_request("request body is empty; expected a JSON object"),
            Vec::new(),
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        (
            ApiError::bad_request(format!("malformed JSON: {e}")),
            Vec::new(),
        )
    })?;
    let Value::Object(mut fields) = value else {
        return Err(invalid(vec!["the body must be a JSON object".into()]));
    };
    let mut problems = Vec::new();
    let agent_info = fields.remove("agentInfo");
    let configs = fields.remove("configs");
    let ob_configs = fields.remove("obConfigs");
    let zone = fields.remove("zone");
    for unknown in fields.keys() {
        problems.push(format!(
            "unknown field {unknown:?}; expected agentInfo, configs (or obConfigs), zone"
        ));
    }
    let agents = match agent_info {
        None | Some(Value::Null) => {
            problems.push("agentInfo is required: {\"ip\", \"port\"} (or a list of them)".into());
            Vec::new()
        }
        Some(Value::Array(items)) if items.is_empty() => {
            problems.push("agentInfo must name at least one agent".into());
            Vec::new()
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| agent_address(item, &format!("agentInfo[{i}]"), &mut problems))
            .collect(),
        Some(item) => agent_address(&item, "agentInfo", &mut problems)
            .into_iter()
            .collect(),
    };
    let configs = match (configs, ob_configs) {
        (Some(_), Some(_)) => {
            problems.push("give configs or obConfigs (its alias), not both".into());
            Map::new()
        }
        (Some(Value::Object(map)), None) | (None, Some(Value::Object(map))) => map,
        (None | Some(Value::Null), None) | (None, Some(Value::Null)) => Map::new(),
        (Some(_), None) | (None, Some(_)) => {
            problems.push("configs must be a JSON object of settings".into());
            Map::new()
        }
    };
    let mut pushed = Map::new();
    let mut heartbeat_timeout = None;
    let mut coordinator_url = None;
    for (key, value) in configs {
        if !matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
            problems.push(format!(
                "configs.{key} must be a string, a number or a boolean"
            ));
            continue;
        }
        if key == "coordinator_url" {
            match value.as_str().map(str::trim) {
                Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                    coordinator_url = Some(url.trim_end_matches('/').to_string());
                }
                _ => problems.push(format!("configs.{key} must be an http(s) URL")),
            }
            continue;
        }
        if COORDINATOR_CONFIGS.contains(&key.as_str()) {
            match number(&value) {
                Some(secs) if secs.is_finite() && secs > 0.0 && secs <= 3600.0 => {
                    heartbeat_timeout = Some(Duration::from_secs_f64(secs));
                }
                _ => problems.push(format!(
                    "configs.{key} must be a number of seconds between 0 and 3600"
                )),
            }
            continue;
        }
        pushed.insert(key, value);
    }
    let zone = match zone {
        None | Some(Value::Null) => None,
        Some(Value::String(z)) if z.trim().is_empty() => None,
        Some(Value::String(z)) => Some(z),
        Some(_) => {
            problems.push("zone must be a string".into());
            None
        }
    };
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    Ok(ScaleOutRequest {
        agents,
        zone,
        configs: pushed,
        heartbeat_timeout,
        coordinator_url,
    })
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn agent_address(item: &Value, at: &str, problems: &mut Vec<String>) -> Option<AgentAddress> {
    let Value::Object(map) = item else {
        problems.push(format!("{at} must be an object {{\"ip\", \"port\"}}"));
        return None;
    };
    for key in map.keys().filter(|k| !matches!(k.as_str(), "ip" | "port")) {
        problems.push(format!("{at}: unknown field {key:?}; expected ip, port"));
    }
    let ip = match map.get("ip") {
        Some(Value::String(s)) => match s.trim().parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                problems.push(format!("{at}.ip {s:?} is not an IP address"));
                None
            }
        },
        _ => {
            problems.push(format!("{at}.ip is required: the agent's IP address"));
            None
        }
    };
    let port = match map.get("port").and_then(number) {
        Some(p) if p.fract() == 0.0 && (1.0..=65535.0).contains(&p) => Some(p as u16),
        Some(p) => {
            problems.push(format!("{at}.port must be between 1 and 65535, got {p}"));
            None
        }
        None => {
            problems.push(format!("{at}.port is required: the agent's standby port"));
            None
        }
    };
    Some(AgentAddress {
        ip: ip?,
        port: port?,
    })
}

/// Body of `POST /api/v1/cluster/shrink` (seed 003). `type`, `force_backup` and
/// `need_agency` are the seed's database settings: accepted and ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShrinkBody {
    shrink_number: Option<i64>,
    online: Option<bool>,
    #[serde(default)]
    retry: Option<bool>,
    /// Seconds an online shrink lets running work finish before it is requeued.
    #[serde(default)]
    timeout: Option<f64>,
    #[serde(default, rename = "type")]
    _database_type: Option<Value>,
    #[serde(default, rename = "force_backup")]
    _force_backup: Option<Value>,
    #[serde(default, rename = "need_agency")]
    _need_agency: Option<Value>,
}

/// `POST /api/v1/cluster/shrink` → `202 {"job_id"}`.
pub async fn shrink(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<ShrinkBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(number) = body.shrink_number else {
        return Err(ApiError::unprocessable(
            "shrink_number is required: how many nodes to remove",
        ));
    };
    let Some(online) = body.online else {
        return Err(ApiError::unprocessable(
            "online is required: true drains the nodes first, false requeues their work at once",
        ));
    };
    if let Some(t) = body.timeout
        && !(t.is_finite() && (0.0..=86_400.0).contains(&t))
    {
        return Err(ApiError::unprocessable(format!(
            "timeout must be a number of seconds between 0 and 86400, got {t}"
        )));
    }
    let shrink_number = match usize::try_from(number) {
        Ok(n) if n > 0 => n,
        // Not a count of nodes: the same 400 as any other number off the groups.
        _ => {
            let valid = plan::valid_shrink_numbers(&app.operations.engine().groups());
            let err = plan::InvalidShrink {
                shrink_number: number,
                valid,
            };
            return Err(ApiError::bad_request(err.to_string()));
        }
    };
    let operation = app
        .operations
        .shrink(ShrinkRequest {
            shrink_number,
            online,
            retry: body.retry.unwrap_or(false),
            timeout: body.timeout,
        })
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job_id": operation.operation_id.to_string() })),
    ))
}

/// `GET /api/v1/operations/{id}`.
pub async fn get(
    State(app): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let operation_id = raw.parse::<i64>().map_err(|_| {
        ApiError::unprocessable(format!("operation id must be an integer, got {raw:?}"))
    })?;
    let operation = app
        .operations
        .engine()
        .operation(operation_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Operation {operation_id} not found")))?;
    Ok(Json(views::operation(&operation)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(rename = "type")]
    kind: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
    offset: Option<u64>,
}

/// `GET /api/v1/operations`: newest first, paged.
pub async fn list(
    State(app): State<AppState>,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let kind = status_filter(
        params.kind.as_deref(),
        &[OperationKind::ScaleOut, OperationKind::Shrink],
        OperationKind::as_str,
    )?;
    let state = status_filter(
        params.state.as_deref(),
        &[
            OperationState::Ready,
            OperationState::Running,
            OperationState::Succeeded,
            OperationState::Failed,
        ],
        OperationState::as_str,
    )?;
    let limit = page_limit(params.limit)?;
    let offset = params.offset.unwrap_or(0);
    let items: Vec<Value> = app
        .operations
        .engine()
        .operations(&OperationQuery {
            kind,
            state,
            limit,
            offset,
        })
        .await?
        .iter()
        .map(views::operation)
        .collect();
    Ok(Json(
        json!({ "items": items, "limit": limit, "offset": offset }),
    ))
}
