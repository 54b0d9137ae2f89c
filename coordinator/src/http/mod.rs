//! The HTTP edge: routing, extraction, error rendering. Handlers translate between the wire
//! and the [`Engine`]; they decide nothing.
//!
//! Architecture Invariant: only this module knows axum.

mod error;
mod extract;
mod feed;
mod nodes;
mod seed;
mod tasks;
mod views;

pub use error::ApiError;

use crate::engine::Engine;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use std::sync::Arc;
use tower_http::cors::CorsLayer;
use tower_http::trace::TraceLayer;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
}

/// Settings that shape the HTTP layer itself.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub max_body_bytes: usize,
}

pub fn router(engine: Arc<Engine>, config: &HttpConfig) -> Router {
    let state = AppState { engine };
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
        .route("/api/v1/tasks", post(tasks::create).get(tasks::list))
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
        .route("/ws/updates", get(feed::updates))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        // Development default (seed 001): any origin. Restricted when auth arrives.
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
