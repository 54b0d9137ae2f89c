//! The supervisor: registers with the coordinator, keeps one long-poll for work outstanding,
//! runs every assignment it is handed, applies cancels, and shuts down gracefully.
//!
//! Tasks it starts: the heartbeat ticker, the outbox deliverer, and one task per run. The
//! table of runs ([`Runs`]) is what heartbeats report as `running` and what cancels act on.

use crate::client::{CallError, CoordinatorClient};
use crate::commands::{Commands, Stopped};
use crate::executor::{
    ColdExecutor, Execution, Executor, ExecutorKind, Job, PauseClock, PauseSwitch, RunControl,
    RunPoint, RunProcess, ZygoteExecutor, ZygoteSettings, format_seconds,
};
use crate::heartbeat::{LoadMeter, heartbeat_until_stopped, send_heartbeat};
use crate::outbox::Outbox;
use crate::owner::OwnerLoad;
use crate::retry::{Backoff, FailureLog};
use crate::slots::Slots;
use crate::{AgentConfig, AgentError, resolve_node_id};
use lull_shared::{
    AgentState, Assignment, DEFAULT_TIMEOUT_SECS, NodeResources, RunId, RunOutcome, RunReport,
    TaskId,
};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// How many assignments one pull may bring; the coordinator decides what actually fits.
const PULL_MAX: usize = 64;
const PULL_RETRY_INITIAL: Duration = Duration::from_millis(100);
const PULL_RETRY_MAX: Duration = Duration::from_secs(2);
/// After the grace period, how long released runs get to die (they are sent SIGKILL).
const RELEASE_WAIT: Duration = Duration::from_secs(10);
/// How long shutdown keeps posting results; what remains stays on disk for the next start.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// Bounds the `draining` and `offline` heartbeats, which are best effort.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(3);
const RELEASED_ERROR: &str = "agent shutting down";

/// Runs the agent with the executor its configuration chooses (the zygote, unless it cannot
/// start here or `cold` is asked for) until `shutdown` is cancelled, then shuts down
/// gracefully (see the crate docs) and returns `Ok`. Errors only when it cannot start.
///
/// A `restart` command from the coordinator is carried out in this process: the agent
/// shuts down gracefully and starts again (new executor, same node id). `lull-agent`
/// uses [`run_once`] instead and re-executes itself.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    loop {
        match run_once(config.clone(), shutdown.clone()).await? {
            Stopped::Shutdown => return Ok(()),
            Stopped::Decommission => {
                info!("decommissioned: this agent has left the pool");
                return Ok(());
            }
            Stopped::Restart => info!("restarting the agent in process"),
        }
    }
}

/// [`run`] until shutdown or until a `restart` command, saying which: the caller restarts.
pub async fn run_once(
    config: AgentConfig,
    shutdown: CancellationToken,
) -> Result<Stopped, AgentError> {
    // Before the probe: a contradiction in the configuration is said at once.
    validate(&config)?;
    PreparedExecutor::start(&config)
        .await
        .run(config, shutdown)
        .await
}

/// The executor the configuration chooses, started: the zygote, unless it cannot start
/// here (then cold) or `cold` is asked for.
pub(crate) enum PreparedExecutor {
    Zygote(ZygoteExecutor),
    Cold(ColdExecutor),
}

