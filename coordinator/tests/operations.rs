//! Scale-out, shrink and operations at the HTTP edge: a real coordinator on 127.0.0.1:0,
//! agents played by the test through `/internal/heartbeat`. The standby agents themselves
//! are exercised end to end in `tests/tests/scale.rs`.

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
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(join_secret: Option<&str>) -> Server {
        Server::start_with(|config| config.join_secret = join_secret.map(str::to_string)).await
    }

    async fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::new(dir.path().to_path_buf());
        config.local_agents = 0;
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

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request");
        let status = resp.status();
        (status, resp.json().await.expect("JSON body"))
    }

    async fn post_raw(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request");
        let status = resp.status();
        (status, resp.json().await.expect("JSON body"))
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.post_raw(path, &body.to_string()).await
    }

    async fn heartbeat(&self, body: Value) -> Value {
        let (status, answer) = self.post("/internal/heartbeat", body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer
    }

    async fn node(&self, node_id: &str, status: &str) -> Value {
        self.heartbeat(json!({"node_id": node_id, "status": status,
            "resources": {"cpu_cores": 2, "memory_mb": 2048}}))
            .await
    }

    /// Polls until `pred` holds for the operation, for at most 30 s.
    async fn wait_operation(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (status, op) = self.get(&format!("/api/v1/operations/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{op}");
            if pred(&op) {
                return op;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "operation {id} never got there: {op}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Seed 002's envelope for a refusal: every field, and `error` filled.
fn assert_refused(envelope: &Value, status: StatusCode, code: &str) -> Vec<String> {
    assert_eq!(envelope["successful"], false, "{envelope}");
    assert_eq!(envelope["status"], status.as_u16(), "{envelope}");
    assert_eq!(envelope["data"], Value::Null, "{envelope}");
    assert_eq!(envelope["error"]["code"], code, "{envelope}");
    assert!(
        envelope["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert_eq!(
        envelope["traceId"].as_str().map(str::len),
        Some(16),
        "{envelope}"
    );
    assert!(
        envelope["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert!(envelope["duration"].is_u64(), "{envelope}");
    envelope["error"]["subErrors"]
        .as_array()
        .expect("subErrors is a list")
        .iter()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn scale_out_refusals_come_in_the_seed_envelope_with_the_fitting_status() {
    let s = Server::start(Some("secret")).await;
    let (status, body) = s.post_raw("/api/v1/cluster/scale_out", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_refused(&body, status, "BAD_REQUEST");

    let (status, body) = s.post_raw("/api/v1/cluster/scale_out", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_refused(&body, status, "BAD_REQUEST");

    let (status, body) = s.post("/api/v1/cluster/scale_out", json!({})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let subs = assert_refused(&body, status, "INVALID_ARGUMENT");
    assert!(
        subs.iter().any(|e| e.contains("agentInfo is required")),
        "{subs:?}"
    );

    // Every problem is listed, one per subError.
    let (status, body) = s
        .post(
            "/api/v1/cluster/scale_out",
            json!({"agentInfo": {"ip": "10.0.0.999", "port": 70000, "host": "x"},
                   "configs": {"cpus": {"nested": 1}}, "obConfigs": {}, "zone": 3, "extra": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let subs = assert_refused(&body, status, "INVALID_ARGUMENT");
    for needle in [
        "agentInfo.ip",
        "agentInfo.port must be between 1 and 65535",
        "unknown field \"host\"",
        "not both",
        "zone must be a string",
        "unknown field \"extra\"",
    ] {
        assert!(
            subs.iter().any(|e| e.contains(needle)),
            "{needle}: {subs:?}"
        );
    }
    let (status, body) = s
        .post(
            "/api/v1/cluster/scale_out",
            json!({"agentInfo": {"ip": "127.0.0.1", "port": 1}, "configs": {"cpus": [1], "heartbeat_timeout": -1, "coordinator_url": "ftp://x"}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let subs = assert_refused(&body, status, "INVALID_ARGUMENT");
    assert_eq!(subs.len(), 3, "{subs:?}");

    // The same agent twice.
    let one = json!({"ip": "127.0.0.1", "port": 9});
    let (status, body) = s
        .post(
            "/api/v1/cluster/scale_out",
            json!({"agentInfo": [one.clone(), one], "zone": "z"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_refused(&body, status, "INVALID_ARGUMENT");
    // Nothing was created by any of it.
    let (_, listed) = s.get("/api/v1/operations").await;
    assert_eq!(listed["items"], json!([]));
    s.shutdown().await;
}

#[tokio::test]
async fn without_a_join_secret_scale_out_is_unavailable() {
    let s = Server::start(None).await;
    let (status, body) = s
        .post(
            "/api/v1/cluster/scale_out",
            json!({"agentInfo": {"ip": "127.0.0.1", "port": 9}, "obConfigs": {}, "zone": "z"}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_refused(&body, status, "UNAVAILABLE");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--join-secret")
    );
    s.shutdown().await;
}

#[tokio::test]
async fn an_accepted_scale_out_answers_the_ready_dag_and_fails_at_the_unreachable_agent() {
    let s = Server::start(Some("secret")).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let (status, envelope) = s
        .post(
            "/api/v1/cluster/scale_out",
            json!({"agentInfo": {"ip": "127.0.0.1", "port": port},
                   "obConfigs": {"cpus": "2"}, "zone": "zone2"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{envelope}");
    assert_eq!(envelope["successful"], true);
    assert_eq!(envelope["status"], 200);
    assert_eq!(envelope["error"], Value::Null);
    let dag = &envelope["data"];
    assert_eq!(dag["name"], "Cluster scale out");
    assert_eq!(dag["state"], "READY");
    assert_eq!(dag["operator"], "RUN");
    assert_eq!(
        (dag["stage"].as_u64(), dag["max_stage"].as_u64()),
        (Some(1), Some(6))
    );
    assert_eq!(
        dag["dag_id"].as_i64().map(|i| i.to_string()).as_deref(),
        dag["id"].as_str()
    );
    assert_eq!(dag["nodes"].as_array().map(Vec::len), Some(6));
    assert_eq!(dag["additional_data"]["zone"], "zone2");
    let id = dag["id"].as_str().expect("id").to_string();

    let op = s.wait_operation(&id, |op| op["state"] == "FAILED").await;
    assert_eq!(op["stage_name"], "check_agent_reachable");
    assert_eq!(op["nodes"][0]["state"], "FAILED");
    assert_eq!(op["nodes"][1]["state"], "READY");
    assert!(op["end_time"].is_string());
    let error = op["additional_data"]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("stage check_agent_reachable failed"),
        "{error}"
    );
    assert!(error.contains("unreachable"), "{error}");

    // Reads: by id, listed, filtered, paged; unknown and malformed ids.
    let (status, listed) = s
        .get("/api/v1/operations?type=scale_out&state=FAILED")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["items"][0]["id"], id.as_str());
    let (_, listed) = s.get("/api/v1/operations?type=shrink").await;
    assert_eq!(listed["items"], json!([]));
    let (_, listed) = s.get("/api/v1/operations?offset=1").await;
    assert_eq!(listed["items"], json!([]));
    let (status, body) = s.get("/api/v1/operations/999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["detail"], "Operation 999 not found");
    let (status, _) = s.get("/api/v1/operations/abc").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = s.get("/api/v1/operations?state=DONE").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = s.get("/api/v1/operations?limit=0").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    s.shutdown().await;
}

#[tokio::test]
async fn shrink_refuses_numbers_off_the_group_boundaries_and_listing_the_valid_ones() {
    let s = Server::start(None).await;
    // Nothing to shrink yet.
    let (status, body) = s
        .post(
            "/api/v1/cluster/shrink",
            json!({"shrink_number": 1, "online": true}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // Two nodes that joined on their own: a group each.
    s.node("n1", "idle").await;
    s.node("n2", "idle").await;
    for number in [3, 0, -2] {
        let (status, body) = s
            .post(
                "/api/v1/cluster/shrink",
                json!({"shrink_number": number, "online": true, "type": "dws", "force_backup": false, "need_agency": false}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or_default()
                .ends_with("valid numbers: 1, 2"),
            "{body}"
        );
    }
    for body in [
        json!({"online": true}),
        json!({"shrink_number": 1}),
        json!({"shrink_number": 1, "online": true, "surprise": 1}),
        json!({"shrink_number": "one", "online": true}),
        json!({"shrink_number": 1, "online": true, "timeout": -5}),
    ] {
        let (status, answer) = s.post("/api/v1/cluster/shrink", body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} → {answer}"
        );
    }
    let (status, body) = s
        .post(
            "/api/v1/cluster/shrink",
            json!({"shrink_number": 1, "online": true, "retry": true}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    s.shutdown().await;
}

#[tokio::test]
async fn a_shrink_drains_decommissions_and_removes_the_newest_node() {
    let s = Server::start(None).await;
    s.node("n1", "idle").await;
    s.node("n2", "idle").await;
    let (status, body) = s
        .post(
            "/api/v1/cluster/shrink",
            json!({"shrink_number": 1, "online": true}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = body["job_id"]
        .as_str()
        .expect("job_id is a string")
        .to_string();
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");
    // One operation at a time.
    let (status, busy) = s
        .post(
            "/api/v1/cluster/shrink",
            json!({"shrink_number": 1, "online": true}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{busy}");

    let op = s
        .wait_operation(&job, |op| op["stage_name"] == "decommission")
        .await;
    assert_eq!(op["additional_data"]["node_ids"], json!(["n2"]));
    // The newest node's agent is told to leave in its heartbeat answer...
    let answer = s.node("n2", "idle").await;
    let command = answer["commands"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["command"] == "decommission").cloned())
        .unwrap_or_else(|| panic!("no decommission in {answer}"));
    // ... and says goodbye with the outcome.
    s.heartbeat(json!({"node_id": "n2", "status": "offline",
        "resources": {"cpu_cores": 2, "memory_mb": 2048},
        "command_results": [{"id": command["id"], "ok": true}]}))
        .await;
    let op = s.wait_operation(&job, |op| op["state"] != "RUNNING").await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    let (_, nodes) = s.get("/api/v1/nodes").await;
    let status_of = |id: &str| {
        nodes["items"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node_id"] == id))
            .map(|n| n["status"].clone())
    };
    assert_eq!(status_of("n2"), Some(json!("removed")));
    assert_ne!(status_of("n1"), Some(json!("removed")));
    let (_, commands) = s.get("/api/v1/nodes/commands?node_id=n2").await;
    assert!(
        commands["items"]
            .as_array()
            .expect("commands")
            .iter()
            .any(|c| c["command"] == "decommission" && c["status"] == "succeeded"),
        "{commands}"
    );
    // A removed node's stray goodbye leaves it removed, and it is no shrink candidate.
    s.node("n2", "offline").await;
    let (status, body) = s
        .post(
            "/api/v1/cluster/shrink",
            json!({"shrink_number": 2, "online": false}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .ends_with("valid numbers: 1")
    );
    s.shutdown().await;
}

/// The ids of the decommission commands in a heartbeat answer.
fn decommissions(answer: &Value) -> Vec<Value> {
    answer["commands"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter(|c| c["command"] == "decommission")
                .map(|c| c["id"].clone())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_shrink_whose_agent_does_not_leave_fails_and_a_retry_resumes_it() {
    let s = Server::start_with(|config| config.shrink_leave_timeout = Some(1.0)).await;
    s.node("n1", "idle").await;
    s.node("n2", "idle").await;
    let (status, body) = s
        .post(
            "/api/v1/cluster/shrink",
            json!({"shrink_number": 1, "online": false}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = body["job_id"].as_str().expect("job id").to_string();
    // n2 keeps heartbeating and ignores its decommission.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let op = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the shrink never failed"
        );
        s.node("n2", "idle").await;
        let (_, op) = s.get(&format!("/api/v1/operations/{job}")).await;
        if op["state"] == "FAILED" {
            break op;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(op["stage_name"], "decommission", "{op}");
    let message = op["nodes"][2]["message"].as_str().unwrap_or_default();
    assert!(message.contains("n2 did not leave within 1 s"), "{message}");
    assert_eq!(op["nodes"][1]["state"], "SUCCEEDED");

    // A retry must be of the same shrink.
    let (status, body) = s
        .post(
            "/api/v1/cluster/shrink",
            json!({"shrink_number": 2, "online": false, "retry": true}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = s
        .post(
            "/api/v1/cluster/shrink",
            json!({"shrink_number": 1, "online": false, "retry": true}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["job_id"], job.as_str(), "the same operation resumes");
    let op = s.wait_operation(&job, |op| op["operator"] == "RETRY").await;
    assert_eq!(op["stage_name"], "decommission");
    // This time the agent goes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let ids = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no decommission was sent again"
        );
        let ids = decommissions(&s.node("n2", "idle").await);
        if !ids.is_empty() {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let results: Vec<Value> = ids.iter().map(|id| json!({"id": id, "ok": true})).collect();
    s.heartbeat(json!({"node_id": "n2", "status": "offline",
        "resources": {"cpu_cores": 2, "memory_mb": 2048}, "command_results": results}))
        .await;
    let op = s.wait_operation(&job, |op| op["state"] != "RUNNING").await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    assert_eq!(op["operator"], "RETRY");
    let (status, body) = s
        .post(
            "/api/v1/cluster/shrink",
            json!({"shrink_number": 1, "online": false, "retry": true}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "nothing failed to retry: {body}"
    );
    s.shutdown().await;
}
