//! The HTTP edge: routing, extraction, error rendering. Handlers translate between the wire
//! and the [`Engine`]; they decide nothing.
//!
//! Architecture Invariant: only this module knows axum.

mod auth;
mod error;
mod extract;
mod feed;
mod keys;
mod nodes;
mod seed;
mod tasks;
mod views;

pub use error::ApiError;

use crate::engine::Engine;
use crate::store::KeyStore;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use std::sync::Arc;
use tower_http::cors::CorsLayer;
use tower_http::trace::TraceLayer;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub keys: Arc<dyn KeyStore>,
    pub auth: AuthSettings,
    pub local_agents: Arc<LocalAgentKey>,
}

/// Whether requests must carry an API key, and how much body a signed one may buffer.
#[derive(Debug, Clone, Copy)]
pub struct AuthSettings {
    pub enabled: bool,
    pub max_body_bytes: usize,
}

/// Settings `auth` needs beyond [`AuthSettings`]: the in-process agents' credential.
#[derive(Debug, Clone, Default)]
pub struct LocalAgentKey {
    /// SHA-256 of a random token made at start-up and held only in memory: the local
    /// agents' `agent` role key, never stored.
    pub token_hash: Option<String>,
}

/// Settings that shape the HTTP layer itself.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub max_body_bytes: usize,
    /// Require API keys (see [`auth`]).
    pub auth: bool,
    /// The in-process agents' token hash, accepted as an `agent` key.
    pub local_agent_token_hash: Option<String>,
}

pub fn router(engine: Arc<Engine>, keys: Arc<dyn KeyStore>, config: &HttpConfig) -> Router {
    let state = AppState {
        engine,
        keys,
        auth: AuthSettings {
            enabled: config.auth,
            max_body_bytes: config.max_body_bytes,
        },
        local_agents: Arc::new(LocalAgentKey {
            token_hash: config.local_agent_token_hash.clone(),
        }),
    };
    Router::new()
        .route("/", get(seed::root))
        .route("/submit", post(seed::submit))
        .route("/get_task", get(seed::get_task))
        .route("/submit_result", post(seed::submit_result))
        .route("/status/{task_id}", get(seed::status))
        .route("/results", get(seed::results))
        .route("/health", get(seed::health))
        .route("/stats", get(seed::stats))
        .route("/internal/heartbeat", post(seed::heartbeat))
        .route("/internal/task", get(seed::pull))
        .route("/internal/result", post(seed::result))
        .route("/internal/results", post(seed::results_batch))
        .route("/api/v1/tasks", post(tasks::create).get(tasks::list))
        .route("/api/v1/tasks/batch", post(tasks::create_batch))
        .route("/api/v1/tasks/{task_id}", get(tasks::get))
        .route("/api/v1/tasks/{task_id}/cancel", post(tasks::cancel))
        .route("/api/v1/tasks/{task_id}/explain", get(tasks::explain))
        .route("/api/v1/nodes", get(nodes::list))
        // Before `{node_id}` routes would shadow it: "commands" is not a node id.
        .route("/api/v1/nodes/commands", get(nodes::commands))
        .route("/api/v1/nodes/{node_id}/drain", post(nodes::drain))
        .route("/api/v1/nodes/{node_id}/undrain", post(nodes::undrain))
        .route("/api/v1/nodes/{node_id}/restart", post(nodes::restart))
        .route(
            "/api/v1/nodes/{node_id}/meta",
            get(nodes::get_meta).put(nodes::put_meta),
        )
        .route("/api/v1/keys", get(keys::list).post(keys::create))
        .route("/api/v1/keys/{key_id}", delete(keys::revoke))
        .route("/ws/updates", get(feed::updates))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        // Development default (seed 001): any origin. Preflights are answered here, before
        // authentication, so browsers can send the key headers.
        .layer(CorsLayer::permissive())
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not Found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}
