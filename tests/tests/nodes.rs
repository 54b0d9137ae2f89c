//! End-to-end node management (seed 004) with real coordinator and agent processes:
//! drain with a deadline, restart of a real agent, operator metadata steering placement.

use lull_tests::{Coordinator, start_agent, wait_until};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const COORD_FAST: &[&str] = &[
    "--local-agents",
    "0",
    "--heartbeat-interval",
    "0.3",
    "--node-ttl",
    "3",
];

fn start_node(c: &Coordinator, dir: &Path, node_id: &str, extra: &[&str]) -> lull_tests::Process {
    let mut args = vec![
        "--node-id",
        node_id,
        "--heartbeat-interval",
        "0.3",
        "--cpus",
        "2",
        "--memory-mb",
        "4096",
    ];
    args.extend_from_slice(extra);
    start_agent(&c.url, &dir.join(node_id), &args).expect("agent starts")
}

async fn node(c: &Coordinator, node_id: &str) -> Option<Value> {
    let nodes = c.get("/api/v1/nodes").await.ok()?;
    nodes["items"]
        .as_array()?
        .iter()
        .find(|n| n["node_id"] == node_id)
        .cloned()
}

async fn wait_node_status(c: &Coordinator, node_id: &str, status: &str) -> Value {
    wait_until(
        Duration::from_secs(60),
        &format!("node {node_id} to be {status}"),
        || async { node(c, node_id).await.filter(|n| n["status"] == status) },
    )
    .await
}

async fn submit(c: &Coordinator, body: Value) -> i64 {
    let created = c.post("/api/v1/tasks", &body).await.expect("task accepted");
    created["task_id"].as_i64().expect("task id")
}

fn completed_runs(task: &Value) -> Vec<&Value> {
    task["runs"]
        .as_array()
        .map(|runs| runs.iter().filter(|r| r["status"] == "completed").collect())
        .unwrap_or_default()
}

async fn command(c: &Coordinator, id: i64) -> Option<Value> {
    let listed = c.get("/api/v1/nodes/commands").await.ok()?;
    listed["items"]
        .as_array()?
        .iter()
        .find(|cmd| cmd["id"] == id)
        .cloned()
}

#[tokio::test]
async fn drain_lets_a_short_run_finish_and_moves_a_long_one_to_another_node_once() {
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("coord"), COORD_FAST).expect("coordinator");
    let _a = start_node(&c, dir.path(), "drain-a", &[]);
    c.wait_for_nodes(1).await;

    // One run that ends well inside the drain's deadline, one that cannot.
    let short = submit(
        &c,
        json!({"code": "import time; time.sleep(1); print('short')"}),
    )
    .await;
    let long = submit(
        &c,
        json!({"code": "import time; time.sleep(20); print('long')"}),
    )
    .await;
    for t in [short, long] {
        c.wait_task(t, "running on drain-a", |t| {
            t["status"] == "running" && t["node_id"] == "drain-a"
        })
        .await;
    }
    let drained = c
        .post("/api/v1/nodes/drain-a/drain", &json!({"timeout": 6}))
        .await
        .expect("drain accepted");
    assert_eq!(drained["node"]["status"], "draining");
    let command_id = drained["command"]["id"].as_i64().expect("command id");

    let done = c
        .wait_task(short, "to complete", |t| t["status"] == "completed")
        .await;
    assert_eq!(done["result"], "short");
    assert_eq!(
        done["node_id"], "drain-a",
        "the running run finished where it was"
    );

    // At the deadline the long run is stopped and requeued; the node is drained.
    wait_node_status(&c, "drain-a", "drained").await;
    let requeued = c
        .wait_task(long, "to be requeued", |t| {
            t["runs"][0]["status"] != "running"
        })
        .await;
    assert_eq!(requeued["status"], "pending", "{requeued}");
    assert_eq!(requeued["runs"][0]["status"], "released", "{requeued}");

    // Another node takes it and it completes there, exactly once.
    let _b = start_node(&c, dir.path(), "drain-b", &[]);
    let finished = c.wait_ended(long).await;
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(finished["result"], "long");
    assert_eq!(finished["node_id"], "drain-b");
    let completed = completed_runs(&finished);
    assert_eq!(completed.len(), 1, "exactly once: {finished}");
    assert_eq!(completed[0]["node_id"], "drain-b");

    // The agent acknowledged the drain; undrain puts the node back to work.
    wait_until(
        Duration::from_secs(30),
        "the drain command to succeed",
        || async {
            command(&c, command_id)
                .await
                .filter(|cmd| cmd["status"] == "succeeded")
        },
    )
    .await;
    c.post("/api/v1/nodes/drain-a/undrain", &json!({}))
        .await
        .expect("undrain accepted");
    wait_node_status(&c, "drain-a", "idle").await;
    let after = submit(
        &c,
        json!({"code": "print('after')", "resources": {"cpu": 2, "memory": 512}}),
    )
    .await;
    let after = c
        .wait_task(after, "to complete", |t| t["status"] == "completed")
        .await;
    assert_eq!(after["result"], "after");
}

