//! End-to-end: real coordinator and agent processes on 127.0.0.1, real Python.

use lull_tests::{
    Coordinator, Process, agent_log_has, start_agent, start_agent_logging_to, wait_until,
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Fast heartbeats so that failure detection takes seconds, not tens of seconds.
const FAST: &[&str] = &["--heartbeat-interval", "0.3", "--node-ttl", "2"];
const AGENT_FAST: &[&str] = &["--heartbeat-interval", "0.3"];

/// A coordinator with no agent of its own and fast heartbeats.
fn dedicated_args() -> Vec<&'static str> {
    let mut args = vec!["--local-agents", "0"];
    args.extend_from_slice(FAST);
    args
}

/// For a test that kills the coordinator (SIGKILL) and starts it again on the same address
/// and database ([`dedicated_args`]).
struct Restartable {
    data: PathBuf,
    addr: String,
}

impl Restartable {
    /// A coordinator with its database in `dir/coord`, and how to start it again.
    fn start(dir: &Path) -> (Coordinator, Restartable) {
        let data = dir.join("coord");
        let c = Coordinator::start(&data, &dedicated_args()).expect("coordinator");
        let addr = c.addr().to_string();
        (c, Restartable { data, addr })
    }

    fn again(&self) -> Coordinator {
        Coordinator::start_on(&self.addr, &self.data, &dedicated_args())
            .expect("coordinator restarts")
    }
}

fn agent_args<'a>(node_id: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--node-id", node_id];
    args.extend_from_slice(AGENT_FAST);
    args.extend_from_slice(extra);
    args
}

/// An agent of two CPUs with the tests' fast settings, as node `node_id`, its state in
/// `state_dir`.
fn two_cpu_agent(url: &str, state_dir: &Path, node_id: &str) -> Process {
    start_agent(url, state_dir, &agent_args(node_id, &["--cpus", "2"]))
        .unwrap_or_else(|err| panic!("agent {node_id}: {err}"))
}

