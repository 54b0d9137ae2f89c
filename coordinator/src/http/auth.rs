//! Authentication at the edge: a middleware that, when auth is on, finds the request's API
//! key (`token` header, `Authorization: Bearer`, or `?token=` on `/ws/updates` alone),
//! checks a signed key's `sign_str` and refuses a replay of it, holds the key to its rate
//! limit, and refuses a role that may not make this request. `/` and `/health` stay open.
//!
//! 401 says what is wrong with the credentials; 403 names the role and what it may do; 429
//! carries `Retry-After`. An admitted request carries its [`Caller`] to the handlers, which
//! scope a submitter to its own tasks.

use super::AppState;
use super::change_points;
use super::error::{ApiError, Refusal};
use crate::keys::{Access, ApiKey, KeyMode, Role, TIMESTAMP_WINDOW_MS, hash_token};
use crate::rate_limit::{RateLimit, RateLimiter, Throttled};
use crate::replay::{ReplayCache, Replayed};
use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lull_shared::ErrorBody;
use lull_shared::signing::{SIGN_HEADER, TIMESTAMP_HEADER, TOKEN_HEADER, verify};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// The one path that accepts credentials in its query string: browsers cannot set headers
/// on a WebSocket.
const QUERY_CREDENTIALS_PATH: &str = "/ws/updates";

/// Who made a request, as the handlers see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Caller {
    /// The API key (none with auth off, or for the in-process agents).
    pub key_id: Option<i64>,
    pub role: Option<Role>,
}

impl Caller {
    /// With auth off: no key, no restriction.
    pub const ANYONE: Caller = Caller {
        key_id: None,
        role: None,
    };

    /// The key whose tasks alone this caller may see and act on: a submitter's own.
    /// `None`: every task (admins, viewers, auth off).
    pub fn only_tasks_of(&self) -> Option<i64> {
        match self.role {
            Some(Role::Submitter) => self.key_id,
            _ => None,
        }
    }

    /// Whether a task submitted with key `submitted_by` is visible to this caller.
    pub fn sees(&self, submitted_by: Option<i64>) -> bool {
        self.only_tasks_of()
            .is_none_or(|own| submitted_by == Some(own))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .copied()
            .unwrap_or(Caller::ANYONE))
    }
}

/// Rate limits and the replay cache: the edge's only mutable state. Locked for one
/// synchronous call each, never across an `.await`.
pub struct Guards {
    rate: Mutex<RateLimiter>,
    replay: Mutex<ReplayCache>,
    /// The rate limiter's clock: seconds since this.
    started: Instant,
}

impl Guards {
    pub fn new(replay_per_key: usize) -> Guards {
        Guards {
            rate: Mutex::new(RateLimiter::new()),
            replay: Mutex::new(ReplayCache::new(TIMESTAMP_WINDOW_MS, replay_per_key)),
            started: Instant::now(),
        }
    }

    fn rate(&self) -> MutexGuard<'_, RateLimiter> {
        self.rate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn replay(&self) -> MutexGuard<'_, ReplayCache> {
        self.replay.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn admit(&self, key_id: i64, limit: RateLimit) -> Result<(), Throttled> {
        let now = self.started.elapsed().as_secs_f64();
        self.rate().admit(key_id, limit, now)
    }
}

fn unauthorized(refusal: Refusal, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, detail).refused(refusal)
}

/// What a request presents: a token and, for a signed key, its timestamp and signature.
struct Credentials {
    token: String,
    timestamp: Option<String>,
    sign_str: Option<String>,
    /// Taken from the query string (`/ws/updates`): the signature then covers the
    /// path-with-query without its `sign_str` parameter.
    from_query: bool,
}

fn header_text(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim().to_string()).filter(|s| !s.is_empty()))
            .map_err(|_| {
                unauthorized(
                    Refusal::MissingCredentials,
                    format!("the {name} header is not valid text"),
                )
            }),
    }
}

