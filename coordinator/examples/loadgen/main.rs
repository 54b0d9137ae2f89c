//! Coordinator-alone benchmarks (issue 5, parts 3–5; not tests): simulated agents over real
//! HTTP against a release `lull-coordinator` this program starts and stops.
//!
//! ```sh
//! cargo build --release --workspace --bins --examples
//! target/release/examples/loadgen dispatch --sync full     # part 3: tasks/s, latency
//! target/release/examples/loadgen scale --nodes 10000      # part 4: heartbeats + tasks
//! target/release/examples/loadgen memory --tasks 1000000   # part 5: RSS with a full store
//! target/release/examples/loadgen agent                    # part 5: a real lull-agent
//! ```
//!
//! Each subcommand starts `lull-coordinator` (next to `examples/`, `--listen 127.0.0.1:0
//! --local-agents 0`, data in a temporary directory) and stops it by PID afterwards (SIGTERM,
//! then SIGKILL after 30 s); `agent` also starts a real `lull-agent --executor zygote`. The
//! simulated agents (`sim.rs`) heartbeat like real ones, long-poll `GET /internal/task` and
//! report each run completed without executing it. The coordinator's CPU comes from
//! `/proc/PID/stat` (utime + stime over the measured window), its memory from
//! `/proc/PID/status` (VmRSS); the load generator's own figures are printed beside them.
//!
//! Every run checks one thing: every task accepted was completed exactly once (the exit
//! status says so). `--json FILE` appends one JSON record per run, which
//! `bench/charts.py` turns into the SVG charts under `bench/charts/`.

#![forbid(unsafe_code)]

mod process;
mod sim;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use process::{
    Sample, Started, cores, descendants, release_dir, sample, start_coordinator, status_mb,
};
use serde_json::{Value, json};
use sim::{Outcome, Phase, Plan, percentile};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "Lull coordinator-alone benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
    /// Append one JSON record per run to this file (for bench/charts.py).
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Dispatch throughput and latency: submit → handed out → result recorded.
    Dispatch(DispatchArgs),
    /// Many heartbeating nodes while tasks flow: coordinator CPU, RSS, heartbeat latency.
    Scale(ScaleArgs),
    /// Coordinator RSS with many nodes and a store full of finished tasks, and after a restart.
    Memory(MemoryArgs),
    /// RSS of a real `lull-agent --executor zygote`, idle and busy, its zygote apart.
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
struct DispatchArgs {
    /// SQLite durability of the coordinator: full (fsync per group commit) or normal.
    #[arg(long, default_value = "full")]
    sync: String,
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Simulated nodes; all of them pull.
    #[arg(long, default_value_t = 32)]
    nodes: usize,
    /// Runs each node holds at once (its declared cores; `max` of each pull).
    #[arg(long, default_value_t = 4)]
    slots: usize,
    /// Submissions in flight at once (closed loop).
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Tasks per submission: 1 posts `POST /submit`; more posts `POST /api/v1/tasks/batch`
    /// (1..=1000).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    batch: u16,
    /// Post each pull's results together to `POST /internal/results`.
    #[arg(long)]
    batch_results: bool,
}

#[derive(Debug, Args)]
struct ScaleArgs {
    #[arg(long, default_value = "full")]
    sync: String,
    /// Simulated nodes heartbeating.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Of which this many pull work.
    #[arg(long, default_value_t = 16)]
    pullers: usize,
    #[arg(long, default_value_t = 4)]
    slots: usize,
    /// Seconds between one node's heartbeats (the agent's default is 2).
    #[arg(long, default_value_t = 2.0)]
    heartbeat_interval: f64,
    /// Keep-alive connections the heartbeats share.
    #[arg(long, default_value_t = 8)]
    heartbeat_connections: usize,
    /// Tasks per second flowing meanwhile (0: heartbeats alone).
    #[arg(long, default_value_t = 200.0)]
    task_rate: f64,
    /// Length of the measured window, seconds.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
}