async fn wait_terminal(c: &Coordinator, task_id: i64, limit: Duration) -> Value {
    wait_until(limit, &format!("task {task_id} to finish"), || async {
        let st = c.status(task_id).await.ok()?;
        matches!(
            st["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
        .then_some(st)
    })
    .await
}

/// Waits (up to five minutes) until every task of `ids` has completed.
async fn wait_all_completed(c: &Coordinator, ids: &[i64], what: &str) {
    wait_until(Duration::from_secs(300), what, || async {
        for id in ids {
            if c.status(*id).await.ok()?["status"] != "completed" {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// Every task in `expected` (id → result) completed with that result, with exactly one
/// completed run.
async fn assert_each_completed_once(c: &Coordinator, expected: &HashMap<i64, String>) {
    for (id, want) in expected {
        let task = c.task(*id).await.expect("task");
        assert_eq!(task["status"], "completed", "task {id}: {task}");
        assert_eq!(task["result"].as_str(), Some(want.as_str()), "task {id}");
        let completed = task["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .filter(|r| r["status"] == "completed")
            .count();
        assert_eq!(completed, 1, "task {id} must complete exactly once: {task}");
    }
}

#[tokio::test]
async fn the_seed_python_client_runs_verbatim_against_the_default_setup() {
    let dir = tempfile::tempdir().expect("dir");
    // The default: one embedded local agent.
    let c = Coordinator::start(dir.path(), &[]).expect("coordinator");
    let script = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/seed_client.py"
    ))
    .expect("seed client");
    // Only the address changes: the test's coordinator listens on a free port.
    let script = script.replace("http://localhost:8000", &c.url);
    let path = dir.path().join("seed_client.py");
    std::fs::write(&path, script).expect("write script");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("python3")
            .arg(&path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the client finishes")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout {stdout}\nstderr {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("任务提交成功，ID: 1"), "{stdout}");
    assert!(stdout.contains("任务完成，结果: 2"), "{stdout}");
}

#[tokio::test]
async fn the_seed_curl_examples_work() {
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(dir.path(), &[]).expect("coordinator");
    let curl = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("curl")
            .args(["-s", "--max-time", "30"])
            .args(&args)
            .output()
            .await
            .expect("curl runs");
        assert!(out.status.success(), "curl {args:?} failed");
        serde_json::from_slice::<Value>(&out.stdout).expect("JSON answer")
    };
    let root = curl(vec![format!("{}/", c.url)]).await;
    assert_eq!(root["status"], "running");
    let submitted = curl(vec![
        "-X".into(),
        "POST".into(),
        format!("{}/submit", c.url),
        "-H".into(),
        "Content-Type: application/json".into(),
        "-d".into(),
        r#"{"code": "print(\"Hello from cURL\")"}"#.into(),
    ])
    .await;
    assert_eq!(submitted["task_id"], 1);
    let done = wait_terminal(&c, 1, Duration::from_secs(60)).await;
    assert_eq!(done["result"], "Hello from cURL");
    let status = curl(vec![format!("{}/status/1", c.url)]).await;
    assert_eq!(status["status"], "completed");
    let stats = curl(vec![format!("{}/stats", c.url)]).await;
    assert_eq!(stats["tasks"]["completed"], 1);
    assert_eq!(stats["nodes"]["total"], 1);
}

#[tokio::test]
async fn five_hundred_tasks_from_two_clients_complete_exactly_once() {
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("coord"), &["--local-agents", "0"])
        .expect("coordinator");
    let _a = two_cpu_agent(&c.url, &dir.path().join("a"), "a");
    let _b = two_cpu_agent(&c.url, &dir.path().join("b"), "b");
    c.wait_for_nodes(2).await;

    let started = Instant::now();
    let clients: Vec<_> = (0..2)
        .map(|client| {
            let url = c.url.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut mine = HashMap::new();
                for i in 0..250 {
                    let n = client * 1000 + i;
                    let resp: Value = http
                        .post(format!("{url}/submit"))
                        .json(&serde_json::json!({"code": format!("print({n} * 2)")}))
                        .send()
                        .await
                        .expect("submit")
                        .json()
                        .await
                        .expect("json");
                    mine.insert(
                        resp["task_id"].as_i64().expect("task_id"),
                        (n * 2).to_string(),
                    );
                }
                mine
            })
        })
        .collect();
    let mut expected = HashMap::new();
    for client in clients {
        expected.extend(client.await.expect("client"));
    }
    assert_eq!(expected.len(), 500, "500 distinct task ids");
    wait_until(
        Duration::from_secs(300),
        "500 tasks to complete",
        || async {
            let stats = c.get("/stats").await.ok()?;
            (stats["tasks"]["completed"] == 500).then_some(())
        },
    )
    .await;
    eprintln!(
        "500 tasks end to end through 2 agents: {:?}",
        started.elapsed()
    );
    assert_each_completed_once(&c, &expected).await;
    let stats = c.get("/stats").await.expect("stats");
    assert_eq!(stats["tasks"]["total"], 500);
    assert_eq!(stats["tasks"]["failed"], 0);
}

#[tokio::test]
async fn an_agent_killed_mid_task_loses_nothing_the_task_completes_elsewhere() {
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("coord"), &dedicated_args()).expect("coordinator");
    let mut doomed =
        start_agent(&c.url, &dir.path().join("a"), &agent_args("doomed", &[])).expect("agent");
    c.wait_for_nodes(1).await;
    let id = c
        .submit("import time\ntime.sleep(2)\nprint('survived')")
        .await
        .expect("submit");
    wait_until(
        Duration::from_secs(30),
        "the task to run on the doomed agent",
        || async {
            let st = c.status(id).await.ok()?;
            (st["status"] == "running" && st["node_id"] == "doomed").then_some(())
        },
    )
    .await;
    let _rescuer =
        start_agent(&c.url, &dir.path().join("b"), &agent_args("rescuer", &[])).expect("agent");
    doomed.kill9();

    let done = wait_terminal(&c, id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"], "survived");
    assert_eq!(done["node_id"], "rescuer");
    let task = c.task(id).await.expect("task");
    let runs = task["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{task}");
    assert_eq!(runs[0]["node_id"], "doomed");
    assert_eq!(runs[0]["status"], "lost");
    assert_eq!(runs[1]["status"], "completed");
}

#[tokio::test]
async fn the_coordinator_killed_under_load_and_restarted_loses_no_task_and_completes_none_twice() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut c, restartable) = Restartable::start(dir.path());
    let _a = two_cpu_agent(&c.url, &dir.path().join("a"), "a");
    let _b = two_cpu_agent(&c.url, &dir.path().join("b"), "b");
    c.wait_for_nodes(2).await;

    // Submit steadily; kill the coordinator with SIGKILL part way; restart it on the same
    // address; keep submitting. Only answered submissions count as accepted.
    let mut expected = HashMap::new();
    let mut i = 0u32;
    while expected.len() < 120 {
        i += 1;
        if let Ok(id) = c
            .submit(&format!("import time; time.sleep(0.05); print({i})"))
            .await
        {
            expected.insert(id, i.to_string());
        }
        assert!(i < 10_000, "bounded");
    }
    c.process.kill9();
    let c = restartable.again();
    while expected.len() < 200 {
        i += 1;
        if let Ok(id) = c.submit(&format!("print({i})")).await {
            expected.insert(id, i.to_string());
        }
        assert!(i < 10_000, "bounded");
    }
    let ids: Vec<i64> = expected.keys().copied().collect();
    wait_all_completed(&c, &ids, "every accepted task to complete").await;
    assert_each_completed_once(&c, &expected).await;
}

/// `n` tasks numbered from `first`, each sleeping `sleep` seconds and printing its number:
/// (code, expected result).
fn sleep_and_print(first: u32, n: u32, sleep: &str) -> Vec<(String, String)> {
    (first..first + n)
        .map(|i| {
            (
                format!("import time; time.sleep({sleep}); print({i})"),
                i.to_string(),
            )
        })
        .collect()
}

/// Submits `codes` in one `POST /api/v1/tasks/batch`; answers id → expected result for an
/// accepted batch (each code prints its own result), nothing for a refused one.
async fn submit_batch(c: &Coordinator, codes: &[(String, String)]) -> HashMap<i64, String> {
    let body = serde_json::json!({
        "tasks": codes.iter().map(|(code, _)| serde_json::json!({"code": code})).collect::<Vec<_>>()
    });
    let Ok(answer) = c.post("/api/v1/tasks/batch", &body).await else {
        return HashMap::new();
    };
    let ids = answer["task_ids"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        ids.len(),
        codes.len(),
        "an accepted batch is accepted whole: {answer}"
    );
    ids.iter()
        .zip(codes)
        .map(|(id, (_, result))| (id.as_i64().expect("task id"), result.clone()))
        .collect()
}

fn json_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn batches_through_a_coordinator_killed_mid_flow_complete_every_accepted_task_once() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut c, restartable) = Restartable::start(dir.path());
    let outboxes = [dir.path().join("a"), dir.path().join("b")];
    let _a = two_cpu_agent(&c.url, &outboxes[0], "a");
    let _b = two_cpu_agent(&c.url, &outboxes[1], "b");
    c.wait_for_nodes(2).await;

    // Batches in flight on both agents; kill the coordinator with SIGKILL while runs are
    // under way, so that their results pile up in the agents' outboxes.
    let mut expected = HashMap::new();
    for k in 0..3 {
        let accepted = submit_batch(&c, &sleep_and_print(k * 40, 40, "0.2")).await;
        assert_eq!(accepted.len(), 40, "batch {k} accepted");
        expected.extend(accepted);
    }
    wait_until(
        Duration::from_secs(60),
        "some tasks to complete",
        || async {
            let stats = c.get("/stats").await.ok()?;
            (stats["tasks"]["completed"].as_u64()? >= 4).then_some(())
        },
    )
    .await;
    c.process.kill9();
    wait_until(
        Duration::from_secs(30),
        "results to wait together in an agent's outbox",
        || async {
            // Two or more in one outbox: that agent posts them as one batch once it can.
            outboxes
                .iter()
                .any(|d| json_files(&d.join("outbox")) >= 2)
                .then_some(())
        },
    )
    .await;

    // Back on the same address: the agents post what waited (together, through
    // `POST /internal/results`), and more batches arrive.
    let c = restartable.again();
    for k in 3..5 {
        let accepted = submit_batch(&c, &sleep_and_print(k * 40, 40, "0")).await;
        assert_eq!(accepted.len(), 40, "batch {k} accepted after the restart");
        expected.extend(accepted);
    }
    let ids: Vec<i64> = expected.keys().copied().collect();
    wait_all_completed(&c, &ids, "every accepted task to complete").await;
    assert_eq!(expected.len(), 200);
    assert_each_completed_once(&c, &expected).await;
    let stats = c.get("/stats").await.expect("stats");
    assert_eq!(stats["tasks"]["total"], 200, "{stats}");
    assert_eq!(stats["tasks"]["completed"], 200, "{stats}");
    wait_until(Duration::from_secs(30), "the outboxes to empty", || async {
        (outboxes
            .iter()
            .map(|d| json_files(&d.join("outbox")))
            .sum::<usize>()
            == 0)
            .then_some(())
    })
    .await;
}

