//! Live feed tests: a real coordinator on 127.0.0.1:0 (no local agent) and real WebSocket
//! clients (tokio-tungstenite, and Python's `websockets`). Agents are played by the test
//! through the `/internal/*` protocol. Every wait is bounded; nothing asserts on timings.

use futures::StreamExt;
use lull_coordinator::feed::FeedConfig;
use lull_coordinator::store::SyncMode;
use lull_coordinator::{Config, run};
use lull_shared::{FeedEventKind, FeedMessage};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use FeedEventKind::*;

/// Longest any single wait in these tests may take before it fails.
const WAIT: Duration = Duration::from_secs(30);

struct Server {
    addr: String,
    http: reqwest::Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        Server::start_with(FeedConfig::default()).await
    }

    async fn start_with(feed: FeedConfig) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::new(dir.path().to_path_buf());
        config.local_agents = 0;
        // Durability is not what these tests are about; `normal` keeps them quick.
        config.sync = SyncMode::Normal;
        // The test plays each agent with one heartbeat; a loaded machine must not turn a
        // long test's node offline under it (no test here waits for the TTL).
        config.node_ttl = 3600.0;
        config.feed = feed;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            run(listener, config, token)
                .await
                .expect("coordinator runs");
        });
        Server {
            addr,
            http: reqwest::Client::new(),
            stop,
            task,
            _dir: dir,
        }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("coordinator stops in time")
            .expect("coordinator task");
    }

    fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws/updates{query}", self.addr)
    }

    async fn connect(&self, query: &str) -> Client {
        let (socket, response) =
            tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(self.ws_url(query)))
                .await
                .expect("handshake in time")
                .expect("handshake");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        Client::new(socket)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .expect("request");
        decode(resp).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("http://{}{path}", self.addr))
            .json(&body)
            .send()
            .await
            .expect("request");
        decode(resp).await
    }

    async fn submit(&self) -> i64 {
        let (status, body) = self.post("/submit", json!({"code": "print(1)"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["task_id"].as_i64().expect("task_id")
    }

    async fn cancel(&self, task_id: i64) {
        let (status, body) = self
            .post(&format!("/api/v1/tasks/{task_id}/cancel"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    async fn heartbeat(&self, node: &str, cpus: f64) {
        let (status, body) = self
            .post(
                "/internal/heartbeat",
                json!({"node_id": node, "status": "idle", "hostname": format!("host-{node}"),
                       "resources": {"cpu_cores": cpus, "memory_mb": 4096.0 * cpus},
                       "current_load": {"cpu_percent": 1.0, "memory_percent": 2.0},
                       "running": []}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// A long-poll for one run from each of `nodes`, returned once all are waiting.
    async fn parked_polls(&self, nodes: &[&str]) -> Vec<tokio::task::JoinHandle<Value>> {
        let mut polls = Vec::new();
        for node in nodes {
            let url = format!(
                "http://{}/internal/task?node_id={node}&wait=30&max=1",
                self.addr
            );
            polls.push(tokio::spawn(async move {
                let resp = reqwest::get(url).await.expect("poll");
                resp.json::<Value>().await.expect("json")
            }));
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.get("/health").await.1["waiting_pulls"] != nodes.len() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the polls never waited"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        polls
    }

    /// One run handed to `node` (waits for it, bounded).
    async fn pull_one(&self, node: &str) -> Value {
        let (status, body) = self
            .get(&format!("/internal/task?node_id={node}&wait=30&max=1"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["tasks"][0].clone()
    }

    async fn report(&self, node: &str, run: &Value, outcome: &str, error: Option<&str>) {
        let (status, body) = self
            .post(
                "/internal/result",
                json!({"node_id": node, "task_id": run["task_id"], "run_id": run["run_id"],
                       "outcome": outcome, "exit_code": if outcome == "completed" { 0 } else { 1 },
                       "stdout": "1\n", "stderr": "", "error": error}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

async fn decode(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}"));
    (status, value)
}

struct Client {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Events of an array message (`?batch=true`) not yet returned by `next`.
    pending: VecDeque<FeedMessage>,
    /// How many events each text message held: 1 for an object, the length of an array.
    sizes: Vec<usize>,
    /// Text messages that were one object, not an array.
    objects: usize,
}

impl Client {
    fn new(socket: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        Client {
            socket,
            pending: VecDeque::new(),
            sizes: Vec::new(),
            objects: 0,
        }
    }

    /// The next feed event (bounded wait), whether it came alone or in an array.
    async fn next(&mut self) -> FeedMessage {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return m;
            }
            let frame = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("a feed message in time")
                .expect("connection open")
                .expect("a frame");
            match frame {
                Message::Text(text) if text.starts_with('[') => {
                    let events: Vec<FeedMessage> = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("not an array of feed messages ({e}): {text}"));
                    assert!(!events.is_empty(), "an empty array was sent");
                    self.sizes.push(events.len());
                    self.pending.extend(events);
                }
                Message::Text(text) => {
                    self.sizes.push(1);
                    self.objects += 1;
                    return serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("not a feed message ({e}): {text}"));
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Messages up to and including the first one `last` accepts.
    async fn until(&mut self, last: impl Fn(&FeedMessage) -> bool) -> Vec<FeedMessage> {
        let mut seen = Vec::new();
        loop {
            let m = self.next().await;
            let done = last(&m);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }

    async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

fn is(kind: FeedEventKind, task_id: i64) -> impl Fn(&FeedMessage) -> bool {
    move |m| m.event == kind && m.data["task_id"] == task_id
}

fn kinds_of(messages: &[FeedMessage], task_id: i64) -> Vec<FeedEventKind> {
    messages
        .iter()
        .filter(|m| m.data["task_id"] == task_id)
        .map(|m| m.event)
        .collect()
}

fn assert_contiguous(messages: &[FeedMessage]) {
    for pair in messages.windows(2) {
        assert_eq!(
            pair[1].seq,
            pair[0].seq + 1,
            "{:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
}

#[tokio::test]
async fn each_task_s_life_arrives_in_order_completed_failed_and_cancelled() {
    let s = Server::start().await;
    let mut feed = s.connect("").await;
    s.heartbeat("n1", 1.0).await;

    let ok = s.submit().await;
    let run = s.pull_one("n1").await;
    s.report("n1", &run, "completed", None).await;
    let failing = s.submit().await;
    let run = s.pull_one("n1").await;
    s.report(
        "n1",
        &run,
        "failed",
        Some("ZeroDivisionError: division by zero"),
    )
    .await;
    let cancelled = s.submit().await;
    s.cancel(cancelled).await;

    let seen = feed.until(is(TaskCancelled, cancelled)).await;
    assert_contiguous(&seen);
    assert_eq!(seen[0].seq, 1, "the first event of a fresh coordinator");
    assert_eq!(
        kinds_of(&seen, ok),
        vec![TaskCreated, TaskStarted, TaskCompleted]
    );
    assert_eq!(
        kinds_of(&seen, failing),
        vec![TaskCreated, TaskStarted, TaskFailed]
    );
    assert_eq!(kinds_of(&seen, cancelled), vec![TaskCreated, TaskCancelled]);

    let of = |kind, id| {
        seen.iter()
            .find(|m| m.event == kind && m.data["task_id"] == id)
            .expect("event present")
    };
    let created = of(TaskCreated, ok);
    assert_eq!(created.data["status"], "pending");
    assert!(created.data["node_id"].is_null());
    assert!(created.ts > 1.6e9);
    let started = of(TaskStarted, ok);
    assert_eq!(started.data["status"], "running");
    assert_eq!(started.data["node_id"], "n1");
    assert_eq!(started.data["attempts"], 1);
    let done = of(TaskCompleted, ok);
    assert_eq!(done.data["status"], "completed");
    assert_eq!(done.data["node_id"], "n1");
    let failed = of(TaskFailed, failing);
    assert_eq!(failed.data["status"], "failed");
    assert_eq!(failed.data["error"], "ZeroDivisionError: division by zero");
    let gone = of(TaskCancelled, cancelled);
    assert_eq!(gone.data["status"], "cancelled");
    assert_eq!(gone.data["error"], "cancelled by request");

    // The node joined, turned busy with each run and idle after it.
    let n1: Vec<(FeedEventKind, Value)> = seen
        .iter()
        .filter(|m| m.data["node_id"] == "n1" && m.data.get("task_id").is_none())
        .map(|m| (m.event, m.data["status"].clone()))
        .collect();
    assert_eq!(
        n1,
        vec![
            (NodeJoined, json!("idle")),
            (NodeUpdated, json!("idle")),
            (NodeUpdated, json!("busy")),
            (NodeUpdated, json!("idle")),
            (NodeUpdated, json!("busy")),
            (NodeUpdated, json!("idle")),
        ]
    );
    // What the feed said is durable: the HTTP API agrees.
    let (_, status) = s.get(&format!("/status/{ok}")).await;
    assert_eq!(status["status"], "completed");
    feed.close().await;
    s.shutdown().await;
}

/// Tasks submitted while nodes' long-polls wait are leased to those nodes in the
/// submission's own commit (one fsync from submission to start, not two): the feed stamps
/// one commit's events with one time, so every `task_created` and `task_started` here
/// carries the same `ts`, and each waiting node is answered with its run. A task leased
/// in the submission's critical section starts at the very time it was created. (On
/// several worker threads, as the coordinator runs: on one, a woken long-poll could lease
/// before the writer commits anyway.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_submitted_to_waiting_nodes_are_leased_in_the_submission_s_commit() {
    let s = Server::start().await;
    let mut feed = s.connect("?events=task_created,task_started").await;
    let nodes = ["n1", "n2"];
    for node in nodes {
        s.heartbeat(node, 1.0).await;
    }
    let polls = s.parked_polls(&nodes).await;
    let (status, body) = s
        .post(
            "/api/v1/tasks/batch",
            json!({"tasks": [{"code": "print(1)"}, {"code": "print(2)"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut submitted: Vec<i64> = body["task_ids"]
        .as_array()
        .expect("task_ids")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    let mut leased = Vec::new();
    for poll in polls {
        let answer = tokio::time::timeout(WAIT, poll)
            .await
            .expect("the poll answered")
            .expect("poll task");
        assert_eq!(
            answer["tasks"].as_array().map(Vec::len),
            Some(1),
            "{answer}"
        );
        leased.push(answer["tasks"][0]["task_id"].as_i64().expect("task_id"));
    }
    leased.sort();
    submitted.sort();
    assert_eq!(leased, submitted);
    let mut seen = Vec::new();
    for &id in &submitted {
        let mut more = feed.until(is(TaskStarted, id)).await;
        seen.append(&mut more);
    }
    let created_and_started: Vec<f64> = seen
        .iter()
        .filter(|m| submitted.contains(&m.data["task_id"].as_i64().unwrap_or(0)))
        .map(|m| m.ts)
        .collect();
    assert_eq!(created_and_started.len(), 4, "{seen:?}");
    assert!(
        created_and_started
            .iter()
            .all(|&ts| ts == created_and_started[0]),
        "created and started in more than one commit: {seen:?}"
    );
    for id in submitted {
        let (_, task) = s.get(&format!("/api/v1/tasks/{id}")).await;
        assert_eq!(task["status"], "running", "{task}");
        assert_eq!(task["started_at"], task["created_at"], "{task}");
    }
    feed.close().await;
    s.shutdown().await;
}

#[tokio::test]
async fn a_task_whose_submitter_waits_is_announced_whole_with_its_result_s_commit() {
    let s = Server::start().await;
    let mut feed = s.connect("").await;
    s.heartbeat("n1", 1.0).await;
    // A fresh coordinator's first run waits for its lease to be durable (its id is past
    // those a restart skips): after one, runs are handed out ahead of their commits.
    let first = s.submit().await;
    let run = s.pull_one("n1").await;
    s.report("n1", &run, "completed", None).await;
    feed.until(is(TaskCompleted, first)).await;

    let poll = s.parked_polls(&["n1"]).await.remove(0);
    let url = format!("http://{}/api/v1/tasks?wait=30", s.addr);
    let submitted = tokio::spawn(async move {
        let resp = reqwest::Client::new()
            .post(url)
            .json(&json!({"code": "print(1)"}))
            .send()
            .await
            .expect("submit");
        decode(resp).await
    });
    let answer = tokio::time::timeout(WAIT, poll)
        .await
        .expect("the poll answered")
        .expect("poll task");
    let run = answer["tasks"][0].clone();
    let id = run["task_id"].as_i64().expect("task_id");
    s.report("n1", &run, "completed", None).await;
    let (status, task) = tokio::time::timeout(WAIT, submitted)
        .await
        .expect("answered")
        .expect("submit task");
    assert_eq!(status, StatusCode::CREATED, "{task}");
    assert_eq!(task["task_id"], id);
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["runs"][0]["stdout"], "1\n", "{task}");

    let seen = feed.until(is(TaskCompleted, id)).await;
    assert_eq!(
        kinds_of(&seen, id),
        vec![TaskCreated, TaskStarted, TaskCompleted]
    );
    // Its submission waited for its result's commit: one commit, one `ts`.
    let mine: Vec<f64> = seen
        .iter()
        .filter(|m| m.data["task_id"] == id)
        .map(|m| m.ts)
        .collect();
    assert!(mine.iter().all(|&ts| ts == mine[0]), "{seen:?}");
    let (_, stored) = s.get(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(stored["status"], "completed", "{stored}");
    assert_eq!(stored["created_at"], task["created_at"], "{stored}");
    feed.close().await;
    s.shutdown().await;
}

#[tokio::test]
async fn a_node_leaving_and_coming_back_is_announced() {
    let s = Server::start().await;
    let mut feed = s.connect("?node_id=n9").await;
    // A heartbeat saying goodbye, as a stopping agent sends.
    s.heartbeat("n9", 1.0).await;
    let (status, body) = s
        .post(
            "/internal/heartbeat",
            json!({"node_id": "n9", "status": "offline",
                   "resources": {"cpu_cores": 1.0, "memory_mb": 4096},
                   "current_load": {"cpu_percent": 1.0, "memory_percent": 2.0}, "running": []}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    s.heartbeat("n9", 1.0).await;
    let seen = feed.until(|m| m.event == NodeJoined && m.seq > 2).await;
    let got: Vec<(FeedEventKind, Value, Value)> = seen
        .iter()
        .map(|m| {
            (
                m.event,
                m.data["status"].clone(),
                m.data["previous_status"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (NodeJoined, json!("idle"), Value::Null),
            (NodeUpdated, json!("idle"), Value::Null),
            (NodeUpdated, json!("offline"), json!("idle")),
            (NodeLeft, json!("offline"), json!("idle")),
            (NodeJoined, json!("idle"), json!("offline")),
        ]
    );
    assert_eq!(seen[0].data["hostname"], "host-n9");
    feed.close().await;
    s.shutdown().await;
}

#[tokio::test]
async fn filters_deliver_only_matching_events() {
    let s = Server::start().await;
    let mut completed = s.connect("?events=task_completed").await;
    let mut of_task_2 = s.connect("?task_id=2").await;
    let mut on_n2 = s.connect("?node_id=n2").await;
    let mut combined = s
        .connect("?events=task_started,%20task_completed&node_id=n2")
        .await;

    s.heartbeat("n1", 1.0).await;
    s.heartbeat("n2", 1.0).await;
    let a = s.submit().await;
    let b = s.submit().await;
    assert_eq!((a, b), (1, 2));
    let run_a = s.pull_one("n1").await;
    let run_b = s.pull_one("n2").await;
    assert_eq!(
        (run_a["task_id"].as_i64(), run_b["task_id"].as_i64()),
        (Some(a), Some(b))
    );
    s.report("n1", &run_a, "completed", None).await;
    // The last event of all: every filter above matches it.
    s.report("n2", &run_b, "completed", None).await;

    let got = completed.until(is(TaskCompleted, b)).await;
    let summary: Vec<(FeedEventKind, Value)> = got
        .iter()
        .map(|m| (m.event, m.data["task_id"].clone()))
        .collect();
    assert_eq!(
        summary,
        vec![(TaskCompleted, json!(a)), (TaskCompleted, json!(b))]
    );

    let got = of_task_2.until(is(TaskCompleted, b)).await;
    assert_eq!(
        got.iter().map(|m| m.event).collect::<Vec<_>>(),
        vec![TaskCreated, TaskStarted, TaskCompleted]
    );
    assert!(got.iter().all(|m| m.data["task_id"] == b));

    let got = on_n2.until(is(TaskCompleted, b)).await;
    assert!(got.iter().all(|m| m.data["node_id"] == "n2"), "{got:?}");
    assert_eq!(
        got.iter().map(|m| m.event).collect::<Vec<_>>(),
        vec![
            NodeJoined,
            NodeUpdated,
            TaskStarted,
            NodeUpdated,
            NodeUpdated,
            TaskCompleted
        ]
    );

    let got = combined.until(is(TaskCompleted, b)).await;
    assert_eq!(
        got.iter().map(|m| m.event).collect::<Vec<_>>(),
        vec![TaskStarted, TaskCompleted]
    );
    s.shutdown().await;
}

#[tokio::test]
async fn bad_query_parameters_get_a_detail_never_a_500() {
    let s = Server::start().await;
    let cases = [
        ("?events=task_created,bogus", "unknown event \"bogus\""),
        ("?task_id=abc", "task_id must be an integer"),
        ("?since=-1", "since must be a non-negative integer"),
        ("?since=1.5", "since must be a non-negative integer"),
        ("?sinse=3", "unknown field `sinse`"),
        ("?batch=yes", "batch must be true or false"),
    ];
    for (query, expected) in cases {
        // A real WebSocket client is refused before the upgrade...
        match tokio_tungstenite::connect_async(s.ws_url(query)).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(
                    response.status(),
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "{query}"
                );
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                        .expect("JSON error body");
                let detail = body["detail"].as_str().unwrap_or_default();
                assert!(detail.contains(expected), "{query}: {detail}");
            }
            Err(e) => panic!("{query}: expected a 422, got {e}"),
            Ok(_) => panic!("{query}: expected a 422, got an upgrade"),
        }
        // ...and so is plain HTTP.
        let (status, body) = s.get(&format!("/ws/updates{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {body}");
    }
    // Plain HTTP with good parameters is told what the endpoint speaks.
    let (status, body) = s.get("/ws/updates?events=task_created").await;
    assert!(status.is_client_error(), "{status}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("WebSocket")),
        "{body}"
    );
    // Empty values mean no filter, as for the other list endpoints.
    let feed = s.connect("?events=&task_id=&node_id=&since=&batch=").await;
    feed.close().await;
    s.shutdown().await;
}

#[tokio::test]
async fn since_replays_exactly_what_a_reconnecting_client_missed() {
    let s = Server::start().await;
    let mut first = s.connect("").await;
    let t1 = s.submit().await;
    let seen = first.until(is(TaskCreated, t1)).await;
    let last_seq = seen.last().expect("one event").seq;
    first.close().await;

    // While it is away: three more tasks, one of them cancelled.
    let t2 = s.submit().await;
    let t3 = s.submit().await;
    s.cancel(t2).await;

    let mut again = s.connect(&format!("?since={last_seq}")).await;
    let t4 = s.submit().await;
    let replayed = again.until(is(TaskCreated, t4)).await;
    assert_eq!(
        replayed[0].seq,
        last_seq + 1,
        "nothing repeated, nothing skipped"
    );
    assert_contiguous(&replayed);
    let got: Vec<(FeedEventKind, Value)> = replayed
        .iter()
        .map(|m| (m.event, m.data["task_id"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (TaskCreated, json!(t2)),
            (TaskCreated, json!(t3)),
            (TaskCancelled, json!(t2)),
            (TaskCreated, json!(t4)),
        ]
    );

    // since=0 replays from the start, and filters apply to the replay too.
    let mut from_start = s.connect("?since=0&events=task_cancelled").await;
    let m = from_start.next().await;
    assert_eq!(
        (m.event, m.data["task_id"].clone()),
        (TaskCancelled, json!(t2))
    );
    s.shutdown().await;
}

#[tokio::test]
async fn since_older_than_the_ring_or_from_another_run_gets_a_lagged_notice() {
    let s = Server::start_with(FeedConfig {
        history: 4,
        ..FeedConfig::default()
    })
    .await;
    for _ in 0..10 {
        s.submit().await;
    }
    let mut old = s.connect("?since=2").await;
    let notice = old.next().await;
    assert_eq!(notice.event, Lagged);
    assert_eq!(notice.seq, 2, "the gap starts after the client's own seq");
    assert_eq!(notice.data["missed"], 4, "{notice:?}");
    assert!(
        notice.data["detail"]
            .as_str()
            .is_some_and(|d| d.contains("older than the replay buffer")),
        "{notice:?}"
    );
    let rest: Vec<u64> = [
        old.next().await,
        old.next().await,
        old.next().await,
        old.next().await,
    ]
    .iter()
    .map(|m| m.seq)
    .collect();
    assert_eq!(rest, vec![7, 8, 9, 10]);

    // A seq from before a restart: the client is told, then the feed goes on.
    let mut ahead = s.connect("?since=500").await;
    let notice = ahead.next().await;
    assert_eq!(notice.event, Lagged);
    assert!(notice.data["missed"].is_null(), "{notice:?}");
    assert!(
        notice.data["detail"]
            .as_str()
            .is_some_and(|d| d.contains("restarted")),
        "{notice:?}"
    );
    let t = s.submit().await;
    let next = ahead.next().await;
    assert_eq!((next.event, next.seq), (TaskCreated, 11));
    assert_eq!(next.data["task_id"], t);
    s.shutdown().await;
}

/// A client that never reads: a socket with a tiny receive buffer, so that the
/// coordinator's writes to it block soon, and no reads until the test says so.
async fn stuck_client(s: &Server, query: &str) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let stream = socket
        .connect(s.addr.parse().expect("address"))
        .await
        .expect("connect");
    let (socket, _) =
        tokio_tungstenite::client_async(s.ws_url(query), MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake");
    Client::new(socket)
}

/// One round of failing tasks on `node`: `n` submitted, pulled at once, each reported with a
/// long error (so its `task_failed` event is large and fills socket buffers quickly).
/// Returns the task ids.
async fn failing_round(s: &Server, node: &str, n: usize) -> Vec<i64> {
    let ids = futures::future::join_all((0..n).map(|_| s.submit())).await;
    let (status, pulled) = s
        .get(&format!("/internal/task?node_id={node}&wait=30&max={n}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{pulled}");
    let runs = pulled["tasks"].as_array().cloned().unwrap_or_default();
    assert_eq!(runs.len(), n, "{pulled}");
    let error = "E".repeat(1000);
    futures::future::join_all(
        runs.iter()
            .map(|run| s.report(node, run, "failed", Some(&error))),
    )
    .await;
    ids
}

#[tokio::test]
async fn a_client_that_does_not_read_gets_lagged_and_nobody_else_waits() {
    a_client_that_does_not_read_gets_lagged("").await;
}

#[tokio::test]
async fn a_batch_client_that_does_not_read_gets_lagged_in_its_arrays() {
    a_client_that_does_not_read_gets_lagged("?batch=true").await;
}

/// Both clients subscribe with `query`.
async fn a_client_that_does_not_read_gets_lagged(query: &str) {
    const BUFFER: usize = 256;
    const ROUND: usize = 20;
    let s = Server::start_with(FeedConfig {
        buffer: BUFFER,
        ..FeedConfig::default()
    })
    .await;
    // Room for every run at once, so the node never flips between idle and busy.
    s.heartbeat("n1", 10_000.0).await;
    let mut stuck = stuck_client(&s, query).await;
    let mut reader = s.connect(query).await;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<i64>();
    // The healthy client reads as events come, until the task the test names last.
    let healthy = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut done_rx = done_rx;
        let mut last = None;
        loop {
            tokio::select! {
                id = &mut done_rx, if last.is_none() => last = id.ok(),
                m = reader.next() => seen.push(m),
            }
            if let (Some(id), Some(m)) = (last, seen.last())
                && m.event == TaskFailed
                && m.data["task_id"] == id
            {
                return seen;
            }
        }
    });

    // Scheduling goes on at full speed although one subscriber reads nothing, until that
    // subscriber is a whole buffer behind (its socket buffers full), and one round more.
    let mut rounds = 0;
    let last_id = loop {
        failing_round(&s, "n1", ROUND).await;
        rounds += 1;
        let (_, health) = s.get("/health").await;
        if health["feed"]["slowest_backlog"] == health["feed"]["buffer"] {
            rounds += 1;
            break *failing_round(&s, "n1", ROUND).await.last().expect("ids");
        }
        assert!(
            rounds < 1000,
            "the stuck client never fell a buffer behind: {health}"
        );
    };
    eprintln!("the stuck client fell a buffer behind after {rounds} rounds");
    let total_tasks = (rounds * ROUND) as u64;
    let _ = done_tx.send(last_id);
    let healthy = tokio::time::timeout(WAIT, healthy)
        .await
        .expect("the healthy client keeps up")
        .expect("reader task");
    assert!(
        healthy.iter().all(|m| m.event != Lagged),
        "no lagged for it"
    );
    assert_contiguous(&healthy);
    let failed = healthy.iter().filter(|m| m.event == TaskFailed).count() as u64;
    assert_eq!(failed, total_tasks, "every event reached it");

    // Now the stuck client reads: what fit in its buffers, then the notice, then the rest.
    let newest = s.get("/health").await.1["feed"]["newest_seq"]
        .as_u64()
        .expect("newest_seq");
    let got = stuck.until(|m| m.seq == newest && m.event != Lagged).await;
    let notices: Vec<&FeedMessage> = got.iter().filter(|m| m.event == Lagged).collect();
    assert!(
        !notices.is_empty(),
        "a client that does not read is told it lagged"
    );
    let missed: u64 = notices
        .iter()
        .map(|n| n.data["missed"].as_u64().expect("missed is a count"))
        .sum();
    assert!(missed > 0);
    // Every event is accounted for, in order: delivered, or counted in a notice.
    let mut expected = got[0].seq;
    for m in &got {
        if m.event == Lagged {
            assert_eq!(
                m.seq + 1,
                expected,
                "the notice names the last seq before the gap"
            );
            expected += m.data["missed"].as_u64().unwrap_or(0);
        } else {
            assert_eq!(m.seq, expected);
            expected += 1;
        }
    }
    assert_eq!(expected, newest + 1);
    if query.contains("batch=true") {
        assert_eq!(
            stuck.objects, 0,
            "with batch=true every message is an array"
        );
        assert!(
            stuck.sizes.iter().all(|&n| n <= 256),
            "at most 256 events per array: {:?}",
            stuck.sizes
        );
    } else {
        assert!(stuck.sizes.iter().all(|&n| n == 1), "one event per message");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn batch_true_sends_the_same_events_in_arrays() {
    const TASKS: usize = 300;
    let s = Server::start().await;
    let mut single = s.connect("").await;
    let mut batched = s.connect("?batch=true").await;
    let mut one = s.connect("?batch=1").await;
    let mut off = s.connect("?batch=false").await;
    let mut created = s.connect("?batch=true&events=task_created").await;
    let code: Vec<Value> = (0..TASKS)
        .map(|i| json!({"code": format!("print({i})")}))
        .collect();
    let (status, body) = s.post("/api/v1/tasks/batch", json!({"tasks": code})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let ids: Vec<i64> = body["task_ids"]
        .as_array()
        .expect("task_ids")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert_eq!(ids.len(), TASKS);
    let last = *ids.last().expect("ids");
    s.cancel(ids[0]).await;
    s.cancel(last).await;

    let seen = |messages: &[FeedMessage]| -> Vec<(u64, FeedEventKind, Value)> {
        messages
            .iter()
            .map(|m| (m.seq, m.event, m.data["task_id"].clone()))
            .collect()
    };
    let reference = single.until(is(TaskCancelled, last)).await;
    assert_eq!(reference.len(), TASKS + 2);
    assert_contiguous(&reference);
    assert_eq!(
        single.objects,
        reference.len(),
        "without batch, one object each"
    );
    let got = batched.until(is(TaskCancelled, last)).await;
    assert_eq!(seen(&got), seen(&reference));
    assert_eq!(
        batched.objects, 0,
        "with batch=true every message is an array"
    );
    assert_eq!(batched.sizes.iter().sum::<usize>(), got.len());
    // A filtered batch connection builds its arrays of what it wants.
    let only_created = created.until(is(TaskCreated, last)).await;
    assert_eq!(only_created.len(), TASKS);
    assert_eq!(
        created.objects, 0,
        "with batch=true every message is an array"
    );
    assert_eq!(created.sizes.iter().sum::<usize>(), TASKS);
    // `1` is `true` and `false` is the default.
    assert_eq!(
        seen(&one.until(is(TaskCancelled, last)).await),
        seen(&reference)
    );
    assert_eq!(one.objects, 0, "batch=1 sends arrays");
    assert_eq!(
        seen(&off.until(is(TaskCancelled, last)).await),
        seen(&reference)
    );
    assert_eq!(
        off.objects,
        reference.len(),
        "batch=false sends one object each"
    );

    // A replay goes out in arrays of at most 256 events: the backlog is queued at once,
    // so the first array is full.
    let mut replayed = s.connect("?since=0&batch=true").await;
    let again = replayed.until(is(TaskCancelled, last)).await;
    assert_eq!(seen(&again), seen(&reference));
    assert_eq!(replayed.sizes, vec![256, TASKS + 2 - 256]);
    s.shutdown().await;
}

#[tokio::test]
async fn fifty_clients_each_see_every_event_in_the_same_order() {
    const CLIENTS: usize = 50;
    let s = Server::start().await;
    let clients = futures::future::join_all((0..CLIENTS).map(|_| s.connect(""))).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(s.submit().await);
    }
    let cancelled: Vec<i64> = ids.iter().step_by(2).copied().collect();
    for id in &cancelled {
        s.cancel(*id).await;
    }
    let last = *cancelled.last().expect("a cancelled task");
    let streams = futures::future::join_all(
        clients
            .into_iter()
            .map(|mut c| async move { c.until(is(TaskCancelled, last)).await }),
    )
    .await;
    let reference: Vec<(u64, FeedEventKind, Value)> = streams[0]
        .iter()
        .map(|m| (m.seq, m.event, m.data["task_id"].clone()))
        .collect();
    assert_eq!(reference.len(), 30);
    assert_eq!(reference[0].0, 1);
    assert_contiguous(&streams[0]);
    for stream in &streams {
        let got: Vec<(u64, FeedEventKind, Value)> = stream
            .iter()
            .map(|m| (m.seq, m.event, m.data["task_id"].clone()))
            .collect();
        assert_eq!(got, reference);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn the_python_websockets_client_follows_a_task_filters_and_replays() {
    let s = Server::start().await;
    s.heartbeat("py-node", 1.0).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python/ws_feed.py");
    let python = tokio::process::Command::new("python3")
        .arg(script)
        .arg(format!("http://{}", s.addr))
        .kill_on_drop(true)
        .output();
    // Play the agent: run whatever the script submits.
    let agent = async {
        let run = s.pull_one("py-node").await;
        s.report("py-node", &run, "completed", None).await;
    };
    let (output, ()) = tokio::join!(
        async {
            tokio::time::timeout(WAIT, python)
                .await
                .expect("the script ends in time")
                .expect("python3 runs")
        },
        agent
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("ok: "), "{stdout}");
    s.shutdown().await;
}

#[tokio::test]
async fn subscribers_are_closed_when_the_coordinator_stops() {
    let s = Server::start().await;
    let mut feed = s.connect("").await;
    s.stop.cancel();
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match feed.socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await
    .expect("the feed ends when the coordinator stops");
    assert_eq!(end, Some(1001));
    tokio::time::timeout(WAIT, s.task)
        .await
        .expect("coordinator stops in time")
        .expect("coordinator task");
}

#[tokio::test]
async fn drain_and_undrain_are_announced_as_node_status_changes() {
    let s = Server::start().await;
    s.heartbeat("n7", 1.0).await;
    let mut feed = s.connect("?node_id=n7&events=node_updated").await;
    s.submit().await;
    let run = s.pull_one("n7").await;
    let (status, body) = s.post("/api/v1/nodes/n7/drain", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    s.report("n7", &run, "completed", None).await;
    let (status, body) = s.post("/api/v1/nodes/n7/undrain", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen = feed
        .until(|m| m.data["status"] == "idle" && m.data["previous_status"] == "drained")
        .await;
    let got: Vec<(Value, Value)> = seen
        .iter()
        .map(|m| (m.data["status"].clone(), m.data["previous_status"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!("busy"), json!("idle")),
            (json!("draining"), json!("busy")),
            (json!("drained"), json!("draining")),
            (json!("idle"), json!("drained")),
        ]
    );
    feed.close().await;
    s.shutdown().await;
}
