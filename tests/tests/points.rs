//! End-to-end seed 000: a task on several real agents at once (`points`), scaled up and
//! down through `POST /api/deployment/task/change_points`, and the seed's own Python
//! `http.client` example run, `HTTPSConnection` and all, against a coordinator with auth
//! on serving HTTPS.

mod certs;

use lull_tests::{
    Coordinator, Process, create_key, processes_of_uid, runs_with, start_agent, wait_until,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const COORD_FAST: &[&str] = &[
    "--local-agents",
    "0",
    "--heartbeat-interval",
    "0.3",
    "--node-ttl",
    "5",
];

/// An agent with its own sandbox uid, so that its runs' processes can be counted from
/// outside. A stop grace far longer than the test's waits: a run gone quickly was ended
/// by SIGTERM, not by the SIGKILL after the grace.
fn start_node(c: &Coordinator, dir: &Path, node_id: &str, uid: u32, extra: &[&str]) -> Process {
    let uid = uid.to_string();
    let mut args = vec![
        "--node-id",
        node_id,
        "--heartbeat-interval",
        "0.3",
        "--cpus",
        "2",
        "--memory-mb",
        "4096",
        "--sandbox-uid",
        &uid,
        "--sandbox-gid",
        &uid,
        "--stop-grace",
        "600",
    ];
    args.extend_from_slice(extra);
    start_agent(&c.url, &dir.join(node_id), &args).expect("agent starts")
}

/// `(point, node)` of the runs with `status`, sorted by point.
fn placed(task: &Value, status: &str) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = runs_with(task, status)
        .iter()
        .map(|r| {
            (
                r["point"].as_u64().expect("point"),
                r["node_id"].as_str().expect("node").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Whether a process of `uid` has a SIGTERM handler (`SigCgt` in `/proc/PID/status`).
/// Whether a process of `uid` has installed its handlers for SIGTERM and SIGUSR1.
fn handles_sigterm(uid: u32) -> bool {
    processes_of_uid(uid)
        .into_iter()
        .any(|pid| catches(pid, Signal::SIGTERM) && catches(pid, Signal::SIGUSR1))
}

/// Whether process `pid` has a handler for `signal` (its `SigCgt` mask).
fn catches(pid: i32, signal: Signal) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (signal as i32 - 1)) != 0)
}

/// Seed 000's call, as its example makes it (auth off: the token is not checked).
async fn change_points(c: &Coordinator, task_id: i64, points: u32) -> Value {
    let resp = c
        .http
        .post(format!("{}/api/deployment/task/change_points", c.url))
        .header("token", "YOUR_API_TOKEN")
        .header("timestamp", "1747379023000")
        .header("version", "1.0.0")
        .header("sign_str", "")
        .json(&json!({"task_id": task_id, "points": points}))
        .send()
        .await
        .expect("change_points");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    resp.json().await.expect("json")
}

#[tokio::test]
async fn a_task_scales_up_and_down_across_real_agents_and_completes_once() {
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("coord"), COORD_FAST).expect("coordinator");
    let uids = [64_201_u32, 64_202, 64_203];
    let _a = start_node(&c, dir.path(), "pt-a", uids[0], &[]);
    let _b = start_node(&c, dir.path(), "pt-b", uids[1], &[]);
    let _c = start_node(&c, dir.path(), "pt-c", uids[2], &["--executor", "cold"]);
    c.wait_for_nodes(3).await;
    let uid_of = |node: &str| match node {
        "pt-a" => uids[0],
        "pt-b" => uids[1],
        _ => uids[2],
    };

    // Each point prints which it is, then waits for the gate: a SIGUSR1 from this test (a
    // file would not do: the test's files may be under /tmp, which runs see privately).
    // SIGTERM ends it cleanly.
    let code = "import os, signal, sys, time\n\
         signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n\
         gate = []\n\
         signal.signal(signal.SIGUSR1, lambda *_: gate.append(1))\n\
         print(os.environ['LULL_POINT_INDEX'], os.environ['LULL_POINTS'], flush=True)\n\
         while not gate:\n    time.sleep(0.05)\n\
         print('done', os.environ['LULL_POINT_INDEX'])\n";
    let created = c
        .post("/api/v1/tasks", &json!({"code": code, "points": 2}))
        .await
        .expect("task accepted");
    let task_id = created["task_id"].as_i64().expect("task id");
    assert_eq!(created["points"], 2);

    let two = c
        .wait_task(task_id, "to run on two nodes", |t| {
            placed(t, "running").len() == 2
        })
        .await;
    let first_two = placed(&two, "running");
    assert_eq!(
        first_two.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_ne!(first_two[0].1, first_two[1].1, "distinct nodes: {two}");
    assert_eq!(two["status"], "running");

    // Raise to 3: the third point goes to the node that had none.
    let answer = change_points(&c, task_id, 3).await;
    assert_eq!(
        answer,
        json!({"code": "0000", "message": "success", "data": null})
    );
    let three = c
        .wait_task(task_id, "to run on three nodes", |t| {
            placed(t, "running").len() == 3
        })
        .await;
    let all_three = placed(&three, "running");
    let mut nodes: Vec<&str> = all_three.iter().map(|(_, n)| n.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, vec!["pt-a", "pt-b", "pt-c"], "{three}");
    assert_eq!(all_three[2].0, 2);
    assert!(
        !first_two.iter().any(|(_, n)| *n == all_three[2].1),
        "point 2 on a node without a point: {three}"
    );
    assert_eq!(three["points"], 3);

    // Every point has installed its SIGTERM handler (so the stop below goes through
    // SIGTERM and the grace, not an immediate kill).
    for uid in uids {
        wait_until(
            Duration::from_secs(60),
            &format!("the run of uid {uid} to handle SIGTERM"),
            || async { handles_sigterm(uid).then_some(()) },
        )
        .await;
    }
    // Lower to 1: points 1 and 2 are stopped by scaling (not failed, not retried), and
    // their processes end (by SIGTERM: the grace is 600 s).
    change_points(&c, task_id, 1).await;
    let one = c.task(task_id).await.expect("task");
    let stopped = runs_with(&one, "stopped");
    assert_eq!(stopped.len(), 2, "{one}");
    for run in &stopped {
        assert!(run["point"] == 1 || run["point"] == 2, "{one}");
        let error = run["error"].as_str().unwrap_or_default();
        assert!(error.contains("scaled down from 3 to 1"), "{error}");
    }
    assert_eq!(placed(&one, "running"), vec![all_three[0].clone()]);
    assert_eq!(one["status"], "running");
    for (_, node) in &all_three[1..] {
        let uid = uid_of(node);
        wait_until(
            Duration::from_secs(60),
            &format!("the stopped run on {node} to end"),
            || async { processes_of_uid(uid).is_empty().then_some(()) },
        )
        .await;
    }
    assert!(
        !processes_of_uid(uid_of(&all_three[0].1)).is_empty(),
        "point 0 runs on"
    );
    let status = c.status(task_id).await.expect("status");
    assert_eq!(status["points"], 1);
    assert_eq!(status["runs"].as_array().map(Vec::len), Some(3), "{status}");

    // Open the gate: point 0 completes the task, exactly once, with its own output.
    for pid in processes_of_uid(uid_of(&all_three[0].1)) {
        if catches(pid, Signal::SIGUSR1) {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGUSR1).expect("gate");
        }
    }
    let done = c.wait_ended(task_id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"], "0 2\ndone 0", "{done}");
    assert_eq!(runs_with(&done, "completed").len(), 1, "{done}");
    assert_eq!(runs_with(&done, "stopped").len(), 2, "{done}");
    assert_eq!(runs_with(&done, "failed").len(), 0, "{done}");
    assert_eq!(
        done["runs"].as_array().map(Vec::len),
        Some(3),
        "nothing retried: {done}"
    );
    assert_eq!(
        c.task(task_id).await.expect("task")["status"],
        "completed",
        "a late result changes nothing"
    );
}

/// The seed's example with what a user fills in: the host and port of the connection (still
/// `HTTPSConnection`; Python verifies the test CA through `SSL_CERT_FILE`), the token, the
/// task id and, for a signed key, `sign_str`.
async fn run_seed_example(
    c: &Coordinator,
    ca: &Path,
    (token, secret): (&str, Option<&str>),
    task_id: i64,
    points: u32,
    dir: &Path,
) -> String {
    let script = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/seed_change_points.py"
    ))
    .expect("seed example");
    let (host, port) = c.addr().split_once(':').expect("host:port");
    assert!(
        script.contains("http.client.HTTPSConnection(\"openapi.suanli.cn\")"),
        "the seed example's connection line changed: update the test"
    );
    let mut script = script
        .replace(
            "http.client.HTTPSConnection(\"openapi.suanli.cn\")",
            &format!("http.client.HTTPSConnection(\"{host}\", {port})"),
        )
        .replace(
            "\"d1e7f0a8-49df-4760-8cb2-09b7aeb48dbf-20250709180338\"",
            &format!("\"{token}\""),
        )
        .replace("TASK_ID = 3000", &format!("TASK_ID = {task_id}"))
        .replace("TARGET_POINTS = 2", &format!("TARGET_POINTS = {points}"));
    if let Some(secret) = secret {
        // Signed mode: "需要计算并填写" — computed as the README says.
        script = script.replace(
            "'sign_str': '', ",
            &format!(
                "'sign_str': __import__('hmac').new(b'{secret}', (str(current_timestamp) + '\\nPOST\\n/api/deployment/task/change_points\\n' + payload).encode(), 'sha256').hexdigest(),"
            ),
        );
    }
    let path = dir.join(format!(
        "seed_change_points_{points}_{}.py",
        secret.is_some()
    ));
    std::fs::write(&path, script).expect("write script");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .arg(&path)
            .env("SSL_CERT_FILE", ca)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the example finishes")
    .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[tokio::test]