#[derive(Debug, Args)]
struct MemoryArgs {
    /// `normal` fills faster; the RSS does not depend on it.
    #[arg(long, default_value = "normal")]
    sync: String,
    /// Finished tasks to store (the full size is 1,000,000).
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// Simulated nodes heartbeating throughout.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    #[arg(long, default_value_t = 32)]
    pullers: usize,
    #[arg(long, default_value_t = 8)]
    slots: usize,
    #[arg(long, default_value_t = 128)]
    submitters: usize,
    /// Seconds of heartbeats from every node after the restart before RSS is read.
    #[arg(long, default_value_t = 10.0)]
    settle: f64,
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Trivial tasks run while "busy" is sampled.
    #[arg(long, default_value_t = 1000)]
    tasks: usize,
    /// Cores the agent lends (its slots).
    #[arg(long, default_value_t = 2.0)]
    cpus: f64,
    /// Seconds the agent sits idle before "idle" is read.
    #[arg(long, default_value_t = 5.0)]
    settle: f64,
}

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

fn ms(x: f64) -> f64 {
    (x * 1e5).round() / 100.0
}

fn check(outcome: &Outcome, tasks: usize) -> anyhow::Result<()> {
    if !outcome.exactly_once(tasks) {
        bail!(
            "not every task completed exactly once: accepted {} of {tasks}, once {}, twice {:?}, never {:?}",
            outcome.submitted,
            outcome.completed_once,
            &outcome.completed_twice[..outcome.completed_twice.len().min(10)],
            &outcome.never_completed[..outcome.never_completed.len().min(10)],
        );
    }
    Ok(())
}

/// Cross-checks with the coordinator's own count of completed tasks.
async fn completed_by_coordinator(base: &str) -> anyhow::Result<u64> {
    let stats: Value = sim::http_client()?
        .get(format!("{base}/stats"))
        .send()
        .await?
        .json()
        .await?;
    stats["tasks"]["completed"]
        .as_u64()
        .context("stats without tasks.completed")
}

/// Appends `record` to the `--json` file (first, so a closed stdout cannot lose it), then
/// prints it.
fn write_record(path: Option<&Path>, record: &Value) -> anyhow::Result<()> {
    if let Some(path) = path {
        process::append_record(path, record)?;
    }
    writeln!(std::io::stdout(), "{}", serde_json::to_string(record)?).ok();
    Ok(())
}

fn latency_json(values: &mut [f64]) -> Value {
    json!({
        "p50_ms": ms(percentile(values, 50.0)),
        "p90_ms": ms(percentile(values, 90.0)),
        "p99_ms": ms(percentile(values, 99.0)),
        "max_ms": ms(percentile(values, 100.0)),
    })
}

/// Runs `plan`, sampling the coordinator (`pid`) and this process at the window's ends.
async fn measured(plan: Plan, pid: u32) -> anyhow::Result<(Outcome, [Sample; 4])> {
    let me = std::process::id().to_string();
    let pid = pid.to_string();
    let mut marks = Vec::new();
    // Called at `Phase::WindowStart`, then at `Phase::WindowEnd`.
    let outcome = sim::run(plan, |_phase: Phase| {
        marks.push((sample(&pid), sample(&me)))
    })
    .await?;
    let [(c0, l0), (c1, l1)] = marks[..] else {
        bail!("the window was not sampled at both ends");
    };
    Ok((outcome, [c0, c1, l0, l1]))
}

// ---------------------------------------------------------------------------------------------
// Benchmarks
// ---------------------------------------------------------------------------------------------