impl PreparedExecutor {
    pub(crate) async fn start(config: &AgentConfig) -> PreparedExecutor {
        let python = ColdExecutor::resolve_interpreter(&config.python).await;
        tracing::info!(python = %python, "interpreter resolved");
        let launcher = config
            .sandbox_launcher
            .clone()
            .or_else(crate::sandbox::default_launcher);
        let mut settings = config.sandbox.clone();
        settings
            .expose
            .extend(ColdExecutor::interpreter_prefixes(&python).await);
        let protections = crate::sandbox::probe(
            launcher.as_deref(),
            &settings,
            &python,
            config.max_sandbox_level,
        )
        .await;
        report_protections(&protections);
        let executor = ColdExecutor::new(python.clone(), config.max_output_bytes).with_sandbox(
            launcher.unwrap_or_default(),
            protections.clone(),
            settings.clone(),
        );
        // Cold runs are fresh interpreters too when the zygote launches them (it only forks
        // and sandboxes each, then execs python3): one long-lived launcher instead of a
        // `lull-sandbox` per run. Without a zygote, `lull-sandbox` launches each.
        let fresh_interpreter = config.executor == ExecutorKind::Cold;
        let zygote = ZygoteSettings {
            binary: config
                .zygote_bin
                .clone()
                .or_else(ZygoteSettings::default_binary)
                .unwrap_or_else(|| "lull-zygote".into()),
            python,
            // Nothing to preload for runs that exec their own interpreter.
            preload: if fresh_interpreter {
                Vec::new()
            } else {
                config.preload.clone()
            },
            protections,
            sandbox: settings,
            max_output_bytes: config.max_output_bytes,
            fresh_interpreter,
        };
        match ZygoteExecutor::start(zygote, executor.clone()).await {
            Ok(zygote) => return PreparedExecutor::Zygote(zygote),
            Err(err) if fresh_interpreter => {
                warn!(%err, "no zygote to launch cold runs; lull-sandbox launches each")
            }
            Err(err) => {
                warn!(%err, "the zygote executor cannot run here; using the cold executor")
            }
        }
        PreparedExecutor::Cold(executor)
    }

    /// `zygote` or `cold`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            PreparedExecutor::Zygote(z) => z.kind(),
            PreparedExecutor::Cold(c) => c.kind(),
        }
    }

    pub(crate) async fn run(
        self,
        config: AgentConfig,
        shutdown: CancellationToken,
    ) -> Result<Stopped, AgentError> {
        match self {
            PreparedExecutor::Zygote(z) => run_with_executor(config, z, shutdown).await,
            PreparedExecutor::Cold(c) => run_with_executor(config, c, shutdown).await,
        }
    }
}

/// Says once, at start, what every run will get and what it will not.
fn report_protections(p: &lull_shared::Protections) {
    info!(
        level = %p.level,
        namespaces = p.namespaces,
        drop_user = p.drop_user,
        seccomp = p.seccomp,
        cgroups = p.cgroups,
        "sandbox probed"
    );
    for missing in &p.missing {
        warn!(level = %p.level, "sandbox: {missing}");
    }
}

