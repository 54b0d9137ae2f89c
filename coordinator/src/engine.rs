//! The engine joins the pure scheduler to the store and to time: it holds the scheduler's
//! lock for the length of one synchronous call, hands the resulting changes to the writer
//! in the same critical section, and awaits durability after letting go.
//!
//! Architecture Invariant: no lock is held across an `.await`. The only waiting on the
//! dispatch path is for the group commit, for the `work` notification, and (a parked
//! long-poll) for the lease a submission hands it.
//!
//! Architecture Invariant: a client is answered only after what it was told is durable: an
//! accepted task, a recorded result. A pull is answered once its leases are durable, or
//! before, while their run ids are at most [`RUN_IDS_AHEAD`] above the highest durable one
//! (see [`Engine::hand_out`]).

use crate::feed::Feed;
use crate::history::{QueueHistory, QueueSample};
use crate::model::{
    Change, CommandRecord, NewTask, NodeGroup, RunRecord, TaskLimits, TaskRecord, ValidationError,
    validate_points,
};
use crate::operations::OperationRecord;
use crate::operations::plan::GroupMembers;
use crate::scheduler::{Explanation, LegacyAssignment, NodeCounts, Scheduler, SchedulerError};
use crate::store::{
    Ack, CommandQuery, Committer, OperationQuery, ResultRow, Store, StoreError, TaskQuery,
    TaskStats, Writer, WriterHandle, WriterStopped,
};
use crate::waiters::{FinishWaiters, FinishWatch};
use lull_shared::{
    HeartbeatRequest, HeartbeatResponse, PullResponse, RunId, RunReport, RunReportAck,
    SubmitRequest, TaskId, TaskStatus,
};
use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub limits: TaskLimits,
    /// The heartbeat interval agents are told to use, in seconds.
    pub heartbeat_interval: f64,
    /// How often silent nodes and lapsed leases are looked for.
    pub tick_interval: Duration,
    /// This process's identity, shown to clients (`server_id`).
    pub server_id: String,
    /// The longest the submission of a task whose submitter waits for its end
    /// (`POST /api/v1/tasks?wait=`) waits to be committed with another change
    /// ([`DEFERRED_SUBMISSION_WINDOW`]).
    pub deferred_window: Duration,
}

/// How long a waited-for submission may wait for its commit ([`Engine::submit_and_wait`]):
/// longer than a short task takes from submission to result on an idle node (~2–4 ms), so
/// that the result's commit carries the submission too; short enough that the task is in the
/// store, the feed and the listings within moments either way.
pub const DEFERRED_SUBMISSION_WINDOW: Duration = Duration::from_millis(20);

/// Most parked long-polls one submission leases to in its own critical section; others still
/// waiting are woken and look for themselves. (With thousands of idle nodes parked, a
/// submission of one task must not try them all under the lock.)
const MAX_HAND_OFFS: usize = 64;

/// How far above the highest durable run id a pull's runs may be before their leases are
/// durable, for the pull to be answered at once (the node starts the run while the lease
/// commits, not one commit later). See [`highest_run_ahead`].
pub const RUN_IDS_AHEAD: RunId = 1 << 16;

/// The highest run id a pull may be handed before its lease is durable, while the highest
/// durable one is `durable`. The same bound numbers a starting coordinator's runs: they start
/// above `highest_run_ahead(highest run id in the store)`, so an id handed out ahead of a
/// commit that a crash then lost is never handed out again, and a node holding it can never
/// report for another run. Runs are never deleted, so the highest durable run id never goes
/// down.
pub fn highest_run_ahead(durable: RunId) -> RunId {
    durable.saturating_add(RUN_IDS_AHEAD)
}

/// A long-poll parked until work appears. A submission leases to it in the submission's own
/// critical section and commit, and hands it the lease with an [`Ack`] for that commit: the
/// node starts the run while that commit is made ([`Engine::hand_out`]), or once it is durable,
/// not one commit later.
struct ParkedPull {
    node_id: String,
    max: usize,
    handed: oneshot::Sender<(PullResponse, Ack)>,
}

/// A parked long-poll's place on the list, given up when the request is dropped.
struct Parked<'a> {
    engine: &'a Engine,
    id: Option<u64>,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.engine.unpark(id);
        }
    }
}

/// Unix time in seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub struct Engine {
    scheduler: Mutex<Scheduler>,
    store: Arc<dyn Store>,
    writer: WriterHandle,
    /// Woken whenever work or capacity may have appeared (and for cancels), so long-polls
    /// answer at once instead of polling.
    work: Notify,
    /// Those waiting for a task to finish; the writer wakes them after the commit.
    finished: Arc<FinishWaiters>,
    /// The live feed; the writer publishes to it, WebSocket clients subscribe.
    feed: Arc<Feed>,
    /// Long-polls waiting for work right now (shown in `/health`).
    waiting_pulls: AtomicUsize,
    /// The long-polls a submission may lease to directly, by park id (oldest first).
    /// Locked only while the scheduler's lock is held (so a park and a submission are
    /// ordered).
    parked: Mutex<BTreeMap<u64, ParkedPull>>,
    next_park_id: AtomicU64,
    /// The queue's length over the last hour, sampled by the ticker (the console's chart).
    queue_history: Mutex<QueueHistory>,
    shutdown: CancellationToken,
    config: EngineConfig,
}

impl Engine {
    /// An engine over `scheduler` that reads from `store` and commits through `committer`
    /// on the writer's thread, started here with `highest_run`, the highest run id the store
    /// holds (see [`WriterHandle::durable_runs`]); the writer wakes the engine's waiters for
    /// finished tasks after each commit. Also returns what resolves once that thread has
    /// ended.
    pub fn new(
        scheduler: Scheduler,
        store: Arc<dyn Store>,
        committer: Box<dyn Committer>,
        highest_run: RunId,
        feed: Arc<Feed>,
        config: EngineConfig,
        shutdown: CancellationToken,
    ) -> Result<(Engine, WriterStopped), StoreError> {
        let finished = Arc::new(FinishWaiters::default());
        let (writer, writer_stopped) = Writer::spawn(
            committer,
            finished.clone(),
            feed.clone(),
            highest_run,
            config.deferred_window,
        )?;
        let engine = Engine {
            scheduler: Mutex::new(scheduler),
            store,
            writer,
            work: Notify::new(),
            finished,
            feed,
            waiting_pulls: AtomicUsize::new(0),
            parked: Mutex::new(BTreeMap::new()),
            next_park_id: AtomicU64::new(0),
            queue_history: Mutex::new(QueueHistory::default()),
            shutdown,
            config,
        };
        Ok((engine, writer_stopped))
    }