async fn dispatch(a: DispatchArgs, json_out: Option<&Path>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (coordinator, base) = start_coordinator(dir.path(), &a.sync).await?;
    let result = async {
        let plan = Plan {
            nodes: a.nodes,
            pullers: a.nodes,
            slots: a.slots,
            tasks: a.tasks,
            submitters: a.submitters,
            heartbeat_connections: 4,
            batch: a.batch.into(),
            batch_results: a.batch_results,
            ..Plan::new(&base)
        };
        let (mut o, [c0, c1, l0, l1]) = measured(plan, coordinator.pid).await?;
        check(&o, a.tasks)?;
        let recorded = completed_by_coordinator(&base).await?;
        anyhow::ensure!(
            recorded == a.tasks as u64,
            "the coordinator counts {recorded} completed tasks, not {}",
            a.tasks
        );
        let rate = a.tasks as f64 / o.dispatch.as_secs_f64();
        println!(
            "dispatch sync={} tasks={} nodes={}x{} slots submitters={} batch={} batch_results={}: \
             {:.0} tasks/s ({:.2} s); submit→result p50 {:.2} ms p99 {:.2} ms; \
             submit→handed out p50 {:.2} ms p99 {:.2} ms; \
             coordinator {:.2} cores, RSS {:.1} MB; loadgen {:.2} cores; 409s {} errors {}",
            a.sync,
            a.tasks,
            a.nodes,
            a.slots,
            a.submitters,
            a.batch,
            a.batch_results,
            rate,
            o.dispatch.as_secs_f64(),
            ms(percentile(&mut o.latency, 50.0)),
            ms(percentile(&mut o.latency, 99.0)),
            ms(percentile(&mut o.start_latency, 50.0)),
            ms(percentile(&mut o.start_latency, 99.0)),
            cores(&c0, &c1),
            c1.rss_mb,
            cores(&l0, &l1),
            o.refused,
            o.errors
        );
        write_record(
            json_out,
            &json!({
                "bench": "dispatch", "sync": a.sync, "tasks": a.tasks, "nodes": a.nodes,
                "slots": a.slots, "submitters": a.submitters,
                "batch": a.batch, "batch_results": a.batch_results,
                "tasks_per_s": rate.round(), "seconds": o.dispatch.as_secs_f64(),
                "submit_to_result": latency_json(&mut o.latency),
                "submit_to_start": latency_json(&mut o.start_latency),
                "coordinator_cores": cores(&c0, &c1), "coordinator_rss_mb": c1.rss_mb,
                "loadgen_cores": cores(&l0, &l1), "loadgen_rss_mb": l1.rss_mb,
                "refused": o.refused, "errors": o.errors, "exactly_once": true,
            }),
        )
    }
    .await;
    coordinator.stop().await?;
    result
}

async fn scale(a: ScaleArgs, json_out: Option<&Path>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (coordinator, base) = start_coordinator(dir.path(), &a.sync).await?;
    let result = async {
        let tasks = (a.task_rate * a.seconds).round() as usize;
        let plan = Plan {
            nodes: a.nodes,
            pullers: a.pullers.min(a.nodes),
            slots: a.slots,
            heartbeat_interval: Duration::from_secs_f64(a.heartbeat_interval),
            heartbeat_connections: a.heartbeat_connections,
            tasks,
            submitters: 8,
            task_rate: Some(a.task_rate),
            min_window: Duration::from_secs_f64(a.seconds),
            ..Plan::new(&base)
        };
        let (mut o, [c0, c1, l0, l1]) = measured(plan, coordinator.pid).await?;
        check(&o, tasks)?;
        let window = o.window.as_secs_f64();
        let hb_rate = o.heartbeats as f64 / window;
        println!(
            "scale nodes={} interval={} s connections={} tasks={} ({}/s) window {:.1} s: \
             heartbeats {:.0}/s (target {:.0}/s), heartbeat p50 {:.2} ms p99 {:.2} ms; \
             coordinator {:.3} cores, RSS {:.1} MB; loadgen {:.3} cores, RSS {:.1} MB; \
             registration {:.2} s; task submit→result p99 {:.2} ms; errors {}",
            a.nodes,
            a.heartbeat_interval,
            a.heartbeat_connections,
            tasks,
            a.task_rate,
            window,
            hb_rate,
            o.heartbeat_target_rate,
            ms(percentile(&mut o.heartbeat_latency, 50.0)),
            ms(percentile(&mut o.heartbeat_latency, 99.0)),
            cores(&c0, &c1),
            c1.rss_mb,
            cores(&l0, &l1),
            l1.rss_mb,
            o.registration.as_secs_f64(),
            ms(percentile(&mut o.latency, 99.0)),
            o.errors
        );
        write_record(
            json_out,
            &json!({
                "bench": "scale", "sync": a.sync, "nodes": a.nodes, "pullers": a.pullers,
                "heartbeat_interval": a.heartbeat_interval,
                "heartbeat_connections": a.heartbeat_connections,
                "task_rate": a.task_rate, "tasks": tasks, "window_s": window,
                "heartbeats_per_s": hb_rate, "heartbeat_target_per_s": o.heartbeat_target_rate,
                "heartbeat": latency_json(&mut o.heartbeat_latency),
                "submit_to_result": latency_json(&mut o.latency),
                "coordinator_cores": cores(&c0, &c1), "coordinator_rss_mb": c1.rss_mb,
                "loadgen_cores": cores(&l0, &l1), "loadgen_rss_mb": l1.rss_mb,
                "registration_s": o.registration.as_secs_f64(),
                "errors": o.errors, "exactly_once": true,
            }),
        )
    }
    .await;
    coordinator.stop().await?;
    result
}

