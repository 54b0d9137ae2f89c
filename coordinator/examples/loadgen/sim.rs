//! Simulated agents for the coordinator-alone benchmarks, over real HTTP.
//!
//! A [`Plan`] names `nodes` node ids. Every one heartbeats like `lull-agent` does (first to
//! register, then every `heartbeat_interval`, declaring the runs it holds), but through a few
//! keep-alive connections shared by many ids, so that the load generator is not what limits
//! the coordinator. The first `pullers` of them also long-poll `GET /internal/task` and report
//! every run they are handed as completed at once, without executing anything. Meanwhile
//! `submitters` post `tasks` tasks to `POST /submit`, as fast as they are answered or at
//! `task_rate`.
//!
//! [`run`] records, per task, when its submission was sent, when a simulated agent was handed
//! it and when its result was acknowledged, and says whether every task was completed exactly
//! once. It is shared by the `loadgen` example and `coordinator/tests/loadgen.rs`, which runs
//! it at a tiny size so the tool cannot rot.
//!
//! It asserts nothing itself: the caller decides what a [`Outcome`] must satisfy.

use anyhow::{Context, bail};
use futures::StreamExt;
use lull_shared::{
    AgentState, HeartbeatRequest, Load, NodeResources, PullResponse, ReportVerdict, ResultsAck,
    RunId, RunOutcome, RunReport, RunReportBatch, TaskId,
};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// The benchmark's workload (issue 5): every simulated run "prints" this program's output.
pub const CODE: &str = "print(sum(range(1000)))";
const STDOUT: &str = "499500\n";

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The coordinator, e.g. `http://127.0.0.1:8000`.
    pub base: String,
    /// Node ids that heartbeat.
    pub nodes: usize,
    /// How many of them (the first ones) also pull work and report results.
    pub pullers: usize,
    /// Runs a puller holds at once: its declared cores, and `max` of each pull.
    pub slots: usize,
    pub heartbeat_interval: Duration,
    /// Keep-alive connections the heartbeats of all nodes share.
    pub heartbeat_connections: usize,
    pub tasks: usize,
    /// Submissions in flight at once.
    pub submitters: usize,
    /// Tasks per second over all submitters (open loop); `None`: as fast as answered.
    pub task_rate: Option<f64>,
    /// Heartbeats (and the measured window) go on at least this long, tasks or not.
    pub min_window: Duration,
    /// Gives up waiting for results after this long.
    pub deadline: Duration,
    /// Node ids are `{node_prefix}{index}`.
    pub node_prefix: String,
    /// Tasks per submission: 1 posts each to `POST /submit`; more posts them together to
    /// `POST /api/v1/tasks/batch` (at most 1,000).
    pub batch: usize,
    /// Post the results of each pull together to `POST /internal/results` instead of one
    /// `POST /internal/result` each.
    pub batch_results: bool,
}

impl Plan {
    pub fn new(base: impl Into<String>) -> Plan {
        Plan {
            base: base.into(),
            nodes: 20,
            pullers: 20,
            slots: 4,
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_connections: 4,
            tasks: 200,
            submitters: 16,
            task_rate: None,
            min_window: Duration::ZERO,
            deadline: Duration::from_secs(600),
            node_prefix: "sim-".into(),
            batch: 1,
            batch_results: false,
        }
    }
}

/// The two moments the caller may sample the coordinator's CPU and memory at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Every node registered; heartbeats, pulls and submissions start now.
    WindowStart,
    /// Every task has a result (and `min_window` has passed); nothing is stopped yet.
    WindowEnd,
}

/// What happened.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Tasks the coordinator accepted.
    pub submitted: usize,
    /// Tasks whose result was acknowledged exactly once.
    pub completed_once: usize,
    /// Tasks acknowledged more than once (must be empty).
    pub completed_twice: Vec<TaskId>,
    /// Tasks accepted but never acknowledged (must be empty).
    pub never_completed: Vec<TaskId>,
    /// Results refused with 409 (a run no longer current).
    pub refused: u64,
    /// Requests that failed otherwise (transport errors, 5xx).
    pub errors: u64,
    /// From the first submission sent to the last result acknowledged.
    pub dispatch: Duration,
    /// Registration of every node (their first heartbeats).
    pub registration: Duration,
    /// The measured window, [`Phase::WindowStart`] to [`Phase::WindowEnd`].
    pub window: Duration,
    /// Submission sent → result acknowledged, seconds, per task.
    pub latency: Vec<f64>,
    /// Submission sent → run handed to a simulated agent, seconds, per task.
    pub start_latency: Vec<f64>,
    /// Round trip of each heartbeat in the window, seconds.
    pub heartbeat_latency: Vec<f64>,
    /// Heartbeats sent in the window, and the rate the plan asked for (per second).
    pub heartbeats: u64,
    pub heartbeat_target_rate: f64,
}