/// [`run`] with another [`Executor`].
pub async fn run_with_executor<E: Executor>(
    config: AgentConfig,
    executor: E,
    shutdown: CancellationToken,
) -> Result<Stopped, AgentError> {
    validate(&config)?;
    let protections = executor.protections();
    if protections.level < config.min_sandbox_level {
        return Err(AgentError::SandboxTooWeak {
            have: protections.level,
            want: config.min_sandbox_level,
        });
    }
    crate::node_id::private_state_dir(&config.state_dir)?;
    let node_id = resolve_node_id(&config).await?;
    let client = CoordinatorClient::new(
        &config.coordinator,
        config.token.as_deref(),
        config.secret.clone(),
        config.ca_cert.as_deref(),
    )?;
    let outbox = Outbox::open(config.state_dir.join("outbox")).await?;
    let meter = LoadMeter::new();
    let capacity = NodeResources {
        cpu_cores: config.cpus.unwrap_or_else(|| meter.logical_cores()),
        memory_mb: config.memory_mb.unwrap_or_else(|| meter.total_memory_mb()),
    };
    let hostname = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    info!(
        node_id,
        coordinator = config.coordinator,
        cpu_cores = capacity.cpu_cores,
        memory_mb = capacity.memory_mb,
        pending_results = outbox.len(),
        "agent starting"
    );

    // Stopped by shutdown, or by a `restart` command.
    let stop_pulling = shutdown.child_token();
    let commands = Commands::open(&config.state_dir, stop_pulling.clone());
    let (pause_switch, pause_clock) = PauseClock::new();
    let shared = Arc::new(Shared {
        commands,
        config,
        node_id,
        hostname,
        capacity,
        client,
        runs: Runs::default(),
        slots: Slots::new(capacity),
        outbox,
        draining: AtomicBool::new(false),
        paused_because: Mutex::new(None),
        pause_switch,
        pause_clock,
        owner_load: Mutex::new(None),
        load: Mutex::new(meter),
        protections,
        executor_name: executor.kind(),
    });
    let executor = Arc::new(executor);

    let stop_heartbeats = CancellationToken::new();
    let heartbeats = tokio::spawn(heartbeat_until_stopped(
        Arc::clone(&shared),
        stop_heartbeats.clone(),
    ));
    let owner = tokio::spawn(crate::owner::watch_owner_until_stopped(
        Arc::clone(&shared),
        stop_heartbeats.clone(),
    ));
    let stop_delivery = CancellationToken::new();
    let delivery = tokio::spawn({
        let shared = Arc::clone(&shared);
        let refill = RefillWithResults {
            shared: Arc::clone(&shared),
            executor: Arc::clone(&executor),
            stop_pulling: stop_pulling.clone(),
        };
        let stop = stop_delivery.clone();
        async move {
            shared
                .outbox
                .deliver_until_stopped(&shared.client, &refill, shared.config.results_linger, stop)
                .await
        }
    });

    pull_until_stopped(&shared, &executor, &stop_pulling).await;

    // Graceful shutdown, in order: say we are leaving, let runs finish, release the rest,
    // post what we can, say goodbye.
    info!(running = shared.runs.len(), "agent shutting down");
    shared.draining.store(true, Ordering::SeqCst);
    farewell(&shared, AgentState::Draining).await;
    drain_runs(&shared).await;

    if tokio::time::timeout(FLUSH_WAIT, shared.outbox.wait_empty())
        .await
        .is_err()
    {
        warn!(
            results = shared.outbox.len(),
            "results left in the outbox for the next start"
        );
    }
    stop_delivery.cancel();
    stop_heartbeats.cancel();
    for (what, task) in [
        ("result delivery", delivery),
        ("heartbeat", heartbeats),
        ("owner watch", owner),
    ] {
        if let Err(err) = task.await {
            error!(%err, "the {what} task failed");
        }
    }
    // What is still waiting goes to disk for the next start (delivery has stopped).
    shared.outbox.save_unsaved().await;
    shared.commands.finish_decommission();
    farewell(&shared, AgentState::Offline).await;
    let stopped = if shutdown.is_cancelled() {
        Stopped::Shutdown
    } else {
        shared.commands.finish()
    };
    info!(?stopped, "agent stopped");
    Ok(stopped)
}

fn validate(config: &AgentConfig) -> Result<(), AgentError> {
    let invalid = |what: &str| Err(AgentError::InvalidConfig(what.to_string()));
    if config.heartbeat_interval.is_zero() {
        return invalid("heartbeat_interval must be greater than zero");
    }
    if config.pull_wait.is_zero() {
        return invalid("pull_wait must be greater than zero");
    }
    for (name, value) in [("cpus", config.cpus), ("memory_mb", config.memory_mb)] {
        if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            return invalid(&format!("{name} must be a positive number"));
        }
    }
    if config.min_sandbox_level > config.max_sandbox_level {
        return invalid(&format!(
            "min_sandbox_level {} is above max_sandbox_level {}",
            config.min_sandbox_level.as_str(),
            config.max_sandbox_level.as_str()
        ));
    }
    Ok(())
}

/// What the agent's tasks share.
pub(crate) struct Shared {
    /// Node commands from heartbeat answers, and their outcomes for the next ones.
    pub(crate) commands: Commands,
    pub(crate) config: AgentConfig,
    pub(crate) node_id: String,
    pub(crate) hostname: String,
    /// Declared capacity, as sent in heartbeats.
    pub(crate) capacity: NodeResources,
    pub(crate) client: CoordinatorClient,
    pub(crate) runs: Runs,
    /// Where runs wait for capacity: the coordinator may lease a few more than fit at once.
    slots: Arc<Slots>,
    pub(crate) outbox: Outbox,
    draining: AtomicBool,
    /// Why the node is paused for its owner (`None`: it is not).
    pub(crate) paused_because: Mutex<Option<String>>,
    /// Stops and restarts the runs' wall clocks with the pause.
    pub(crate) pause_switch: PauseSwitch,
    pub(crate) pause_clock: PauseClock,
    /// The owner's load as last measured (`None` before the first measurement).
    pub(crate) owner_load: Mutex<Option<OwnerLoad>>,
    pub(crate) load: Mutex<LoadMeter>,
    /// What every run gets, as reported in heartbeats.
    pub(crate) protections: lull_shared::Protections,
    pub(crate) executor_name: &'static str,
}

