//! `/api/v1/keys` (admins only, enforced by [`super::auth`]): list, create, revoke.

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use crate::keys::{ApiKey, KeyMode, NewKey, Role};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

/// A key as shown to admins: never its token, hash or secret.
pub fn view(key: &ApiKey) -> Value {
    json!({
        "id": key.key_id,
        "name": key.name,
        "role": key.role,
        "mode": key.mode,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "revoked": key.revoked_at.is_some(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    role: Role,
    #[serde(default = "simple")]
    mode: KeyMode,
    #[serde(default)]
    name: String,
}

fn simple() -> KeyMode {
    KeyMode::Simple
}

pub async fn list(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let keys = app.keys.keys().await?;
    Ok(Json(
        json!({ "keys": keys.iter().map(view).collect::<Vec<_>>() }),
    ))
}

pub async fn create(
    State(app): State<AppState>,
    JsonBody(request): JsonBody<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let new = NewKey::generate(&request.name, request.role, request.mode);
    let key = app.keys.create_key(&new, crate::engine::unix_now()).await?;
    tracing::info!(key_id = key.key_id, role = %key.role, mode = %key.mode, "API key created");
    let mut body = view(&key);
    body["token"] = json!(new.token);
    body["secret"] = json!(new.secret);
    Ok((StatusCode::CREATED, Json(body)))
}

pub async fn revoke(
    State(app): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key_id: i64 = raw
        .parse()
        .map_err(|_| ApiError::unprocessable(format!("key id must be an integer, got {raw:?}")))?;
    let key = app
        .keys
        .revoke_key(key_id, crate::engine::unix_now())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no API key {key_id}")))?;
    tracing::info!(key_id, "API key revoked");
    Ok(Json(view(&key)))
}
