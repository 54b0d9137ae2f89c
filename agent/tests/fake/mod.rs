//! A fake coordinator for the agent's tests: the `/internal` endpoints on 127.0.0.1:0,
//! recording what the agent sends and answering as each test scripts it.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lull_shared::{
    Assignment, ErrorBody, HeartbeatRequest, HeartbeatResponse, PullResponse, ReportItemAck,
    ReportVerdict, ResultsAck, RunId, RunReport, RunReportAck, RunReportBatch,
};
use serde::Deserialize;
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub struct FakeCoordinator {
    pub url: String,
    state: Arc<FakeState>,
    server: JoinHandle<()>,
}

#[derive(Default)]
struct FakeState {
    heartbeats: Mutex<Vec<HeartbeatRequest>>,
    known_nodes: Mutex<HashSet<String>>,
    queue: Mutex<VecDeque<Assignment>>,
    work_arrived: Notify,
    pulls: Mutex<Vec<StatusCode>>,
    results: Mutex<Vec<RunReport>>,
    /// The status every `POST /internal/result` is answered with (`None`: 200).
    result_status: Mutex<Option<StatusCode>>,
    /// The run ids of each `POST /internal/result`, and of each `POST /internal/results`.
    singles: Mutex<Vec<RunId>>,
    batches: Mutex<Vec<Vec<RunId>>>,
    /// The status every `POST /internal/results` is answered with as a whole (`None`: 200,
    /// each report settled on its own).
    batch_status: Mutex<Option<StatusCode>>,
    /// Runs whose report a batch answer refuses (409) instead of accepting.
    refused_runs: Mutex<BTreeSet<RunId>>,
    cancels: Mutex<BTreeSet<RunId>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FakeCoordinator {
    pub async fn start() -> FakeCoordinator {
        let state = Arc::new(FakeState::default());
        let router = Router::new()
            .route("/internal/heartbeat", post(heartbeat))
            .route("/internal/task", get(pull))
            .route("/internal/result", post(result))
            .route("/internal/results", post(results))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("fake coordinator serves");
        });
        FakeCoordinator { url, state, server }
    }

    /// Queues an assignment for the next pull.
    pub fn assign(&self, assignment: Assignment) {
        lock(&self.state.queue).push_back(assignment);
        self.state.work_arrived.notify_one();
    }

    /// Answers every result from now on with `status` (`None`: 200); a post of several
    /// (or of one asking for new runs) is answered with it as a whole, like a coordinator
    /// whose storage fails.
    pub fn answer_results_with(&self, status: Option<u16>) {
        *lock(&self.state.result_status) = status.map(|s| StatusCode::from_u16(s).expect("status"));
    }

    /// Answers every batch of results from now on with `status` as a whole (`None`: 200).
    pub fn answer_batches_with(&self, status: Option<u16>) {
        *lock(&self.state.batch_status) = status.map(|s| StatusCode::from_u16(s).expect("status"));
    }

    /// Refuses (409) `run_id`'s report in batch answers from now on.
    pub fn refuse_in_batches(&self, run_id: RunId) {
        lock(&self.state.refused_runs).insert(run_id);
    }

    /// The run ids of every `POST /internal/result`, in order.
    pub fn single_posts(&self) -> Vec<RunId> {
        lock(&self.state.singles).clone()
    }

    /// The run ids of every `POST /internal/results`, batch by batch.
    pub fn batches(&self) -> Vec<Vec<RunId>> {
        lock(&self.state.batches).clone()
    }

    /// Tells the agent to cancel `run_id` in every heartbeat answer from now on.
    pub fn cancel(&self, run_id: RunId) {
        lock(&self.state.cancels).insert(run_id);
    }

    /// Forgets every node, as a coordinator that restarted without its registry would.
    pub fn forget_nodes(&self) {
        lock(&self.state.known_nodes).clear();
    }

    pub fn heartbeats(&self) -> Vec<HeartbeatRequest> {
        lock(&self.state.heartbeats).clone()
    }

    pub fn results(&self) -> Vec<RunReport> {
        lock(&self.state.results).clone()
    }

    /// The status of every pull answered so far.
    pub fn pulls(&self) -> Vec<StatusCode> {
        lock(&self.state.pulls).clone()
    }
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn heartbeat(
    State(state): State<Arc<FakeState>>,
    Json(request): Json<HeartbeatRequest>,
) -> Json<HeartbeatResponse> {
    lock(&state.known_nodes).insert(request.node_id.clone());
    let node_id = request.node_id.clone();
    lock(&state.heartbeats).push(request);
    Json(HeartbeatResponse {
        status: "ok".to_string(),
        node_id,
        cancel: lock(&state.cancels).iter().copied().collect(),
        heartbeat_interval: 1.0,
        server_id: "fake".to_string(),
        commands: Vec::new(),
    })
}