/// The credentials a request carries: the `token` header (seed 000) or
/// `Authorization: Bearer`, with `timestamp` and `sign_str` headers; on `/ws/updates` only,
/// `?token=&timestamp=&sign_str=` when no header carries a token.
fn credentials(req: &Request) -> Result<Credentials, ApiError> {
    let headers = req.headers();
    let from_headers = |token: String| -> Result<Credentials, ApiError> {
        Ok(Credentials {
            token,
            timestamp: header_text(headers, TIMESTAMP_HEADER)?,
            sign_str: header_text(headers, SIGN_HEADER)?,
            from_query: false,
        })
    };
    if let Some(token) = header_text(headers, TOKEN_HEADER)? {
        return from_headers(token);
    }
    if let Some(auth) = header_text(headers, "authorization")? {
        let bearer = auth
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                unauthorized(
                    Refusal::MissingCredentials,
                    "the Authorization header must be `Bearer TOKEN`",
                )
            })?;
        return from_headers(bearer);
    }
    if req.uri().path() == QUERY_CREDENTIALS_PATH {
        let query = req.uri().query().unwrap_or_default();
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|e| {
            unauthorized(
                Refusal::MissingCredentials,
                format!("could not read the query string: {e}"),
            )
        })?;
        let param = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if let Some(token) = param(TOKEN_HEADER) {
            return Ok(Credentials {
                token,
                timestamp: param(TIMESTAMP_HEADER),
                sign_str: param(SIGN_HEADER),
                from_query: true,
            });
        }
    }
    Err(unauthorized(
        Refusal::MissingCredentials,
        "missing credentials: send an API key in the `token` header or as `Authorization: Bearer TOKEN` \
         (on /ws/updates also `?token=`)",
    ))
}

/// The path-with-query a query-string signature covers: as sent, minus every `sign_str`
/// parameter (which cannot sign itself).
fn path_without_sign_str(req: &Request) -> String {
    let path = req.uri().path();
    let kept: Vec<&str> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| pair.split('=').next() != Some(SIGN_HEADER))
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

fn now_ms() -> i64 {
    (crate::engine::unix_now() * 1000.0) as i64
}

/// Checks a signed key's `timestamp` and `sign_str` over the request and that it is not a
/// replay, and hands the request back with its body (read to verify it) restored.
async fn check_signature(
    key: &ApiKey,
    credentials: &Credentials,
    req: Request,
    max_body: usize,
    guards: &Guards,
) -> Result<Request, ApiError> {
    let id = key.key_id;
    let timestamp = credentials.timestamp.as_deref().ok_or_else(|| {
        unauthorized(
            Refusal::BadTimestamp,
            format!(
                "missing timestamp: key {id} is a signed key; send `timestamp` (ms) and `sign_str`"
            ),
        )
    })?;
    let sign_str = credentials.sign_str.as_deref().ok_or_else(|| {
        unauthorized(
            Refusal::BadSignature,
            format!("missing sign_str: key {id} is a signed key"),
        )
    })?;
    let at: i64 = timestamp.parse().map_err(|_| {
        unauthorized(
            Refusal::BadTimestamp,
            format!("bad timestamp {timestamp:?}: milliseconds since the Unix epoch expected"),
        )
    })?;
    let now = now_ms();
    if !crate::keys::timestamp_fresh(at, now) {
        return Err(unauthorized(
            Refusal::BadTimestamp,
            format!(
                "stale timestamp {at}: more than {} s from the coordinator's clock",
                TIMESTAMP_WINDOW_MS / 1000
            ),
        ));
    }
    let Some(secret) = key.secret.as_deref() else {
        tracing::error!(key_id = id, "signed key without a stored secret");
        return Err(unauthorized(
            Refusal::BadSignature,
            format!("key {id} has no secret to verify with"),
        ));
    };
    let method = req.method().as_str().to_string();
    let path = if credentials.from_query {
        path_without_sign_str(&req)
    } else {
        req.uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_string())
            .unwrap_or_else(|| req.uri().path().to_string())
    };
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, max_body)
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))?;
    let bad_signature = || {
        unauthorized(
            Refusal::BadSignature,
            "bad signature: sign_str must be hex HMAC-SHA256(secret, timestamp\\nMETHOD\\npath?query\\nbody)",
        )
    };
    if !verify(secret, timestamp, &method, &path, &bytes, sign_str) {
        return Err(bad_signature());
    }
    let signature: [u8; 32] = hex::decode(sign_str)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad_signature)?;
    guards
        .replay()
        .check(id, at, signature, now)
        .map_err(|Replayed| {
            tracing::warn!(
                key_id = id,
                timestamp = at,
                "replayed signed request refused"
            );
            unauthorized(Refusal::BadSignature, "replayed request")
        })?;
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
    .refused(Refusal::Forbidden)
}

fn too_many_requests(key_id: i64, throttled: Throttled) -> Response {
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        Json(ErrorBody {
            detail: format!(
                "rate limit exceeded for API key {key_id}: retry after {} s",
                throttled.retry_after_secs
            ),
        }),
    )
        .into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(throttled.retry_after_secs),
    );
    response
}