async fn the_seeds_python_example_works_with_a_simple_and_a_signed_key() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("coord");
    let (admin, _) = create_key(&data, "admin", "simple");
    let (signer, secret) = create_key(&data, "submitter", "signed");
    let secret = secret.expect("a signed key has a secret");
    let certs = certs::TestCerts::create(dir.path());
    let mut args = vec!["--local-agents".to_string(), "0".into(), "--auth".into()];
    args.extend(certs.coordinator_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = Coordinator::start_tls(&data, &args, &certs.ca).expect("coordinator");
    assert!(c.url.starts_with("https://"), "{}", c.url);
    let client = &c.http;
    let created: Value = client
        .post(format!("{}/api/v1/tasks", c.url))
        .header("token", &admin)
        .json(&json!({"code": "print(1)"}))
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("json");
    let task_id = created["task_id"].as_i64().expect("task id");
    let points = || async {
        let task: Value = client
            .get(format!("{}/api/v1/tasks/{task_id}", c.url))
            .header("token", &admin)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        task["points"].clone()
    };

    let out = run_seed_example(&c, &certs.ca, (&admin, None), task_id, 2, dir.path()).await;
    assert!(out.contains("状态码: 200 OK"), "{out}");
    assert!(out.contains("\"code\": \"0000\""), "{out}");
    assert!(out.contains("\"message\": \"success\""), "{out}");
    assert!(out.contains("\"data\": null"), "{out}");
    assert_eq!(points().await, 2);

    // The signed key with the seed's empty sign_str is refused; with it computed, accepted.
    let refused = run_seed_example(&c, &certs.ca, (&signer, None), task_id, 3, dir.path()).await;
    assert!(refused.contains("状态码: 401"), "{refused}");
    assert!(refused.contains("\"code\": \"1003\""), "{refused}");
    assert_eq!(points().await, 2, "refused: nothing changed");
    let signed = run_seed_example(
        &c,
        &certs.ca,
        (&signer, Some(&secret)),
        task_id,
        3,
        dir.path(),
    )
    .await;
    assert!(signed.contains("状态码: 200 OK"), "{signed}");
    assert!(signed.contains("\"code\": \"0000\""), "{signed}");
    assert_eq!(points().await, 3);
}
