//! Extractors that turn every malformed request into an [`ApiError`] with a useful detail,
//! never axum's plain-text rejections.
//!
//! JSON bodies are parsed whatever the `Content-Type` says (seed 001's clients send JSON;
//! refusing one for a missing header helps nobody).

use super::error::ApiError;
use super::seed::{DEFAULT_PAGE, MAX_PAGE};
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// A JSON body: syntax errors are 400, shape errors (wrong types, unknown fields) are 422,
/// an oversized body is 413.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let BodyBytes(bytes) = BodyBytes::from_request(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// The raw body, for handlers that parse it themselves: too large is 413, unreadable 400.
pub struct BodyBytes(pub Bytes);

impl<S> FromRequest<S> for BodyBytes
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(BodyBytes)
            .map_err(|rejection| {
                let status = rejection.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(status, "request body too large")
                } else {
                    ApiError::bad_request(format!("could not read the request body: {rejection}"))
                }
            })
    }
}

/// A JSON body already read: empty or malformed is 400, the wrong shape 422 (as [`JsonBody`]).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is empty; expected a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = T::deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(json_error)?;
    Ok(value)
}

/// A JSON body that may be left out entirely (an empty body is `T::default()`), for
/// actions whose every field is optional (`POST /api/v1/nodes/{id}/drain`).
pub struct OptionalJsonBody<T>(pub T);

impl<S, T> FromRequest<S> for OptionalJsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(status, "request body too large")
            } else {
                ApiError::bad_request(format!("could not read the request body: {rejection}"))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = T::deserialize(&mut de).map_err(json_error)?;
        de.end().map_err(json_error)?;
        Ok(OptionalJsonBody(value))
    }
}

fn json_error(e: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request(format!("malformed JSON: {e}"))
        }
        Category::Data => ApiError::unprocessable(format!("invalid request: {e}")),
    }
}

/// Query parameters, with a 422 that names the bad parameter.
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(QueryParams)
            .map_err(|e| ApiError::unprocessable(format!("invalid query parameter: {e}")))
    }
}

/// Parses a task id from a path segment.
pub fn task_id_from_path(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .map_err(|_| ApiError::unprocessable(format!("task_id must be an integer, got {raw:?}")))
}

/// A page's `limit`: [`DEFAULT_PAGE`] when absent, else 1..=[`MAX_PAGE`] (422 otherwise).
pub fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::unprocessable(format!(
            "limit must be between 1 and {MAX_PAGE}, got {n}"
        ))),
    }
}

/// A `status=` filter: absent or empty means no filter; anything else must be one of `all`
/// (a closed enum's values, by name), or the answer is a 422 that lists them.
pub fn status_filter<T: Copy>(
    raw: Option<&str>,
    all: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<Option<T>, ApiError> {
    match raw {
        None | Some("") => Ok(None),
        Some(s) => all
            .iter()
            .copied()
            .find(|v| name(*v) == s)
            .map(Some)
            .ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|v| name(*v)).collect();
                ApiError::unprocessable(format!(
                    "unknown status {s:?}; expected one of {}",
                    names.join(", ")
                ))
            }),
    }
}