/// The middleware. Its refusals are `{"detail"}` errors, except on seed 000's path, which
/// answers its own envelope (`{"code", "message", "data"}`) for everything.
pub async fn authenticate(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let seed_000 = change_points::is_its_path(req.uri().path());
    match check(app, req, next).await {
        // Only the middleware answers 429 on that path: keep its Retry-After.
        Ok(response) if seed_000 && response.status() == StatusCode::TOO_MANY_REQUESTS => {
            let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
            let mut refused = change_points::refusal(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit exceeded for this API key",
            ));
            if let Some(value) = retry_after {
                refused.headers_mut().insert(header::RETRY_AFTER, value);
            }
            refused
        }
        Ok(response) => response,
        Err(e) if seed_000 => change_points::refusal(e),
        Err(e) => e.into_response(),
    }
}

async fn check(app: AppState, mut req: Request, next: Next) -> Result<Response, ApiError> {
    if !app.auth.enabled {
        return Ok(next.run(req).await);
    }
    let access = Access::of(req.method().as_str(), req.uri().path());
    if access == Access::Open {
        return Ok(next.run(req).await);
    }
    let credentials = credentials(&req)?;
    let token_hash = hash_token(&credentials.token);
    if app.local_agents.token_hash.as_deref() == Some(token_hash.as_str()) {
        if Role::Agent.may(access) {
            req.extensions_mut().insert(Caller {
                key_id: None,
                role: Some(Role::Agent),
            });
            return Ok(next.run(req).await);
        }
        return Err(forbidden(Role::Agent, &req));
    }
    let key = app
        .keys
        .key_by_token_hash(&token_hash)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| unauthorized(Refusal::UnknownKey, "unknown API key"))?;
    if key.revoked_at.is_some() {
        return Err(unauthorized(
            Refusal::UnknownKey,
            format!("API key {} was revoked", key.key_id),
        ));
    }
    let mut req = match key.mode {
        KeyMode::Simple => req,
        KeyMode::Signed => {
            check_signature(
                &key,
                &credentials,
                req,
                app.auth.max_body_bytes,
                &app.guards,
            )
            .await?
        }
    };
    let limit = match key.role {
        Role::Agent => app.auth.agent_rate_limit,
        _ => app.auth.rate_limit,
    };
    if let Err(throttled) = app.guards.admit(key.key_id, limit) {
        tracing::info!(key_id = key.key_id, role = %key.role, retry_after = throttled.retry_after_secs, "rate limited");
        return Ok(too_many_requests(key.key_id, throttled));
    }
    if !key.role.may(access) {
        tracing::info!(key_id = key.key_id, role = %key.role, method = %req.method(), path = req.uri().path(), "refused by role");
        return Err(forbidden(key.role, &req));
    }
    tracing::debug!(key_id = key.key_id, role = %key.role, "authenticated");
    req.extensions_mut().insert(Caller {
        key_id: Some(key.key_id),
        role: Some(key.role),
    });
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str) -> Request {
        Request::builder()
            .uri(uri)
            .body(Body::empty())
            .expect("request")
    }

    #[test]
    fn the_query_signature_covers_everything_but_itself() {
        assert_eq!(
            path_without_sign_str(&request(
                "/ws/updates?events=task_completed&token=t&timestamp=5&sign_str=ab"
            )),
            "/ws/updates?events=task_completed&token=t&timestamp=5"
        );
        assert_eq!(
            path_without_sign_str(&request("/ws/updates?sign_str=ab&token=t&timestamp=5")),
            "/ws/updates?token=t&timestamp=5"
        );
        assert_eq!(
            path_without_sign_str(&request("/ws/updates?sign_str=ab")),
            "/ws/updates"
        );
    }

    #[test]
    fn readme_feed_example() {
        // The browser example in README.md's Security section.
        let url = "/ws/updates?events=task_completed&token=lull_0123&timestamp=1747379023000\
                   &sign_str=10a2ed178863e44e939d05abb3df01b735b11ccea1c8ed234d5e60d947095ff9";
        let path = path_without_sign_str(&request(url));
        let signature = lull_shared::signing::sign("s3cr3t", "1747379023000", "GET", &path, b"");
        assert!(
            url.ends_with(&format!("&sign_str={signature}")),
            "{signature}"
        );
    }

    #[test]
    fn submitters_see_their_own_tasks_only() {
        let submitter = Caller {
            key_id: Some(4),
            role: Some(Role::Submitter),
        };
        assert!(submitter.sees(Some(4)));
        assert!(!submitter.sees(Some(5)) && !submitter.sees(None));
        let viewer = Caller {
            key_id: Some(5),
            role: Some(Role::Viewer),
        };
        assert!(viewer.sees(Some(4)) && viewer.sees(None));
        assert!(Caller::ANYONE.sees(Some(4)));
    }
}
