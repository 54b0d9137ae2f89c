//! The coordinator's internal API as the agent calls it, and what each answer means.
//!
//! Architecture Invariant: this module decides what an HTTP status means (acknowledged,
//! refused, retry) and nothing else: no retry loops, no sleeping, no state.

use crate::AgentError;
use crate::executor::format_seconds;
use lull_shared::signing;
use lull_shared::{
    ErrorBody, HeartbeatRequest, HeartbeatResponse, PullResponse, ReportItemAck, ReportVerdict,
    ResultsAck, RunReport,
};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

/// Bounds every call but the long-poll, which gets `wait` plus [`PULL_SLACK`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PULL_SLACK: Duration = Duration::from_secs(10);

/// A failed call that is worth trying again later.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// `GET /internal/task` answered 404: the coordinator does not know this node (it
    /// restarted, or never saw a heartbeat). Heartbeat, then pull again.
    #[error("the coordinator does not know this node")]
    NodeUnknown,
    #[error("could not reach the coordinator: {0}")]
    Transport(String),
    #[error("the coordinator answered {status}: {detail}")]
    Status { status: StatusCode, detail: String },
    #[error("could not read the coordinator's answer: {0}")]
    Decode(String),
}

/// What became of one `POST /internal/result`.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// 2xx: the coordinator has the result; forget it.
    Acknowledged,
    /// 404 / 409 / 410: the run's lease is no longer current (moved elsewhere, cancelled).
    /// Forget it: sending it again can never succeed.
    Refused { status: StatusCode, detail: String },
    /// 400 / 413 / 422: the coordinator cannot accept this body. Forget it, loudly.
    Rejected { status: StatusCode, detail: String },
    /// Anything else (5xx, 401/403/429, no connection): keep it and try again later.
    Retry(CallError),
}

/// What became of one `POST /internal/results`.
#[derive(Debug)]
pub(crate) enum BatchDelivery {
    /// The coordinator settled each report: one [`Delivery`] per report, in order; and the
    /// runs it handed out with the answer, when asked for some.
    Settled(Vec<Delivery>, PullResponse),
    /// The coordinator took none of them as a batch (it has no such endpoint, or the body
    /// was too large or not understood): post them one at a time instead.
    OneByOne { status: StatusCode, detail: String },
    /// Nothing is known to be recorded (5xx, 401/403/429, no connection): try again later.
    Retry(CallError),
}

#[derive(Debug, Clone)]
pub(crate) struct CoordinatorClient {
    http: reqwest::Client,
    base: String,
    /// A signed key's secret: every request then carries `timestamp` and `sign_str`.
    secret: Option<String>,
}

/// Every certificate of a PEM file, trusted as roots besides the system's: read at start,
/// so that a wrong path stops the agent instead of failing every call.
fn read_ca_certs(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, AgentError> {
    let failed = |reason: String| AgentError::CaCert {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    let certificates =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| failed(e.to_string()))?;
    if certificates.is_empty() {
        return Err(failed("no PEM `CERTIFICATE` block in it".into()));
    }
    Ok(certificates)
}

impl CoordinatorClient {
    pub(crate) fn new(
        coordinator: &str,
        token: Option<&str>,
        secret: Option<String>,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Self, AgentError> {
        let invalid = |reason: &str| AgentError::InvalidCoordinatorUrl {
            url: coordinator.to_string(),
            reason: reason.to_string(),
        };
        let url = reqwest::Url::parse(coordinator).map_err(|e| invalid(&e.to_string()))?;
        match url.scheme() {
            "http" | "https" => {}
            other => return Err(invalid(&format!("unsupported scheme {other:?}"))),
        }

        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(token).map_err(|_| {
                AgentError::InvalidConfig("token holds characters a header cannot carry".into())
            })?;
            value.set_sensitive(true);
            headers.insert("token", value);
        }
        let mut builder = reqwest::Client::builder();
        if let Some(path) = ca_cert {
            for certificate in read_ca_certs(path)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .default_headers(headers)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // Coordinators live on the LAN; an HTTP_PROXY meant for the internet must not
            // capture agent traffic.
            .no_proxy()
            .build()
            .map_err(AgentError::HttpClient)?;
        Ok(CoordinatorClient {
            http,
            base: coordinator.trim_end_matches('/').to_string(),
            secret,
        })
    }

    /// Sends a request, signed when this agent holds a signed key's secret.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let Some(secret) = &self.secret else {
            return request.send().await;
        };
        let mut request = request.build()?;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
            .to_string();
        let url = request.url();
        let path = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        };
        let body = request
            .body()
            .and_then(reqwest::Body::as_bytes)
            .unwrap_or_default();
        let sign_str = signing::sign(secret, &timestamp, request.method().as_str(), &path, body);
        let headers = request.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&timestamp) {
            headers.insert(signing::TIMESTAMP_HEADER, value);
        }
        if let Ok(value) = HeaderValue::from_str(&sign_str) {
            headers.insert(signing::SIGN_HEADER, value);
        }
        self.http.execute(request).await
    }

    pub(crate) async fn heartbeat(
        &self,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, CallError> {
        let response = self
            .send(
                self.http
                    .post(format!("{}/internal/heartbeat", self.base))
                    .json(request),
            )
            .await
            .map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return Err(CallError::Status {
                status,
                detail: detail_of(response).await,
            });
        }
        response.json().await.map_err(decode)
    }

    /// Long-polls for work: answers when the coordinator has assignments for this node, or
    /// with none after `wait`.
    pub(crate) async fn pull(
        &self,
        node_id: &str,
        wait: Duration,
        max: usize,
    ) -> Result<PullResponse, CallError> {
        let response = self
            .send(
                self.http
                    .get(format!("{}/internal/task", self.base))
                    .query(&[
                        ("node_id", node_id),
                        ("wait", &format_seconds(wait)),
                        ("max", &max.to_string()),
                    ])
                    .timeout(wait.saturating_add(PULL_SLACK)),
            )
            .await
            .map_err(transport)?;
        match response.status() {
            status if status.is_success() => response.json().await.map_err(decode),
            StatusCode::NOT_FOUND => Err(CallError::NodeUnknown),
            status => Err(CallError::Status {
                status,
                detail: detail_of(response).await,
            }),
        }
    }

    pub(crate) async fn post_result(&self, report: &RunReport) -> Delivery {
        let sent = self
            .send(
                self.http
                    .post(format!("{}/internal/result", self.base))
                    .json(report),
            )
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(err) => return Delivery::Retry(transport(err)),
        };
        let status = response.status();
        if status.is_success() {
            return Delivery::Acknowledged;
        }
        let detail = detail_of(response).await;
        match status {
            StatusCode::NOT_FOUND | StatusCode::CONFLICT | StatusCode::GONE => {
                Delivery::Refused { status, detail }
            }
            StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNPROCESSABLE_ENTITY => Delivery::Rejected { status, detail },
            _ => Delivery::Retry(CallError::Status { status, detail }),
        }
    }
}