/// `POST /api/v1/tasks?wait=` for each of `codes` at once (`wait` seconds): id → (expected
/// result, the answer) for each one answered, nothing for one that was not.
async fn submit_and_wait(
    c: &Coordinator,
    codes: Vec<(String, String)>,
    wait: u32,
) -> HashMap<i64, (String, Value)> {
    let mut requests = tokio::task::JoinSet::new();
    for (code, want) in codes {
        let request = c
            .http
            .post(format!("{}/api/v1/tasks?wait={wait}", c.url))
            .json(&serde_json::json!({ "code": code }));
        requests.spawn(async move {
            let resp = request.send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let answer: Value = resp.json().await.ok()?;
            Some((answer["task_id"].as_i64()?, (want, answer)))
        });
    }
    let mut answered = HashMap::new();
    while let Some(joined) = requests.join_next().await {
        answered.extend(joined.expect("request task"));
    }
    answered
}

#[tokio::test]
async fn waited_for_submissions_through_a_coordinator_killed_mid_flow_lose_no_answered_task() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut c, restartable) = Restartable::start(dir.path());
    let _a = two_cpu_agent(&c.url, &dir.path().join("a"), "a");
    c.wait_for_nodes(1).await;

    // Their submissions' commits are deferred to their results'; the ones answered at once
    // (`wait=0`, still pending) must be durable by then, the others with their results.
    let mut answered = HashMap::new();
    let mut next = 0;
    for round in 0..6 {
        let wait = if round % 2 == 0 { 0 } else { 10 };
        answered.extend(submit_and_wait(&c, sleep_and_print(next, 4, "0.1"), wait).await);
        next += 4;
    }
    // Killed with tasks in flight: some submitted and not yet finished, their clients
    // waiting (they get no answer: not accepted, whatever became of them).
    let in_flight = tokio::spawn({
        let url = c.url.clone();
        let codes = sleep_and_print(next, 4, "0.1");
        async move {
            let client = reqwest::Client::new();
            for (code, _) in codes {
                let _ = client
                    .post(format!("{url}/api/v1/tasks?wait=10"))
                    .json(&serde_json::json!({ "code": code }))
                    .send()
                    .await;
            }
        }
    });
    next += 4;
    wait_until(Duration::from_secs(30), "a task in flight", || async {
        let stats = c.get("/stats").await.ok()?;
        (stats["tasks"]["running"].as_u64()? >= 1).then_some(())
    })
    .await;
    c.process.kill9();
    let _ = in_flight.await;

    let c = restartable.again();
    for round in 0..4 {
        let wait = if round % 2 == 0 { 0 } else { 10 };
        answered.extend(submit_and_wait(&c, sleep_and_print(next, 4, "0.1"), wait).await);
        next += 4;
    }
    assert!(answered.len() >= 36, "{} answered", answered.len());
    let ids: Vec<i64> = answered.keys().copied().collect();
    wait_all_completed(&c, &ids, "every answered task to complete").await;
    let expected: HashMap<i64, String> = answered
        .iter()
        .map(|(id, (want, _))| (*id, want.clone()))
        .collect();
    assert_each_completed_once(&c, &expected).await;
    // An answer that said completed said what the store still says.
    for (id, (_, answer)) in &answered {
        if answer["status"] == "completed" {
            let task = c.task(*id).await.expect("task");
            assert_eq!(task["result"], answer["result"], "task {id}");
            assert_eq!(task["runs"], answer["runs"], "task {id}");
        }
    }
}

