//! End to end, scale-out (seed 002) and shrink (seed 003) with real coordinator and agent
//! processes: standby agents on 127.0.0.x adopted in one operation, every failure stage
//! rolled back, shrink online and offline with work in flight, and a coordinator killed
//! in the middle of an operation.

use lull_tests::{
    Coordinator, StandbyAgent, create_key, runs_with, start_agent, start_standby_agent, wait_until,
};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const SECRET: &str = "join-secret-for-tests";

fn coordinator(dir: &Path, extra: &[&str]) -> Coordinator {
    let mut args = vec![
        "--local-agents",
        "0",
        "--heartbeat-interval",
        "0.3",
        "--node-ttl",
        "3",
        "--join-secret",
        SECRET,
    ];
    args.extend_from_slice(extra);
    Coordinator::start(&dir.join("coordinator"), &args).expect("coordinator starts")
}

fn standby(dir: &Path, name: &str, ip: &str, secret: &str) -> StandbyAgent {
    start_standby_agent(ip, secret, &dir.join(name), &[]).expect("standby agent starts")
}

/// The settings every adopted agent gets: fast heartbeats, a small declared capacity.
fn configs() -> Value {
    json!({"cpus": "2", "memory_mb": "2048", "heartbeat_interval": "0.3"})
}

/// `POST /api/v1/cluster/scale_out`: the envelope, whatever the status.
async fn scale_out(c: &Coordinator, body: Value) -> (u16, Value) {
    let resp = c
        .http
        .post(format!("{}/api/v1/cluster/scale_out", c.url))
        .json(&body)
        .send()
        .await
        .expect("scale_out answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON envelope"))
}

