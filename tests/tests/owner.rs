//! Owner first, end to end: a real CPU-burning process outside Lull (the "owner") makes the
//! node pause and its run stop; the run resumes and completes once the owner is done; a
//! pause past the eviction limit hands the run to another node; and a Lull run burning CPU
//! on its own is not mistaken for the owner.
//!
//! The tests run one at a time: each one's owner load would be every other's too.

use lull_tests::{Coordinator, processes_of_uid, start_agent, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const COORDINATOR: &[&str] = &[
    "--local-agents",
    "0",
    "--heartbeat-interval",
    "0.3",
    "--node-ttl",
    "5",
];
/// Runs execute as this uid, which no other test uses, so the test can find a run's
/// processes from outside (and read their CPU time).
const RUN_UID: u32 = 64_123;
const LIMIT: Duration = Duration::from_secs(60);

/// An agent with the owner policy on and thresholds that suit a small, shared test host.
fn owner_first_agent(node_id: &str, evict_after: &str) -> Vec<String> {
    [
        "--node-id",
        node_id,
        "--heartbeat-interval",
        "0.3",
        "--sandbox-uid",
        &RUN_UID.to_string(),
        "--sandbox-gid",
        &RUN_UID.to_string(),
        "--owner-policy",
        "on",
        "--owner-cpu-percent",
        "50",
        "--owner-memory-percent",
        "100",
        "--owner-busy-for",
        "1",
        "--owner-quiet-for",
        "1",
        "--owner-evict-after",
        evict_after,
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

fn start(c: &Coordinator, dir: &std::path::Path, args: &[String]) -> lull_tests::Process {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start_agent(&c.url, dir, &args).expect("agent")
}

/// The owner: `python3 -c 'while True: pass'` processes, killed by PID when dropped.
struct Owner(Vec<Child>);

impl Owner {
    fn start_busy() -> Owner {
        // Twice as many burners as cores: the owner takes most of the host even beside a
        // run and whatever else the host is doing.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Owner(
            (0..2 * cores)
                .map(|_| {
                    // Each in a session of its own: the kernel's autogroup scheduling shares
                    // the CPU between sessions first, so burners sharing one session would
                    // get no more than the run's own session does.
                    Command::new("setsid")
                        .args(["python3", "-c", "while True: pass"])
                        .stdin(Stdio::null())
                        .spawn()
                        .expect("start a CPU burner")
                })
                .collect(),
        )
    }

    fn stop(&mut self) {
        for mut child in self.0.drain(..) {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.stop();
    }
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
    wait_until(LIMIT, &format!("node {node_id} to be {status}"), || async {
        node(c, node_id).await.filter(|n| n["status"] == status)
    })
    .await
}

async fn submit(c: &Coordinator, code: &str, timeout: f64) -> i64 {
    let task = c
        .post("/api/v1/tasks", &json!({"code": code, "timeout": timeout}))
        .await
        .expect("submitted");
    task["task_id"].as_i64().expect("task_id")
}

async fn wait_running_on(c: &Coordinator, task_id: i64, node_id: &str) {
    wait_until(
        LIMIT,
        &format!("task {task_id} to run on {node_id}"),
        || async {
            let st = c.status(task_id).await.ok()?;
            (st["status"] == "running" && st["node_id"] == node_id).then_some(())
        },
    )
    .await
}

/// CPU time (utime + stime, clock ticks) of every process running as the run uid.
fn run_cpu_ticks() -> Option<u64> {
    let pids = processes_of_uid(RUN_UID);
    if pids.is_empty() {
        return None;
    }
    let mut ticks = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        ticks += fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    }
    Some(ticks)
}

/// Burns `secs` seconds of CPU time, then prints `done`.
fn burn(secs: f64) -> String {
    format!(
        "import time\nstart = time.process_time()\nwhile time.process_time() - start < {secs}: pass\nprint('done')"
    )
}

#[tokio::test]
async fn a_busy_owner_pauses_the_node_and_the_run_resumes_and_completes_after() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("c"), COORDINATOR).expect("coordinator");
    let _agent = start(
        &c,
        &dir.path().join("a"),
        &owner_first_agent("lender", "600"),
    );
    wait_node_status(&c, "lender", "idle").await;

    // A run that needs 1.5 s of CPU and has 8 s of wall clock: it outlives its timeout only
    // if the time it spends paused counts.
    let task_id = submit(&c, &burn(1.5), 8.0).await;
    wait_running_on(&c, task_id, "lender").await;
    wait_until(LIMIT, "the run's process", || async { run_cpu_ticks() }).await;

    let mut owner = Owner::start_busy();
    let paused = wait_node_status(&c, "lender", "paused").await;
    let reason = paused["paused_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("owner CPU "), "{paused}");
    assert!(paused["owner_load"]["cpu_percent"].is_number(), "{paused}");

    // The run is stopped: its CPU time stands still.
    wait_until(LIMIT, "the run's CPU time to stop growing", || async {
        let before = run_cpu_ticks()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = run_cpu_ticks()?;
        (before == after).then_some(())
    })
    .await;
    // The owner stays busy for longer than the run's whole timeout.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let status = c.status(task_id).await.expect("status");
    assert_eq!(status["status"], "running", "{status}");
    owner.stop();

    wait_until(LIMIT, "the node to resume", || async {
        node(&c, "lender").await.filter(|n| n["status"] != "paused")
    })
    .await;
    let task = c.wait_ended(task_id).await;
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["result"], "done", "{task}");
    assert_eq!(task["runs"].as_array().map(Vec::len), Some(1), "{task}");
    wait_node_status(&c, "lender", "idle").await;
}

