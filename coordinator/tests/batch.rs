//! Batches over real HTTP: `POST /api/v1/tasks/batch` (all or none, ids in order, a clear
//! error naming the bad task, the size limit, the submitter role) and `POST /internal/results`
//! (each report settled on its own: accepted, a duplicate refused, a requeued run refused,
//! a malformed one rejected alone). A real coordinator on 127.0.0.1:0, agents played by hand.

use lull_coordinator::engine::unix_now;
use lull_coordinator::keys::{KeyMode, NewKey, Role};
use lull_coordinator::store::{KeyStore, SqliteStore, SyncMode};
use lull_coordinator::{Config, run};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Server {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// The admin token when auth is on.
    admin: Option<String>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(auth: bool) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut admin = None;
        if auth {
            let store = SqliteStore::open(dir.path(), SyncMode::Normal)
                .await
                .expect("store");
            let key = NewKey::generate("root", Role::Admin, KeyMode::Simple);
            store.create_key(&key, unix_now()).await.expect("admin key");
            admin = Some(key.token);
        }
        let mut config = Config::new(dir.path().to_path_buf());
        config.local_agents = 0;
        // The tests count what one pull hands out; prefetching has its own tests.
        config.prefetch = 0;
        config.auth = auth;
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
            admin,
            _dir: dir,
        }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("coordinator stops in time")
            .expect("coordinator task");
    }

    async fn send(&self, req: reqwest::RequestBuilder, token: Option<&str>) -> (StatusCode, Value) {
        let req = match token.or(self.admin.as_deref()) {
            Some(token) => req.header("token", token),
            None => req,
        };
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let body =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}"));
        (status, body)
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post_as(path, body, None).await
    }

    async fn post_as(&self, path: &str, body: &Value, token: Option<&str>) -> (StatusCode, Value) {
        let req = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send(req, token).await
    }

    async fn post_raw(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send(req, None).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send(req, None).await
    }

    async fn heartbeat(&self, node: &str, cpus: f64) {
        let (status, body) = self
            .post(
                "/internal/heartbeat",
                &json!({"node_id": node, "status": "idle",
                        "resources": {"cpu_cores": cpus, "memory_mb": 65536},
                        "current_load": {"cpu_percent": 1.0, "memory_percent": 2.0}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    async fn pull(&self, node: &str, max: usize) -> Vec<Value> {
        let (status, body) = self
            .get(&format!("/internal/task?node_id={node}&wait=0&max={max}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["tasks"].as_array().cloned().unwrap_or_default()
    }

    async fn task(&self, id: i64) -> Value {
        let (status, body) = self.get(&format!("/api/v1/tasks/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn total_tasks(&self) -> u64 {
        let (_, stats) = self.get("/stats").await;
        stats["tasks"]["total"].as_u64().expect("total")
    }
}

fn tasks(codes: &[&str]) -> Value {
    json!({"tasks": codes.iter().map(|c| json!({"code": c})).collect::<Vec<_>>()})
}

fn report(node: &str, assignment: &Value, stdout: &str) -> Value {
    json!({"node_id": node, "task_id": assignment["task_id"], "run_id": assignment["run_id"],
           "outcome": "completed", "exit_code": 0, "stdout": stdout, "stderr": ""})
}

#[tokio::test]
async fn a_batch_is_accepted_whole_and_answers_the_ids_in_order() {
    let s = Server::start(false).await;
    let (status, body) = s
        .post(
            "/api/v1/tasks/batch",
            &tasks(&["print(1)", "print(2)", "print(3)"]),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["count"], 3);
    let ids: Vec<i64> = body["task_ids"]
        .as_array()
        .expect("task_ids")
        .iter()
        .map(|id| id.as_i64().expect("an id"))
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "in order: {ids:?}"
    );
    for (id, code) in ids.iter().zip(["print(1)", "print(2)", "print(3)"]) {
        let task = s.task(*id).await;
        assert_eq!(task["status"], "pending");
        assert_eq!(task["code"], code, "{task}");
    }
    // Options of single submissions apply per task.
    let (status, body) = s
        .post(
            "/api/v1/tasks/batch",
            &json!({"tasks": [{"code": "print(4)", "timeout": 5, "resources": {"cpu": 2, "memory": 128},
                               "constraints": {"zone": "lab1"}, "max_attempts": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let task = s.task(body["task_ids"][0].as_i64().expect("id")).await;
    assert_eq!(task["timeout"], 5.0, "{task}");
    assert_eq!(task["max_attempts"], 1, "{task}");
    // The largest batch allowed goes through too, in one piece.
    let codes: Vec<String> = (0..1000).map(|i| format!("print({i})")).collect();
    let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    let (status, body) = s.post("/api/v1/tasks/batch", &tasks(&refs)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["count"], 1000);
    assert_eq!(s.total_tasks().await, 1004);
    s.shutdown().await;
}

#[tokio::test]
async fn one_invalid_task_refuses_the_whole_batch_and_names_its_index() {
    let s = Server::start(false).await;
    let cases = [
        // the seed's validation message, prefixed with the index
        (
            tasks(&["print(1)", "   ", "print(3)"]),
            "tasks[1]: Code cannot be empty",
        ),
        (
            json!({"tasks": [{"code": "print(1)"}, {"code": "print(2)"}, {"code": "x", "timeout": -1}]}),
            "tasks[2]: timeout must be a positive number",
        ),
        // a task of the wrong shape
        (
            json!({"tasks": [{"code": "print(1)"}, {"code": 7}]}),
            "tasks[1]: invalid task",
        ),
        (
            json!({"tasks": [{"code": "print(1)", "colour": "red"}]}),
            "tasks[0]: invalid task: unknown field `colour`",
        ),
    ];
    for (body, detail) in cases {
        let (status, answer) = s.post("/api/v1/tasks/batch", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        let got = answer["detail"].as_str().expect("detail");
        assert!(
            got.starts_with(detail),
            "{got:?} should start with {detail:?}"
        );
    }
    assert_eq!(
        s.total_tasks().await,
        0,
        "all or none: nothing was accepted"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn the_batch_envelope_and_its_size_are_checked() {
    let s = Server::start(false).await;
    let codes: Vec<String> = (0..1001).map(|i| format!("print({i})")).collect();
    let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    let (status, body) = s.post("/api/v1/tasks/batch", &tasks(&refs)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["detail"],
        "a batch holds at most 1000 tasks, got 1001; split it into several"
    );
    let (status, body) = s.post("/api/v1/tasks/batch", &json!({"tasks": []})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("1 to 1000")
    );
    let (status, body) = s
        .post("/api/v1/tasks/batch", &json!({"code": "print(1)"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = s
        .post("/api/v1/tasks/batch", &json!([{"code": "print(1)"}]))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = s.post_raw("/api/v1/tasks/batch", "{\"tasks\": [").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = s.post_raw("/api/v1/tasks/batch", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(s.total_tasks().await, 0);
    s.shutdown().await;
}

#[tokio::test]
async fn batch_submission_is_for_submitters_and_admins() {
    let s = Server::start(true).await;
    let mut tokens = Vec::new();
    for role in ["submitter", "agent", "viewer"] {
        let (status, key) = s
            .post("/api/v1/keys", &json!({"role": role, "mode": "simple"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        tokens.push(key["token"].as_str().expect("token").to_string());
    }
    let batch = tasks(&["print(1)"]);
    let (status, body) = s
        .post_as("/api/v1/tasks/batch", &batch, Some(&tokens[0]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "submitter: {body}");
    for (token, role) in tokens[1..].iter().zip(["agent", "viewer"]) {
        let (status, body) = s.post_as("/api/v1/tasks/batch", &batch, Some(token)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{role}: {body}");
        assert!(
            body["detail"]
                .as_str()
                .expect("detail")
                .starts_with(&format!("role {role}")),
            "{body}"
        );
    }
    let (status, _) = s
        .post_as("/api/v1/tasks/batch", &batch, Some("lull_not_a_key"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = s.post("/api/v1/tasks/batch", &batch).await;
    assert_eq!(status, StatusCode::CREATED, "admin: {body}");
    assert_eq!(s.total_tasks().await, 2);
    s.shutdown().await;
}

#[tokio::test]
async fn batched_results_are_settled_one_by_one_in_one_answer() {
    let s = Server::start(false).await;
    s.heartbeat("n1", 8.0).await;
    s.heartbeat("n2", 8.0).await;
    let (status, body) = s
        .post(
            "/api/v1/tasks/batch",
            &tasks(&["print(1)", "print(2)", "print(3)", "print(4)"]),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let runs = s.pull("n1", 4).await;
    assert_eq!(runs.len(), 4, "one pull hands out every run that fits");

    // Run 0 and 1 are fine; run 1 again in the same batch is a duplicate; run 2 is reported
    // by a node that does not hold it; the fifth entry is not a report at all.
    let (status, answer) = s
        .post(
            "/internal/results",
            &json!({"results": [
                report("n1", &runs[0], "1\n"),
                report("n1", &runs[1], "2\n"),
                report("n1", &runs[1], "forged\n"),
                report("n2", &runs[2], "forged\n"),
                {"node_id": "n1", "task_id": runs[3]["task_id"], "run_id": runs[3]["run_id"], "outcome": "exploded"},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let items = answer["results"].as_array().expect("results");
    assert_eq!(items.len(), 5, "one answer per report, in order: {answer}");
    let verdicts: Vec<(&str, u64)> = items
        .iter()
        .map(|i| {
            (
                i["status"].as_str().expect("status"),
                i["code"].as_u64().expect("code"),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("accepted", 200),
            ("accepted", 200),
            ("refused", 409),
            ("refused", 409),
            ("rejected", 422)
        ]
    );
    for (item, run) in items.iter().zip([0, 1, 1, 2, 3].map(|i| &runs[i])) {
        assert_eq!(item["run_id"], run["run_id"]);
        assert_eq!(item["task_id"], run["task_id"]);
    }
    assert!(
        items[4]["detail"]
            .as_str()
            .expect("detail")
            .starts_with("results[4]: invalid report")
    );

    let first = s.task(runs[0]["task_id"].as_i64().expect("id")).await;
    assert_eq!(first["status"], "completed");
    assert_eq!(first["result"], "1");
    let second = s.task(runs[1]["task_id"].as_i64().expect("id")).await;
    assert_eq!(
        second["result"], "2",
        "the duplicate changed nothing: {second}"
    );
    assert_eq!(second["runs"].as_array().expect("runs").len(), 1);
    for run in &runs[2..] {
        let task = s.task(run["task_id"].as_i64().expect("id")).await;
        assert_eq!(
            task["status"], "running",
            "still n1's, still running: {task}"
        );
    }

    // Sent again (as an agent does when an answer is lost): nothing completes twice.
    let (status, again) = s
        .post(
            "/internal/results",
            &json!({"results": [report("n1", &runs[0], "1\n"), report("n1", &runs[2], "3\n")]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["results"][0]["status"], "refused");
    assert_eq!(again["results"][1]["status"], "accepted");
    let (_, stats) = s.get("/stats").await;
    assert_eq!(stats["tasks"]["completed"], 3, "{stats}");
    s.shutdown().await;
}

#[tokio::test]
async fn a_batched_result_for_a_requeued_run_is_refused() {
    let s = Server::start(false).await;
    s.heartbeat("n1", 2.0).await;
    let (status, body) = s
        .post("/api/v1/tasks/batch", &tasks(&["print(1)", "print(2)"]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let runs = s.pull("n1", 2).await;
    assert_eq!(runs.len(), 2);
    // The node hands run 0 back (released: requeued without a loss), then a second node
    // takes it; n1's late result for its old run must be refused, the other one kept.
    let (status, answer) = s
        .post(
            "/internal/results",
            &json!({"results": [{"node_id": "n1", "task_id": runs[0]["task_id"],
                                 "run_id": runs[0]["run_id"], "outcome": "released"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["results"][0]["status"], "accepted");
    s.heartbeat("n2", 2.0).await;
    let rerun = s.pull("n2", 1).await;
    assert_eq!(rerun.len(), 1);
    assert_eq!(rerun[0]["task_id"], runs[0]["task_id"]);
    assert_eq!(rerun[0]["attempt"], 2);

    let (status, answer) = s
        .post(
            "/internal/results",
            &json!({"results": [report("n1", &runs[0], "stale\n"), report("n1", &runs[1], "2\n")]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["results"][0]["status"], "refused", "{answer}");
    assert_eq!(answer["results"][0]["code"], 409);
    assert!(
        answer["results"][0]["detail"]
            .as_str()
            .expect("detail")
            .contains("not current"),
        "{answer}"
    );
    assert_eq!(answer["results"][1]["status"], "accepted");
    let (status, answer) = s
        .post(
            "/internal/results",
            &json!({"results": [report("n2", &rerun[0], "1\n")]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["results"][0]["status"], "accepted");
    let task = s.task(runs[0]["task_id"].as_i64().expect("id")).await;
    assert_eq!(task["status"], "completed");
    assert_eq!(
        task["result"], "1",
        "the current run's result, not the stale one"
    );

    // The envelope itself: empty, too many, not a batch.
    let (status, body) = s.post("/internal/results", &json!({"results": []})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let many: Vec<Value> = (0..1001).map(|_| report("n1", &runs[1], "2\n")).collect();
    let (status, body) = s.post("/internal/results", &json!({"results": many})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("at most 1000")
    );
    let (status, _) = s.post("/internal/results", &json!({"reports": []})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = s.post_raw("/internal/results", "{\"results\": [").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    s.shutdown().await;
}

#[tokio::test]
async fn a_results_post_can_bring_the_next_runs_leased_in_its_commit() {
    let s = Server::start(false).await;
    s.heartbeat("n1", 1.0).await;
    let (status, body) = s
        .post(
            "/api/v1/tasks/batch",
            &tasks(&["print(1)", "print(2)", "print(3)"]),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let first = s.pull("n1", 1).await;
    assert_eq!(first.len(), 1);

    // Asked for: the answer settles the result and hands out the next run, as a pull would.
    let (status, answer) = s
        .post(
            "/internal/results?node_id=n1&max=1",
            &json!({"results": [report("n1", &first[0], "1\n")]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["results"][0]["status"], "accepted", "{answer}");
    let next = answer["tasks"].as_array().expect("runs handed out");
    assert_eq!(next.len(), 1, "{answer}");
    assert_ne!(next[0]["task_id"], first[0]["task_id"]);
    let leased = s.task(next[0]["task_id"].as_i64().expect("task_id")).await;
    assert_eq!(leased["status"], "running", "leased to n1: {leased}");
    assert_eq!(leased["node_id"], "n1");
    assert_eq!(leased["runs"][0]["run_id"], next[0]["run_id"]);

    // Not asked for: nothing handed out, the last task still waits for a pull.
    let (status, answer) = s
        .post(
            "/internal/results",
            &json!({"results": [report("n1", &next[0], "2\n")]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer.get("tasks").is_none(), "{answer}");
    let last = s.pull("n1", 4).await;
    assert_eq!(last.len(), 1, "the third task was not handed out before");

    let (status, refused) = s
        .post(
            "/internal/results?max=2",
            &json!({"results": [report("n1", &last[0], "3\n")]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    s.shutdown().await;
}