async fn memory(a: MemoryArgs, json_out: Option<&Path>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (coordinator, base) = start_coordinator(dir.path(), &a.sync).await?;
    let empty_rss = status_mb(&coordinator.pid.to_string(), "VmRSS")?;
    let filled = async {
        let plan = Plan {
            nodes: a.nodes,
            pullers: a.pullers.min(a.nodes),
            slots: a.slots,
            tasks: a.tasks,
            submitters: a.submitters,
            heartbeat_connections: 8,
            deadline: Duration::from_secs(6 * 3600),
            ..Plan::new(&base)
        };
        let (o, [_, c1, _, l1]) = measured(plan, coordinator.pid).await?;
        check(&o, a.tasks)?;
        let hwm = status_mb(&coordinator.pid.to_string(), "VmHWM")?;
        anyhow::Ok((o, c1, l1, hwm))
    }
    .await;
    coordinator.stop().await?;
    let (filled, full, loadgen, hwm) = filled?;
    let db_mb = dir_mb(dir.path());
    println!(
        "memory: filled {} tasks through {} nodes in {:.1} s ({:.0} tasks/s); coordinator RSS \
         empty {:.1} MB, with {} nodes and {} finished tasks {:.1} MB (peak {:.1} MB); \
         database {:.0} MB; loadgen RSS {:.1} MB",
        a.tasks,
        a.nodes,
        filled.dispatch.as_secs_f64(),
        a.tasks as f64 / filled.dispatch.as_secs_f64(),
        empty_rss,
        a.nodes,
        a.tasks,
        full.rss_mb,
        hwm,
        db_mb,
        loadgen.rss_mb
    );

    // Restart on the same store: only unfinished work (none) is loaded; every node registers
    // again and heartbeats for `settle` seconds.
    let (coordinator, base) = start_coordinator(dir.path(), &a.sync).await?;
    let restarted = async {
        // The store is loaded before the coordinator serves: once it answers, it is.
        sim::http_client()?
            .get(format!("{base}/health"))
            .send()
            .await?
            .error_for_status()?;
        let restart_rss = status_mb(&coordinator.pid.to_string(), "VmRSS")?;
        let plan = Plan {
            nodes: a.nodes,
            pullers: 0,
            tasks: 0,
            heartbeat_connections: 8,
            min_window: Duration::from_secs_f64(a.settle),
            ..Plan::new(&base)
        };
        let (_, [_, c1, _, _]) = measured(plan, coordinator.pid).await?;
        let stored = completed_by_coordinator(&base).await?;
        anyhow::ensure!(
            stored == a.tasks as u64,
            "after the restart the store holds {stored} completed tasks, not {}",
            a.tasks
        );
        anyhow::Ok((restart_rss, c1.rss_mb))
    }
    .await;
    coordinator.stop().await?;
    let (restart_rss, restart_nodes_rss) = restarted?;
    println!(
        "memory after restart with {} finished tasks stored: RSS {:.1} MB once serving, {:.1} MB \
         after {} nodes heartbeated for {} s",
        a.tasks, restart_rss, restart_nodes_rss, a.nodes, a.settle
    );
    write_record(
        json_out,
        &json!({
            "bench": "memory", "sync": a.sync, "tasks": a.tasks, "nodes": a.nodes,
            "fill_seconds": filled.dispatch.as_secs_f64(),
            "fill_tasks_per_s": a.tasks as f64 / filled.dispatch.as_secs_f64(),
            "coordinator_rss_empty_mb": empty_rss, "coordinator_rss_full_mb": full.rss_mb,
            "coordinator_hwm_mb": hwm, "database_mb": db_mb,
            "coordinator_rss_restart_mb": restart_rss,
            "coordinator_rss_restart_nodes_mb": restart_nodes_rss,
            "loadgen_rss_mb": loadgen.rss_mb, "exactly_once": true,
        }),
    )
}

fn dir_mb(dir: &Path) -> f64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len() as f64)
                .sum::<f64>()
        })
        .unwrap_or(0.0)
        / 1_048_576.0
}