impl Outcome {
    /// Every accepted task completed exactly once and nothing went wrong on the way.
    pub fn exactly_once(&self, expected: usize) -> bool {
        self.submitted == expected
            && self.completed_once == expected
            && self.completed_twice.is_empty()
            && self.never_completed.is_empty()
    }
}

#[derive(Default)]
struct TaskTimes {
    submitted: Option<f64>,
    started: Option<f64>,
    done: Option<f64>,
    acks: u32,
}

struct Shared {
    plan: Plan,
    epoch: Instant,
    tasks: Mutex<HashMap<TaskId, TaskTimes>>,
    /// Runs each puller holds, declared in its heartbeats.
    running: Vec<Mutex<BTreeSet<RunId>>>,
    acked: AtomicUsize,
    all_done: tokio::sync::Notify,
    refused: AtomicU64,
    errors: AtomicU64,
    /// Set at window start: heartbeats before it (registration) are not measured.
    measuring: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn node_id(&self, index: usize) -> String {
        format!("{}{index}", self.plan.node_prefix)
    }

    fn heartbeat_body(&self, index: usize) -> HeartbeatRequest {
        let running: Vec<RunId> = self
            .running
            .get(index)
            .map(|r| lock(r).iter().copied().collect())
            .unwrap_or_default();
        let slots = self.plan.slots.max(1) as f64;
        HeartbeatRequest {
            node_id: self.node_id(index),
            status: if running.is_empty() {
                AgentState::Idle
            } else {
                AgentState::Busy
            },
            // Only pullers lend capacity: the others must never be handed a run.
            resources: if index < self.plan.pullers {
                NodeResources {
                    cpu_cores: slots,
                    memory_mb: slots * 1024.0,
                }
            } else {
                NodeResources {
                    cpu_cores: 0.0,
                    memory_mb: 0.0,
                }
            },
            current_load: Load {
                cpu_percent: 1.0,
                memory_percent: 10.0,
            },
            hostname: Some("loadgen".into()),
            node_type: None,
            zone: None,
            version: Some("loadgen".into()),
            running,
            finished: Vec::new(),
            sandbox: None,
            executor: Some("simulated".into()),
            command_results: Vec::new(),
            owner_load: None,
            paused_reason: None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A client that keeps its connections (HTTP/1.1 keep-alive) and never goes through a proxy.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .context("could not build an HTTP client")
}

async fn send_heartbeat(
    http: &reqwest::Client,
    shared: &Shared,
    index: usize,
) -> anyhow::Result<()> {
    let resp = http
        .post(format!("{}/internal/heartbeat", shared.plan.base))
        .json(&shared.heartbeat_body(index))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("heartbeat of node {index}: {}", resp.status());
    }
    // Read the body so the connection goes back to the pool.
    resp.bytes().await?;
    Ok(())
}

/// One keep-alive connection beating for the nodes `first, first + stride, ...`, spread
/// evenly over the interval. Returns the round trips measured in the window.
async fn heartbeat_worker(
    shared: Arc<Shared>,
    first: usize,
    stride: usize,
    stop: CancellationToken,
) -> anyhow::Result<(Vec<f64>, u64)> {
    let http = http_client()?;
    let mine: Vec<usize> = (first..shared.plan.nodes).step_by(stride).collect();
    if mine.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let period = shared.plan.heartbeat_interval / mine.len() as u32;
    let mut ticker = tokio::time::interval(period.max(Duration::from_micros(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut latencies = Vec::new();
    let mut sent = 0;
    for &index in mine.iter().cycle() {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        let began = Instant::now();
        if let Err(e) = send_heartbeat(&http, &shared, index).await {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "heartbeat failed");
            continue;
        }
        if shared.measuring.load(Ordering::Relaxed) {
            latencies.push(began.elapsed().as_secs_f64());
            sent += 1;
        }
    }
    Ok((latencies, sent))
}

/// A simulated run's report: completed at once, printing what the workload prints.
fn completed(node_id: &str, task_id: TaskId, run_id: RunId) -> RunReport {
    let now = unix_now();
    RunReport {
        node_id: node_id.to_string(),
        task_id,
        run_id,
        outcome: RunOutcome::Completed,
        exit_code: Some(0),
        stdout: STDOUT.into(),
        stderr: String::new(),
        error: None,
        started_at: Some(now),
        completed_at: Some(now),
        cpu_seconds: Some(0.0),
        max_rss_mb: Some(0.0),
    }
}

/// Counts one acknowledgement of `task_id`'s result.
fn acknowledged(shared: &Shared, task_id: TaskId) {
    let now = shared.now();
    let mut tasks = lock(&shared.tasks);
    let t = tasks.entry(task_id).or_default();
    t.acks += 1;
    if t.acks == 1 {
        t.done = Some(now);
        drop(tasks);
        if shared.acked.fetch_add(1, Ordering::Relaxed) + 1 >= shared.plan.tasks {
            shared.all_done.notify_one();
        }
    }
}

/// Posts `reports` together to `POST /internal/results` and counts what each answer says.
async fn report_batch(
    http: &reqwest::Client,
    shared: &Shared,
    reports: &[RunReport],
) -> anyhow::Result<()> {
    let body = RunReportBatch {
        results: reports.to_vec(),
    };
    // As in `report`: after a transport error, post the whole batch again; what was
    // recorded already is refused (409) the second time, never counted twice.
    let mut attempt = 0;
    let answer: ResultsAck = loop {
        attempt += 1;
        match http
            .post(format!("{}/internal/results", shared.plan.base))
            .json(&body)
            .send()
            .await
        {
            Ok(resp) if resp.status().is_success() => break resp.json().await?,
            Ok(resp) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                bail!("results batch: {}", resp.status());
            }
            Err(e) if attempt < 5 => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "results post failed; retrying");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => return Err(e).context("posting results"),
        }
    };
    anyhow::ensure!(
        answer.results.len() == reports.len(),
        "{} answers for {} reports",
        answer.results.len(),
        reports.len()
    );
    for (report, item) in reports.iter().zip(&answer.results) {
        match item.status {
            ReportVerdict::Accepted => acknowledged(shared, report.task_id),
            ReportVerdict::Refused => {
                shared.refused.fetch_add(1, Ordering::Relaxed);
            }
            ReportVerdict::Rejected => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(task_id = report.task_id, detail = ?item.detail, "report rejected");
            }
        }
    }
    Ok(())
}