#[tokio::test]
async fn a_restarted_agent_finishes_its_run_and_rejoins_with_the_same_id_and_pid() {
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("coord"), COORD_FAST).expect("coordinator");
    let mut agent = start_node(&c, dir.path(), "restart-1", &["--shutdown-grace", "60"]);
    let pid = agent.pid();
    c.wait_for_nodes(1).await;
    let joined_before = node(&c, "restart-1").await.expect("listed")["joined_at"].clone();

    let inflight = submit(
        &c,
        json!({"code": "import time; time.sleep(2); print('inflight')"}),
    )
    .await;
    c.wait_task(inflight, "running", |t| t["status"] == "running")
        .await;
    let answer = c
        .post("/api/v1/nodes/restart-1/restart", &json!({}))
        .await
        .expect("restart accepted");
    let command_id = answer["command"]["id"].as_i64().expect("command id");

    // The restarted agent reports the outcome itself, from its first heartbeat.
    let done = wait_until(
        Duration::from_secs(90),
        "the restart to succeed",
        || async {
            command(&c, command_id).await.filter(|cmd| {
                matches!(
                    cmd["status"].as_str(),
                    Some("succeeded" | "failed" | "expired")
                )
            })
        },
    )
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(agent.is_running(), "the agent re-executed itself in place");
    assert_eq!(agent.pid(), pid, "exec keeps the pid");

    let back = wait_node_status(&c, "restart-1", "idle").await;
    assert_ne!(back["joined_at"], joined_before, "it left and rejoined");
    let inflight = c
        .wait_task(inflight, "to complete", |t| t["status"] == "completed")
        .await;
    assert_eq!(inflight["result"], "inflight");
    assert_eq!(completed_runs(&inflight).len(), 1);
    assert_eq!(
        inflight["runs"].as_array().map(Vec::len),
        Some(1),
        "it finished before the restart"
    );

    let after = submit(&c, json!({"code": "print('after restart')"})).await;
    let after = c
        .wait_task(after, "to complete", |t| t["status"] == "completed")
        .await;
    assert_eq!(after["node_id"], "restart-1");
    assert_eq!(after["result"], "after restart");
    assert!(
        agent.terminate(Duration::from_secs(30)),
        "clean exit after the restart"
    );
}

#[tokio::test]
async fn operator_meta_steers_a_constrained_task_to_its_node() {
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("coord"), COORD_FAST).expect("coordinator");
    let _plain = start_node(&c, dir.path(), "meta-plain", &[]);
    let _blue = start_node(&c, dir.path(), "meta-blue", &[]);
    c.wait_for_nodes(2).await;

    let picky = json!({"code": "print('blue')", "constraints": {"meta": {"pool": "blue"}}});
    let waiting = submit(&c, picky.clone()).await;
    let explained = c
        .get(&format!("/api/v1/tasks/{waiting}/explain"))
        .await
        .expect("explain");
    assert_eq!(explained["status"], "pending");
    assert!(
        explained["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no node matches")),
        "{explained}"
    );

    let resp = c
        .http
        .put(format!("{}/api/v1/nodes/meta-blue/meta", c.url))
        .json(&json!({"meta": {"pool": "blue", "owner": "lab 3"}}))
        .send()
        .await
        .expect("put meta");
    assert!(resp.status().is_success(), "{}", resp.status());

    let mut tasks = vec![waiting];
    for _ in 0..3 {
        tasks.push(submit(&c, picky.clone()).await);
    }
    for t in tasks {
        let done = c
            .wait_task(t, "to complete", |t| t["status"] == "completed")
            .await;
        assert_eq!(done["node_id"], "meta-blue", "{done}");
        assert_eq!(done["result"], "blue");
    }
    let meta = c.get("/api/v1/nodes/meta-blue/meta").await.expect("meta");
    assert_eq!(
        meta["meta"],
        json!({"pool": "blue", "owner": "lab 3"}),
        "heartbeats kept it"
    );
}