impl CoordinatorClient {
    /// Posts several results in one request; the coordinator records them in one commit
    /// and answers each on its own. With `refill` (this node, at most how many runs), the
    /// answer also brings the runs a pull would (leased in the same commit).
    pub(crate) async fn post_results(
        &self,
        reports: &[Arc<RunReport>],
        refill: Option<(&str, usize)>,
    ) -> BatchDelivery {
        let body = ResultsBody {
            results: reports.iter().map(|report| &**report).collect(),
        };
        let mut request = self
            .http
            .post(format!("{}/internal/results", self.base))
            .json(&body);
        if let Some((node_id, max)) = refill {
            request = request.query(&[("node_id", node_id), ("max", &max.to_string())]);
        }
        let sent = self.send(request).await;
        let response = match sent {
            Ok(response) => response,
            Err(err) => return BatchDelivery::Retry(transport(err)),
        };
        let status = response.status();
        if !status.is_success() {
            let detail = detail_of(response).await;
            return match status {
                StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::TOO_MANY_REQUESTS => {
                    BatchDelivery::Retry(CallError::Status { status, detail })
                }
                status if status.is_client_error() => BatchDelivery::OneByOne { status, detail },
                status => BatchDelivery::Retry(CallError::Status { status, detail }),
            };
        }
        let answer: ResultsAck = match response.json().await {
            Ok(answer) => answer,
            // Recorded or not, we cannot tell: sending again is safe (a result already
            // recorded is refused the second time, never recorded twice).
            Err(err) => return BatchDelivery::Retry(decode(err)),
        };
        let pulled = PullResponse {
            tasks: answer.tasks,
            cancel: answer.cancel,
        };
        let mut items = answer.results.into_iter();
        BatchDelivery::Settled(
            reports
                .iter()
                .map(|report| match items.next() {
                    Some(item) if item.run_id == Some(report.run_id) => item_delivery(item),
                    // An answer that does not line up settles nothing: keep the result.
                    _ => Delivery::Retry(CallError::Decode(format!(
                        "no answer for run {} in the batch answer",
                        report.run_id
                    ))),
                })
                .collect(),
            pulled,
        )
    }
}

/// The body of `POST /internal/results`, serialised from the outbox's shared reports.
#[derive(serde::Serialize)]
struct ResultsBody<'a> {
    results: Vec<&'a RunReport>,
}

/// One report's answer as the [`Delivery`] `POST /internal/result` would have given.
fn item_delivery(item: ReportItemAck) -> Delivery {
    let status = StatusCode::from_u16(item.code).unwrap_or(StatusCode::CONFLICT);
    let detail = item.detail.unwrap_or_default();
    match item.status {
        ReportVerdict::Accepted => Delivery::Acknowledged,
        ReportVerdict::Refused => Delivery::Refused { status, detail },
        ReportVerdict::Rejected => Delivery::Rejected { status, detail },
    }
}

fn transport(err: reqwest::Error) -> CallError {
    CallError::Transport(error_chain(&err))
}

fn decode(err: reqwest::Error) -> CallError {
    CallError::Decode(error_chain(&err))
}

/// reqwest's own message is terse ("error sending request"); the cause is in its sources.
fn error_chain(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The `{"detail": ...}` of an error answer, or the start of its body.
async fn detail_of(response: reqwest::Response) -> String {
    const MAX_DETAIL: usize = 300;
    let body = response.text().await.unwrap_or_default();
    if let Ok(ErrorBody { detail }) = serde_json::from_str::<ErrorBody>(&body) {
        return detail;
    }
    match body.char_indices().nth(MAX_DETAIL) {
        Some((cut, _)) => format!("{}...", &body[..cut]),
        None => body,
    }
}