impl Shared {
    /// The status heartbeats announce.
    pub(crate) fn current_state(&self) -> AgentState {
        if self.draining.load(Ordering::SeqCst) {
            AgentState::Draining
        } else if self.paused_reason().is_some() {
            AgentState::Paused
        } else if self.runs.is_empty() {
            AgentState::Idle
        } else {
            AgentState::Busy
        }
    }

    /// Why the node is paused for its owner, if it is.
    pub(crate) fn paused_reason(&self) -> Option<String> {
        self.paused_because
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stops a run because the coordinator said so (from a heartbeat or a pull answer; both
    /// repeat it until the run is gone, so only the first call acts): SIGTERM to the run's
    /// processes, SIGKILL (the executor's cancel) once they are gone or after `stop_grace`.
    /// A run nothing of which handles SIGTERM is killed at once — SIGTERM would have ended
    /// it, except its PID 1, which ignores signals it has no handler for — and so is one
    /// that has no process yet (waiting for a slot).
    pub(crate) fn cancel_run(&self, run_id: RunId) {
        let Some((cancel, pid)) = self.runs.begin_stop(run_id, StopReason::Cancelled) else {
            debug!(
                run_id,
                "cancel for a run that is not running here or already stopping; nothing to do"
            );
            return;
        };
        let Some(pid) = pid else {
            info!(run_id, "cancelling a run that has not started");
            cancel.cancel();
            return;
        };
        let grace = self.config.stop_grace;
        tokio::spawn(async move {
            let handled =
                tokio::task::spawn_blocking(move || crate::owner::suspend::terminate(pid))
                    .await
                    .unwrap_or_else(|err| {
                        Err(crate::owner::suspend::SuspendError::Gone(err.to_string()))
                    });
            match handled {
                Ok(true) if !grace.is_zero() => {
                    info!(
                        run_id,
                        pid,
                        grace_secs = grace.as_secs_f64(),
                        "run stopping: SIGTERM sent; SIGKILL after the grace"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(grace) => {}
                        () = cancel.cancelled() => {}
                    }
                }
                Ok(_) => info!(
                    run_id,
                    pid, "run stopping: nothing handles SIGTERM; killing it"
                ),
                Err(err) => warn!(run_id, pid, %err, "could not send SIGTERM; killing the run"),
            }
            cancel.cancel();
        });
    }
}

/// Sends a best-effort heartbeat during shutdown.
async fn farewell(shared: &Shared, status: AgentState) {
    match tokio::time::timeout(FAREWELL_TIMEOUT, send_heartbeat(shared, status)).await {
        Ok(Ok(_)) => debug!(?status, "heartbeat sent"),
        Ok(Err(err)) => info!(?status, %err, "could not tell the coordinator"),
        Err(_) => info!(?status, "the coordinator did not answer in time"),
    }
}

/// Hands back at once the runs still waiting for a slot (another node may start them
/// sooner), lets the running ones finish within the grace period, then releases the rest.
async fn drain_runs(shared: &Shared) {
    for run_id in shared.slots.waiting_runs() {
        if shared.runs.stop(run_id, StopReason::Released) {
            info!(run_id, "handing back a run that had not started");
        }
    }
    if shared.runs.is_empty() {
        return;
    }
    let grace = shared.config.shutdown_grace;
    info!(
        running = shared.runs.len(),
        grace_secs = format_seconds(grace),
        "waiting for running runs to finish"
    );
    if tokio::time::timeout(grace, shared.runs.wait_empty())
        .await
        .is_ok()
    {
        return;
    }
    warn!(
        running = shared.runs.len(),
        "grace period over; releasing the remaining runs"
    );
    shared.runs.stop_all(StopReason::Released);
    if tokio::time::timeout(RELEASE_WAIT, shared.runs.wait_empty())
        .await
        .is_err()
    {
        error!(
            running = shared.runs.len(),
            "some runs did not stop after being killed"
        );
    }
}

/// Keeps one long-poll outstanding until `stop`, starting every assignment it brings.
async fn pull_until_stopped<E: Executor>(
    shared: &Arc<Shared>,
    executor: &Arc<E>,
    stop: &CancellationToken,
) {
    let mut backoff = Backoff::new(PULL_RETRY_INITIAL, PULL_RETRY_MAX);
    let mut failures = FailureLog::new("pulling work");

    // The first heartbeat registers the node; the first pull would only 404 without it.
    let registered = tokio::select! {
        () = stop.cancelled() => return,
        sent = send_heartbeat(shared, shared.current_state()) => sent,
    };
    if let Err(err) = registered {
        // The pull below fails the same way and says so.
        debug!(%err, "could not register with the coordinator yet");
    }

    let mut pause = shared.pause_clock.clone();
    loop {
        // A paused node takes no work: the owner needs the machine.
        if pause.is_paused() {
            debug!("paused for the owner; not pulling");
            tokio::select! {
                () = stop.cancelled() => return,
                () = pause.wait_unpaused() => {}
            }
        }
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            answer = shared.client.pull(&shared.node_id, shared.config.pull_wait, PULL_MAX) => answer,
        };
        let retry_now = match answer {
            Ok(pulled) => {
                failures.succeeded();
                backoff.reset();
                for run_id in pulled.cancel {
                    shared.cancel_run(run_id);
                }
                let started = !pulled.tasks.is_empty();
                for assignment in pulled.tasks {
                    start_run(shared, executor, assignment);
                }
                if started {
                    // The runs go to the executor before the next pull goes out: on this one
                    // thread, the new long-poll's request was written first, and the run
                    // waited behind it.
                    tokio::task::yield_now().await;
                }
                true
            }
            Err(CallError::NodeUnknown) => {
                info!("the coordinator does not know this node; registering");
                let registered = tokio::select! {
                    () = stop.cancelled() => return,
                    sent = send_heartbeat(shared, shared.current_state()) => sent,
                };
                match registered {
                    // Retry at once the first time; a coordinator that keeps answering 404
                    // right after a heartbeat gets the backoff like any other failure.
                    Ok(_) if backoff.is_fresh() => {
                        let _ = backoff.next_delay();
                        true
                    }
                    Ok(_) => false,
                    Err(err) => {
                        failures.failed(&err);
                        false
                    }
                }
            }
            Err(err) => {
                failures.failed(&err);
                false
            }
        };
        if !retry_now {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

/// Asks for new runs with every results post while the agent takes work (as the pull loop
/// would), and starts what comes back like a pull's answer.
struct RefillWithResults<E> {
    shared: Arc<Shared>,
    executor: Arc<E>,
    stop_pulling: CancellationToken,
}

impl<E: Executor> RefillWithResults<E> {
    /// Not paused for the owner, not stopping.
    fn takes_work(&self) -> bool {
        !self.stop_pulling.is_cancelled() && !self.shared.pause_clock.is_paused()
    }
}

impl<E: Executor> crate::outbox::Refill for RefillWithResults<E> {
    fn wanted(&self) -> Option<(String, usize)> {
        self.takes_work()
            .then(|| (self.shared.node_id.clone(), PULL_MAX))
    }

    fn hold(&self, waiting: usize) -> bool {
        if !self.takes_work() {
            return false;
        }
        let (running, queued) = self.shared.slots.occupancy();
        may_hold_results(running, queued, waiting)
    }

    fn pulled(&self, answer: lull_shared::PullResponse) {
        for run_id in answer.cancel {
            self.shared.cancel_run(run_id);
        }
        for assignment in answer.tasks {
            start_run(&self.shared, &self.executor, assignment);
        }
    }
}

/// Whether `waiting` finished runs' results may wait for more before they are posted, with
/// `running` runs executing and `queued` waiting for a slot: while fewer results wait than
/// runs execute, and the queue holds more runs than there are running, so that after the post
/// every slot still has a run to start next while its answer (the runs that refill the queue,
/// leased in the results' commit) comes back. Held until the queue ran dry instead, a post
/// went out with one run left per slot at most, and a slot whose run ended before the answer
/// (a commit's sync on the way) sat idle.
fn may_hold_results(running: usize, queued: usize, waiting: usize) -> bool {
    queued > running && waiting < running
}

/// Starts one assignment in its own task.
fn start_run<E: Executor>(shared: &Arc<Shared>, executor: &Arc<E>, assignment: Assignment) {
    let (task_id, run_id) = (assignment.task_id, assignment.run_id);
    if shared.outbox.contains(run_id) {
        warn!(
            task_id,
            run_id, "assigned a run that already finished here; ignoring it"
        );
        return;
    }
    let Some((cancel, process)) = shared.runs.insert(run_id, task_id) else {
        warn!(
            task_id,
            run_id, "assigned a run that is already running here; ignoring it"
        );
        return;
    };
    let span = info_span!("run", task_id, run_id);
    tokio::spawn(
        execute(
            Arc::clone(shared),
            Arc::clone(executor),
            assignment,
            cancel,
            process,
        )
        .instrument(span),
    );
}

/// One run, from start to its result in the outbox.
async fn execute<E: Executor>(
    shared: Arc<Shared>,
    executor: Arc<E>,
    assignment: Assignment,
    cancel: CancellationToken,
    process: RunProcess,
) {
    let (task_id, run_id) = (assignment.task_id, assignment.run_id);
    // Takes the run off the table however this task ends, panics included.
    let slot = RunSlotGuard {
        shared: &shared,
        run_id,
    };
    let timeout = match Duration::try_from_secs_f64(assignment.timeout) {
        Ok(timeout) if !timeout.is_zero() => timeout,
        _ => {
            warn!(
                task_id,
                run_id,
                timeout = assignment.timeout,
                "unusable timeout; using the default"
            );
            Duration::from_secs_f64(DEFAULT_TIMEOUT_SECS)
        }
    };
    let job = Job {
        task_id,
        run_id,
        code: assignment.code,
        timeout,
        resources: assignment.resources,
        point: RunPoint {
            index: assignment.point,
            of: assignment.points,
        },
        control: RunControl {
            process,
            clock: shared.pause_clock.clone(),
        },
    };
    // A run handed out just before the node paused waits for the owner too.
    let mut pause = shared.pause_clock.clone();
    let capacity = tokio::select! {
        share = async {
            let share = shared.slots.acquire(run_id, assignment.resources).await;
            pause.wait_unpaused().await;
            share
        } => Some(share),
        () = cancel.cancelled() => None,
    };
    let execution = match capacity {
        Some(share) => {
            info!(
                task_id,
                run_id,
                attempt = assignment.attempt,
                timeout_secs = format_seconds(timeout),
                "run started"
            );
            let execution = executor.run(job, cancel).await;
            drop(share);
            execution
        }
        None => Execution::cancelled_before_start(),
    };

    let stopped_because = shared.runs.stop_reason(run_id);
    let report = report(&shared.node_id, task_id, run_id, execution, stopped_because);
    info!(
        task_id,
        run_id,
        outcome = ?report.outcome,
        exit_code = report.exit_code,
        error = report.error.as_deref().unwrap_or(""),
        "run finished"
    );
    // The run waiting for this slot (woken when the share above was dropped) goes first: its
    // message to the executor is queued before the result's post is, so that the next run
    // does not wait behind the coordinator's answer (on a busy CPU the post's handling took
    // its place; BENCHMARKS.md, Sixteenth session).
    tokio::task::yield_now().await;
    // Into the outbox before off the table: heartbeats must always list the run somewhere.
    shared.outbox.store(report).await;
    drop(slot);
}

/// The wire report for a finished execution. A run the agent stopped itself is reported
/// for why it was stopped, unless it finished on its own first.
fn report(
    node_id: &str,
    task_id: TaskId,
    run_id: RunId,
    execution: Execution,
    stopped_because: Option<StopReason>,
) -> RunReport {
    // A stop begins with SIGTERM, which may end the code before the executor's own cancel
    // fires: a run that did not complete is then reported as stopped, whatever killed it.
    let (outcome, error) = match (&execution.outcome, &stopped_because) {
        (RunOutcome::Failed, Some(_)) => (RunOutcome::Cancelled, Some("cancelled".to_string())),
        _ => (execution.outcome, execution.error),
    };
    let (outcome, error) = match (outcome, stopped_because) {
        (RunOutcome::Cancelled, Some(StopReason::Released)) => {
            (RunOutcome::Released, Some(RELEASED_ERROR.to_string()))
        }
        // Handed back like a run of a stopping agent: requeued, not counted as a loss.
        (RunOutcome::Cancelled, Some(StopReason::Evicted(why))) => {
            (RunOutcome::Released, Some(why))
        }
        (outcome, _) => (outcome, error),
    };
    RunReport {
        node_id: node_id.to_string(),
        task_id,
        run_id,
        outcome,
        exit_code: execution.exit_code,
        stdout: execution.stdout,
        stderr: execution.stderr,
        error,
        started_at: Some(execution.started_at),
        completed_at: Some(execution.completed_at),
        cpu_seconds: execution.cpu_seconds,
        max_rss_mb: execution.max_rss_mb,
    }
}

/// Why the agent stopped a run before it ended on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// The coordinator cancelled it: report `Cancelled`.
    Cancelled,
    /// The agent is shutting down and the grace period is over: report `Released`.
    Released,
    /// The node was paused for its owner longer than `evict_after`: report `Released` with
    /// this reason (the task is requeued and the run does not count as a loss).
    Evicted(String),
}

#[derive(Debug)]
struct RunSlot {
    task_id: TaskId,
    cancel: CancellationToken,
    process: RunProcess,
    stopped_because: Option<StopReason>,
}

/// The runs executing now. A watch channel so that shutdown can wait for it to empty.
#[derive(Debug)]
pub(crate) struct Runs {
    slots: watch::Sender<BTreeMap<RunId, RunSlot>>,
}

impl Default for Runs {
    fn default() -> Self {
        Runs {
            slots: watch::Sender::new(BTreeMap::new()),
        }
    }
}

impl Runs {
    /// Adds a run; `None` when it is already there.
    fn insert(&self, run_id: RunId, task_id: TaskId) -> Option<(CancellationToken, RunProcess)> {
        let cancel = CancellationToken::new();
        let process = RunProcess::default();
        let added = self.slots.send_if_modified(|slots| {
            if slots.contains_key(&run_id) {
                return false;
            }
            slots.insert(
                run_id,
                RunSlot {
                    task_id,
                    cancel: cancel.clone(),
                    process: process.clone(),
                    stopped_because: None,
                },
            );
            true
        });
        added.then_some((cancel, process))
    }

    fn remove(&self, run_id: RunId) {
        self.slots.send_modify(|slots| {
            slots.remove(&run_id);
        });
    }

    /// Records why a run is about to be stopped, without stopping it yet: its cancel token
    /// and process, for the caller to stop it gracefully. `None` when the run is not here
    /// or is already being stopped.
    fn begin_stop(
        &self,
        run_id: RunId,
        reason: StopReason,
    ) -> Option<(CancellationToken, Option<u32>)> {
        let mut begun = None;
        self.slots.send_if_modified(|slots| {
            if let Some(slot) = slots.get_mut(&run_id)
                && slot.stopped_because.is_none()
            {
                slot.stopped_because = Some(reason);
                begun = Some((slot.cancel.clone(), slot.process.pid()));
            }
            false
        });
        begun
    }

    /// Asks a run to stop; the first reason given sticks. False when the run is not here.
    fn stop(&self, run_id: RunId, reason: StopReason) -> bool {
        let mut found = false;
        // Nothing a watcher cares about changes (the set of runs stays the same).
        self.slots.send_if_modified(|slots| {
            if let Some(slot) = slots.get_mut(&run_id) {
                slot.stopped_because.get_or_insert(reason);
                slot.cancel.cancel();
                found = true;
            }
            false
        });
        found
    }

    pub(crate) fn stop_all(&self, reason: StopReason) {
        self.slots.send_if_modified(|slots| {
            for (run_id, slot) in slots.iter_mut() {
                slot.stopped_because.get_or_insert_with(|| reason.clone());
                slot.cancel.cancel();
                debug!(task_id = slot.task_id, run_id, ?reason, "stopping run");
            }
            false
        });
    }

    fn stop_reason(&self, run_id: RunId) -> Option<StopReason> {
        self.slots
            .borrow()
            .get(&run_id)
            .and_then(|slot| slot.stopped_because.clone())
    }

    /// `(run_id, task_id, pid)` of every run whose process exists now.
    pub(crate) fn processes(&self) -> Vec<(RunId, TaskId, u32)> {
        self.slots
            .borrow()
            .iter()
            .filter_map(|(run_id, slot)| Some((*run_id, slot.task_id, slot.process.pid()?)))
            .collect()
    }

    pub(crate) fn ids(&self) -> Vec<RunId> {
        self.slots.borrow().keys().copied().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.borrow().is_empty()
    }

    pub(crate) fn wait_empty(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut slots = self.slots.subscribe();
        async move {
            let _ = slots.wait_for(BTreeMap::is_empty).await;
        }
    }
}

struct RunSlotGuard<'a> {
    shared: &'a Shared,
    run_id: RunId,
}

impl Drop for RunSlotGuard<'_> {
    fn drop(&mut self) {
        self.shared.runs.remove(self.run_id);
    }
}

#[cfg(test)]
mod report_tests {
    use super::*;

