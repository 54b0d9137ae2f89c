//! The HTTP edge: routing, extraction, error rendering. Handlers translate between the wire
//! and the [`Engine`]; they decide nothing.
//!
//! Architecture Invariant: only this module knows axum.

mod auth;
mod change_points;
mod console;
mod error;
mod extract;
mod feed;
mod keys;
mod nodes;
mod operations;
mod seed;
mod tasks;
mod views;

pub use auth::{Caller, Guards};
pub use change_points::Code as ChangePointsCode;
pub use error::ApiError;

use crate::engine::Engine;
use crate::rate_limit::RateLimit;
use crate::store::KeyStore;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use std::sync::Arc;
use std::time::Duration;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub keys: Arc<dyn KeyStore>,
    pub auth: AuthSettings,
    pub local_agents: Arc<LocalAgentKey>,
    /// Scale-out and shrink.
    pub operations: Arc<crate::operations::Operations>,
    /// Rate limits and recent signatures (see [`auth`]).
    pub guards: Arc<Guards>,
    /// How long `POST /api/v1/tasks?wait=` may wait: a second short of the request timeout,
    /// which it runs under (its body is read under it), so that the answer is the task and
    /// never a 408 for a task that was accepted.
    pub longest_submit_wait: Duration,
}

/// Whether requests must carry an API key, how much body a signed one may buffer, and
/// each key's request budget.
#[derive(Debug, Clone, Copy)]
pub struct AuthSettings {
    pub enabled: bool,
    pub max_body_bytes: usize,
    /// Every key but agent keys.
    pub rate_limit: RateLimit,
    /// Agent keys: the agent protocol must never be starved by people's budgets.
    pub agent_rate_limit: RateLimit,
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
    /// Per-key budgets (with auth on).
    pub rate_limit: RateLimit,
    pub agent_rate_limit: RateLimit,
    /// Origins a browser may call from when auth is on (none: same-origin only). With auth
    /// off any origin may (`*`, seed 001's development default).
    pub cors_origins: Vec<String>,
    /// Longest a request may take, body included; long-polls and the feed are exempt.
    pub request_timeout: Duration,
}

/// Headers a cross-origin browser may send: the credentials (seed 000) and JSON.
const CORS_HEADERS: [&str; 6] = [
    "token",
    "timestamp",
    "version",
    "sign_str",
    "authorization",
    "content-type",
];

fn cors(config: &HttpConfig) -> CorsLayer {
    if !config.auth {
        // Development default (seed 001): any origin.
        return CorsLayer::permissive();
    }
    let origins = config.cors_origins.iter().filter_map(|origin| {
        HeaderValue::from_str(origin)
            .inspect_err(|_| {
                tracing::warn!(origin, "ignoring a CORS origin that is not a header value")
            })
            .ok()
    });
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers(CORS_HEADERS.map(HeaderName::from_static))
        .max_age(Duration::from_secs(600))
}