#[tokio::test]
async fn a_run_paused_past_the_eviction_limit_completes_on_another_node() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("c"), COORDINATOR).expect("coordinator");
    let _lender = start(&c, &dir.path().join("a"), &owner_first_agent("lender", "1"));
    wait_node_status(&c, "lender", "idle").await;
    let task_id = submit(&c, &burn(5.0), 120.0).await;
    wait_running_on(&c, task_id, "lender").await;
    let _owner = Owner::start_busy();
    wait_node_status(&c, "lender", "paused").await;

    // A second node whose owner policy is off (the harness's default): the owner's load
    // here is on the same host, and this node must not yield to it.
    let _spare = start_agent(
        &c.url,
        &dir.path().join("b"),
        &["--node-id", "spare", "--heartbeat-interval", "0.3"],
    )
    .expect("agent");
    let task = c.wait_ended(task_id).await;
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["result"], "done", "{task}");
    let runs = task["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{task}");
    assert_eq!(runs[0]["node_id"], "lender", "{task}");
    assert_eq!(runs[0]["status"], "released", "{task}");
    let error = runs[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("evicted: the owner needed the machine"),
        "{task}"
    );
    assert_eq!(runs[1]["node_id"], "spare", "{task}");
    assert_eq!(runs[1]["status"], "completed", "{task}");
    // The lender stays paused while its owner is busy.
    let lender = node(&c, "lender").await.expect("lender");
    assert_eq!(lender["status"], "paused", "{lender}");
}

#[tokio::test]
async fn a_lull_run_burning_every_core_is_not_mistaken_for_the_owner() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("dir");
    let c = Coordinator::start(&dir.path().join("c"), COORDINATOR).expect("coordinator");
    let _agent = start(
        &c,
        &dir.path().join("a"),
        &owner_first_agent("lender", "600"),
    );
    wait_node_status(&c, "lender", "idle").await;

    // The run and a child it forks both burn a core for 4 s: the host is busy, all of it
    // Lull's, for longer than the owner policy's 1 s hold.
    let code = "import os, time\n\
                child = os.fork()\n\
                end = time.time() + 4\n\
                while time.time() < end: pass\n\
                if child == 0: os._exit(0)\n\
                os.waitpid(child, 0)\n\
                print('done')";
    let task_id = submit(&c, code, 60.0).await;
    let statuses = std::cell::RefCell::new(Vec::new());
    let task = wait_until(LIMIT * 2, "the burning task to finish", || async {
        if let Some(n) = node(&c, "lender").await {
            let status = n["status"].as_str().unwrap_or_default().to_string();
            statuses.borrow_mut().push(status);
        }
        let task = c.task(task_id).await.ok()?;
        matches!(task["status"].as_str(), Some("completed" | "failed")).then_some(task)
    })
    .await;
    let statuses = statuses.into_inner();
    assert_eq!(task["status"], "completed", "{task}");
    assert!(
        statuses.iter().any(|s| s == "busy"),
        "the node was seen busy: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| s != "paused"),
        "the node paused for its own run: {statuses:?}"
    );
}
