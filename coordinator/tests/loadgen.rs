//! The `loadgen` benchmark's simulated agents (`examples/loadgen/sim.rs`) at a tiny size
//! against an in-process coordinator on 127.0.0.1:0, so the tool cannot rot: 20 nodes
//! heartbeat and pull, 200 tasks are submitted (one by one, or in batches with the results
//! posted in batches), and every one completes exactly once.

#[path = "../examples/loadgen/sim.rs"]
#[allow(dead_code)]
mod sim;

use lull_coordinator::{Config, run};
use serde_json::Value;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agents_complete_every_task_exactly_once() {
    simulate(1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_submissions_and_results_complete_every_task_exactly_once() {
    simulate(50, true).await;
}

async fn simulate(batch: usize, batch_results: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::new(dir.path().to_path_buf());
    config.local_agents = 0;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = CancellationToken::new();
    let server = tokio::spawn(run(listener, config, stop.clone()));

    let plan = sim::Plan {
        nodes: 20,
        pullers: 20,
        slots: 2,
        tasks: 200,
        submitters: 8,
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_connections: 2,
        min_window: Duration::from_millis(500),
        deadline: Duration::from_secs(60),
        batch,
        batch_results,
        ..sim::Plan::new(&base)
    };
    let mut phases = Vec::new();
    let outcome = sim::run(plan, |phase| phases.push(phase))
        .await
        .expect("the simulation runs");

    assert_eq!(phases, [sim::Phase::WindowStart, sim::Phase::WindowEnd]);
    assert!(
        outcome.exactly_once(200),
        "accepted {}, completed once {}, twice {:?}, never {:?}",
        outcome.submitted,
        outcome.completed_once,
        outcome.completed_twice,
        outcome.never_completed
    );
    assert_eq!(outcome.refused, 0, "no result was refused");
    assert_eq!(outcome.latency.len(), 200, "every task's latency is known");
    assert!(outcome.heartbeats > 0, "heartbeats went on in the window");

    // The coordinator agrees: 200 completed, nothing else.
    let stats: Value = reqwest::get(format!("{base}/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats body");
    assert_eq!(stats["tasks"]["total"], 200);
    assert_eq!(stats["tasks"]["completed"], 200);
    assert_eq!(stats["nodes"]["total"], 20);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("coordinator stops in time")
        .expect("coordinator task")
        .expect("coordinator ran");
}