pub fn router(
    engine: Arc<Engine>,
    keys: Arc<dyn KeyStore>,
    operations: Arc<crate::operations::Operations>,
    config: &HttpConfig,
) -> Router {
    let state = AppState {
        engine,
        keys,
        operations,
        auth: AuthSettings {
            enabled: config.auth,
            max_body_bytes: config.max_body_bytes,
            rate_limit: config.rate_limit,
            agent_rate_limit: config.agent_rate_limit,
        },
        local_agents: Arc::new(LocalAgentKey {
            token_hash: config.local_agent_token_hash.clone(),
        }),
        guards: Arc::new(Guards::new(crate::replay::DEFAULT_PER_KEY)),
        longest_submit_wait: config
            .request_timeout
            .saturating_sub(Duration::from_secs(1)),
    };
    // Layers are given as tuples, outermost first: one `Router::layer` boxes every route's
    // service and its future once more per request, so each call wraps a whole stack.
    let timed = Router::new()
        .route("/", get(seed::root))
        .route("/submit", post(seed::submit))
        .route("/get_task", get(seed::get_task))
        .route("/submit_result", post(seed::submit_result))
        .route("/status/{task_id}", get(seed::status))
        .route("/results", get(seed::results))
        .route("/health", get(seed::health))
        .route("/stats", get(seed::stats))
        .route("/api/v1/tasks", post(tasks::create).get(tasks::list))
        .route("/api/v1/tasks/batch", post(tasks::create_batch))
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
        .route("/api/v1/cluster/scale_out", post(operations::scale_out))
        .route("/api/v1/cluster/shrink", post(operations::shrink))
        .route("/api/v1/operations", get(operations::list))
        .route("/api/v1/operations/{operation_id}", get(operations::get))
        .route("/api/v1/keys", get(keys::list).post(keys::create))
        .route("/api/v1/keys/{key_id}", delete(keys::revoke))
        .merge(console::routes())
        .route(
            change_points::PATH,
            post(change_points::change_points).fallback(change_points::method_not_allowed),
        )
        .fallback(not_found);
    // These wait by design, each bounded by itself: a task read with `?wait=` and a wait for
    // several (at most 60 s), and the live feed.
    let waiting = Router::new()
        .route("/api/v1/tasks/{task_id}", get(tasks::get))
        .route("/api/v1/tasks/wait", get(tasks::wait_many))
        .route("/ws/updates", get(feed::updates));
    let public = bounded(timed, waiting, config, &state).layer((
        TraceLayer::new_for_http(),
        // Preflights are answered here, before authentication, so browsers can send
        // the key headers.
        cors(config),
        axum::middleware::map_response(detail_for_bare_errors),
    ));
    // The agents' own routes: the bulk of a large pool's requests (10,000 nodes send 5,000
    // heartbeats a second). No CORS (agents are not browsers: a web page gets no preflight
    // through to them, even with auth off) and no request span (debug-level, unread at the
    // default level): the two layers were about a tenth of the coordinator's CPU per
    // heartbeat (BENCHMARKS.md, section 4).
    let agents = Router::new()
        .route("/internal/heartbeat", post(seed::heartbeat))
        .route("/internal/result", post(seed::result))
        .route("/internal/results", post(seed::results_batch));
    // The long-poll, bounded by its own `wait` (at most 60 s).
    let agents_waiting = Router::new().route("/internal/task", get(seed::pull));
    let agents = bounded(agents, agents_waiting, config, &state)
        .layer(axum::middleware::map_response(detail_for_bare_errors));
    public.merge(agents).with_state(state)
}

/// `timed` under the request timeout, `waiting` (routes that wait by design) without it, both
/// behind the body limit and authentication.
///
/// With auth off the authentication middleware would pass every request through untouched
/// (no key to check, no rate limit, no caller but [`auth::Caller::ANYONE`], which the
/// extractor gives anyway), so it is left out: wrapping a request in it (a clone of the
/// inner service, of the state, a boxed future) was a few per cent of a heartbeat's CPU.
fn bounded(
    timed: Router<AppState>,
    waiting: Router<AppState>,
    config: &HttpConfig,
    state: &AppState,
) -> Router<AppState> {
    // One `layer` call per router (each call boxes every route once more per request), so
    // the four combinations are spelled out. Outermost first: the timeout (a slow client,
    // headers in and body dripping, cannot hold a handler, nor the signature check reading
    // the body, past it), the body limit, authentication.
    let timeout =
        || TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, config.request_timeout);
    let limit = || DefaultBodyLimit::max(config.max_body_bytes);
    let authenticate = || axum::middleware::from_fn_with_state(state.clone(), auth::authenticate);
    let timed = timed.method_not_allowed_fallback(method_not_allowed);
    let waiting = waiting.method_not_allowed_fallback(method_not_allowed);
    if state.auth.enabled {
        timed
            .layer((timeout(), limit(), authenticate()))
            .merge(waiting.layer((limit(), authenticate())))
    } else {
        timed
            .layer((timeout(), limit()))
            .merge(waiting.layer(limit()))
    }
}

/// Errors made by layers rather than handlers (a request timeout) come without a body:
/// give them the `{"detail"}` every other error has.
async fn detail_for_bare_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.headers().contains_key(header::CONTENT_TYPE)
    {
        return response;
    }
    let detail = match status {
        StatusCode::REQUEST_TIMEOUT => {
            "request timed out: the coordinator answers within its --request-timeout".to_string()
        }
        other => other
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string(),
    };
    let mut fixed = ApiError::new(status, detail).into_response();
    for (name, value) in response.headers() {
        if !fixed.headers().contains_key(name) && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fixed
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not Found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}