/// Scales out and returns the operation id (the request must be accepted).
async fn start_scale_out(c: &Coordinator, agents: Value, extra_configs: Value) -> String {
    let mut configs = configs();
    if let (Value::Object(base), Value::Object(extra)) = (&mut configs, extra_configs) {
        base.extend(extra);
    }
    let (status, envelope) = scale_out(
        c,
        json!({"agentInfo": agents, "obConfigs": configs, "zone": "zone2"}),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
    assert_eq!(envelope["successful"], true, "{envelope}");
    envelope["data"]["id"]
        .as_str()
        .expect("operation id")
        .to_string()
}

async fn operation(c: &Coordinator, id: &str) -> Value {
    c.get(&format!("/api/v1/operations/{id}"))
        .await
        .expect("operation readable")
}

/// Waits for the operation to finish (SUCCEEDED or FAILED) and returns it.
async fn finished(c: &Coordinator, id: &str) -> Value {
    wait_until(
        Duration::from_secs(90),
        &format!("operation {id} to finish"),
        || async {
            let op = operation(c, id).await;
            matches!(op["state"].as_str(), Some("SUCCEEDED" | "FAILED")).then_some(op)
        },
    )
    .await
}

/// The failed stage's name and message.
fn failure(op: &Value) -> (String, String) {
    assert_eq!(op["state"], "FAILED", "{op}");
    let stage = op["nodes"]
        .as_array()
        .and_then(|stages| stages.iter().find(|s| s["state"] == "FAILED"))
        .unwrap_or_else(|| panic!("no failed stage in {op}"));
    assert_eq!(op["stage_name"], stage["name"], "{op}");
    (
        stage["name"].as_str().unwrap_or_default().to_string(),
        stage["message"].as_str().unwrap_or_default().to_string(),
    )
}

async fn nodes(c: &Coordinator) -> Vec<Value> {
    c.get("/api/v1/nodes").await.expect("nodes")["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn node(c: &Coordinator, node_id: &str) -> Option<Value> {
    nodes(c).await.into_iter().find(|n| n["node_id"] == node_id)
}

async fn standby_state(agent: &StandbyAgent) -> String {
    agent.hello().await.expect("standby answers")["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Nothing half-joined: the agent is back in standby and no node record is a member.
async fn assert_not_joined(c: &Coordinator, agent: &StandbyAgent) {
    let node_id = agent.hello().await.expect("hello")["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_until(
        Duration::from_secs(30),
        "the agent back in standby",
        || async { (standby_state(agent).await == "standby").then_some(()) },
    )
    .await;
    let record = node(c, &node_id).await;
    assert!(
        record.as_ref().is_none_or(|n| n["status"] == "removed"),
        "node {node_id} must not be a member: {record:?}"
    );
}

async fn submit(c: &Coordinator, body: Value) -> i64 {
    c.post("/api/v1/tasks", &body).await.expect("task accepted")["task_id"]
        .as_i64()
        .expect("task id")
}

async fn shrink(c: &Coordinator, body: Value) -> (u16, Value) {
    let resp = c
        .http
        .post(format!("{}/api/v1/cluster/shrink", c.url))
        .json(&body)
        .send()
        .await
        .expect("shrink answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_standby_agents_join_as_one_group_run_work_and_leave_with_a_shrink() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = coordinator(dir.path(), &[]);
    let a = standby(dir.path(), "a", "127.0.0.2", SECRET);
    let b = standby(dir.path(), "b", "127.0.0.3", SECRET);
    assert_eq!(standby_state(&a).await, "standby");

    let id = start_scale_out(&c, json!([a.agent_info(), b.agent_info()]), json!({})).await;
    let op = finished(&c, &id).await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    assert_eq!(
        (op["stage"].as_u64(), op["max_stage"].as_u64()),
        (Some(6), Some(6))
    );
    let stages: Vec<&str> = op["nodes"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| {
            assert_eq!(s["state"], "SUCCEEDED", "{s}");
            s["name"].as_str().unwrap_or_default()
        })
        .collect();
    assert_eq!(
        stages,
        [
            "check_agent_reachable",
            "authenticate",
            "push_config",
            "start_executor",
            "wait_first_heartbeat",
            "mark_node_ready"
        ]
    );
    assert_eq!(standby_state(&a).await, "adopted");

    // Both nodes are members of one group, formed by this operation, with the zone given.
    let node_ids: Vec<String> = op["additional_data"]["node_ids"]
        .as_array()
        .expect("node ids")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    assert_eq!(node_ids.len(), 2);
    let members: Vec<Value> = nodes(&c).await;
    assert_eq!(members.len(), 2);
    for n in &members {
        assert!(node_ids.contains(&n["node_id"].as_str().unwrap_or_default().to_string()));
        assert_eq!(n["group"]["operation_id"].as_i64(), id.parse::<i64>().ok());
        assert_eq!(n["group"]["id"], members[0]["group"]["id"]);
        assert_eq!(n["zone"], "zone2");
        assert_eq!(n["resources"]["cpu_cores"], 2.0);
    }

    // They heartbeat and run work.
    let tasks = [
        submit(&c, json!({"code": "print(6 * 7)"})).await,
        submit(
            &c,
            json!({"code": "print('hi')", "constraints": {"zone": "zone2"}}),
        )
        .await,
    ];
    for t in tasks {
        let task = c
            .wait_task(t, "completed", |t| t["status"] == "completed")
            .await;
        assert!(node_ids.contains(&task["node_id"].as_str().unwrap_or_default().to_string()));
    }

    // Both leave in one shrink (a group leaves whole) and go back to standby.
    let (status, body) = shrink(&c, json!({"shrink_number": 1, "online": true})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("valid numbers: 2"),
        "{body}"
    );
    let (status, body) = shrink(&c, json!({"shrink_number": 2, "online": true})).await;
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().expect("job id").to_string();
    let op = finished(&c, &job).await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    for n in nodes(&c).await {
        assert_eq!(n["status"], "removed", "{n}");
    }
    for agent in [&a, &b] {
        wait_until(Duration::from_secs(30), "back in standby", || async {
            (standby_state(agent).await == "standby").then_some(())
        })
        .await;
    }
    // Listed newest first.
    let listed = c.get("/api/v1/operations").await.expect("list");
    assert_eq!(listed["items"][0]["id"], job.as_str());
    assert_eq!(listed["items"][1]["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scale_out_failure_names_its_stage_and_leaves_nothing_half_joined() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = coordinator(dir.path(), &[]);

    // Unreachable: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.4:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let id = start_scale_out(&c, json!({"ip": "127.0.0.4", "port": port}), json!({})).await;
    let (stage, message) = failure(&finished(&c, &id).await);
    assert_eq!(stage, "check_agent_reachable");
    assert!(message.contains("unreachable"), "{message}");

    // Wrong join secret: the agent refuses our proof.
    let stranger = standby(dir.path(), "stranger", "127.0.0.5", "another-secret");
    let id = start_scale_out(&c, json!(stranger.agent_info()), json!({})).await;
    let (stage, message) = failure(&finished(&c, &id).await);
    assert_eq!(stage, "authenticate");
    assert!(message.contains("join secret"), "{message}");
    assert_not_joined(&c, &stranger).await;

    // Config rejected: a setting the agent does not know.
    let picky = standby(dir.path(), "picky", "127.0.0.6", SECRET);
    let id = start_scale_out(&c, json!(picky.agent_info()), json!({"mysql_port": "2881"})).await;
    let (stage, message) = failure(&finished(&c, &id).await);
    assert_eq!(stage, "push_config");
    assert!(message.contains("config rejected"), "{message}");
    assert!(message.contains("mysql_port"), "{message}");
    assert_not_joined(&c, &picky).await;

    // No heartbeat in time: the agent is told a coordinator URL nobody answers at.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let id = start_scale_out(
        &c,
        json!(picky.agent_info()),
        json!({"coordinator_url": format!("http://127.0.0.1:{dead_port}"), "heartbeat_timeout": 2}),
    )
    .await;
    let op = finished(&c, &id).await;
    let (stage, message) = failure(&op);
    assert_eq!(stage, "wait_first_heartbeat");
    assert!(message.contains("no heartbeat"), "{message}");
    assert!(message.contains("back in standby"), "{message}");
    assert_not_joined(&c, &picky).await;

    // Already a member: adopt it for real, then once more.
    let id = start_scale_out(&c, json!(picky.agent_info()), json!({})).await;
    assert_eq!(finished(&c, &id).await["state"], "SUCCEEDED");
    let id = start_scale_out(&c, json!(picky.agent_info()), json!({})).await;
    let (stage, message) = failure(&finished(&c, &id).await);
    assert_eq!(stage, "check_agent_reachable");
    assert!(message.contains("already a member"), "{message}");
    // The member is untouched by the failed attempt.
    assert_eq!(standby_state(&picky).await, "adopted");
    let members = nodes(&c).await;
    assert_eq!(members.len(), 1, "{members:?}");
    assert_ne!(members[0]["status"], "removed");
    assert_ne!(members[0]["status"], "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_shrink_lets_the_running_task_finish_on_the_leaving_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = coordinator(dir.path(), &[]);
    let _own = start_agent(
        &c.url,
        &dir.path().join("own"),
        &[
            "--node-id",
            "own",
            "--heartbeat-interval",
            "0.3",
            "--cpus",
            "2",
            "--memory-mb",
            "2048",
        ],
    )
    .expect("agent starts");
    c.wait_for_nodes(1).await;
    let a = standby(dir.path(), "a", "127.0.0.2", SECRET);
    let id = start_scale_out(&c, json!(a.agent_info()), json!({})).await;
    let op = finished(&c, &id).await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    let adopted = op["additional_data"]["node_ids"][0]
        .as_str()
        .expect("node id")
        .to_string();

    // Two groups: the agent that joined on its own, then the scale-out.
    let (status, body) = shrink(&c, json!({"shrink_number": 3, "online": true})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("valid numbers: 1, 2"),
        "{body}"
    );

    let task = submit(
        &c,
        json!({"code": "import time\ntime.sleep(3)\nprint('finished')", "constraints": {"zone": "zone2"}}),
    )
    .await;
    c.wait_task(task, "running on the adopted node", |t| {
        t["status"] == "running" && t["node_id"] == adopted.as_str()
    })
    .await;

    let (status, body) = shrink(
        &c,
        json!({"shrink_number": 1, "online": true, "timeout": 60}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().expect("job id").to_string();
    let op = finished(&c, &job).await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");

    // It finished where it ran, once; nothing was requeued.
    let done = c
        .wait_task(task, "completed", |t| t["status"] == "completed")
        .await;
    assert_eq!(done["result"], "finished");
    assert_eq!(done["runs"].as_array().map(Vec::len), Some(1), "{done}");
    assert_eq!(
        runs_with(&done, "completed")[0]["node_id"],
        adopted.as_str()
    );
    assert_eq!(
        node(&c, &adopted).await.expect("record")["status"],
        "removed"
    );
    assert_eq!(node(&c, "own").await.expect("record")["status"], "idle");
    wait_until(Duration::from_secs(30), "back in standby", || async {
        (standby_state(&a).await == "standby").then_some(())
    })
    .await;
    // The shrunk node counts as removed, not as offline capacity.
    let stats = c.get("/stats").await.expect("stats");
    assert_eq!(stats["nodes"]["removed"], 1, "{stats}");
    assert_eq!(stats["nodes"]["offline"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_shrink_requeues_the_running_task_which_completes_elsewhere_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = coordinator(dir.path(), &[]);
    let mut own = start_agent(
        &c.url,
        &dir.path().join("own"),
        &[
            "--node-id",
            "own",
            "--heartbeat-interval",
            "0.3",
            "--cpus",
            "2",
            "--memory-mb",
            "2048",
        ],
    )
    .expect("agent starts");
    c.wait_for_nodes(1).await;
    let a = standby(dir.path(), "a", "127.0.0.2", SECRET);
    let id = start_scale_out(&c, json!(a.agent_info()), json!({})).await;
    let op = finished(&c, &id).await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    let adopted = op["additional_data"]["node_ids"][0]
        .as_str()
        .expect("node id")
        .to_string();

    // Keep the task off "own" until it runs on the adopted node.
    c.post("/api/v1/nodes/own/drain", &json!({}))
        .await
        .expect("drain");
    let task = submit(
        &c,
        json!({"code": "import time\ntime.sleep(4)\nprint('done')"}),
    )
    .await;
    c.wait_task(task, "running on the adopted node", |t| {
        t["status"] == "running" && t["node_id"] == adopted.as_str()
    })
    .await;
    c.post("/api/v1/nodes/own/undrain", &json!({}))
        .await
        .expect("undrain");

    let (status, body) = shrink(&c, json!({"shrink_number": 1, "online": false})).await;
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().expect("job id").to_string();
    let op = finished(&c, &job).await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    assert!(
        op["nodes"][1]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("requeued"),
        "{op}"
    );

    let done = c
        .wait_task(task, "completed", |t| t["status"] == "completed")
        .await;
    assert_eq!(done["result"], "done");
    let completed = runs_with(&done, "completed");
    assert_eq!(completed.len(), 1, "completed exactly once: {done}");
    assert_eq!(completed[0]["node_id"], "own");
    let released = runs_with(&done, "released");
    assert_eq!(released.len(), 1, "{done}");
    assert_eq!(released[0]["node_id"], adopted.as_str());
    assert_eq!(
        node(&c, &adopted).await.expect("record")["status"],
        "removed"
    );

    // The agent that joined on its own is a group of one: it can be shrunk too, and,
    // not having been adopted, it exits.
    let (status, body) = shrink(&c, json!({"shrink_number": 1, "online": true})).await;
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().expect("job id").to_string();
    assert_eq!(finished(&c, &job).await["state"], "SUCCEEDED");
    assert_eq!(node(&c, "own").await.expect("record")["status"], "removed");
    wait_until(
        Duration::from_secs(30),
        "the decommissioned agent to exit",
        || {
            let running = own.is_running();
            async move { (!running).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_out_cut_short_by_a_killed_coordinator_fails_cleanly_after_the_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut c = coordinator(dir.path(), &[]);
    let a = standby(dir.path(), "a", "127.0.0.2", SECRET);
    // Its heartbeats go nowhere, so the operation sits in wait_first_heartbeat.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let id = start_scale_out(
        &c,
        json!(a.agent_info()),
        json!({"coordinator_url": format!("http://127.0.0.1:{dead_port}"), "heartbeat_timeout": 600}),
    )
    .await;
    wait_until(
        Duration::from_secs(60),
        "the wait for a heartbeat",
        || async {
            let op = operation(&c, &id).await;
            (op["stage_name"] == "wait_first_heartbeat" && op["state"] == "RUNNING").then_some(())
        },
    )
    .await;
    assert_eq!(standby_state(&a).await, "adopted");

    c.process.kill9();
    let c = coordinator(dir.path(), &[]);
    let op = finished(&c, &id).await;
    let (stage, message) = failure(&op);
    assert_eq!(stage, "wait_first_heartbeat");
    assert!(message.contains("restarted"), "{message}");
    assert!(message.contains("back in standby"), "{message}");
    assert_not_joined(&c, &a).await;

    // The agent can be adopted again, properly this time.
    let id = start_scale_out(&c, json!(a.agent_info()), json!({})).await;
    assert_eq!(finished(&c, &id).await["state"], "SUCCEEDED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_only_admins_scale_out_and_each_adopted_agent_gets_its_own_agent_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("coordinator");
    let admin = create_key(&data, "admin", "simple").0;
    let viewer = create_key(&data, "viewer", "simple").0;
    let c = coordinator(dir.path(), &["--auth"]);
    let a = standby(dir.path(), "a", "127.0.0.2", SECRET);
    let call = |token: &str, path: &str, body: Value| {
        c.http
            .post(format!("{}{path}", c.url))
            .header("token", token)
            .json(&body)
            .send()
    };
    let body = json!({"agentInfo": a.agent_info(), "configs": configs(), "zone": "zone2"});
    let refused = call(&viewer, "/api/v1/cluster/scale_out", body.clone())
        .await
        .expect("answer");
    assert_eq!(refused.status().as_u16(), 403);
    let refused = call(
        &viewer,
        "/api/v1/cluster/shrink",
        json!({"shrink_number": 1, "online": true}),
    )
    .await
    .expect("answer");
    assert_eq!(refused.status().as_u16(), 403);

    let accepted: Value = call(&admin, "/api/v1/cluster/scale_out", body)
        .await
        .expect("answer")
        .json()
        .await
        .expect("envelope");
    assert_eq!(accepted["successful"], true, "{accepted}");
    let id = accepted["data"]["id"].as_str().expect("id").to_string();
    let op = wait_until(
        Duration::from_secs(90),
        "the scale-out to finish",
        || async {
            let op: Value = c
                .http
                .get(format!("{}/api/v1/operations/{id}", c.url))
                .header("token", &viewer)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            matches!(op["state"].as_str(), Some("SUCCEEDED" | "FAILED")).then_some(op)
        },
    )
    .await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    // The agent heartbeats and works with the agent key made for it.
    let keys: Value = c
        .http
        .get(format!("{}/api/v1/keys", c.url))
        .header("token", &admin)
        .send()
        .await
        .expect("keys")
        .json()
        .await
        .expect("JSON");
    let made: Vec<&Value> = keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| {
            k["name"]
                .as_str()
                .unwrap_or_default()
                .starts_with("scale-out")
        })
        .collect();
    assert_eq!(made.len(), 1, "{keys}");
    assert_eq!(made[0]["role"], "agent");
    assert_eq!(made[0]["revoked"], false);
    let task: Value = call(&admin, "/submit", json!({"code": "print('with a key')"}))
        .await
        .expect("submitted")
        .json()
        .await
        .expect("JSON");
    let task_id = task["task_id"].as_i64().expect("task id");
    wait_until(Duration::from_secs(60), "the task to complete", || async {
        let status: Value = c
            .http
            .get(format!("{}/status/{task_id}", c.url))
            .header("token", &viewer)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (status["status"] == "completed").then_some(())
    })
    .await;

    // A scale-out that fails after its key was made revokes the key.
    let b = standby(dir.path(), "b", "127.0.0.3", SECRET);
    let failing =
        json!({"agentInfo": b.agent_info(), "configs": {"rpc_port": "2882"}, "zone": "zone2"});
    let accepted: Value = call(&admin, "/api/v1/cluster/scale_out", failing)
        .await
        .expect("answer")
        .json()
        .await
        .expect("envelope");
    let id = accepted["data"]["id"].as_str().expect("id").to_string();
    let keys = wait_until(
        Duration::from_secs(60),
        "the failed scale-out's key revoked",
        || async {
            let keys: Value = c
                .http
                .get(format!("{}/api/v1/keys", c.url))
                .header("token", &admin)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let revoked = keys["keys"].as_array()?.iter().any(|k| {
                k["name"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(&format!("scale-out {id}:"))
                    && k["revoked"] == true
            });
            revoked.then_some(keys)
        },
    )
    .await;
    assert!(keys.to_string().contains("scale-out"), "{keys}");
    assert_eq!(standby_state(&b).await, "standby");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrink_cut_short_by_a_killed_coordinator_resumes_after_the_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut c = coordinator(dir.path(), &[]);
    let addr = c.addr().to_string();
    let a = standby(dir.path(), "a", "127.0.0.2", SECRET);
    let id = start_scale_out(&c, json!(a.agent_info()), json!({})).await;
    let op = finished(&c, &id).await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    let adopted = op["additional_data"]["node_ids"][0]
        .as_str()
        .expect("node id")
        .to_string();
    let task = submit(
        &c,
        json!({"code": "import time\ntime.sleep(5)\nprint('survived')"}),
    )
    .await;
    c.wait_task(task, "running", |t| t["status"] == "running")
        .await;

    let (status, body) = shrink(
        &c,
        json!({"shrink_number": 1, "online": true, "timeout": 120}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().expect("job id").to_string();
    wait_until(Duration::from_secs(30), "the shrink to drain", || async {
        let op = operation(&c, &job).await;
        (op["stage_name"] == "drain" && op["state"] == "RUNNING").then_some(())
    })
    .await;

    c.process.kill9();
    let c = Coordinator::start_on(
        &addr,
        &dir.path().join("coordinator"),
        &[
            "--local-agents",
            "0",
            "--heartbeat-interval",
            "0.3",
            "--node-ttl",
            "3",
            "--join-secret",
            SECRET,
        ],
    )
    .expect("coordinator restarts");
    let op = finished(&c, &job).await;
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    let done = c
        .wait_task(task, "completed", |t| t["status"] == "completed")
        .await;
    assert_eq!(done["result"], "survived");
    assert_eq!(runs_with(&done, "completed").len(), 1, "{done}");
    assert_eq!(
        node(&c, &adopted).await.expect("record")["status"],
        "removed"
    );
    wait_until(Duration::from_secs(30), "back in standby", || async {
        (standby_state(&a).await == "standby").then_some(())
    })
    .await;
}