#[derive(Deserialize)]
struct PullQuery {
    node_id: String,
    wait: f64,
    max: usize,
}

async fn pull(State(state): State<Arc<FakeState>>, Query(query): Query<PullQuery>) -> Response {
    if !lock(&state.known_nodes).contains(&query.node_id) {
        lock(&state.pulls).push(StatusCode::NOT_FOUND);
        let detail = format!("node {} not found", query.node_id);
        return (StatusCode::NOT_FOUND, Json(ErrorBody { detail })).into_response();
    }
    lock(&state.pulls).push(StatusCode::OK);
    let take = |state: &FakeState| {
        let mut queue = lock(&state.queue);
        let n = queue.len().min(query.max);
        queue.drain(..n).collect::<Vec<_>>()
    };
    let mut tasks = take(&state);
    if tasks.is_empty() {
        let wait = Duration::try_from_secs_f64(query.wait).unwrap_or(Duration::ZERO);
        let _ = tokio::time::timeout(wait, state.work_arrived.notified()).await;
        tasks = take(&state);
    }
    Json(PullResponse {
        tasks,
        cancel: Vec::new(),
    })
    .into_response()
}

async fn result(State(state): State<Arc<FakeState>>, Json(report): Json<RunReport>) -> Response {
    let (task_id, run_id) = (report.task_id, report.run_id);
    lock(&state.singles).push(run_id);
    lock(&state.results).push(report);
    let status = lock(&state.result_status).unwrap_or(StatusCode::OK);
    if status == StatusCode::OK {
        let ack = RunReportAck {
            status: "ok".to_string(),
            task_id,
            run_id,
        };
        return Json(ack).into_response();
    }
    let detail = format!("scripted {status}");
    (status, Json(ErrorBody { detail })).into_response()
}

async fn results(
    State(state): State<Arc<FakeState>>,
    Json(batch): Json<RunReportBatch>,
) -> Response {
    lock(&state.batches).push(batch.results.iter().map(|r| r.run_id).collect());
    // A scripted answer for every result: refusals item by item, as the coordinator
    // answers them in a batch; anything else fails the post whole (a storage failure).
    let scripted = lock(&state.result_status).filter(|status| *status != StatusCode::OK);
    let item_verdict = match scripted {
        Some(StatusCode::NOT_FOUND | StatusCode::CONFLICT | StatusCode::GONE) => {
            scripted.map(|status| (ReportVerdict::Refused, status.as_u16()))
        }
        Some(status) => {
            lock(&state.results).extend(batch.results);
            let detail = format!("scripted {status}");
            return (status, Json(ErrorBody { detail })).into_response();
        }
        None => None,
    };
    let status = lock(&state.batch_status).unwrap_or(StatusCode::OK);
    if status != StatusCode::OK {
        let detail = format!("scripted {status}");
        return (status, Json(ErrorBody { detail })).into_response();
    }
    let refused = lock(&state.refused_runs).clone();
    let answers = batch
        .results
        .iter()
        .map(|report| {
            let (status, code) = if refused.contains(&report.run_id) {
                (ReportVerdict::Refused, 409)
            } else {
                item_verdict.unwrap_or((ReportVerdict::Accepted, 200))
            };
            ReportItemAck {
                status,
                code,
                task_id: Some(report.task_id),
                run_id: Some(report.run_id),
                detail: None,
            }
        })
        .collect();
    lock(&state.results).extend(batch.results);
    Json(ResultsAck {
        results: answers,
        tasks: Vec::new(),
        cancel: Vec::new(),
    })
    .into_response()
}