    fn ended(outcome: RunOutcome) -> Execution {
        Execution {
            outcome,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            error: Some("killed by signal 15".into()),
            started_at: 1.0,
            completed_at: 2.0,
            cpu_seconds: None,
            max_rss_mb: None,
        }
    }

    fn outcome(execution: RunOutcome, why: Option<StopReason>) -> RunOutcome {
        report("n", 1, 2, ended(execution), why).outcome
    }

    #[test]
    fn results_wait_for_more_only_while_the_queue_outlasts_a_post() {
        // Two slots busy, four runs queued: a first result may wait for a second.
        assert!(may_hold_results(2, 4, 1));
        assert!(may_hold_results(2, 3, 1));
        // As many results wait as runs execute: posted.
        assert!(!may_hold_results(2, 4, 2));
        // The queue holds one run per slot or less: posted now, so that its answer refills
        // the queue before a slot has nothing to start.
        assert!(!may_hold_results(2, 2, 1));
        assert!(!may_hold_results(2, 1, 1));
        assert!(!may_hold_results(2, 0, 1));
        // One slot: never held (a result waits alone).
        assert!(!may_hold_results(1, 4, 1));
    }

    #[test]
    fn a_run_our_sigterm_ended_is_reported_as_stopped_not_failed() {
        use RunOutcome::*;
        assert_eq!(outcome(Failed, Some(StopReason::Cancelled)), Cancelled);
        assert_eq!(outcome(Failed, Some(StopReason::Released)), Released);
        // Ended on its own, or not stopped by us: as it ended.
        assert_eq!(outcome(Completed, Some(StopReason::Cancelled)), Completed);
        assert_eq!(outcome(Failed, None), Failed);
        assert_eq!(outcome(Lost, Some(StopReason::Cancelled)), Lost);
    }
}

#[cfg(test)]
mod validate_tests {
    use super::*;
    use lull_shared::SandboxLevel;

    #[test]
    fn a_minimum_sandbox_level_above_the_maximum_is_refused_before_the_probe() {
        let mut config = AgentConfig::new("http://127.0.0.1:1", "/nonexistent".into());
        config.min_sandbox_level = SandboxLevel::Full;
        config.max_sandbox_level = SandboxLevel::Basic;
        match validate(&config) {
            Err(AgentError::InvalidConfig(why)) => assert_eq!(
                why,
                "min_sandbox_level full is above max_sandbox_level basic"
            ),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
        config.max_sandbox_level = SandboxLevel::Full;
        assert!(validate(&config).is_ok());
    }
}