async fn report(
    http: &reqwest::Client,
    shared: &Shared,
    node_id: &str,
    task_id: TaskId,
    run_id: RunId,
) -> anyhow::Result<()> {
    let body = completed(node_id, task_id, run_id);
    // A transport error leaves the result unknown: post again, as the agent's outbox does.
    // A repeated post of a result already recorded is refused (409), never counted twice.
    let mut attempt = 0;
    let status = loop {
        attempt += 1;
        match http
            .post(format!("{}/internal/result", shared.plan.base))
            .json(&body)
            .send()
            .await
        {
            Ok(resp) => {
                let status = resp.status();
                resp.bytes().await.ok();
                break status;
            }
            Err(e) if attempt < 5 => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, task_id, "result post failed; retrying");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => return Err(e).context("posting a result"),
        }
    };
    if status == reqwest::StatusCode::CONFLICT {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    if !status.is_success() {
        shared.errors.fetch_add(1, Ordering::Relaxed);
        bail!("result of task {task_id}: {status}");
    }
    acknowledged(shared, task_id);
    Ok(())
}

/// One simulated agent: long-polls for up to `slots` runs, reports each completed at once.
async fn puller(
    shared: Arc<Shared>,
    http: reqwest::Client,
    index: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let node_id = shared.node_id(index);
    let url = format!(
        "{}/internal/task?node_id={node_id}&wait=5&max={}",
        shared.plan.base,
        shared.plan.slots.max(1)
    );
    loop {
        let resp = tokio::select! {
            r = http.get(&url).send() => r,
            _ = stop.cancelled() => return Ok(()),
        };
        let pulled: PullResponse = match resp {
            Ok(r) if r.status().is_success() => r.json().await?,
            Ok(r) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(status = %r.status(), node_id, "pull refused");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, node_id, "pull failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if pulled.tasks.is_empty() {
            continue;
        }
        let now = shared.now();
        {
            let mut tasks = lock(&shared.tasks);
            for a in &pulled.tasks {
                tasks
                    .entry(a.task_id)
                    .or_default()
                    .started
                    .get_or_insert(now);
            }
        }
        lock(&shared.running[index]).extend(pulled.tasks.iter().map(|a| a.run_id));
        let results = if shared.plan.batch_results {
            let reports: Vec<RunReport> = pulled
                .tasks
                .iter()
                .map(|a| completed(&node_id, a.task_id, a.run_id))
                .collect();
            vec![report_batch(&http, &shared, &reports).await]
        } else {
            let reports = pulled
                .tasks
                .iter()
                .map(|a| report(&http, &shared, &node_id, a.task_id, a.run_id));
            futures::future::join_all(reports).await
        };
        {
            let mut running = lock(&shared.running[index]);
            for a in &pulled.tasks {
                running.remove(&a.run_id);
            }
        }
        for r in results {
            if let Err(e) = r {
                tracing::warn!(error = %e, node_id, "result not recorded");
            }
        }
    }
}