    pub fn server_id(&self) -> &str {
        &self.config.server_id
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    /// Cancelled when the coordinator stops serving (after local agents have stopped):
    /// long-lived connections such as feed subscribers end then.
    pub fn stopping(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The scheduler, for one synchronous call. A panic inside the scheduler is a bug; the
    /// state it leaves is still the best we have, so a poisoned lock is taken over.
    fn scheduler(&self) -> MutexGuard<'_, Scheduler> {
        self.scheduler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The parked long-polls. Called only with the scheduler's lock held.
    fn parked(&self) -> MutexGuard<'_, BTreeMap<u64, ParkedPull>> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// As [`Engine::mutate`] for a submission: in the same critical section, the parked
    /// long-polls (oldest first, at most [`MAX_HAND_OFFS`]) lease what now fits them, and
    /// their leases ride in the submission's commit. Each is handed its runs and an
    /// acknowledgement of that commit. Only if work is left over are the waiting pulls
    /// woken (`work`) to look for themselves: a submission the parked pulls took whole
    /// wakes nobody else (no herd of thousands of idle nodes per task).
    ///
    /// `deferred`: the commit may wait for the next one ([`WriterHandle::send_deferred_to`]).
    fn submit_and_lease<T>(
        &self,
        now: f64,
        deferred: bool,
        f: impl FnOnce(&mut Scheduler) -> (T, Vec<Change>),
    ) -> (T, Ack) {
        let mut sched = self.scheduler();
        let (value, mut changes) = f(&mut sched);
        let mut handed = Vec::new();
        {
            let mut parked = self.parked();
            let mut after = None;
            let mut tried = 0;
            while tried < MAX_HAND_OFFS && sched.pending_count() > 0 {
                let next = match after {
                    None => parked.keys().next(),
                    Some(id) => parked
                        .range((Excluded(id), Unbounded))
                        .next()
                        .map(|(k, _)| k),
                };
                let Some(&id) = next else { break };
                after = Some(id);
                let Some(pull) = parked.get(&id) else { break };
                if pull.handed.is_closed() {
                    // Its request went away (the client hung up): nothing to lease to.
                    parked.remove(&id);
                    continue;
                }
                tried += 1;
                match sched.pull(&pull.node_id, pull.max, now) {
                    Ok(mut out) => {
                        changes.append(&mut out.changes);
                        if out.assignments.is_empty() && out.cancel.is_empty() {
                            continue;
                        }
                        let response = PullResponse {
                            tasks: out.assignments,
                            cancel: out.cancel,
                        };
                        if let Some(pull) = parked.remove(&id) {
                            handed.push((pull, response));
                        }
                    }
                    // Dropping it wakes the long-poll, whose own pull says what is wrong.
                    Err(_) => drop(parked.remove(&id)),
                }
            }
        }
        // Work the parked pulls did not take: wake every waiting pull to look for itself.
        let left = sched.pending_count() > 0;
        let mut acks = if deferred {
            self.writer.send_deferred_to(changes, 1 + handed.len())
        } else {
            self.writer.send_to(changes, 1 + handed.len())
        };
        let ack = acks.remove(0);
        for ((pull, response), ack) in handed.into_iter().zip(acks) {
            // Sent under the scheduler's lock: a long-poll that finds itself unparked
            // (it takes that lock to look) finds its lease already sent.
            if let Err((response, _)) = pull.handed.send((response, ack)) {
                // Gone since the check above: the lease lapses like any lease whose
                // holder vanished, and the task is queued again.
                tracing::debug!(node_id = %pull.node_id, runs = response.tasks.len(), "long-poll gone before its lease");
            }
        }
        drop(sched);
        if left {
            self.work.notify_waiters();
        }
        (value, ack)
    }

    /// Takes a long-poll off the parked list; false if a submission already took it (and
    /// so has sent it a lease, or dropped its sender).
    fn unpark(&self, id: u64) -> bool {
        let _sched = self.scheduler();
        self.parked().remove(&id).is_some()
    }

    /// Runs `f` on the scheduler and queues its changes in the same critical section.
    fn mutate<T>(&self, f: impl FnOnce(&mut Scheduler) -> (T, Vec<Change>)) -> (T, Ack) {
        let mut sched = self.scheduler();
        let (value, changes) = f(&mut sched);
        let ack = self.writer.send(changes);
        (value, ack)
    }

    // -------------------------------------------------------------------------------------------
    // Tasks
    // -------------------------------------------------------------------------------------------

    pub async fn submit(&self, request: SubmitRequest) -> Result<TaskId, EngineError> {
        Ok(self.submit_by(request, None).await?.task_id)
    }

    /// Accepts a task submitted with API key `submitted_by` (`None`: no key, or an
    /// in-process caller). The key is recorded on the task: a submitter sees its own tasks.
    /// Answers the task as it was accepted (`pending`), once that is durable: what the
    /// store holds then, without reading it back.
    pub async fn submit_by(
        &self,
        request: SubmitRequest,
        submitted_by: Option<i64>,
    ) -> Result<TaskRecord, EngineError> {
        let (task, ack) = self.accept(request, submitted_by, false).await?;
        ack.durable().await?;
        tracing::debug!(task_id = task.task_id, "task accepted");
        Ok(task)
    }

    /// Queues the task (its submission's commit deferred or not) and answers it as accepted,
    /// with the acknowledgement of that commit.
    async fn accept(
        &self,
        request: SubmitRequest,
        submitted_by: Option<i64>,
        deferred: bool,
    ) -> Result<(TaskRecord, Ack), EngineError> {
        let mut task = NewTask::from_request(request, &self.config.limits)?;
        task.spec.submitted_by = submitted_by;
        let now = unix_now();
        let ((task_id, accepted), ack) = self.submit_and_lease(now, deferred, |s| {
            let (task_id, changes) = s.submit(task, now);
            let accepted = changes.iter().find_map(|change| match change {
                Change::TaskCreated(record) => Some(record.clone()),
                _ => None,
            });
            ((task_id, accepted), changes)
        });
        let task = match accepted {
            Some(task) => task,
            None => {
                self.writer.hasten(ack).await?;
                return Ok((self.task(task_id).await?, Ack::durable_already()));
            }
        };
        Ok((task, ack))
    }

    /// Accepts a task as [`Engine::submit_by`] does, then answers it with its runs once it
    /// has finished, or as it is after `wait`, as [`Engine::wait_finished`] would (one
    /// request for a client that wants the result).
    ///
    /// Its submission is not acknowledged before that answer, so it need not be durable
    /// before then either: its commit is deferred and rides in the commit that records the
    /// task's end (one commit per task, not two), or in any commit made meanwhile, or in its
    /// own once [`EngineConfig::deferred_window`] has passed. An answer that comes before
    /// the end (the wait ran out, the coordinator is stopping) first has it committed. A crash
    /// before that commit loses a task nobody was told of, as a lost connection would: the
    /// client has no answer and the task no record; a node that ran it meanwhile has its
    /// result refused (its run is unknown, see [`Engine::hand_out`]).
    ///
    /// The answer reads nothing from the store while the scheduler still holds the task once
    /// the watch is taken (nothing has finished it yet): the accepted record stands for the
    /// store's (its immutable part is the same; its state comes with the finishing commit).
    /// One that finished meanwhile is read as any other.
    pub async fn submit_and_wait(
        &self,
        request: SubmitRequest,
        submitted_by: Option<i64>,
        wait: Duration,
    ) -> Result<(TaskRecord, Vec<RunRecord>), EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        let (accepted, ack) = self.accept(request, submitted_by, true).await?;
        tracing::debug!(
            task_id = accepted.task_id,
            "task accepted, its commit deferred"
        );
        self.wait_accepted(accepted, ack, deadline).await
    }

    /// [`Engine::submit_and_wait`]'s wait for `accepted`, whose submission `ack` acknowledges.
    async fn wait_accepted(
        &self,
        accepted: TaskRecord,
        ack: Ack,
        deadline: tokio::time::Instant,
    ) -> Result<(TaskRecord, Vec<RunRecord>), EngineError> {
        let task_id = accepted.task_id;
        // Before the look: a task held then is finished under the scheduler's lock later,
        // and that commit wakes the watch.
        let watch = self.finished.watch_with_runs(task_id);
        let held = self.scheduler().holds(task_id);
        let (task, ack) = if held {
            (accepted, ack)
        } else {
            // Finished meanwhile: read, once what is read is durable.
            self.writer.hasten(ack).await?;
            (self.task(task_id).await?, Ack::durable_already())
        };
        self.finished_by(task, watch, deadline, ack).await
    }

    /// Accepts several tasks at once, all or none: every one is validated first (the error
    /// names the first invalid one by its index), then all are queued in one critical
    /// section and made durable in one commit. Answers the ids in the order given.
    /// `submitted_by` is recorded on every task as [`Engine::submit_by`] does.
    pub async fn submit_batch(
        &self,
        requests: Vec<SubmitRequest>,
        submitted_by: Option<i64>,
    ) -> Result<Vec<TaskId>, EngineError> {
        let specs = requests
            .into_iter()
            .enumerate()
            .map(|(index, request)| {
                let mut task = NewTask::from_request(request, &self.config.limits)
                    .map_err(|e| ValidationError(format!("tasks[{index}]: {}", e.0)))?;
                task.spec.submitted_by = submitted_by;
                Ok::<_, ValidationError>(task)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let now = unix_now();
        let (task_ids, ack) = self.submit_and_lease(now, false, |s| {
            let mut task_ids = Vec::with_capacity(specs.len());
            let mut changes = Vec::with_capacity(specs.len());
            for spec in specs {
                let (task_id, mut created) = s.submit(spec, now);
                task_ids.push(task_id);
                changes.append(&mut created);
            }
            (task_ids, changes)
        });
        ack.durable().await?;
        tracing::debug!(
            tasks = task_ids.len(),
            first_task_id = task_ids.first().copied(),
            "task batch accepted"
        );
        Ok(task_ids)
    }

    pub async fn cancel(&self, task_id: TaskId) -> Result<TaskRecord, EngineError> {
        let now = unix_now();
        let (outcome, ack) = self.mutate(|s| match s.cancel(task_id, now) {
            Ok(changes) => (Ok(()), changes),
            Err(e) => (Err(e), Vec::new()),
        });
        match outcome {
            Ok(()) => {
                self.work.notify_waiters();
                ack.durable().await?;
                tracing::info!(task_id, "task cancelled");
            }
            Err(SchedulerError::TaskNotFound(_)) => {
                // Not active: either finished (a conflict) or unknown.
                if let Some(task) = self.store.task(task_id).await? {
                    return Err(SchedulerError::AlreadyFinished {
                        task_id,
                        status: task.state.status,
                    }
                    .into());
                }
                return Err(SchedulerError::TaskNotFound(task_id).into());
            }
            Err(e) => return Err(e.into()),
        }
        self.task(task_id).await
    }

    /// Seed 000's change_points: how many nodes run an unfinished task at once. Raising
    /// wakes the agents; lowering stops the newest points (their nodes are told to kill
    /// them). Answered once durable.
    pub async fn change_points(&self, task_id: TaskId, points: u32) -> Result<(), EngineError> {
        let points = validate_points(points, &self.config.limits)?;
        let now = unix_now();
        let (outcome, ack) = self.mutate(|s| match s.change_points(task_id, points, now) {
            Ok(changes) => (Ok(()), changes),
            Err(e) => (Err(e), Vec::new()),
        });
        match outcome {
            Ok(()) => {
                // New points to place, or cancels to deliver to long-polling agents.
                self.work.notify_waiters();
                ack.durable().await?;
                tracing::info!(task_id, points, "task points changed");
                Ok(())
            }
            Err(SchedulerError::TaskNotFound(_)) => {
                if let Some(task) = self.store.task(task_id).await? {
                    return Err(SchedulerError::AlreadyFinished {
                        task_id,
                        status: task.state.status,
                    }
                    .into());
                }
                Err(SchedulerError::TaskNotFound(task_id).into())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn task(&self, task_id: TaskId) -> Result<TaskRecord, EngineError> {
        self.store
            .task(task_id)
            .await?
            .ok_or(EngineError::Scheduler(SchedulerError::TaskNotFound(
                task_id,
            )))
    }

    /// The task with its runs once it has finished, or as it is after `wait` (a long-poll
    /// for clients that want a result without polling). `visible` is asked about the task as
    /// first read; one it refuses is not found (a submitter's scope). The commit that
    /// finishes the task hands its final state to the waiter, and its runs as of that commit
    /// when it holds them all; otherwise its runs are read (those of a task still active
    /// with it, as of one moment).
    pub async fn wait_finished(
        &self,
        task_id: TaskId,
        wait: Duration,
        visible: impl FnOnce(&TaskRecord) -> bool,
    ) -> Result<(TaskRecord, Vec<RunRecord>), EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        // Before the read: a commit between the read and the wait still wakes us.
        let watch = self.finished.watch_with_runs(task_id);
        let task = self.task(task_id).await?;
        if !visible(&task) {
            return Err(SchedulerError::TaskNotFound(task_id).into());
        }
        self.finished_by(task, watch, deadline, Ack::durable_already())
            .await
    }

    /// `task` (as read, or as accepted) with its runs once `watch` says it has finished, or
    /// as it is at `deadline`. `submitted`: the acknowledgement of the task's submission,
    /// which is durable before anything is answered.
    async fn finished_by(
        &self,
        mut task: TaskRecord,
        watch: FinishWatch,
        deadline: tokio::time::Instant,
        submitted: Ack,
    ) -> Result<(TaskRecord, Vec<RunRecord>), EngineError> {
        let task_id = task.task_id;
        let mut committed_runs = None;
        if !task.state.status.is_terminal() {
            tokio::select! {
                finished = watch.finished_with_runs() => {
                    task.state = finished.state;
                    committed_runs = finished.runs;
                }
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
        // Nothing is answered (or read) before the submission is durable: a finishing commit
        // carried it or came after it; an answer before the end has it committed now.
        self.writer.hasten(submitted).await?;
        if let Some(runs) = committed_runs {
            return Ok((task, runs));
        }
        if task.state.status.is_terminal() {
            // A finished task's runs are final with it.
            let runs = self.runs(task_id).await?;
            Ok((task, runs))
        } else {
            self.task_with_runs(task_id).await
        }
    }

    /// Each task of `task_ids` (in that order) with its runs, once every one of them has
    /// finished, or as they are after `wait`: a client that submitted many tasks collects
    /// their results in one request instead of one each. `visible` is asked about each task
    /// as first read; an unknown task or one it refuses is not found. Two store reads, however
    /// many tasks: the commits that finish them wake the wait, as for [`Engine::wait_finished`].
    pub async fn wait_all_finished(
        &self,
        task_ids: &[TaskId],
        wait: Duration,
        visible: impl Fn(&TaskRecord) -> bool,
    ) -> Result<Vec<(TaskRecord, Vec<RunRecord>)>, EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        let unique: Vec<TaskId> = task_ids
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        // Before the read: a commit between the read and the wait still wakes us.
        let watches: BTreeMap<TaskId, _> = unique
            .iter()
            .map(|&task_id| (task_id, self.finished.watch(task_id)))
            .collect();
        let mut read: BTreeMap<TaskId, (TaskRecord, Vec<RunRecord>)> = self
            .store
            .tasks_with_runs(&unique)
            .await?
            .into_iter()
            .map(|(task, runs)| (task.task_id, (task, runs)))
            .collect();
        if let Some(&hidden) = task_ids
            .iter()
            .find(|task_id| read.get(task_id).is_none_or(|(task, _)| !visible(task)))
        {
            return Err(SchedulerError::TaskNotFound(hidden).into());
        }
        let unfinished: Vec<TaskId> = read
            .values()
            .filter(|(task, _)| !task.state.status.is_terminal())
            .map(|(task, _)| task.task_id)
            .collect();
        if !unfinished.is_empty() {
            // One after the other against one deadline: a watch whose task finished while
            // an earlier one was awaited answers at once.
            for task_id in &unfinished {
                let Some(watch) = watches.get(task_id) else {
                    continue;
                };
                tokio::select! {
                    _ = watch.finished() => {}
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = self.shutdown.cancelled() => break,
                }
            }
            // Read again, each task and its runs as of one moment.
            for (task, runs) in self.store.tasks_with_runs(&unfinished).await? {
                read.insert(task.task_id, (task, runs));
            }
        }
        task_ids
            .iter()
            .map(|task_id| {
                read.get(task_id).cloned().ok_or(EngineError::Scheduler(
                    SchedulerError::TaskNotFound(*task_id),
                ))
            })
            .collect()
    }

    /// The task and its runs as of one moment.
    pub async fn task_with_runs(
        &self,
        task_id: TaskId,
    ) -> Result<(TaskRecord, Vec<RunRecord>), EngineError> {
        self.store
            .task_with_runs(task_id)
            .await?
            .ok_or(EngineError::Scheduler(SchedulerError::TaskNotFound(
                task_id,
            )))
    }

    pub async fn runs(&self, task_id: TaskId) -> Result<Vec<RunRecord>, EngineError> {
        Ok(self.store.runs(task_id).await?)
    }

    pub async fn tasks(&self, query: &TaskQuery) -> Result<Vec<TaskRecord>, EngineError> {
        Ok(self.store.tasks(query).await?)
    }

    /// Tasks with `status` (any if `None`); only those submitted with key `submitted_by`
    /// if given.
    pub async fn count_tasks(
        &self,
        status: Option<TaskStatus>,
        submitted_by: Option<i64>,
    ) -> Result<u64, EngineError> {
        Ok(self.store.count_tasks(status, submitted_by).await?)
    }

    pub async fn results(
        &self,
        limit: u32,
        offset: u64,
        after: Option<TaskId>,
        submitted_by: Option<i64>,
    ) -> Result<Vec<ResultRow>, EngineError> {
        Ok(self
            .store
            .results(limit, offset, after, submitted_by)
            .await?)
    }

    pub async fn stats(&self) -> Result<TaskStats, EngineError> {
        Ok(self.store.stats(unix_now()).await?)
    }

    pub async fn ping_store(&self) -> Result<(), EngineError> {
        Ok(self.store.ping().await?)
    }

    /// Every node as operators see it.
    pub fn nodes(&self) -> Vec<crate::scheduler::NodeView> {
        self.scheduler().nodes()
    }

    // -------------------------------------------------------------------------------------------
    // Node management (seed 004)
    // -------------------------------------------------------------------------------------------

    /// Runs one node command on the scheduler, wakes pulls (placement or cancels changed),
    /// and answers once it is durable.
    async fn node_command(
        &self,
        f: impl FnOnce(&mut Scheduler, f64) -> Result<(CommandRecord, Vec<Change>), SchedulerError>,
    ) -> Result<CommandRecord, EngineError> {
        let now = unix_now();
        let (outcome, ack) = self.mutate(|s| match f(s, now) {
            Ok((command, changes)) => (Ok(command), changes),
            Err(e) => (Err(e), Vec::new()),
        });
        let command = outcome?;
        self.work.notify_waiters();
        ack.durable().await?;
        tracing::info!(
            node_id = %command.node_id,
            command_id = command.command_id,
            command = %command.kind,
            "node command issued"
        );
        Ok(command)
    }

    /// `POST /api/v1/nodes/{id}/drain`.
    pub async fn drain(
        &self,
        node_id: &str,
        timeout: Option<f64>,
    ) -> Result<CommandRecord, EngineError> {
        self.node_command(|s, now| s.drain(node_id, timeout, now))
            .await
    }

    /// `POST /api/v1/nodes/{id}/undrain`.
    pub async fn undrain(&self, node_id: &str) -> Result<CommandRecord, EngineError> {
        self.node_command(|s, now| s.undrain(node_id, now)).await
    }

    /// `POST /api/v1/nodes/{id}/restart`.
    pub async fn restart(&self, node_id: &str) -> Result<CommandRecord, EngineError> {
        self.node_command(|s, now| s.restart(node_id, now)).await
    }

    /// One node as operators see it.
    pub fn node(&self, node_id: &str) -> Result<crate::scheduler::NodeView, EngineError> {
        self.scheduler()
            .nodes()
            .into_iter()
            .find(|n| n.record.node_id == node_id)
            .ok_or_else(|| SchedulerError::NodeNotFound(node_id.to_string()).into())
    }

    pub fn node_meta(
        &self,
        node_id: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, EngineError> {
        Ok(self.scheduler().meta(node_id)?)
    }

    /// Replaces a node's metadata; durable before it answers, used from the next placement.
    pub async fn set_node_meta(
        &self,
        node_id: &str,
        meta: serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Map<String, serde_json::Value>, EngineError> {
        let (outcome, ack) = self.mutate(|s| match s.set_meta(node_id, meta.clone()) {
            Ok(changes) => (Ok(()), changes),
            Err(e) => (Err(e), Vec::new()),
        });
        outcome?;
        // New metadata may match waiting constrained tasks.
        self.work.notify_waiters();
        ack.durable().await?;
        tracing::info!(node_id, "node metadata replaced");
        Ok(meta)
    }

    /// `GET /api/v1/nodes/commands`: newest first.
    pub async fn commands(&self, query: &CommandQuery) -> Result<Vec<CommandRecord>, EngineError> {
        Ok(self.store.commands(query).await?)
    }

    /// Why a task is (not) running. Finished tasks are read from the store.
    pub async fn explain(&self, task_id: TaskId) -> Result<Explanation, EngineError> {
        if let Some(e) = self.scheduler().explain(task_id) {
            return Ok(e);
        }
        let task = self.task(task_id).await?;
        let status = task.state.status;
        let reason = match status {
            TaskStatus::Completed => "it has completed; nothing to wait for".to_string(),
            TaskStatus::Failed => format!(
                "it has failed ({}); it will not run again",
                task.state.error.as_deref().unwrap_or("no error recorded")
            ),
            TaskStatus::Cancelled => "it was cancelled; it will not run".to_string(),
            // Active tasks are in memory; one that just finished may race this read.
            other => format!("it is {other}"),
        };
        Ok(Explanation {
            task_id,
            status,
            reason,
            node_id: task.state.node_id,
            run_id: None,
            points: task.state.points,
            runs: Vec::new(),
            done_points: Vec::new(),
            waiting_points: Vec::new(),
            queued_ahead: None,
            nodes: Vec::new(),
        })
    }

    /// How many agents are long-polling for work right now.
    pub fn waiting_pulls(&self) -> usize {
        self.waiting_pulls.load(Ordering::Relaxed)
    }

    /// The queue's length since `from` (Unix seconds), as sampled, then now.
    pub fn queue_samples(&self, from: f64) -> Vec<QueueSample> {
        let mut samples = self
            .queue_history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .since(from);
        let pending = self.scheduler().pending_count() as u64;
        samples.push(QueueSample {
            at: unix_now(),
            pending,
        });
        samples
    }

    /// Tasks completed per minute (Unix seconds / 60) since `from`; empty minutes left out.
    pub async fn completed_per_minute(&self, from: f64) -> Result<Vec<(i64, u64)>, EngineError> {
        Ok(self.store.completed_per_minute(from).await?)
    }

    /// Task totals and queue length from memory (cheap; for `GET /`).
    pub fn counts(&self) -> (u64, usize, NodeCounts) {
        let sched = self.scheduler();
        (
            sched.total_tasks(),
            sched.pending_count(),
            sched.node_counts(),
        )
    }

    // -------------------------------------------------------------------------------------------
    // Operations (scale-out, shrink): the driver's window on the scheduler and the store
    // -------------------------------------------------------------------------------------------

    /// Makes an operation's new state durable (and published as `operation_updated`).
    pub async fn save_operation(&self, operation: &OperationRecord) -> Result<(), EngineError> {
        let ((), ack) = self.mutate(|_| ((), vec![Change::OperationSaved(operation.clone())]));
        ack.durable().await?;
        Ok(())
    }

    pub async fn operation(
        &self,
        operation_id: i64,
    ) -> Result<Option<OperationRecord>, EngineError> {
        Ok(self.store.operation(operation_id).await?)
    }

    pub async fn operations(
        &self,
        query: &OperationQuery,
    ) -> Result<Vec<OperationRecord>, EngineError> {
        Ok(self.store.operations(query).await?)
    }

    /// Holds a node a scale-out is adopting (see `Scheduler::hold`).
    pub fn hold(&self, node_id: &str, operation_id: i64) -> Result<(), EngineError> {
        Ok(self.scheduler().hold(node_id, operation_id)?)
    }

    pub fn unhold(&self, node_id: &str, operation_id: i64) {
        self.scheduler().unhold(node_id, operation_id);
    }

    pub fn held_heartbeat_at(&self, node_id: &str) -> Option<f64> {
        self.scheduler().held_heartbeat_at(node_id)
    }

    /// Admits a scale-out's held nodes as one group and saves the operation (already moved
    /// on by the caller) in the same commit: the nodes are members exactly when the
    /// operation says so, even across a crash.
    pub async fn admit(
        &self,
        node_ids: &[String],
        operation: &mut OperationRecord,
        message: impl FnOnce(&NodeGroup) -> String,
    ) -> Result<NodeGroup, EngineError> {
        let now = unix_now();
        let (outcome, ack) =
            self.mutate(|s| match s.admit(node_ids, operation.operation_id, now) {
                Ok((group, mut changes)) => {
                    operation
                        .additional_data
                        .insert("group".into(), serde_json::Value::from(group.id));
                    // A transition error here is a driver bug; the admission still stands.
                    if let Err(e) = operation.stage_succeeded(message(&group), now) {
                        tracing::error!(error = %e, "operation transition refused");
                    }
                    changes.push(Change::OperationSaved(operation.clone()));
                    (Ok(group), changes)
                }
                Err(e) => (Err(e), Vec::new()),
            });
        let group = outcome?;
        self.work.notify_waiters();
        ack.durable().await?;
        tracing::info!(operation_id = operation.operation_id, group = group.id, nodes = ?node_ids, "nodes admitted");
        Ok(group)
    }

    /// The pool's scale-out groups and their members.
    pub fn groups(&self) -> Vec<GroupMembers> {
        self.scheduler().groups()
    }

    /// `decommission` command for a node (shrink).
    pub async fn decommission(&self, node_id: &str) -> Result<CommandRecord, EngineError> {
        self.node_command(|s, now| s.decommission(node_id, now))
            .await
    }

    /// Marks a node `removed` (shrink), durably.
    pub async fn remove_node(&self, node_id: &str) -> Result<(), EngineError> {
        let now = unix_now();
        let (outcome, ack) = self.mutate(|s| match s.remove_node(node_id, now) {
            Ok(changes) => (Ok(()), changes),
            Err(e) => (Err(e), Vec::new()),
        });
        outcome?;
        self.work.notify_waiters();
        ack.durable().await?;
        tracing::info!(node_id, "node removed");
        Ok(())
    }

    // -------------------------------------------------------------------------------------------
    // Legacy workers (seed 001's /get_task and /submit_result)
    // -------------------------------------------------------------------------------------------

    pub async fn legacy_get_task(&self) -> Result<Option<LegacyAssignment>, EngineError> {
        let now = unix_now();
        let (lease, ack) = self.mutate(|s| s.legacy_assign(now));
        ack.durable().await?;
        if let Some(lease) = &lease {
            tracing::info!(
                task_id = lease.task_id,
                run_id = lease.run_id,
                "task leased to a /get_task worker"
            );
        }
        Ok(lease)
    }

    pub async fn legacy_submit_result(
        &self,
        task_id: TaskId,
        run_id: Option<RunId>,
        result: String,
        error: Option<String>,
    ) -> Result<(), EngineError> {
        let now = unix_now();
        let (outcome, ack) =
            self.mutate(
                |s| match s.legacy_result(task_id, run_id, result, error, now) {
                    Ok(changes) => (Ok(()), changes),
                    Err(e) => (Err(e), Vec::new()),
                },
            );
        match outcome {
            Ok(()) => Ok(ack.durable().await?),
            Err(SchedulerError::TaskNotFound(_)) => match self.store.task(task_id).await? {
                Some(task) => Err(SchedulerError::AlreadyFinished {
                    task_id,
                    status: task.state.status,
                }
                .into()),
                None => Err(SchedulerError::TaskNotFound(task_id).into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    // -------------------------------------------------------------------------------------------
    // Agents
    // -------------------------------------------------------------------------------------------

    pub async fn heartbeat(&self, hb: HeartbeatRequest) -> Result<HeartbeatResponse, EngineError> {
        let now = unix_now();
        let ((cancel, commands, wake), ack) = self.mutate(|s| {
            let out = s.heartbeat(&hb, now);
            ((out.cancel, out.commands, out.wake_pullers), out.changes)
        });
        if wake {
            self.work.notify_waiters();
        }
        ack.durable().await?;
        Ok(HeartbeatResponse {
            status: "ok".into(),
            node_id: hb.node_id,
            cancel,
            heartbeat_interval: self.config.heartbeat_interval,
            server_id: self.config.server_id.clone(),
            commands,
        })
    }

    /// Long-poll: answers the moment runs fit the node (or a cancel is due), else after `wait`.
    pub async fn pull(
        &self,
        node_id: &str,
        wait: Duration,
        max: usize,
    ) -> Result<PullResponse, EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so a submit between the look and the wait
            // is not missed.
            let notified = self.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = unix_now();
            let park_id = self.next_park_id.fetch_add(1, Ordering::Relaxed);
            let (handed_tx, handed_rx) = oneshot::channel();
            let (outcome, ack) = self.mutate(|s| match s.pull(node_id, max, now) {
                Ok(mut out) => {
                    let changes = std::mem::take(&mut out.changes);
                    if out.assignments.is_empty() && out.cancel.is_empty() {
                        // Parked in the same critical section as the look: the next
                        // submission sees it.
                        self.parked().insert(
                            park_id,
                            ParkedPull {
                                node_id: node_id.to_string(),
                                max,
                                handed: handed_tx,
                            },
                        );
                    }
                    (Ok(out), changes)
                }
                Err(e) => (Err(e), Vec::new()),
            });
            let out = outcome?;
            if !out.assignments.is_empty() || !out.cancel.is_empty() {
                return self
                    .hand_out(node_id, out.assignments, out.cancel, ack)
                    .await;
            }
            // If this request is dropped while parked (its client hung up), it unparks.
            let mut parked = Parked {
                engine: self,
                id: Some(park_id),
            };
            self.waiting_pulls.fetch_add(1, Ordering::Relaxed);
            let mut handed_rx = handed_rx;
            let woken = tokio::select! {
                handed = &mut handed_rx => Some(handed),
                _ = &mut notified => None,
                _ = tokio::time::sleep_until(deadline) => None,
                _ = self.shutdown.cancelled() => None,
            };
            self.waiting_pulls.fetch_sub(1, Ordering::Relaxed);
            parked.id = None;
            let handed = match woken {
                Some(handed) => handed,
                // Still parked: nobody leased to it.
                None if self.unpark(park_id) => {
                    if tokio::time::Instant::now() >= deadline || self.shutdown.is_cancelled() {
                        return Ok(PullResponse::default());
                    }
                    continue;
                }
                // A submission took it off the list: its lease was sent before the lock
                // was let go (or its sender dropped), so this does not wait.
                None => handed_rx.await,
            };
            match handed {
                Ok((response, ack)) => {
                    return self
                        .hand_out(node_id, response.tasks, response.cancel, ack)
                        .await;
                }
                // Unparked without a lease (its node is unknown now): look again.
                Err(_) => continue,
            }
        }
    }

    /// Answers a pull with runs at once while their ids are at most [`RUN_IDS_AHEAD`] above
    /// the highest durable run id, their leases committing behind the answer; otherwise (and
    /// an answer with only cancels) once its changes are durable.
    ///
    /// Why at once is safe: a restarted coordinator never reuses an id handed out ahead (see
    /// [`RUN_IDS_AHEAD`]). If a crash loses the commit, nothing a client was told is lost: the
    /// submission was not answered yet (its own answer waits for the same commit), or the task
    /// was durable and is still pending after the restart; the node's result for the unknown
    /// run is refused (the agent drops it) and its heartbeat gets the run cancelled. The task
    /// may then run again, as after any lost lease, and still completes once. A failed commit
    /// leaves the lease in memory either way: a pull that waited fails, and the lease lapses
    /// once the node's heartbeats do not list the run (its task is queued again); a pull
    /// answered ahead has the node run it.
    async fn hand_out(
        &self,
        node_id: &str,
        tasks: Vec<lull_shared::Assignment>,
        cancel: Vec<RunId>,
        ack: Ack,
    ) -> Result<PullResponse, EngineError> {
        let limit = highest_run_ahead(self.writer.durable_runs());
        let ahead = tasks
            .iter()
            .map(|a| a.run_id)
            .max()
            .is_some_and(|id| id <= limit);
        if !ahead {
            // Its lease may ride in a deferred commit (a waited-for submission's): now.
            self.writer.hasten(ack).await?;
        }
        for a in &tasks {
            tracing::debug!(
                task_id = a.task_id,
                run_id = a.run_id,
                node_id,
                ahead_of_commit = ahead,
                "run handed out"
            );
        }
        Ok(PullResponse { tasks, cancel })
    }

    pub async fn report(&self, report: RunReport) -> Result<RunReportAck, EngineError> {
        let now = unix_now();
        let (outcome, ack) = self.mutate(|s| match s.report(&report, now) {
            Ok(changes) => (Ok(()), changes),
            Err(e) => (Err(e), Vec::new()),
        });
        outcome?;
        // Capacity freed (and maybe a task requeued): waiting pulls look again.
        self.work.notify_waiters();
        ack.durable().await?;
        tracing::info!(task_id = report.task_id, run_id = report.run_id, node_id = %report.node_id, outcome = ?report.outcome, "run reported");
        Ok(RunReportAck {
            status: "ok".into(),
            task_id: report.task_id,
            run_id: report.run_id,
        })
    }

    /// Records several runs' outcomes in one critical section and one commit. Each report
    /// is settled on its own, exactly as [`Engine::report`] would settle it alone (a stale
    /// one is refused, the others are still recorded); the answer, in order, comes once
    /// every accepted report is durable. Only a storage failure fails the whole batch.
    ///
    /// With `refill` (a node and at most how many runs), the same critical section then
    /// places runs on that node as [`Engine::pull`] would (without waiting): the capacity
    /// the reports freed is leased again in their commit, and handed out in their answer.
    pub async fn report_batch(
        &self,
        reports: &[RunReport],
        refill: Option<(&str, usize)>,
    ) -> Result<(Vec<Result<(), SchedulerError>>, PullResponse), EngineError> {
        let now = unix_now();
        let ((outcomes, pulled), ack) = self.mutate(|s| {
            let mut changes = Vec::new();
            let outcomes: Vec<Result<(), SchedulerError>> = reports
                .iter()
                .map(|report| {
                    s.report(report, now)
                        .map(|mut settled| changes.append(&mut settled))
                })
                .collect();
            let mut pulled = PullResponse::default();
            if let Some((node_id, max)) = refill {
                match s.pull(node_id, max, now) {
                    Ok(mut out) => {
                        changes.append(&mut out.changes);
                        pulled.tasks = out.assignments;
                        pulled.cancel = out.cancel;
                    }
                    // Only a courtesy: the node's own pull says what is wrong.
                    Err(e) => tracing::debug!(node_id, error = %e, "no refill with the results"),
                }
            }
            ((outcomes, pulled), changes)
        });
        let accepted = outcomes.iter().filter(|o| o.is_ok()).count();
        if accepted > 0 {
            // Capacity freed (and maybe tasks requeued): waiting pulls look again, once.
            self.work.notify_waiters();
        }
        ack.durable().await?;
        for (report, outcome) in reports.iter().zip(&outcomes) {
            match outcome {
                Ok(()) => {
                    tracing::debug!(task_id = report.task_id, run_id = report.run_id, node_id = %report.node_id, outcome = ?report.outcome, "run reported")
                }
                Err(e) => {
                    tracing::info!(task_id = report.task_id, run_id = report.run_id, node_id = %report.node_id, error = %e, "run report refused")
                }
            }
        }
        tracing::debug!(
            reports = reports.len(),
            accepted,
            refused = reports.len() - accepted,
            "run reports recorded"
        );
        for a in &pulled.tasks {
            tracing::debug!(
                task_id = a.task_id,
                run_id = a.run_id,
                "run handed out with the results' answer"
            );
        }
        Ok((outcomes, pulled))
    }

    /// One pass of the periodic checks (silent nodes, lapsed leases).
    pub async fn tick(&self) -> Result<(), EngineError> {
        let now = unix_now();
        let ((requeued, pending), ack) = self.mutate(|s| {
            let changes = s.tick(now);
            ((!changes.is_empty(), s.pending_count()), changes)
        });
        self.queue_history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(now, pending as u64);
        if requeued {
            self.work.notify_waiters();
        }
        Ok(ack.durable().await?)
    }

    /// Runs [`Engine::tick`] until shutdown.
    pub async fn run_ticker(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.config.tick_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    if let Err(e) = self.tick().await {
                        tracing::error!(error = %e, "periodic check failed");
                    }
                }
                _ = self.shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::FeedConfig;
    use crate::model::Snapshot;
    use crate::scheduler::SchedulerConfig;
    use crate::scheduler::tests::{heartbeat_request, run_report};
    use crate::store::{SqliteStore, SyncMode};
    use lull_shared::{Assignment, RunOutcome};
    use std::sync::mpsc;

    /// Commits nothing, and each commit only once the test lets it through.
    struct Gated(mpsc::Receiver<()>);

    impl Committer for Gated {
        fn apply(&mut self, _changes: &[Change]) -> Result<(), StoreError> {
            self.0
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| StoreError::Commit("the test never let the commit through".into()))
        }
    }

    /// An engine whose scheduler numbers its next run `next_run` and whose highest durable
    /// run is `durable`, with one idle node `n1` registered; its commits wait for `gate`.
    async fn engine(
        dir: &std::path::Path,
        next_run: RunId,
        durable: RunId,
    ) -> (Arc<Engine>, mpsc::Sender<()>) {
        let store: Arc<dyn Store> = SqliteStore::open(dir, SyncMode::Normal)
            .await
            .expect("store");
        let snapshot = Snapshot {
            max_run_id: next_run - 1,
            ..Snapshot::default()
        };
        let (gate, gated) = mpsc::channel();
        let engine = test_engine(store, Box::new(Gated(gated)), snapshot, durable);
        let registered = tokio::spawn({
            let engine = engine.clone();
            async move { engine.heartbeat(heartbeat_request("n1")).await }
        });
        gate.send(()).expect("writer waiting");
        registered
            .await
            .expect("joined")
            .expect("the node is registered");
        (engine, gate)
    }

    /// An engine over `store` that commits through `committer`, its scheduler restored from
    /// `snapshot`, `durable` the highest durable run id.
    fn test_engine(
        store: Arc<dyn Store>,
        committer: Box<dyn Committer>,
        snapshot: Snapshot,
        durable: RunId,
    ) -> Arc<Engine> {
        let scheduler = Scheduler::restore(SchedulerConfig::default(), snapshot, unix_now());
        let (engine, _stopped) = Engine::new(
            scheduler,
            store,
            committer,
            durable,
            Arc::new(Feed::new(&FeedConfig::default(), [])),
            test_config(),
            CancellationToken::new(),
        )
        .expect("engine");
        Arc::new(engine)
    }

    fn test_config() -> EngineConfig {
        EngineConfig {
            limits: TaskLimits::default(),
            heartbeat_interval: 5.0,
            tick_interval: Duration::from_secs(60),
            server_id: "test".into(),
            // Longer than any test: a deferred commit waits for another, never for the time.
            deferred_window: Duration::from_secs(3600),
        }
    }

    /// An engine whose commits are written to its store, with one idle node `n1`.
    async fn stored_engine(dir: &std::path::Path) -> Arc<Engine> {
        stored_engine_with(dir, |committer| committer).await
    }

    /// As [`stored_engine`], its store's committer wrapped by `wrap`.
    async fn stored_engine_with(
        dir: &std::path::Path,
        wrap: impl FnOnce(Box<dyn Committer>) -> Box<dyn Committer>,
    ) -> Arc<Engine> {
        let store = SqliteStore::open(dir, SyncMode::Normal)
            .await
            .expect("store");
        let committer = wrap(Box::new(store.committer().expect("committer")));
        let engine = test_engine(store, committer, Snapshot::default(), 0);
        engine
            .heartbeat(heartbeat_request("n1"))
            .await
            .expect("the node is registered");
        engine
    }

    fn one_line() -> SubmitRequest {
        SubmitRequest {
            code: Some("print(1)".into()),
            ..SubmitRequest::default()
        }
    }

    /// Accepts a one-line task as `POST /api/v1/tasks?wait=` does (its commit deferred),
    /// leased to `n1`'s waiting pull: the accepted task, its submission's acknowledgement and
    /// its run.
    async fn accept_and_start(engine: &Arc<Engine>) -> (TaskRecord, Ack, Assignment) {
        let pull = park(engine).await;
        let (accepted, ack) = engine
            .accept(one_line(), None, true)
            .await
            .expect("accepted");
        let mut pulled = tokio::time::timeout(Duration::from_secs(10), pull)
            .await
            .expect("answered")
            .expect("joined")
            .expect("pulled");
        assert_eq!(pulled.tasks.len(), 1, "{pulled:?}");
        (accepted, ack, pulled.tasks.remove(0))
    }

    /// Commits through `inner`, logging each commit as the kinds of its changes.
    struct Recording {
        inner: Box<dyn Committer>,
        commits: Arc<Mutex<Vec<String>>>,
    }

    impl Committer for Recording {
        fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError> {
            let kinds: Vec<String> = changes
                .iter()
                .map(|change| match change {
                    Change::TaskCreated(_) => "created".to_string(),
                    Change::TaskUpdated(state) => format!("{:?}", state.status),
                    Change::RunSaved(run) => format!("run {:?}", run.status),
                    other => format!("{other:?}").chars().take(12).collect(),
                })
                .collect();
            self.inner.apply(changes)?;
            self.commits
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(kinds.join(", "));
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_waited_for_submission_is_committed_with_its_result_and_answered_as_stored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let commits = Arc::new(Mutex::new(Vec::new()));
        let engine = stored_engine_with(dir.path(), |inner| {
            Box::new(Recording {
                inner,
                commits: commits.clone(),
            })
        })
        .await;
        let (accepted, ack, run) = accept_and_start(&engine).await;
        assert!(
            engine.task(run.task_id).await.is_err(),
            "committed before its end, alone"
        );
        let waiting = tokio::spawn({
            let engine = engine.clone();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            async move { engine.wait_accepted(accepted, ack, deadline).await }
        });
        engine
            .report(run_report("n1", &run, RunOutcome::Completed, "1\n"))
            .await
            .expect("reported");
        let (task, runs) = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("answered once the result was committed")
            .expect("joined")
            .expect("waited");
        assert_eq!(task.state.status, TaskStatus::Completed);
        // The accepted record with the finishing commit's state is what the store holds.
        assert_eq!(task, engine.task(run.task_id).await.expect("stored"));
        assert_eq!(runs, engine.runs(run.task_id).await.expect("stored runs"));
        assert_eq!(runs.len(), 1);
        // After the node's registration: one commit for the submission, the lease and the end.
        let commits = commits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        assert_eq!(commits.len(), 2, "{commits:?}");
        let last = &commits[1];
        assert!(
            last.starts_with("created, Running") && last.ends_with("run Completed, Completed"),
            "{commits:?}"
        );
    }

    #[tokio::test]
    async fn a_waited_for_task_that_finished_first_is_answered_at_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine = stored_engine(dir.path()).await;
        let (accepted, ack, run) = accept_and_start(&engine).await;
        // The writer acknowledges a commit before it wakes the commit's waiters: a watch
        // taken before the report and seen woken after it shows the wake-up is over.
        let earlier = engine.finished.watch(run.task_id);
        engine
            .report(run_report("n1", &run, RunOutcome::Completed, "1\n"))
            .await
            .expect("reported");
        tokio::time::timeout(Duration::from_secs(30), earlier.finished())
            .await
            .expect("the finishing commit woke its waiters");
        drop(earlier);
        // Finished before the wait began: the accepted (pending) record must not stand for
        // it, or the wait would sit out its two minutes for a commit that has come and gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let (task, runs) = tokio::time::timeout(
            Duration::from_secs(30),
            engine.wait_accepted(accepted, ack, deadline),
        )
        .await
        .expect("answered at once")
        .expect("waited");
        assert_eq!(task.state.status, TaskStatus::Completed);
        assert_eq!(task.state.result.as_deref(), Some("1"));
        assert_eq!(runs.len(), 1);
    }

    #[tokio::test]
    async fn a_waited_for_task_answered_before_its_end_is_durable_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine = stored_engine(dir.path()).await;
        // No node takes it: the wait runs out, and the answer tells the client it was
        // accepted (its deferred commit would otherwise wait an hour here).
        let (task, runs) = tokio::time::timeout(
            Duration::from_secs(30),
            engine.submit_and_wait(one_line(), None, Duration::ZERO),
        )
        .await
        .expect("answered when the wait ran out")
        .expect("answered");
        assert_eq!(task.state.status, TaskStatus::Pending);
        assert!(runs.is_empty());
        assert_eq!(task, engine.task(task.task_id).await.expect("stored"));
    }

    /// A pull for `n1`, once it is parked.
    async fn park(
        engine: &Arc<Engine>,
    ) -> tokio::task::JoinHandle<Result<PullResponse, EngineError>> {
        let pull = tokio::spawn({
            let engine = engine.clone();
            async move { engine.pull("n1", Duration::from_secs(30), 1).await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while engine.waiting_pulls.load(Ordering::Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pull never parked"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pull
    }

    /// Parks a pull for `n1`, then submits a task: returns both, still running.
    async fn park_and_submit(
        engine: &Arc<Engine>,
    ) -> (
        tokio::task::JoinHandle<Result<PullResponse, EngineError>>,
        tokio::task::JoinHandle<Result<TaskId, EngineError>>,
    ) {
        let pull = park(engine).await;
        let submit = tokio::spawn({
            let engine = engine.clone();
            async move {
                engine
                    .submit(SubmitRequest {
                        code: Some("print(1)".into()),
                        ..SubmitRequest::default()
                    })
                    .await
            }
        });
        (pull, submit)
    }

    #[tokio::test]
    async fn a_parked_pull_gets_its_run_while_the_lease_commits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (engine, gate) = engine(dir.path(), 1, 0).await;
        let (pull, submit) = park_and_submit(&engine).await;

        // The commit of the task and its lease is held: the pull is answered anyway.
        let answer = tokio::time::timeout(Duration::from_secs(10), pull)
            .await
            .expect("answered before the commit")
            .expect("joined")
            .expect("pulled");
        assert_eq!(answer.tasks.len(), 1, "{answer:?}");
        assert_eq!(answer.tasks[0].run_id, 1);
        assert!(
            !submit.is_finished(),
            "the submission is answered only once durable"
        );
        gate.send(()).expect("writer waiting");
        let task_id = submit.await.expect("joined").expect("accepted");
        assert_eq!(answer.tasks[0].task_id, task_id);
        assert_eq!(engine.writer.durable_runs(), 1);
    }

    #[tokio::test]
    async fn a_run_beyond_the_ids_a_restart_skips_waits_for_its_lease_to_be_durable() {
        let dir = tempfile::tempdir().expect("temp dir");
        // The next run's id is past what a restart now would skip: it must not leave before
        // its lease is durable.
        let (engine, gate) = engine(dir.path(), RUN_IDS_AHEAD + 2, 1).await;
        let (mut pull, submit) = park_and_submit(&engine).await;

        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut pull)
                .await
                .is_err(),
            "answered before its lease was durable"
        );
        gate.send(()).expect("writer waiting");
        let answer = tokio::time::timeout(Duration::from_secs(10), pull)
            .await
            .expect("answered once durable")
            .expect("joined")
            .expect("pulled");
        assert_eq!(answer.tasks[0].run_id, RUN_IDS_AHEAD + 2);
        submit.await.expect("joined").expect("accepted");
        // Now durable: the next run may go ahead of its commit.
        assert_eq!(engine.writer.durable_runs(), RUN_IDS_AHEAD + 2);
    }

    #[tokio::test]
    async fn a_run_that_must_wait_for_its_lease_has_a_deferred_commit_made_at_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        // As above, with a waited-for submission: its commit (and the lease in it) would wait
        // an hour for another change here, and the node with it.
        let (engine, gate) = engine(dir.path(), RUN_IDS_AHEAD + 2, 1).await;
        let pull = park(&engine).await;
        let waiting = tokio::spawn({
            let engine = engine.clone();
            async move {
                engine
                    .submit_and_wait(one_line(), None, Duration::from_secs(30))
                    .await
            }
        });
        gate.send(()).expect("writer running");
        let answer = tokio::time::timeout(Duration::from_secs(10), pull)
            .await
            .expect("answered once its lease was made durable")
            .expect("joined")
            .expect("pulled");
        assert_eq!(answer.tasks[0].run_id, RUN_IDS_AHEAD + 2);
        assert_eq!(engine.writer.durable_runs(), RUN_IDS_AHEAD + 2);
        waiting.abort();
    }

    #[test]
    fn a_restarted_coordinator_numbers_its_runs_past_every_id_it_may_have_handed_ahead() {
        // A starting coordinator's first run id (the scheduler numbers from the highest + 1).
        let first_run_id = |highest_stored| highest_run_ahead(highest_stored) + 1;
        assert_eq!(first_run_id(0), RUN_IDS_AHEAD + 1);
        let highest_durable = 40;
        // The most a pull could have handed out ahead of its commit before the restart.
        let handed_ahead = highest_durable + RUN_IDS_AHEAD;
        assert!(first_run_id(highest_durable) > handed_ahead);
        assert_eq!(highest_run_ahead(RunId::MAX), RunId::MAX);
    }
}
