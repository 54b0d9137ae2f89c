//! Authentication at the edge: a middleware that, when auth is on, finds the request's API
//! key (`token` header or `Authorization: Bearer`), checks a signed key's `sign_str`, and
//! refuses a role that may not make this request. `/` and `/health` stay open.
//!
//! 401 says what is wrong with the credentials; 403 names the role and what it may do.

use super::AppState;
use super::error::ApiError;
use crate::keys::{Access, ApiKey, KeyMode, Role, hash_token, timestamp_fresh};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use lull_shared::signing::{SIGN_HEADER, TIMESTAMP_HEADER, TOKEN_HEADER, verify};

fn unauthorized(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, detail)
}

/// The token a request carries: the `token` header (seed 000) or `Authorization: Bearer`.
fn credential(headers: &HeaderMap) -> Result<String, ApiError> {
    let header = |name: &str| -> Result<Option<String>, ApiError> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.trim().to_string()).filter(|s| !s.is_empty()))
                .map_err(|_| unauthorized(format!("the {name} header is not valid text"))),
        }
    };
    if let Some(token) = header(TOKEN_HEADER)? {
        return Ok(token);
    }
    if let Some(auth) = header("authorization")? {
        let bearer = auth
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_string())
            .filter(|t| !t.is_empty());
        return bearer
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer TOKEN`"));
    }
    Err(unauthorized(
        "missing credentials: send an API key in the `token` header or as `Authorization: Bearer TOKEN`",
    ))
}

fn now_ms() -> i64 {
    (crate::engine::unix_now() * 1000.0) as i64
}

/// Checks a signed key's `timestamp` and `sign_str` over the request, and hands the
/// request back with its body (read to verify it) restored.
async fn check_signature(key: &ApiKey, req: Request, max_body: usize) -> Result<Request, ApiError> {
    let id = key.key_id;
    let headers = req.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let timestamp = header(TIMESTAMP_HEADER).ok_or_else(|| {
        unauthorized(format!(
            "missing timestamp: key {id} is a signed key; send `timestamp` (ms) and `sign_str`"
        ))
    })?;
    let sign_str = header(SIGN_HEADER)
        .ok_or_else(|| unauthorized(format!("missing sign_str: key {id} is a signed key")))?;
    let at: i64 = timestamp.parse().map_err(|_| {
        unauthorized(format!(
            "bad timestamp {timestamp:?}: milliseconds since the Unix epoch expected"
        ))
    })?;
    if !timestamp_fresh(at, now_ms()) {
        return Err(unauthorized(format!(
            "stale timestamp {at}: more than {} s from the coordinator's clock",
            crate::keys::TIMESTAMP_WINDOW_MS / 1000
        )));
    }
    let Some(secret) = key.secret.as_deref() else {
        tracing::error!(key_id = id, "signed key without a stored secret");
        return Err(unauthorized(format!(
            "key {id} has no secret to verify with"
        )));
    };
    let method = req.method().as_str().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, max_body)
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))?;
    if !verify(secret, &timestamp, &method, &path, &bytes, &sign_str) {
        return Err(unauthorized(
            "bad signature: sign_str must be hex HMAC-SHA256(secret, timestamp\\nMETHOD\\npath?query\\nbody)",
        ));
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

fn forbidden(role: Role, req: &Request) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "role {role} may not {} {}: it may {}",
            req.method(),
            req.uri().path(),
            role.allows()
        ),
    )
}

/// The role a request was authenticated with, left in its extensions for handlers that
/// show different things to different roles (the console disables what a role may not do).
/// Absent when authentication is off: then anyone may do anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerRole(pub Role);

pub async fn authenticate(
    State(app): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !app.auth.enabled {
        return Ok(next.run(req).await);
    }
    let access = Access::of(req.method().as_str(), req.uri().path());
    if access == Access::Open {
        return Ok(next.run(req).await);
    }
    let token = credential(req.headers())?;
    let token_hash = hash_token(&token);
    if app.local_agents.token_hash.as_deref() == Some(token_hash.as_str()) {
        if Role::Agent.may(access) {
            req.extensions_mut().insert(CallerRole(Role::Agent));
            return Ok(next.run(req).await);
        }
        return Err(forbidden(Role::Agent, &req));
    }
    let key = app
        .keys
        .key_by_token_hash(&token_hash)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| unauthorized("unknown API key"))?;
    if key.revoked_at.is_some() {
        return Err(unauthorized(format!("API key {} was revoked", key.key_id)));
    }
    let mut req = match key.mode {
        KeyMode::Simple => req,
        KeyMode::Signed => check_signature(&key, req, app.auth.max_body_bytes).await?,
    };
    if !key.role.may(access) {
        tracing::info!(key_id = key.key_id, role = %key.role, method = %req.method(), path = req.uri().path(), "refused by role");
        return Err(forbidden(key.role, &req));
    }
    tracing::debug!(key_id = key.key_id, role = %key.role, "authenticated");
    req.extensions_mut().insert(CallerRole(key.role));
    Ok(next.run(req).await)
}