/// Posts tasks until `plan.tasks` were accepted (this submitter's share, taken from `next`).
async fn submitter(
    shared: Arc<Shared>,
    http: reqwest::Client,
    next: Arc<AtomicUsize>,
    pace: Option<Duration>,
) -> anyhow::Result<usize> {
    if shared.plan.batch > 1 {
        return batch_submitter(shared, http, next, pace).await;
    }
    let url = format!("{}/submit", shared.plan.base);
    let body = serde_json::json!({ "code": CODE });
    let mut ticker = pace.map(|p| {
        let mut t = tokio::time::interval(p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut accepted = 0;
    while next.fetch_add(1, Ordering::Relaxed) < shared.plan.tasks {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        let sent = shared.now();
        let resp = http
            .post(&url)
            .json(&body)
            .send()
            .await
            .context("submitting a task")?;
        let status = resp.status();
        if !status.is_success() {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            bail!("submit answered {status}");
        }
        let answer: serde_json::Value = resp.json().await.context("submit answer")?;
        let task_id = answer["task_id"]
            .as_i64()
            .context("submit answer without task_id")?;
        lock(&shared.tasks).entry(task_id).or_default().submitted = Some(sent);
        accepted += 1;
    }
    Ok(accepted)
}

/// [`submitter`] with `plan.batch` tasks per `POST /api/v1/tasks/batch` (the last batch may
/// be smaller); `pace` is per batch.
async fn batch_submitter(
    shared: Arc<Shared>,
    http: reqwest::Client,
    next: Arc<AtomicUsize>,
    pace: Option<Duration>,
) -> anyhow::Result<usize> {
    let url = format!("{}/api/v1/tasks/batch", shared.plan.base);
    let size = shared.plan.batch;
    let task = serde_json::json!({ "code": CODE });
    let mut ticker = pace.map(|p| {
        let mut t = tokio::time::interval(p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut accepted = 0;
    loop {
        let first = next.fetch_add(size, Ordering::Relaxed);
        if first >= shared.plan.tasks {
            break;
        }
        let n = size.min(shared.plan.tasks - first);
        let body = serde_json::json!({ "tasks": vec![&task; n] });
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        let sent = shared.now();
        let resp = http
            .post(&url)
            .json(&body)
            .send()
            .await
            .context("submitting a batch")?;
        let status = resp.status();
        if !status.is_success() {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            bail!("batch submit answered {status}");
        }
        let answer: serde_json::Value = resp.json().await.context("batch answer")?;
        let ids = answer["task_ids"]
            .as_array()
            .context("batch answer without task_ids")?;
        anyhow::ensure!(ids.len() == n, "{} ids for {n} tasks", ids.len());
        let mut tasks = lock(&shared.tasks);
        for id in ids {
            let task_id = id.as_i64().context("a task id that is not a number")?;
            tasks.entry(task_id).or_default().submitted = Some(sent);
        }
        accepted += n;
    }
    Ok(accepted)
}

/// Registers every node, then runs heartbeats, pullers and submitters until every task has
/// a result (or the deadline passes), calling `at` at the window's two ends.
pub async fn run(plan: Plan, mut at: impl FnMut(Phase)) -> anyhow::Result<Outcome> {
    anyhow::ensure!(plan.pullers <= plan.nodes, "pullers must be at most nodes");
    anyhow::ensure!(
        plan.tasks == 0 || plan.pullers > 0,
        "tasks need at least one puller"
    );
    let connections = plan.heartbeat_connections.clamp(1, plan.nodes.max(1));
    let shared = Arc::new(Shared {
        running: (0..plan.pullers).map(|_| Mutex::default()).collect(),
        plan,
        epoch: Instant::now(),
        tasks: Mutex::new(HashMap::new()),
        acked: AtomicUsize::new(0),
        all_done: tokio::sync::Notify::new(),
        refused: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        measuring: false.into(),
    });
    let plan = &shared.plan;

    // 1. Registration: every node's first heartbeat, many in flight over a shared pool.
    let registering = Instant::now();
    let http = http_client()?;
    let failures: Vec<anyhow::Error> = futures::stream::iter(0..plan.nodes)
        .map(|i| {
            let (http, shared) = (http.clone(), shared.clone());
            async move { send_heartbeat(&http, &shared, i).await }
        })
        .buffer_unordered(connections * 8)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    if let Some(e) = failures.into_iter().next() {
        return Err(e.context("registering the simulated nodes"));
    }
    let registration = registering.elapsed();

    // 2. The window: heartbeats, pullers, submitters.
    let stop = CancellationToken::new();
    let beats: Vec<_> = (0..connections)
        .map(|k| {
            tokio::spawn(heartbeat_worker(
                shared.clone(),
                k,
                connections,
                stop.clone(),
            ))
        })
        .collect();
    shared.measuring.store(true, Ordering::Relaxed);
    at(Phase::WindowStart);
    let window_began = Instant::now();
    let pull_http = http_client()?;
    let pullers: Vec<_> = (0..plan.pullers)
        .map(|i| tokio::spawn(puller(shared.clone(), pull_http.clone(), i, stop.clone())))
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let submitters_n = plan.submitters.max(1);
    let pace = plan
        .task_rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(submitters_n as f64 * plan.batch.max(1) as f64 / r));
    let dispatch_began = Instant::now();
    let submitters: Vec<_> = (0..submitters_n)
        .map(|_| tokio::spawn(submitter(shared.clone(), http.clone(), next.clone(), pace)))
        .collect();
    let mut submitted = 0;
    for s in submitters {
        submitted += s.await.context("submitter panicked")??;
    }
    let waited = tokio::time::timeout(plan.deadline, async {
        while shared.acked.load(Ordering::Relaxed) < plan.tasks {
            let notified = shared.all_done.notified();
            if shared.acked.load(Ordering::Relaxed) >= plan.tasks {
                break;
            }
            // Bounded: a result that raced the check above is seen within 100 ms.
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    })
    .await;
    let dispatch = dispatch_began.elapsed();
    if waited.is_err() {
        tracing::warn!(
            acked = shared.acked.load(Ordering::Relaxed),
            tasks = plan.tasks,
            "deadline passed before every task had a result"
        );
    }
    if let Some(rest) = plan.min_window.checked_sub(window_began.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    at(Phase::WindowEnd);
    let window = window_began.elapsed();
    shared.measuring.store(false, Ordering::Relaxed);
    stop.cancel();
    for p in pullers {
        p.await.context("puller panicked")??;
    }
    let mut heartbeat_latency = Vec::new();
    let mut heartbeats = 0;
    for b in beats {
        let (lat, n) = b.await.context("heartbeat worker panicked")??;
        heartbeat_latency.extend(lat);
        heartbeats += n;
    }

    let tasks = std::mem::take(&mut *lock(&shared.tasks));
    let mut out = Outcome {
        submitted,
        refused: shared.refused.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        dispatch,
        registration,
        window,
        heartbeat_latency,
        heartbeats,
        heartbeat_target_rate: plan.nodes as f64 / plan.heartbeat_interval.as_secs_f64(),
        ..Outcome::default()
    };
    for (task_id, t) in tasks {
        match t.acks {
            0 => out.never_completed.push(task_id),
            1 => out.completed_once += 1,
            _ => out.completed_twice.push(task_id),
        }
        if let (Some(s), Some(d)) = (t.submitted, t.done) {
            out.latency.push(d - s);
        }
        if let (Some(s), Some(st)) = (t.submitted, t.started) {
            out.start_latency.push(st - s);
        }
    }
    out.never_completed.sort_unstable();
    out.completed_twice.sort_unstable();
    Ok(out)
}

/// The `p`th percentile (0–100) of `values`, which it sorts; NaN when empty.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}