#[tokio::test]
async fn a_result_made_while_the_coordinator_is_down_is_delivered_after_it_returns() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut c, restartable) = Restartable::start(dir.path());
    let agent_dir = dir.path().join("a");
    let log = dir.path().join("agent.log");
    let _a =
        start_agent_logging_to(&c.url, &agent_dir, &agent_args("a", &[]), &log).expect("agent");
    c.wait_for_nodes(1).await;
    let id = c
        .submit("import time\ntime.sleep(1.5)\nprint('kept')")
        .await
        .expect("submit");
    // Running by the agent's own word, not only leased by the coordinator's: the lease is
    // durable (and the task `running`) a moment before the agent holds the answer.
    let started = format!("task_id={id} ");
    wait_until(
        Duration::from_secs(30),
        "the agent to start the run",
        || async { agent_log_has(&log, &["run started", &started]).then_some(()) },
    )
    .await;
    c.process.kill9();
    // The run finishes while nobody can take its result: the agent keeps it on disk.
    let outbox = agent_dir.join("outbox");
    wait_until(
        Duration::from_secs(30),
        "the result to be kept in the agent's outbox",
        || async { (json_files(&outbox) == 1).then_some(()) },
    )
    .await;
    let c = restartable.again();
    let done = wait_terminal(&c, id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["result"], "kept");
    let task = c.task(id).await.expect("task");
    assert_eq!(
        task["runs"].as_array().map(Vec::len),
        Some(1),
        "not run again: {task}"
    );
    wait_until(Duration::from_secs(30), "the outbox to empty", || async {
        (json_files(&outbox) == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stopping_agent_hands_back_unfinished_work() {
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("coord"), &dedicated_args()).expect("coordinator");
    let mut leaving = start_agent(
        &c.url,
        &dir.path().join("a"),
        &agent_args("leaving", &["--shutdown-grace", "1"]),
    )
    .expect("agent");
    c.wait_for_nodes(1).await;
    let quick = c
        .submit("import time\ntime.sleep(0.3)\nprint('finished in grace')")
        .await
        .expect("submit");
    let slow = c
        .submit("import time\ntime.sleep(120)\nprint('finished elsewhere')")
        .await
        .expect("submit");
    wait_until(Duration::from_secs(30), "both tasks to run", || async {
        let a = c.status(quick).await.ok()?;
        let b = c.status(slow).await.ok()?;
        (a["status"] == "running" && b["status"] == "running").then_some(())
    })
    .await;
    assert!(
        leaving.terminate(Duration::from_secs(30)),
        "the agent exits cleanly on SIGTERM"
    );
    let q = wait_terminal(&c, quick, Duration::from_secs(30)).await;
    assert_eq!(q["result"], "finished in grace");
    // The slow one was handed back, not failed and not lost.
    let st = c.task(slow).await.expect("task");
    assert_eq!(st["status"], "pending", "{st}");
    assert_eq!(st["runs"][0]["status"], "released");
    let stats = c.get("/stats").await.expect("stats");
    assert_eq!(
        stats["nodes"]["offline"], 1,
        "the agent said goodbye: {stats}"
    );
}

#[tokio::test]
async fn cancel_kills_the_whole_process_tree_on_the_node() {
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("coord"), &dedicated_args()).expect("coordinator");
    // A uid of its own, so that this run's processes are found from the host by owner.
    const UID: u32 = 64_001;
    let _a = start_agent(
        &c.url,
        &dir.path().join("a"),
        &agent_args("a", &["--sandbox-uid", "64001", "--sandbox-gid", "64001"]),
    )
    .expect("agent");
    c.wait_for_nodes(1).await;
    let node = c.get("/api/v1/nodes").await.expect("nodes")["items"][0].clone();
    assert_eq!(
        node["sandbox"]["drop_user"], true,
        "this test finds a run's processes by their uid: it needs an agent that can drop to one (root): {node}"
    );
    // A child that makes its own session, and a grandchild: both must die with the run.
    let code = "import subprocess, time\n\
                subprocess.Popen(['sleep', '300'], start_new_session=True)\n\
                subprocess.Popen(['sh', '-c', 'sleep 300 & sleep 300'])\n\
                time.sleep(300)\n";
    let id = c.submit(code).await.expect("submit");
    wait_until(
        Duration::from_secs(30),
        "the task to start its processes",
        || async { (c.status(id).await.ok()?["status"] == "running").then_some(()) },
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the run's tree to be up",
        || async { (lull_tests::processes_of_uid(UID).len() >= 5).then_some(()) },
    )
    .await;
    let resp = c
        .http
        .post(format!("{}/api/v1/tasks/{id}/cancel", c.url))
        .send()
        .await
        .expect("cancel");
    assert_eq!(resp.status(), 200);
    wait_until(
        Duration::from_secs(30),
        "every process of the run to die",
        || async { lull_tests::processes_of_uid(UID).is_empty().then_some(()) },
    )
    .await;
    assert_eq!(c.status(id).await.expect("status")["status"], "cancelled");
}

#[test]
fn binaries_are_where_the_harness_looks() {
    assert!(
        Path::new(&lull_tests::bin_dir())
            .join("lull-coordinator")
            .exists()
    );
    assert!(
        Path::new(&lull_tests::bin_dir())
            .join("lull-agent")
            .exists()
    );
}

#[tokio::test]
async fn an_agent_below_the_required_sandbox_level_refuses_to_start() {
    let dir = tempfile::tempdir().expect("dir");
    // Without its launcher an agent can only reach level `none`.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(lull_tests::bin_dir().join("lull-agent"))
            .args([
                "--coordinator",
                "http://127.0.0.1:9",
                "--min-sandbox-level",
                "basic",
            ])
            .arg("--state-dir")
            .arg(dir.path())
            .args(["--sandbox-launcher", "/nonexistent/lull-sandbox"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the agent gives up at once")
    .expect("agent runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sandbox level is none, below the required basic"),
        "{stderr}"
    );
}

/// Code that sleeps and prints when it started and ended (Unix seconds).
const TIMED_SLEEP: &str =
    "import time\nstart = time.time()\ntime.sleep(1.5)\nprint(start, time.time())";

/// A coordinator with `--prefetch 2` and one agent with 1 cpu (`extra` agent flags) holding
/// three `TIMED_SLEEP` tasks: one running, two waiting on the node for its slot.
async fn one_slot_holding_three(
    dir: &Path,
    node_id: &str,
    extra: &[&str],
) -> (Coordinator, lull_tests::Process, Vec<i64>) {
    let mut args = vec!["--local-agents", "0", "--prefetch", "2"];
    args.extend_from_slice(FAST);
    let c = Coordinator::start(&dir.join("coord"), &args).expect("coordinator");
    let mut agent_extra = vec!["--cpus", "1"];
    agent_extra.extend_from_slice(extra);
    let agent =
        start_agent(&c.url, &dir.join("a"), &agent_args(node_id, &agent_extra)).expect("agent");
    c.wait_for_nodes(1).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(c.submit(TIMED_SLEEP).await.expect("submit"));
    }
    wait_until(
        Duration::from_secs(30),
        "all three to be on the node",
        || async {
            let mut on_node = 0;
            for id in &ids {
                on_node += usize::from(c.status(*id).await.ok()?["status"] == "running");
            }
            (on_node == 3).then_some(())
        },
    )
    .await;
    (c, agent, ids)
}

#[tokio::test]
async fn a_full_node_holds_prefetched_runs_but_never_runs_more_than_its_capacity() {
    let dir = tempfile::tempdir().expect("dir");
    let (c, _agent, ids) = one_slot_holding_three(dir.path(), "one-slot", &[]).await;
    let mut spans = Vec::new();
    for id in &ids {
        let task = wait_terminal(&c, *id, Duration::from_secs(60)).await;
        assert_eq!(task["status"], "completed", "{task}");
        let times: Vec<f64> = task["result"]
            .as_str()
            .expect("result")
            .split_whitespace()
            .map(|t| t.parse().expect("a time"))
            .collect();
        spans.push((times[0], times[1]));
    }
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in spans.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "a 1-cpu node ran two tasks at once: {spans:?}"
        );
    }
}

#[tokio::test]
async fn a_stopping_agent_hands_back_at_once_the_runs_that_had_not_started() {
    let dir = tempfile::tempdir().expect("dir");
    let (c, mut agent, ids) =
        one_slot_holding_three(dir.path(), "leaving", &["--shutdown-grace", "30"]).await;
    assert!(
        agent.terminate(Duration::from_secs(60)),
        "the agent exits cleanly on SIGTERM"
    );
    // The running one finished within the grace period; the waiting ones were handed back
    // without waiting for it, and count as no attempt.
    let states: Vec<Value> = {
        let mut out = Vec::new();
        for id in &ids {
            out.push(c.task(*id).await.expect("task"));
        }
        out
    };
    let completed = states.iter().filter(|t| t["status"] == "completed").count();
    assert_eq!(completed, 1, "{states:?}");
    for task in states.iter().filter(|t| t["status"] != "completed") {
        assert_eq!(task["status"], "pending", "{task}");
        assert_eq!(task["runs"][0]["status"], "released", "{task}");
        assert!(
            task["runs"][0]["exit_code"].is_null(),
            "it never ran: {task}"
        );
    }
}