/// RSS in MB of the agent, its zygote, and the zygote's runs (summed), right now.
fn agent_rss(agent: u32) -> (f64, f64, f64) {
    let agent_mb = status_mb(&agent.to_string(), "VmRSS").unwrap_or(f64::NAN);
    let below = descendants(agent);
    let zygote = below.iter().find(|p| p.2 == "lull-zygote").map(|p| p.0);
    let zygote_mb = zygote
        .map(|z| status_mb(&z.to_string(), "VmRSS").unwrap_or(0.0))
        .unwrap_or(0.0);
    let runs_mb = zygote
        .map(|z| {
            descendants(z)
                .iter()
                .map(|p| status_mb(&p.0.to_string(), "VmRSS").unwrap_or(0.0))
                .sum()
        })
        .unwrap_or(0.0);
    (agent_mb, zygote_mb, runs_mb)
}

async fn agent(a: AgentArgs, json_out: Option<&Path>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (coordinator, base) = start_coordinator(&dir.path().join("coordinator"), "normal").await?;
    let bin = release_dir()?.join("lull-agent");
    let spawned = tokio::process::Command::new(&bin)
        .args(["--coordinator", &base, "--executor", "zygote", "--cpus"])
        .arg(a.cpus.to_string())
        .arg("--state-dir")
        .arg(dir.path().join("agent"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("could not start {}", bin.display()));
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            coordinator.stop().await?;
            return Err(e);
        }
    };
    let pid = child.id().context("agent has no pid")?;
    let agent_proc = Started {
        child,
        pid,
        name: "lull-agent",
    };
    let result = agent_phases(&a, &base, pid).await;
    agent_proc.stop().await?;
    coordinator.stop().await?;
    let record = result?;
    write_record(json_out, &record)
}

async fn agent_phases(a: &AgentArgs, base: &str, pid: u32) -> anyhow::Result<Value> {
    let http = sim::http_client()?;
    // Idle: registered, zygote up, nothing to do for `settle` seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes: Value = http
            .get(format!("{base}/api/v1/nodes"))
            .send()
            .await?
            .json()
            .await?;
        let registered = nodes["items"].as_array().is_some_and(|n| !n.is_empty());
        if registered && agent_rss(pid).1 > 0.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent did not register with a zygote within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let idle = agent_rss(pid);

    // Busy: `tasks` trivial tasks through its slots, sampled every 50 ms.
    let submitted = futures::future::join_all((0..a.tasks).map(|_| {
        let http = http.clone();
        async move {
            http.post(format!("{base}/submit"))
                .json(&json!({ "code": sim::CODE }))
                .send()
                .await?
                .error_for_status()?;
            anyhow::Ok(())
        }
    }));
    let began = Instant::now();
    let mut peak = (0.0f64, 0.0f64, 0.0f64);
    let mut submit = Box::pin(submitted);
    let mut submits_done = false;
    loop {
        tokio::select! {
            results = &mut submit, if !submits_done => {
                for r in results {
                    r?;
                }
                submits_done = true;
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        let now = agent_rss(pid);
        peak = (peak.0.max(now.0), peak.1.max(now.1), peak.2.max(now.2));
        if submits_done && completed_by_coordinator(base).await? >= a.tasks as u64 {
            break;
        }
        if began.elapsed() > Duration::from_secs(600) {
            bail!("the agent did not finish {} tasks in 600 s", a.tasks);
        }
    }
    let busy_secs = began.elapsed().as_secs_f64();
    let after = agent_rss(pid);
    println!(
        "agent (zygote executor, {} cpus): idle agent {:.1} MB + zygote {:.1} MB; busy ({} tasks \
         in {:.1} s) peak agent {:.1} MB, zygote {:.1} MB, runs {:.1} MB; after: agent {:.1} MB, \
         zygote {:.1} MB",
        a.cpus, idle.0, idle.1, a.tasks, busy_secs, peak.0, peak.1, peak.2, after.0, after.1
    );
    Ok(json!({
        "bench": "agent", "executor": "zygote", "cpus": a.cpus, "tasks": a.tasks,
        "busy_seconds": busy_secs,
        "idle_agent_mb": idle.0, "idle_zygote_mb": idle.1,
        "busy_agent_peak_mb": peak.0, "busy_zygote_peak_mb": peak.1, "busy_runs_peak_mb": peak.2,
        "after_agent_mb": after.0, "after_zygote_mb": after.1,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let json_out = cli.json.as_deref();
    match cli.bench {
        Bench::Dispatch(a) => dispatch(a, json_out).await,
        Bench::Scale(a) => scale(a, json_out).await,
        Bench::Memory(a) => memory(a, json_out).await,
        Bench::Agent(a) => agent(a, json_out).await,
    }
}
