//! HTTP tests: a real coordinator on 127.0.0.1:0 (no local agent), driven over real HTTP.
//! Agents are played by the test through the `/internal/*` protocol.

use lull_coordinator::{Config, run};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Server {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Server::start_in(dir.path(), |_| {}).await;
        server._dir = Some(dir);
        server
    }

    async fn start_in(data_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Server {
        let mut config = Config::new(data_dir.to_path_buf());
        config.local_agents = 0;
        // These tests play the agent by hand and count what fits; prefetching has its own
        // tests (the scheduler's, and end to end with real agents).
        config.prefetch = 0;
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            run(listener, config, token)
                .await
                .expect("coordinator runs");
        });
        Server {
            base,
            http: reqwest::Client::new(),
            stop,
            task,
            _dir: None,
        }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("coordinator stops in time")
            .expect("coordinator task");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self.http.get(self.url(path)).send().await.expect("request");
        decode(resp).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request");
        decode(resp).await
    }

    async fn post_raw(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request");
        decode(resp).await
    }

    /// Sends `request`, one that waits (`?wait=`), in the background; see [`answer`].
    fn waiting(
        &self,
        request: reqwest::RequestBuilder,
    ) -> tokio::task::JoinHandle<(StatusCode, Value)> {
        tokio::spawn(async move { decode(request.send().await.expect("request")).await })
    }

    async fn submit(&self, code: &str) -> i64 {
        let (status, body) = self.post("/submit", json!({"code": code})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["task_id"].as_i64().expect("task_id")
    }

    async fn heartbeat(&self, node: &str, cpus: f64, running: &[i64]) -> Value {
        let (status, body) = self
            .post(
                "/internal/heartbeat",
                json!({"node_id": node, "status": "idle",
                       "resources": {"cpu_cores": cpus, "memory_mb": 4096},
                       "current_load": {"cpu_percent": 1.0, "memory_percent": 2.0},
                       "running": running}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn pull(&self, node: &str, wait: f64) -> Value {
        let (status, body) = self
            .get(&format!("/internal/task?node_id={node}&wait={wait}&max=8"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn report(
        &self,
        node: &str,
        assignment: &Value,
        outcome: &str,
        stdout: &str,
    ) -> (StatusCode, Value) {
        self.post(
            "/internal/result",
            json!({"node_id": node, "task_id": assignment["task_id"], "run_id": assignment["run_id"],
                   "outcome": outcome, "exit_code": 0, "stdout": stdout, "stderr": ""}),
        )
        .await
    }

    /// Polls `/status/{id}` until `pred` holds, for at most 30 s.
    async fn wait_status(&self, task_id: i64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, body) = self.get(&format!("/status/{task_id}")).await;
            if pred(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "condition not met in time; last {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `check`'s first `Some`, asked every 20 ms for at most 30 s; panics naming `what` if it
/// never comes.
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A [`Server::waiting`] request's status and body, which must come before its wait (50 s in
/// these tests) runs out.
async fn answer(waiter: tokio::task::JoinHandle<(StatusCode, Value)>) -> (StatusCode, Value) {
    tokio::time::timeout(Duration::from_secs(40), waiter)
        .await
        .expect("the wait answered before its 50 s ran out")
        .expect("waiter")
}

async fn decode(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}"));
    (status, value)
}

#[tokio::test]
async fn root_reports_service_and_counts() {
    let s = Server::start().await;
    s.submit("print(1)").await;
    let (status, body) = s.get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["service"], "Idle Computing Scheduler");
    assert_eq!(body["status"], "running");
    assert_eq!(body["version"], "1.0.0");
    assert_eq!(body["server_id"].as_str().map(str::len), Some(8));
    assert_eq!(body["task_count"], 1);
    assert_eq!(body["pending_tasks"], 1);
    s.shutdown().await;
}

#[tokio::test]
async fn submit_answers_with_the_seed_shape_and_status_follows() {
    let s = Server::start().await;
    let (status, body) = s
        .post("/submit", json!({"code": "print('Hello World')", "timeout": 300, "resources": {"cpu": 1.0, "memory": 512}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["task_id"], 1);
    assert_eq!(body["status"], "submitted");
    assert_eq!(body["message"], "Task 1 has been queued");
    let (_, root) = s.get("/").await;
    assert_eq!(body["server_id"], root["server_id"]);
    let (status, st) = s.get("/status/1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(st["task_id"], 1);
    assert_eq!(st["status"], "pending");
    assert!(st["result"].is_null());
    assert!(st["created_at"].as_f64().expect("created_at") > 1.6e9);
    assert!(st["completed_at"].is_null());
    s.shutdown().await;
}

#[tokio::test]
async fn every_bad_input_gets_a_clear_error_never_a_500() {
    let s = Server::start().await;
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "/submit",
            json!({"code": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "Code cannot be empty",
        ),
        (
            "/submit",
            json!({}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "Code cannot be empty",
        ),
        (
            "/submit",
            json!({"code": "x".repeat(10_001)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "Code too long (max 10000 characters)",
        ),
        (
            "/submit",
            json!({"code": 5}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid type",
        ),
        (
            "/submit",
            json!({"code": "p", "timeout": -1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "timeout",
        ),
        (
            "/submit",
            json!({"code": "p", "timeout": "soon"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid type",
        ),
        (
            "/submit",
            json!({"code": "p", "timeout": 1e300}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "above the maximum",
        ),
        (
            "/submit",
            json!({"code": "p", "resources": {"cpu": 0, "memory": 512}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "resources.cpu",
        ),
        (
            "/submit",
            json!({"code": "p", "resources": {"cpu": 1, "memory": -1}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "resources.memory",
        ),
        (
            "/submit",
            json!({"code": "p", "resources": {"cpu": 1e9}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "above the maximum",
        ),
        (
            "/submit",
            json!({"code": "p", "bogus": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown field",
        ),
        (
            "/submit",
            json!([1, 2]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            "/api/v1/tasks",
            json!({"code": "p", "points": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "points must be between 1 and 64",
        ),
        (
            "/submit",
            json!({"code": "p", "points": 65}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "points must be between 1 and 64",
        ),
        (
            "/api/v1/tasks",
            json!({"code": "p", "max_attempts": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "max_attempts",
        ),
        (
            "/api/v1/tasks",
            json!({"code": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "Code cannot be empty",
        ),
        (
            "/submit_result",
            json!({"result": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "task_id",
        ),
        (
            "/submit_result",
            json!({"task_id": 999, "result": "x"}),
            StatusCode::NOT_FOUND,
            "Task 999 not found",
        ),
        (
            "/internal/heartbeat",
            json!({"node_id": "n"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "resources",
        ),
        (
            "/internal/heartbeat",
            json!({"node_id": "", "resources": {"cpu_cores": 1, "memory_mb": 1}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "node_id",
        ),
        (
            "/internal/result",
            json!({"node_id": "n", "task_id": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing field",
        ),
        (
            "/api/v1/tasks/999/cancel",
            json!({}),
            StatusCode::NOT_FOUND,
            "Task 999 not found",
        ),
    ];
    for (path, body, want, detail) in cases {
        let (status, got) = s.post(path, body.clone()).await;
        assert_eq!(status, want, "{path} {body}: {got}");
        let text = got["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("no detail for {path} {body}: {got}"));
        assert!(
            text.contains(detail),
            "{path} {body}: detail {text:?} lacks {detail:?}"
        );
    }
    // Malformed JSON is a 400.
    for raw in ["{", "{\"code\": }", "not json", ""] {
        let (status, got) = s.post_raw("/submit", raw).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{raw:?}: {got}");
        assert!(got["detail"].is_string());
    }
    // Oversized bodies are a 413.
    let huge = format!("{{\"code\": \"{}\"}}", "x".repeat(9 * 1024 * 1024));
    let (status, got) = s.post_raw("/submit", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{got}");
    // Reads.
    let gets: Vec<(&str, StatusCode, &str)> = vec![
        ("/status/999", StatusCode::NOT_FOUND, "Task 999 not found"),
        (
            "/status/abc",
            StatusCode::UNPROCESSABLE_ENTITY,
            "task_id must be an integer",
        ),
        (
            "/api/v1/tasks/999",
            StatusCode::NOT_FOUND,
            "Task 999 not found",
        ),
        (
            "/api/v1/tasks/-x",
            StatusCode::UNPROCESSABLE_ENTITY,
            "task_id must be an integer",
        ),
        (
            "/api/v1/tasks?status=bogus",
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown status",
        ),
        (
            "/api/v1/tasks?limit=0",
            StatusCode::UNPROCESSABLE_ENTITY,
            "limit",
        ),
        (
            "/results?limit=100000",
            StatusCode::UNPROCESSABLE_ENTITY,
            "limit",
        ),
        (
            "/results?offset=-1",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid query",
        ),
        (
            "/internal/task",
            StatusCode::UNPROCESSABLE_ENTITY,
            "node_id is required",
        ),
        (
            "/internal/task?node_id=ghost",
            StatusCode::NOT_FOUND,
            "Node ghost not found",
        ),
        (
            "/internal/task?node_id=n&wait=-1",
            StatusCode::UNPROCESSABLE_ENTITY,
            "wait",
        ),
        ("/no/such/path", StatusCode::NOT_FOUND, "Not Found"),
    ];
    for (path, want, detail) in gets {
        let (status, got) = s.get(path).await;
        assert_eq!(status, want, "{path}: {got}");
        let text = got["detail"].as_str().unwrap_or_default();
        assert!(
            text.contains(detail),
            "{path}: detail {text:?} lacks {detail:?}"
        );
    }
    let resp = s
        .http
        .delete(s.url("/submit"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    // And the server is still fine.
    let (status, _) = s.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    s.shutdown().await;
}

#[tokio::test]
async fn legacy_workers_get_tasks_and_submit_results() {
    let s = Server::start().await;
    let (status, empty) = s.get("/get_task").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        empty,
        json!({"task_id": null, "code": null, "status": "no_tasks", "message": "No pending tasks available"})
    );
    let id = s.submit("print('Hello World')").await;
    let (_, lease) = s.get("/get_task").await;
    assert_eq!(lease["task_id"], id);
    assert_eq!(lease["code"], "print('Hello World')");
    assert_eq!(lease["status"], "assigned");
    assert_eq!(
        lease["message"],
        format!("Task {id} assigned for execution")
    );
    assert!(lease["created_at"].as_f64().is_some());
    let (_, st) = s.get(&format!("/status/{id}")).await;
    assert_eq!(st["status"], "assigned");
    let (status, ok) = s
        .post(
            "/submit_result",
            json!({"task_id": id, "result": "Hello World"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ok,
        json!({"status": "ok", "task_id": id, "message": format!("Result for task {id} recorded")})
    );
    let (_, st) = s.get(&format!("/status/{id}")).await;
    assert_eq!(st["status"], "completed");
    assert_eq!(st["result"], "Hello World");
    assert!(st["completed_at"].as_f64().is_some());
    // A second result for the same task is refused: it never completes twice.
    let (status, again) = s
        .post("/submit_result", json!({"task_id": id, "result": "other"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert!(
        again["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("already completed")
    );
    // A result for a pending task (never leased) is refused too.
    let pending = s.submit("print(2)").await;
    let (status, _) = s
        .post("/submit_result", json!({"task_id": pending, "result": "2"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    s.shutdown().await;
}

#[tokio::test]
async fn agents_heartbeat_pull_and_report_and_stale_results_are_refused() {
    let s = Server::start().await;
    // Seed 001's heartbeat body, exactly.
    let (status, hb) = s
        .post(
            "/internal/heartbeat",
            json!({"node_id": "node-001", "status": "idle",
                   "resources": {"cpu_cores": 8, "memory_mb": 16384},
                   "current_load": {"cpu_percent": 15.5, "memory_percent": 45.2}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{hb}");
    assert_eq!(hb["status"], "ok");
    assert_eq!(hb["cancel"], json!([]));
    s.heartbeat("node-002", 8.0, &[]).await;
    let id = s.submit("print('Hello World')").await;
    let got = s.pull("node-001", 0.0).await;
    let a = got["tasks"][0].clone();
    assert_eq!(a["task_id"], id);
    assert_eq!(a["attempt"], 1);
    assert_eq!(a["code"], "print('Hello World')");
    let (_, st) = s.get(&format!("/status/{id}")).await;
    assert_eq!(st["status"], "running");
    // Another node cannot report it.
    let (status, _) = s.report("node-002", &a, "completed", "forged\n").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, ack) = s.report("node-001", &a, "completed", "Hello World\n").await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["status"], "ok");
    let (_, st) = s.get(&format!("/status/{id}")).await;
    assert_eq!(st["status"], "completed");
    assert_eq!(st["result"], "Hello World");
    // Twice: refused.
    let (status, _) = s.report("node-001", &a, "completed", "Hello World\n").await;
    assert_eq!(status, StatusCode::CONFLICT);
    s.shutdown().await;
}

#[tokio::test]
async fn a_long_poll_answers_when_work_appears() {
    let s = Server::start().await;
    s.heartbeat("n1", 2.0, &[]).await;
    // Nothing queued: a short poll comes back empty.
    assert_eq!(s.pull("n1", 0.0).await["tasks"], json!([]));
    let base = s.base.clone();
    let poll = tokio::spawn(async move {
        let resp = reqwest::get(format!("{base}/internal/task?node_id=n1&wait=50&max=4"))
            .await
            .expect("poll");
        resp.json::<Value>().await.expect("json")
    });
    // Submit only once the poll is waiting on the server.
    wait_for("the poll to start waiting", || async {
        (s.get("/health").await.1["waiting_pulls"] == 1).then_some(())
    })
    .await;
    let id = s.submit("print(1)").await;
    let got = tokio::time::timeout(Duration::from_secs(40), poll)
        .await
        .expect("the long-poll answered before its 50 s wait ran out")
        .expect("poll task");
    assert_eq!(got["tasks"][0]["task_id"], id);
    s.shutdown().await;
}

#[tokio::test]
async fn placement_honours_capacity_and_constraints() {
    let s = Server::start().await;
    s.heartbeat("small", 1.0, &[]).await;
    let (status, created) = s
        .post(
            "/api/v1/tasks",
            json!({"code": "p", "constraints": {"zone": "eu"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let big = s
        .post(
            "/api/v1/tasks",
            json!({"code": "p", "resources": {"cpu": 4}}),
        )
        .await
        .1;
    let fits = s.submit("p").await;
    let got = s.pull("small", 0.0).await;
    let ids: Vec<i64> = got["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["task_id"].as_i64())
        .collect();
    assert_eq!(
        ids,
        vec![fits],
        "only the unconstrained 1-cpu task fits a 1-cpu node outside zone eu"
    );
    let (_, st) = s.get(&format!("/status/{}", big["task_id"])).await;
    assert_eq!(st["status"], "pending");
    s.shutdown().await;
}

#[tokio::test]
async fn v1_tasks_create_list_get_and_cancel() {
    let s = Server::start().await;
    let (status, t) = s
        .post(
            "/api/v1/tasks",
            json!({"code": "print(1)", "timeout": 10, "max_attempts": 2,
                                       "constraints": {"type": "cpu", "meta": {"rack": "a"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(t["status"], "pending");
    assert_eq!(t["max_attempts"], 2);
    assert_eq!(
        t["constraints"],
        json!({"type": "cpu", "meta": {"rack": "a"}})
    );
    let running = s.submit("import time; time.sleep(100)").await;
    for _ in 0..3 {
        s.submit("print(2)").await;
    }
    // Run `running` on a node.
    s.heartbeat("n1", 1.0, &[]).await;
    let got = s.pull("n1", 0.0).await;
    let a = got["tasks"][0].clone();
    assert_eq!(a["task_id"], running);

    let (_, page) = s.get("/api/v1/tasks?limit=2").await;
    assert_eq!(page["count"], 2);
    assert_eq!(page["total"], 5);
    assert_eq!(page["items"][0]["task_id"], t["task_id"]);
    let (_, next) = s
        .get(&format!(
            "/api/v1/tasks?limit=2&after={}",
            page["next_after"]
        ))
        .await;
    assert_eq!(page["items"][1]["task_id"], running);
    assert_eq!(
        next["items"][0]["task_id"],
        running + 1,
        "the cursor page starts after the last id seen"
    );
    let (_, off) = s.get("/api/v1/tasks?limit=2&offset=4").await;
    assert_eq!(off["count"], 1);
    let (_, only) = s.get("/api/v1/tasks?status=running").await;
    assert_eq!(only["total"], 1);
    assert_eq!(only["items"][0]["task_id"], running);

    let (status, detail) = s.get(&format!("/api/v1/tasks/{running}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail["runs"][0]["node_id"], "n1");
    assert_eq!(detail["runs"][0]["attempt"], 1);
    assert_eq!(detail["runs"][0]["status"], "running");

    // Cancel a running task: the node is told to kill it.
    let (status, cancelled) = s
        .post(&format!("/api/v1/tasks/{running}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["runs"][0]["status"], "cancelled");
    assert_eq!(s.pull("n1", 0.0).await["cancel"], json!([a["run_id"]]));
    assert_eq!(
        s.heartbeat("n1", 1.0, &[a["run_id"].as_i64().expect("run")])
            .await["cancel"],
        json!([a["run_id"]])
    );
    // Cancel a pending task.
    let (_, c2) = s
        .post(&format!("/api/v1/tasks/{}/cancel", t["task_id"]), json!({}))
        .await;
    assert_eq!(c2["status"], "cancelled");
    // Cancelling a finished task is a conflict.
    let (status, again) = s
        .post(&format!("/api/v1/tasks/{running}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        again["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("already cancelled")
    );
    // Its late result is refused.
    let (status, _) = s.report("n1", &a, "completed", "late\n").await;
    assert_eq!(status, StatusCode::CONFLICT);
    s.shutdown().await;
}

#[tokio::test]
async fn results_health_and_stats_report_real_figures() {
    let s = Server::start().await;
    s.heartbeat("n1", 4.0, &[]).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(s.submit(&format!("print({i})")).await);
    }
    let fail = s.submit("1/0").await;
    let got = s.pull("n1", 0.0).await;
    let tasks = got["tasks"].as_array().expect("tasks").clone();
    assert_eq!(tasks.len(), 4, "4 cpus, 1 cpu each");
    for a in &tasks {
        let out = format!(
            "{}\n",
            a["code"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("print(")
                .trim_end_matches(')')
        );
        s.report("n1", a, "completed", &out).await;
    }
    let rest = s.pull("n1", 0.0).await["tasks"]
        .as_array()
        .expect("tasks")
        .clone();
    for a in &rest {
        if a["task_id"] == fail {
            let (status, _) = s
                .post(
                    "/internal/result",
                    json!({"node_id": "n1", "task_id": a["task_id"], "run_id": a["run_id"], "outcome": "failed",
                           "exit_code": 1, "stdout": "", "stderr": "Traceback...\nZeroDivisionError: division by zero\n",
                           "error": "ZeroDivisionError: division by zero"}),
                )
                .await;
            assert_eq!(status, StatusCode::OK);
        } else {
            s.report("n1", a, "completed", "4\n").await;
        }
    }
    let st = s.wait_status(fail, |b| b["status"] == "failed").await;
    assert_eq!(st["error"], "ZeroDivisionError: division by zero");

    let (_, results) = s.get("/results?limit=2").await;
    assert_eq!(results["count"], 2);
    assert_eq!(results["total"], 5);
    assert_eq!(
        results["results"][0],
        json!({"task_id": ids[0], "result": "0", "completed_at": results["results"][0]["completed_at"]})
    );
    assert!(results["server_id"].is_string());
    let (_, second) = s.get("/results?limit=2&offset=2").await;
    assert_eq!(second["results"][0]["task_id"], ids[2]);
    let (_, cursor) = s.get(&format!("/results?limit=10&after={}", ids[3])).await;
    assert_eq!(cursor["count"], 1);

    let (status, health) = s.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["components"]["task_queue"], "healthy");
    assert_eq!(health["components"]["memory_storage"], "healthy");
    assert!(health["timestamp"].as_f64().is_some());

    let (_, stats) = s.get("/stats").await;
    assert_eq!(stats["time_period"], "all_time");
    assert_eq!(stats["tasks"]["total"], 6);
    assert_eq!(stats["tasks"]["completed"], 5);
    assert_eq!(stats["tasks"]["failed"], 1);
    assert_eq!(stats["tasks"]["pending"], 0);
    assert!(stats["tasks"]["avg_time"].as_f64().expect("avg_time") >= 0.0);
    assert_eq!(stats["nodes"]["total"], 1);
    assert_eq!(stats["nodes"]["idle"], 1);
    assert_eq!(stats["throughput"]["tasks_per_hour"], 6);
    assert!(stats["throughput"]["compute_hours"].as_f64().is_some());
    s.shutdown().await;
}

#[tokio::test]
async fn a_silent_node_goes_offline_and_its_task_moves_to_another() {
    let dir = tempfile::tempdir().expect("dir");
    let s = Server::start_in(dir.path(), |c| {
        c.heartbeat_interval = 0.2;
        c.node_ttl = 1.0;
    })
    .await;
    s.heartbeat("doomed", 1.0, &[]).await;
    let id = s.submit("print(1)").await;
    let first = s.pull("doomed", 0.0).await["tasks"][0].clone();
    assert_eq!(first["task_id"], id);
    // "doomed" stops heartbeating; "healthy" keeps on and long-polls for work.
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        s.heartbeat("healthy", 1.0, &[]).await;
        let got = s.pull("healthy", 0.3).await;
        if let Some(a) = got["tasks"].get(0) {
            break a.clone();
        }
        assert!(Instant::now() < deadline, "the task was not requeued");
    };
    assert_eq!(second["task_id"], id);
    assert_eq!(second["attempt"], 2);
    let (_, nodes) = s.get("/stats").await;
    assert_eq!(nodes["nodes"]["offline"], 1);
    // The lost node's late result is refused; the new run completes once.
    assert_eq!(
        s.report("doomed", &first, "completed", "1\n").await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        s.report("healthy", &second, "completed", "1\n").await.0,
        StatusCode::OK
    );
    let (_, detail) = s.get(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(detail["runs"][0]["status"], "lost");
    assert_eq!(detail["runs"][1]["status"], "completed");
    s.shutdown().await;
}

#[tokio::test]
async fn state_survives_a_restart_and_ids_keep_increasing() {
    let dir = tempfile::tempdir().expect("dir");
    let s = Server::start_in(dir.path(), |_| {}).await;
    let a = s.submit("print('a')").await;
    s.heartbeat("n1", 1.0, &[]).await;
    let run = s.pull("n1", 0.0).await["tasks"][0].clone();
    let b = s.submit("print('b')").await;
    s.shutdown().await;

    let s = Server::start_in(dir.path(), |_| {}).await;
    let (_, st) = s.get(&format!("/status/{a}")).await;
    assert_eq!(st["status"], "running");
    let (_, st) = s.get(&format!("/status/{b}")).await;
    assert_eq!(st["status"], "pending");
    // The agent's run from before the restart is still its lease.
    s.heartbeat("n1", 1.0, &[run["run_id"].as_i64().expect("run")])
        .await;
    assert_eq!(
        s.report("n1", &run, "completed", "a\n").await.0,
        StatusCode::OK
    );
    let c = s.submit("print('c')").await;
    assert!(c > b);
    let (_, root) = s.get("/").await;
    assert_eq!(root["task_count"], 3);
    s.shutdown().await;
}

#[tokio::test]
async fn after_a_restart_runs_are_numbered_past_any_a_pull_got_ahead_of_its_commit() {
    use lull_coordinator::engine::RUN_IDS_AHEAD;
    let dir = tempfile::tempdir().expect("dir");
    let s = Server::start_in(dir.path(), |_| {}).await;
    s.heartbeat("n1", 2.0, &[]).await;
    let a = s.submit("print('a')").await;
    let first = s.pull("n1", 0.0).await["tasks"][0].clone();
    let first_run = first["run_id"].as_i64().expect("run");
    s.shutdown().await;

    let s = Server::start_in(dir.path(), |_| {}).await;
    // Played: the node also holds the next run id, from a pull answered before its lease
    // was committed, the commit lost to a crash. The restarted coordinator does not know it.
    let lost = json!({"task_id": a, "run_id": first_run + 1});
    let beat = s.heartbeat("n1", 2.0, &[first_run, first_run + 1]).await;
    assert_eq!(beat["cancel"], json!([first_run + 1]), "{beat}");
    let (status, body) = s.report("n1", &lost, "completed", "a\n").await;
    assert!(
        status == StatusCode::NOT_FOUND || status == StatusCode::CONFLICT,
        "{status} {body}"
    );
    // New runs are numbered past every id that pull could have had.
    s.submit("print('b')").await;
    let next = s.pull("n1", 0.0).await["tasks"][0]["run_id"]
        .as_i64()
        .expect("run");
    assert!(next > first_run + RUN_IDS_AHEAD, "{next} after {first_run}");
    // The run held from before the restart is still its lease.
    assert_eq!(
        s.report("n1", &first, "completed", "a\n").await.0,
        StatusCode::OK
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_client_can_wait_for_a_result_without_polling() {
    let s = Server::start().await;
    s.heartbeat("n1", 1.0, &[]).await;
    let id = s.submit("print(6 * 7)").await;
    // Not finished: a short wait answers with the task as it is.
    let (status, pending) = s.get(&format!("/api/v1/tasks/{id}?wait=0.05")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(pending["status"], "pending");
    let (status, bad) = s.get(&format!("/api/v1/tasks/{id}?wait=-1")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    // A long wait answers when the result lands.
    let waiter = s.waiting(s.http.get(s.url(&format!("/api/v1/tasks/{id}?wait=50"))));
    let a = s.pull("n1", 0.0).await["tasks"][0].clone();
    assert_eq!(
        s.report("n1", &a, "completed", "42\n").await.0,
        StatusCode::OK
    );
    let (_, done) = answer(waiter).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["result"], "42");
    assert_eq!(done["runs"][0]["status"], "completed");
    s.shutdown().await;
}

#[tokio::test]
async fn a_client_can_submit_and_wait_for_the_result_in_one_request() {
    let s = Server::start().await;
    // Room for all three tasks at once.
    s.heartbeat("n1", 4.0, &[]).await;
    // A bad wait refuses the submission before the task exists.
    let (status, bad) = s
        .post("/api/v1/tasks?wait=-1", json!({"code": "print(1)"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    assert_eq!(s.get("/api/v1/tasks").await.1["total"], 0);
    // Without a wait: the task as accepted, no runs (as ever).
    let (status, plain) = s.post("/api/v1/tasks", json!({"code": "print(1)"})).await;
    assert_eq!(status, StatusCode::CREATED, "{plain}");
    assert!(plain.get("runs").is_none(), "{plain}");
    // A short wait answers with the task as it is, runs included.
    let (status, pending) = s
        .post("/api/v1/tasks?wait=0.05", json!({"code": "print(2)"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pending}");
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["runs"], json!([]));
    // A long wait answers when the result lands.
    let waiter = s.waiting(
        s.http
            .post(s.url("/api/v1/tasks?wait=50"))
            .json(&json!({"code": "print(6 * 7)"})),
    );
    wait_for("the waiting submission's task exists", || async {
        (s.get("/api/v1/tasks").await.1["total"] == 3).then_some(())
    })
    .await;
    for run in s.pull("n1", 0.0).await["tasks"].as_array().expect("tasks") {
        assert_eq!(
            s.report("n1", run, "completed", "42\n").await.0,
            StatusCode::OK
        );
    }
    let (status, done) = answer(waiter).await;
    assert_eq!(status, StatusCode::CREATED, "{done}");
    assert_eq!(done["status"], "completed");
    assert_eq!(done["result"], "42");
    assert_eq!(done["code"], "print(6 * 7)");
    assert_eq!(done["runs"][0]["status"], "completed");
    s.shutdown().await;
}

#[tokio::test]
async fn a_waited_for_task_shows_every_run_it_had() {
    let s = Server::start().await;
    s.heartbeat("n1", 1.0, &[]).await;
    // The client waits from the moment its task is accepted, before any run of it exists.
    let waiter = s.waiting(
        s.http
            .post(s.url("/api/v1/tasks?wait=50"))
            .json(&json!({"code": "print(1)", "max_attempts": 2})),
    );
    // Its first run is lost (the agent's own failure): it runs again.
    let first = s.pull("n1", 10.0).await["tasks"][0].clone();
    let id = first["task_id"].as_i64().expect("task_id");
    assert_eq!(s.report("n1", &first, "lost", "").await.0, StatusCode::OK);
    let second = s.pull("n1", 5.0).await["tasks"][0].clone();
    assert_eq!(second["task_id"], id, "{second}");
    assert_eq!(
        s.report("n1", &second, "completed", "1\n").await.0,
        StatusCode::OK
    );
    let (status, done) = answer(waiter).await;
    assert_eq!(status, StatusCode::CREATED, "{done}");
    assert_eq!(done["status"], "completed", "{done}");
    // The commit that finished it held only the second run: the first comes from the store.
    let statuses: Vec<&Value> = done["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|run| &run["status"])
        .collect();
    assert_eq!(statuses, [&json!("lost"), &json!("completed")], "{done}");
    s.shutdown().await;
}

#[tokio::test]
async fn a_submission_s_wait_ends_before_the_request_timeout_with_the_task() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Server::start_in(dir.path(), |c| c.request_timeout = Duration::from_secs(2)).await;
    // No node: the task cannot run. A wait longer than the request timeout would have the
    // timeout answer 408 for a task that was accepted; it answers with the task instead.
    let (status, body) = s
        .post("/api/v1/tasks?wait=60", json!({"code": "print(1)"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "pending");
    assert_eq!(body["runs"], json!([]));
    s.shutdown().await;
}

#[tokio::test]
async fn a_client_collects_many_results_in_one_wait() {
    let s = Server::start().await;
    s.heartbeat("n1", 4.0, &[]).await;
    let ids = [
        s.submit("print(1)").await,
        s.submit("print(2)").await,
        s.submit("print(3)").await,
    ];
    let assignments = s.pull("n1", 0.0).await["tasks"].clone();
    let by_task = |id: i64| {
        assignments
            .as_array()
            .and_then(|all| all.iter().find(|a| a["task_id"] == id))
            .cloned()
            .expect("an assignment for the task")
    };
    for (id, out) in [(ids[0], "1\n"), (ids[1], "2\n")] {
        assert_eq!(
            s.report("n1", &by_task(id), "completed", out).await.0,
            StatusCode::OK
        );
    }
    let list = |ids: &[i64]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    // Not all finished: a short wait answers with every task as it is, in the order asked.
    let asked = [ids[2], ids[0], ids[2]];
    let (status, now) = s
        .get(&format!(
            "/api/v1/tasks/wait?ids={}&wait=0.05",
            list(&asked)
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{now}");
    assert_eq!(
        (now["count"].clone(), now["finished"].clone()),
        (json!(3), json!(1))
    );
    let order: Vec<i64> = now["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|t| t["task_id"].as_i64())
        .collect();
    assert_eq!(order, asked);
    assert_eq!(now["items"][0]["status"], "running");
    assert_eq!(now["items"][1]["result"], "1");
    assert_eq!(now["items"][1]["runs"][0]["status"], "completed");

    // A long wait answers when the last result lands.
    let url = s.url(&format!("/api/v1/tasks/wait?ids={}&wait=50", list(&ids)));
    let waiter = tokio::spawn(async move {
        reqwest::get(url)
            .await
            .expect("wait")
            .json::<Value>()
            .await
            .expect("json")
    });
    assert_eq!(
        s.report("n1", &by_task(ids[2]), "completed", "3\n").await.0,
        StatusCode::OK
    );
    let done = tokio::time::timeout(Duration::from_secs(40), waiter)
        .await
        .expect("the wait answered before its 50 s ran out")
        .expect("waiter");
    assert_eq!(done["finished"], 3, "{done}");
    let results: Vec<&str> = done["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|t| t["result"].as_str())
        .collect();
    assert_eq!(results, ["1", "2", "3"]);

    // Bad asks get a clear error.
    let too_many = list(&(1..=1001).collect::<Vec<_>>());
    for (query, want, says) in [
        (
            "".to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ids is required",
        ),
        (
            "?ids=".to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ids is required",
        ),
        (
            format!("?ids={},x", ids[0]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "\"x\" is not a task id",
        ),
        (
            "?ids=0".to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "\"0\" is not a task id",
        ),
        (
            format!("?ids={too_many}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "at most 1000 tasks, got 1001",
        ),
        (
            format!("?ids={}&wait=-1", ids[0]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "wait must be",
        ),
        (
            format!("?ids={}&wait=soon", ids[0]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid query parameter",
        ),
        (
            format!("?ids={}&extra=1", ids[0]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "extra",
        ),
        (
            format!("?ids={},999999", ids[0]),
            StatusCode::NOT_FOUND,
            "Task 999999 not found",
        ),
    ] {
        let (status, body) = s.get(&format!("/api/v1/tasks/wait{query}")).await;
        assert_eq!(status, want, "{query}: {body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| d.contains(says)),
            "{query}: {body}"
        );
    }
    s.shutdown().await;
}

#[tokio::test]
async fn nodes_are_listed_with_their_sandbox_and_filtered_by_type_and_status() {
    let s = Server::start().await;
    let (status, _) = s
        .post(
            "/internal/heartbeat",
            json!({"node_id": "g1", "status": "idle", "type": "gpu", "zone": "z1",
                   "resources": {"cpu_cores": 4, "memory_mb": 8192}, "executor": "zygote",
                   "sandbox": {"level": "full", "launcher": true, "namespaces": true, "drop_user": true,
                               "seccomp": true, "cgroups": true, "missing": []}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    s.heartbeat("c1", 2.0, &[]).await;
    s.submit("print(1)").await;
    s.pull("c1", 0.0).await;

    let (status, all) = s.get("/api/v1/nodes").await;
    assert_eq!(status, StatusCode::OK);
    let items = all["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    let g1 = &items[1];
    assert_eq!(g1["node_id"], "g1");
    assert_eq!(g1["type"], "gpu");
    assert_eq!(g1["zone"], "z1");
    assert_eq!(g1["sandbox"]["level"], "full");
    assert_eq!(g1["executor"], "zygote");
    assert_eq!(
        g1["resources"],
        json!({"cpu_cores": 4.0, "memory_mb": 8192.0})
    );
    let (_, gpus) = s.get("/api/v1/nodes?type=gpu").await;
    assert_eq!(gpus["items"].as_array().map(Vec::len), Some(1));
    let (_, busy) = s.get("/api/v1/nodes?status=busy").await;
    assert_eq!(busy["items"][0]["node_id"], "c1");
    assert_eq!(
        busy["items"][0]["running"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(busy["items"].as_array().map(Vec::len), Some(1));
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Node API (seed 004)
// ---------------------------------------------------------------------------------------------

impl Server {
    async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .put(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request");
        decode(resp).await
    }

    async fn node(&self, node: &str) -> Value {
        let (status, body) = self.get("/api/v1/nodes").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["items"]
            .as_array()
            .and_then(|items| items.iter().find(|n| n["node_id"] == node).cloned())
            .unwrap_or_else(|| panic!("node {node} not listed: {body}"))
    }

    async fn commands(&self) -> Vec<Value> {
        let (status, body) = self.get("/api/v1/nodes/commands").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["items"].as_array().cloned().expect("items")
    }
}

#[tokio::test]
async fn the_node_list_carries_every_field_of_the_node_entity() {
    let s = Server::start().await;
    s.heartbeat("n1", 2.0, &[]).await;
    let n = s.node("n1").await;
    for field in [
        "node_id",
        "hostname",
        "type",
        "zone",
        "status",
        "resources",
        "current_load",
        "owner_load",
        "running",
        "meta",
        "sandbox",
        "sandbox_level",
        "executor",
        "version",
        "joined_at",
        "last_heartbeat",
        "drain",
        "reserved",
    ] {
        assert!(n.get(field).is_some(), "{field} missing from {n}");
    }
    assert_eq!(n["current_load"]["cpu_percent"], 1.0);
    assert_eq!(n["meta"], json!({}));
    assert_eq!(n["drain"], Value::Null);
    s.shutdown().await;
}

#[tokio::test]
async fn drain_holds_back_work_and_undrain_returns_the_node_and_both_survive_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let s = Server::start_in(dir.path(), |_| {}).await;
    s.heartbeat("n1", 2.0, &[]).await;
    let t1 = s.submit("print(1)").await;
    let first = s.pull("n1", 0.0).await;
    let a1 = first["tasks"][0].clone();

    let (status, body) = s
        .post("/api/v1/nodes/n1/drain", json!({"timeout": 300}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["node"]["status"], "draining");
    assert_eq!(body["command"]["command"], "drain");
    assert_eq!(body["command"]["status"], "pending");
    assert_eq!(body["command"]["args"], json!({"timeout": 300.0}));
    assert!(body["node"]["drain"]["deadline"].is_number());

    s.submit("print(2)").await;
    assert_eq!(
        s.pull("n1", 0.0).await["tasks"],
        json!([]),
        "no new runs while draining"
    );
    let (status, _) = s.report("n1", &a1, "completed", "1\n").await;
    assert_eq!(status, StatusCode::OK, "the running run may finish");
    s.wait_status(t1, |b| b["status"] == "completed").await;
    assert_eq!(s.node("n1").await["status"], "drained");

    // Drained survives a coordinator restart and the agent's heartbeats.
    s.shutdown().await;
    let s = Server::start_in(dir.path(), |_| {}).await;
    assert_eq!(s.node("n1").await["status"], "drained");
    s.heartbeat("n1", 2.0, &[]).await;
    assert_eq!(s.node("n1").await["status"], "drained");

    // Undrain with no body at all (seed 004's NodeActionRequest has only the path id).
    let resp = s
        .http
        .post(s.url("/api/v1/nodes/n1/undrain"))
        .send()
        .await
        .expect("request");
    let (status, body) = decode(resp).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["node"]["status"], "idle");
    assert_eq!(body["command"]["command"], "undrain");
    assert_eq!(
        s.pull("n1", 0.0).await["tasks"].as_array().map(Vec::len),
        Some(1)
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_drain_deadline_stops_the_run_requeues_it_and_tells_the_agent() {
    let s = Server::start().await;
    s.heartbeat("n1", 2.0, &[]).await;
    let t = s.submit("import time; time.sleep(600)").await;
    let a = s.pull("n1", 0.0).await["tasks"][0].clone();
    let run_id = a["run_id"].as_i64().expect("run id");
    let (status, body) = s
        .post("/api/v1/nodes/n1/drain", json!({"timeout": 0}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["node"]["status"], "drained");
    let task = s.wait_status(t, |b| b["status"] == "pending").await;
    assert_eq!(task["node_id"], Value::Null);
    let hb = s.heartbeat("n1", 2.0, &[run_id]).await;
    assert_eq!(hb["cancel"], json!([run_id]), "the agent kills it");
    let (_, full) = s.get(&format!("/api/v1/tasks/{t}")).await;
    assert_eq!(full["runs"][0]["status"], "released");
    // A second node picks it up; the old run's result is refused.
    s.heartbeat("n2", 2.0, &[]).await;
    let again = s.pull("n2", 0.0).await["tasks"][0].clone();
    assert_eq!(again["task_id"], t);
    let (status, _) = s.report("n1", &a, "completed", "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    s.shutdown().await;
}

#[tokio::test]
async fn meta_is_read_replaced_persisted_and_steers_placement() {
    let dir = tempfile::tempdir().expect("dir");
    let s = Server::start_in(dir.path(), |_| {}).await;
    s.heartbeat("n1", 2.0, &[]).await;
    let (status, body) = s.get("/api/v1/nodes/n1/meta").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"meta": {}}));

    let (status, created) = s
        .post(
            "/api/v1/tasks",
            json!({"code": "print(1)", "constraints": {"meta": {"gpu": "a100", "rack": 7}}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        s.pull("n1", 0.0).await["tasks"],
        json!([]),
        "no matching meta yet"
    );

    let meta = json!({"gpu": "a100", "rack": 7, "notes": {"owner": "lab"}});
    let (status, body) = s.put("/api/v1/nodes/n1/meta", json!({"meta": meta})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["meta"], meta);
    // A heartbeat does not overwrite what the operator set.
    s.heartbeat("n1", 2.0, &[]).await;
    assert_eq!(s.get("/api/v1/nodes/n1/meta").await.1["meta"], meta);
    assert_eq!(s.node("n1").await["meta"], meta);
    let got = s.pull("n1", 0.0).await;
    assert_eq!(got["tasks"][0]["task_id"], created["task_id"]);

    s.shutdown().await;
    let s = Server::start_in(dir.path(), |_| {}).await;
    assert_eq!(
        s.get("/api/v1/nodes/n1/meta").await.1["meta"],
        meta,
        "persisted"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn commands_go_pending_delivered_succeeded_through_heartbeats_and_are_listed() {
    let s = Server::start().await;
    s.heartbeat("n1", 2.0, &[]).await;
    let (status, body) = s.post("/api/v1/nodes/n1/restart", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["command"]["id"].as_i64().expect("id");
    assert_eq!(s.commands().await[0]["status"], "pending");

    let hb = s.heartbeat("n1", 2.0, &[]).await;
    assert_eq!(
        hb["commands"],
        json!([{"id": id, "command": "restart", "args": {}}])
    );
    let listed = s.commands().await;
    assert_eq!(listed[0]["status"], "delivered");
    assert!(listed[0]["delivered_at"].is_number());

    let (status, _) = s
        .post(
            "/internal/heartbeat",
            json!({"node_id": "n1", "resources": {"cpu_cores": 2, "memory_mb": 4096},
                   "command_results": [{"id": id, "ok": false, "error": "disk full"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let listed = s.commands().await;
    assert_eq!(listed[0]["status"], "failed");
    assert_eq!(listed[0]["error"], "disk full");
    assert!(listed[0]["completed_at"].is_number());

    s.post("/api/v1/nodes/n1/drain", json!({})).await;
    let hb = s.heartbeat("n1", 2.0, &[]).await;
    let drain_id = hb["commands"][0]["id"].as_i64().expect("drain delivered");
    s.post(
        "/internal/heartbeat",
        json!({"node_id": "n1", "resources": {"cpu_cores": 2, "memory_mb": 4096},
               "command_results": [{"id": drain_id, "ok": true}]}),
    )
    .await;
    let listed = s.commands().await;
    assert_eq!(listed.len(), 2, "newest first: {listed:?}");
    assert_eq!(listed[0]["command"], "drain");
    assert_eq!(listed[0]["status"], "succeeded");
    assert_eq!(listed[0]["node_id"], "n1");
    let (_, failed) = s.get("/api/v1/nodes/commands?status=failed").await;
    assert_eq!(failed["items"].as_array().map(Vec::len), Some(1));
    let (_, none) = s.get("/api/v1/nodes/commands?node_id=other").await;
    assert_eq!(none["items"], json!([]));
    s.shutdown().await;
}

#[tokio::test]
async fn commands_nobody_answers_expire() {
    let dir = tempfile::tempdir().expect("dir");
    let s = Server::start_in(dir.path(), |c| c.command_ttl = 0.2).await;
    s.heartbeat("n1", 2.0, &[]).await;
    s.post("/api/v1/nodes/n1/undrain", json!({})).await;
    let expired = wait_for("the undelivered command to expire", || async {
        let listed = s.commands().await;
        (listed[0]["status"] == "expired").then(|| listed[0].clone())
    })
    .await;
    assert!(
        expired["error"]
            .as_str()
            .is_some_and(|e| e.contains("never delivered")),
        "{expired}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn node_api_errors_are_404_400_422_with_a_detail() {
    let s = Server::start().await;
    s.heartbeat("n1", 2.0, &[]).await;
    for (method, path) in [
        ("POST", "/api/v1/nodes/ghost/drain"),
        ("POST", "/api/v1/nodes/ghost/undrain"),
        ("POST", "/api/v1/nodes/ghost/restart"),
        ("GET", "/api/v1/nodes/ghost/meta"),
        ("PUT", "/api/v1/nodes/ghost/meta"),
    ] {
        let req = match method {
            "GET" => s.http.get(s.url(path)),
            "PUT" => s.http.put(s.url(path)).json(&json!({"meta": {}})),
            _ => s.http.post(s.url(path)).json(&json!({})),
        };
        let (status, body) = decode(req.send().await.expect("request")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert_eq!(
            body,
            json!({"detail": "Node ghost not found"}),
            "{method} {path}"
        );
    }
    let bad = [
        (
            "/api/v1/nodes/n1/drain",
            "{not json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/v1/nodes/n1/drain",
            r#"{"timeout": -1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/api/v1/nodes/n1/drain",
            r#"{"timeout": "soon"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/api/v1/nodes/n1/drain",
            r#"{"deadline": 5}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/api/v1/nodes/n1/drain",
            r#"{"timeout": 1e300}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/api/v1/nodes/n1/undrain",
            r#"{"force": true}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/api/v1/nodes/n1/restart",
            "[1]",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (path, body, want) in bad {
        let (status, answer) = s.post_raw(path, body).await;
        assert_eq!(status, want, "{path} {body}: {answer}");
        assert!(
            answer["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{answer}"
        );
    }
    for (body, want) in [
        (
            json!({"meta": [1, 2]}),
            "meta must be a JSON object, got an array",
        ),
        (
            json!({"meta": "x"}),
            "meta must be a JSON object, got a string",
        ),
        (json!({}), "meta is required: a JSON object ({} clears it)"),
    ] {
        let (status, answer) = s.put("/api/v1/nodes/n1/meta", body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        assert_eq!(answer["detail"], want);
    }
    let resp = s
        .http
        .put(s.url("/api/v1/nodes/n1/meta"))
        .body("")
        .send()
        .await
        .expect("request");
    assert_eq!(decode(resp).await.0, StatusCode::BAD_REQUEST);
    for query in ["status=bogus", "limit=0", "limit=5000", "colour=red"] {
        let (status, answer) = s.get(&format!("/api/v1/nodes/commands?{query}")).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}: {answer}"
        );
    }
    let (status, body) = s.get("/api/v1/tasks/999/explain").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["detail"], "Task 999 not found");
    let (status, _) = s.get("/api/v1/tasks/abc/explain").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    s.shutdown().await;
}

#[tokio::test]
async fn explain_says_why_a_task_waits_and_what_a_started_one_does() {
    let s = Server::start().await;
    let (_, created) = s
        .post(
            "/api/v1/tasks",
            json!({"code": "print(1)", "resources": {"cpu": 4, "memory": 512}}),
        )
        .await;
    let big = created["task_id"].as_i64().expect("id");
    let (status, e) = s.get(&format!("/api/v1/tasks/{big}/explain")).await;
    assert_eq!(status, StatusCode::OK, "{e}");
    assert_eq!(e["status"], "pending");
    assert_eq!(e["reason"], "no node has joined the pool");

    s.heartbeat("n1", 2.0, &[]).await;
    let (_, e) = s.get(&format!("/api/v1/tasks/{big}/explain")).await;
    assert_eq!(e["nodes"][0]["verdict"], "too_small");
    assert_eq!(e["nodes"][0]["short"], json!(["cpu"]));
    assert!(
        e["reason"]
            .as_str()
            .is_some_and(|r| r.contains("big enough")),
        "{e}"
    );

    let small = s.submit("print(2)").await;
    s.post("/api/v1/nodes/n1/drain", json!({})).await;
    let (_, e) = s.get(&format!("/api/v1/tasks/{small}/explain")).await;
    assert_eq!(e["nodes"][0]["verdict"], "unavailable");
    assert!(
        e["reason"]
            .as_str()
            .is_some_and(|r| r.contains("n1 drained")),
        "{e}"
    );

    s.post("/api/v1/nodes/n1/undrain", json!({})).await;
    let a = s.pull("n1", 0.0).await["tasks"][0].clone();
    let (_, e) = s.get(&format!("/api/v1/tasks/{small}/explain")).await;
    assert_eq!(e["status"], "running");
    assert_eq!(e["node_id"], "n1");
    s.report("n1", &a, "completed", "2\n").await;
    s.wait_status(small, |b| b["status"] == "completed").await;
    let (_, e) = s.get(&format!("/api/v1/tasks/{small}/explain")).await;
    assert_eq!(e["status"], "completed");
    assert!(
        e["reason"]
            .as_str()
            .is_some_and(|r| r.contains("completed")),
        "{e}"
    );
    s.shutdown().await;
}
