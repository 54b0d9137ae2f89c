//! The scheduler: the coordinator's in-memory truth about unfinished work, and every rule
//! that moves it — placement, leases, reconciliation, requeue, retries, stale results.
//!
//! Each operation takes the current time as an argument, mutates the state and returns the
//! [`Change`]s the store must make durable, in order. The engine sends those to the store's
//! writer while still holding the scheduler's lock, so the durable order is the order here.
//!
//! Architecture Invariant: no IO, no async, no clock, no randomness. Everything it knows
//! arrives as arguments, which is what makes it unit-testable and deterministic.
//!
//! Architecture Invariant: only unfinished tasks live here. A task that reaches a terminal
//! status is dropped at once; reads of finished work go to the store.

mod explain;
mod manage;
mod membership;
mod queue;
#[cfg(test)]
pub(crate) mod tests;

pub use explain::{Explanation, NodeVerdict, Verdict};

use crate::model::{
    Change, CommandRecord, Drain, NewTask, NodeGroup, NodeRecord, RunRecord, Snapshot, TaskRecord,
    TaskState,
};
use lull_shared::{
    AgentCommand, AgentState, Assignment, CommandId, Constraints, HeartbeatRequest, NodeResources,
    NodeStatus, Resources, RunId, RunOutcome, RunReport, RunStatus, TaskId, TaskStatus,
    result_from_stdout,
};
use queue::PendingQueue;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Tolerance for floating-point capacity sums.
const EPSILON: f64 = 1e-9;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// A node whose last heartbeat is older than this (seconds) is offline.
    pub node_ttl: f64,
    /// A run handed out less than this long ago (seconds) is not reconciled away when a
    /// heartbeat does not list it: the heartbeat may have left before the run arrived.
    pub reconcile_grace: f64,
    /// Extra seconds past a task's timeout before a legacy `/get_task` lease expires.
    pub legacy_lease_grace: f64,
    /// How many runs a node may hold beyond its capacity, waiting there for a slot (the
    /// agent starts them in lease order as runs end), so that a slot does not sit idle for
    /// the round trip that refills it. Only tasks no other node has room for are prefetched.
    pub prefetch: usize,
    /// A node command with no outcome this many seconds after it was issued is `expired`.
    pub command_ttl: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            node_ttl: 10.0,
            reconcile_grace: 5.0,
            legacy_lease_grace: 30.0,
            prefetch: DEFAULT_PREFETCH,
            command_ttl: DEFAULT_COMMAND_TTL,
        }
    }
}

/// Runs a node may hold beyond its capacity unless configured otherwise: enough for a busy
/// two-slot node to post its results two at a time and still hold a run per slot while the
/// post's answer brings the next (the agent holds a result only while more runs are queued
/// than running). With 2, a busy two-slot node posted each result alone, or waited for its
/// queue to run dry and left a slot idle for the commit.
pub const DEFAULT_PREFETCH: usize = 4;

/// Seconds a node command may wait for its outcome unless configured otherwise.
pub const DEFAULT_COMMAND_TTL: f64 = 300.0;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    #[error("Task {0} not found")]
    TaskNotFound(TaskId),
    #[error("Node {0} not found")]
    NodeNotFound(String),
    #[error("run {run_id} of task {task_id} is not current: {reason}")]
    StaleLease {
        task_id: TaskId,
        run_id: RunId,
        reason: String,
    },
    #[error("Task {task_id} is already {status}")]
    AlreadyFinished { task_id: TaskId, status: TaskStatus },
    #[error("Task {0} has no lease held by a /get_task worker")]
    NoLegacyLease(TaskId),
    #[error("node {0} is {1}: it takes no work")]
    NodeUnavailable(String, NodeStatus),
    #[error("node {0} is removed: it takes no commands")]
    NodeRemoved(String),
    #[error("already a member: {0}")]
    AlreadyMember(String),
    #[error("node {0} is not being adopted by operation {1}")]
    NotHeld(String, i64),
    #[error("node {0} has not heartbeated yet")]
    NoHeartbeatYet(String),
}

/// Why the runs of a task that ended early were ended: what their `error` says.
fn scaled_down_error(task_id: TaskId, from: u32, to: u32) -> String {
    format!("stopped: task {task_id} was scaled down from {from} to {to} points")
}

/// What a heartbeat produced.
#[derive(Debug, Default)]
pub struct HeartbeatOutcome {
    pub cancel: Vec<RunId>,
    /// Node commands the agent has not reported on yet, oldest first.
    pub commands: Vec<AgentCommand>,
    pub changes: Vec<Change>,
    /// Whether the node's capacity or eligibility grew, so waiting pulls should look again.
    pub wake_pullers: bool,
}

/// What a pull produced.
#[derive(Debug, Default)]
pub struct PullOutcome {
    pub assignments: Vec<Assignment>,
    pub cancel: Vec<RunId>,
    pub changes: Vec<Change>,
}

/// A task handed to a legacy `/get_task` worker.
#[derive(Debug, Clone)]
pub struct LegacyAssignment {
    pub task_id: TaskId,
    pub run_id: RunId,
    pub code: String,
    pub timeout: f64,
    pub created_at: f64,
}

#[derive(Debug)]
struct TaskEntry {
    record: TaskRecord,
    /// The active run of each point that has one (point index → run).
    runs: BTreeMap<u32, RunId>,
    /// Points whose run completed. A multi-point task completes when every point below
    /// `points` is here.
    done: BTreeSet<u32>,
    /// Point 0's result once it completed: the task's `result` when it completes.
    first_result: Option<String>,
}

impl TaskEntry {
    fn new(record: TaskRecord) -> TaskEntry {
        TaskEntry {
            record,
            runs: BTreeMap::new(),
            done: BTreeSet::new(),
            first_result: None,
        }
    }

    fn points(&self) -> u32 {
        self.record.state.points
    }

    /// The lowest point that needs a run: neither running nor done.
    fn next_point(&self) -> Option<u32> {
        (0..self.points()).find(|p| !self.runs.contains_key(p) && !self.done.contains(p))
    }

    /// Every current point has completed.
    fn is_complete(&self) -> bool {
        (0..self.points()).all(|p| self.done.contains(&p))
    }
}

#[derive(Debug)]
struct RunEntry {
    record: RunRecord,
    /// What the run reserves on its node (copied so release never needs the task).
    resources: Resources,
    /// Legacy runs only: when the lease lapses if no result arrived.
    lease_deadline: Option<f64>,
}

/// Whether `node_id` already holds an active run of `task` (a task's points run on distinct
/// nodes).
fn holds_run_of(task: &TaskEntry, node_id: &str, runs: &HashMap<RunId, RunEntry>) -> bool {
    task.runs.values().any(|run_id| {
        runs.get(run_id)
            .is_some_and(|r| r.record.node_id.as_deref() == Some(node_id))
    })
}

#[derive(Debug)]
struct NodeEntry {
    record: NodeRecord,
    agent_state: AgentState,
    load: lull_shared::Load,
    /// The host's load that is not Lull's, as the agent last reported it.
    owner_load: Option<lull_shared::Load>,
    /// Why the agent says it is paused for its owner (only while it is).
    paused_reason: Option<String>,
    /// Active runs the coordinator placed here.
    runs: BTreeSet<RunId>,
    reserved_cpu: f64,
    reserved_memory: f64,
    /// Runs the node must kill (cancelled, or no longer its own); cleared once the node
    /// stops reporting them. Every heartbeat answer repeats them.
    to_cancel: BTreeSet<RunId>,
    /// The part of `to_cancel` already sent in a pull answer: a pull answers at once only
    /// for news, so that a pending cancel cannot turn the long-poll into a busy loop.
    cancel_pulled: BTreeSet<RunId>,
}

impl NodeEntry {
    fn accepts_work(&self) -> bool {
        matches!(self.record.status, NodeStatus::Idle | NodeStatus::Busy)
    }

    fn fits(&self, resources: &Resources, constraints: &Constraints) -> bool {
        self.reserved_cpu + resources.cpu <= self.record.resources.cpu_cores + EPSILON
            && self.reserved_memory + resources.memory <= self.record.resources.memory_mb + EPSILON
            && self.matches(constraints)
    }

    /// Whether the task could run here once the node's current runs are over.
    fn fits_when_free(&self, resources: &Resources, constraints: &Constraints) -> bool {
        resources.cpu <= self.record.resources.cpu_cores + EPSILON
            && resources.memory <= self.record.resources.memory_mb + EPSILON
            && self.matches(constraints)
    }

    fn matches(&self, constraints: &Constraints) -> bool {
        if let Some(zone) = &constraints.zone
            && self.record.zone.as_deref() != Some(zone.as_str())
        {
            return false;
        }
        if let Some(node_type) = &constraints.node_type
            && &self.record.node_type != node_type
        {
            return false;
        }
        constraints
            .meta
            .iter()
            .all(|(key, want)| self.record.meta.get(key) == Some(want))
    }

    /// The status a live node's runs and drain call for: `idle`/`busy` by its runs; under
    /// an operator's drain `draining` until its last run ends, then `drained`; `draining`
    /// while its agent shuts down. `None` for a status set explicitly (offline, removed,
    /// paused), which runs do not change.
    fn wanted_status(&self) -> Option<NodeStatus> {
        match self.record.status {
            NodeStatus::Offline | NodeStatus::Removed | NodeStatus::Paused => return None,
            _ => {}
        }
        if self.agent_state == AgentState::Draining {
            return Some(NodeStatus::Draining);
        }
        Some(match (self.record.drain.is_some(), self.runs.is_empty()) {
            (true, true) => NodeStatus::Drained,
            (true, false) => NodeStatus::Draining,
            (false, true) => NodeStatus::Idle,
            (false, false) => NodeStatus::Busy,
        })
    }

    /// Moves the node to [`NodeEntry::wanted_status`]; true if its status changed.
    fn refresh_busy(&mut self) -> bool {
        match self.wanted_status() {
            Some(want) if self.record.status != want => {
                self.record.status = want;
                true
            }
            _ => false,
        }
    }
}

/// The fields of a [`NodeRecord`] a heartbeat can change besides those it replaces
/// (hostname, type, zone, version, protections, executor: `register` compares each as it
/// sets it), copied before and compared after. In debug builds (every test) `register`
/// also compares the whole record and asserts both agree, so a field added to the record
/// and changed by a heartbeat cannot be missed here unnoticed.
#[derive(Clone, Copy, PartialEq)]
struct ChangeCheck {
    status: NodeStatus,
    resources: NodeResources,
    joined_at: f64,
    drain: Option<Drain>,
    group: NodeGroup,
}

impl ChangeCheck {
    fn of(record: &NodeRecord) -> ChangeCheck {
        ChangeCheck {
            status: record.status,
            resources: record.resources,
            joined_at: record.joined_at,
            drain: record.drain,
            group: record.group,
        }
    }
}

/// Sets `field` to `new` if it differs; says whether it did.
fn set_if_new<T: PartialEq + Clone>(field: &mut T, new: &T) -> bool {
    if field == new {
        return false;
    }
    *field = new.clone();
    true
}

/// A node as operators see it: the record plus what only memory knows.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub record: NodeRecord,
    pub running: Vec<RunId>,
    pub load: lull_shared::Load,
    pub owner_load: Option<lull_shared::Load>,
    pub paused_reason: Option<String>,
    pub reserved_cpu: f64,
    pub reserved_memory: f64,
}

/// Counts the coordinator can answer from memory.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeCounts {
    pub total: usize,
    pub idle: usize,
    pub busy: usize,
    pub paused: usize,
    pub draining: usize,
    pub drained: usize,
    pub offline: usize,
    pub removed: usize,
}

/// The in-memory scheduling state. See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    next_task_id: TaskId,
    next_run_id: RunId,
    total_tasks: u64,
    tasks: HashMap<TaskId, TaskEntry>,
    queue: PendingQueue,
    runs: HashMap<RunId, RunEntry>,
    nodes: HashMap<String, NodeEntry>,
    next_command_id: CommandId,
    /// Node commands still waiting for an outcome; finished ones live only in the store.
    commands: BTreeMap<CommandId, CommandRecord>,
    /// The next scale-out group's id: groups are numbered in the order they joined.
    next_group_id: i64,
    /// Nodes a scale-out is adopting: their heartbeats are kept aside, not registered,
    /// until the operation admits them (or rolls back). See `membership.rs`.
    held: HashMap<String, membership::Held>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Scheduler {
        Scheduler::restore(config, Snapshot::default(), 0.0)
    }

    /// Rebuilds the state after a restart. Nodes get a fresh heartbeat time so that agents
    /// have a full TTL to reconnect before their runs are considered lost.
    pub fn restore(config: SchedulerConfig, snapshot: Snapshot, now: f64) -> Scheduler {
        let mut sched = Scheduler {
            config,
            next_task_id: snapshot.max_task_id + 1,
            next_run_id: snapshot.max_run_id + 1,
            total_tasks: snapshot.total_tasks,
            tasks: HashMap::new(),
            queue: PendingQueue::default(),
            runs: HashMap::new(),
            nodes: HashMap::new(),
            next_command_id: snapshot.max_command_id + 1,
            commands: snapshot
                .active_commands
                .into_iter()
                .map(|c| (c.command_id, c))
                .collect(),
            next_group_id: snapshot.nodes.iter().map(|n| n.group.id).max().unwrap_or(0) + 1,
            held: HashMap::new(),
        };
        for mut record in snapshot.nodes {
            record.last_heartbeat = now;
            let agent_state = match record.status {
                NodeStatus::Offline | NodeStatus::Removed => AgentState::Offline,
                NodeStatus::Busy => AgentState::Busy,
                _ => AgentState::Idle,
            };
            sched.nodes.insert(
                record.node_id.clone(),
                NodeEntry {
                    record,
                    agent_state,
                    load: lull_shared::Load::default(),
                    owner_load: None,
                    paused_reason: None,
                    runs: BTreeSet::new(),
                    reserved_cpu: 0.0,
                    reserved_memory: 0.0,
                    to_cancel: BTreeSet::new(),
                    cancel_pulled: BTreeSet::new(),
                },
            );
        }
        for record in snapshot.active_tasks {
            sched.tasks.insert(record.task_id, TaskEntry::new(record));
        }
        for (task_id, point, stdout) in snapshot.completed_points {
            if let Some(task) = sched.tasks.get_mut(&task_id) {
                task.done.insert(point);
                if point == 0 {
                    task.first_result = Some(result_from_stdout(&stdout));
                }
            }
        }
        for run in snapshot.active_runs {
            let Some(task) = sched.tasks.get_mut(&run.task_id) else {
                continue;
            };
            task.runs.insert(run.point, run.run_id);
            let spec = task.record.spec.clone();
            let lease_deadline = match &run.node_id {
                None => Some(now + spec.timeout + sched.config.legacy_lease_grace),
                Some(node_id) => {
                    if let Some(node) = sched.nodes.get_mut(node_id) {
                        node.runs.insert(run.run_id);
                        node.reserved_cpu += spec.resources.cpu;
                        node.reserved_memory += spec.resources.memory;
                    }
                    None
                }
            };
            sched.runs.insert(
                run.run_id,
                RunEntry {
                    record: run,
                    resources: spec.resources,
                    lease_deadline,
                },
            );
        }
        // Points without a run wait in the queue; a task marked active whose runs did not
        // survive is pending again.
        let ids: Vec<TaskId> = sched.tasks.keys().copied().collect();
        for task_id in ids {
            let (status, node_id) = sched.derived_status(task_id);
            if let Some(task) = sched.tasks.get_mut(&task_id) {
                if status == TaskStatus::Pending {
                    task.record.state.status = TaskStatus::Pending;
                    task.record.state.node_id = None;
                } else {
                    task.record.state.node_id = node_id;
                }
                if task.next_point().is_some() {
                    sched.queue.push(task_id, &task.record.spec);
                }
            }
        }
        sched
    }

    // -----------------------------------------------------------------------------------------
    // Reads
    // -----------------------------------------------------------------------------------------

    pub fn pending_count(&self) -> usize {
        self.queue.len()
    }

    pub fn active_count(&self) -> usize {
        self.tasks.len()
    }

    /// Whether the task is active here (pending, assigned or running): one that has
    /// finished, or was never submitted, is not.
    pub fn holds(&self, task_id: TaskId) -> bool {
        self.tasks.contains_key(&task_id)
    }

    pub fn total_tasks(&self) -> u64 {
        self.total_tasks
    }

    pub fn node_counts(&self) -> NodeCounts {
        let mut c = NodeCounts::default();
        for node in self.nodes.values() {
            c.total += 1;
            match node.record.status {
                NodeStatus::Idle => c.idle += 1,
                NodeStatus::Busy => c.busy += 1,
                NodeStatus::Paused => c.paused += 1,
                NodeStatus::Draining => c.draining += 1,
                NodeStatus::Drained => c.drained += 1,
                NodeStatus::Offline => c.offline += 1,
                NodeStatus::Removed => c.removed += 1,
            }
        }
        c
    }

    /// Every node with its live view (runs, load), ordered by id.
    pub fn nodes(&self) -> Vec<NodeView> {
        let mut out: Vec<NodeView> = self
            .nodes
            .values()
            .map(|n| NodeView {
                record: n.record.clone(),
                running: n.runs.iter().copied().collect(),
                load: n.load,
                owner_load: n.owner_load,
                paused_reason: n.paused_reason.clone(),
                reserved_cpu: n.reserved_cpu,
                reserved_memory: n.reserved_memory,
            })
            .collect();
        out.sort_by(|a, b| a.record.node_id.cmp(&b.record.node_id));
        out
    }

    /// The state of an active run, if it is active.
    pub fn active_run(&self, run_id: RunId) -> Option<&RunRecord> {
        self.runs.get(&run_id).map(|r| &r.record)
    }

    /// The status an active task's runs call for, and the node of its newest active run:
    /// `running` while any point runs on a node, `assigned` while only a `/get_task` worker
    /// holds it, else `pending`.
    fn derived_status(&self, task_id: TaskId) -> (TaskStatus, Option<String>) {
        let Some(task) = self.tasks.get(&task_id) else {
            return (TaskStatus::Pending, None);
        };
        let active: Vec<&RunEntry> = task
            .runs
            .values()
            .filter_map(|id| self.runs.get(id))
            .collect();
        let newest = active.iter().max_by_key(|r| r.record.run_id);
        let node_id = newest.and_then(|r| r.record.node_id.clone());
        let status = if active.iter().any(|r| r.record.node_id.is_some()) {
            TaskStatus::Running
        } else if active.is_empty() {
            TaskStatus::Pending
        } else {
            TaskStatus::Assigned
        };
        (status, node_id)
    }

    // -----------------------------------------------------------------------------------------
    // Submission and cancellation
    // -----------------------------------------------------------------------------------------

    /// Accepts a validated task and queues it.
    pub fn submit(&mut self, task: NewTask, now: f64) -> (TaskId, Vec<Change>) {
        let NewTask { spec, points } = task;
        let task_id = self.next_task_id;
        self.next_task_id += 1;
        self.total_tasks += 1;
        let record = TaskRecord {
            task_id,
            spec,
            state: TaskState {
                task_id,
                status: TaskStatus::Pending,
                result: None,
                error: None,
                attempts: 0,
                losses: 0,
                points,
                node_id: None,
                started_at: None,
                completed_at: None,
            },
            created_at: now,
        };
        self.queue.push(task_id, &record.spec);
        let change = Change::TaskCreated(record.clone());
        self.tasks.insert(task_id, TaskEntry::new(record));
        (task_id, vec![change])
    }

    /// Cancels an unfinished task; a running one is killed on its node.
    /// Returns `TaskNotFound` for a task that is not active (the caller checks the store to
    /// tell "unknown" from "already finished").
    pub fn cancel(&mut self, task_id: TaskId, now: f64) -> Result<Vec<Change>, SchedulerError> {
        if !self.tasks.contains_key(&task_id) {
            return Err(SchedulerError::TaskNotFound(task_id));
        }
        let mut changes = Vec::new();
        self.stop_task_runs(task_id, RunStatus::Cancelled, None, 0, now, &mut changes);
        self.queue.remove(task_id);
        self.finish_task(
            task_id,
            TaskStatus::Cancelled,
            None,
            Some("cancelled by request".into()),
            now,
            &mut changes,
        );
        Ok(changes)
    }

    /// Changes how many nodes run an active task at once (seed 000's change_points).
    /// Raising queues the new points (placed on nodes that do not run the task yet);
    /// lowering stops the newest points — those at or above the new count — as `stopped`
    /// (not failed, not lost, not retried) and has their nodes kill them. A task whose
    /// every remaining point is done completes. `points` is validated by the caller.
    pub fn change_points(
        &mut self,
        task_id: TaskId,
        points: u32,
        now: f64,
    ) -> Result<Vec<Change>, SchedulerError> {
        let task = self
            .tasks
            .get_mut(&task_id)
            .ok_or(SchedulerError::TaskNotFound(task_id))?;
        let from = task.record.state.points;
        let mut changes = Vec::new();
        if from == points {
            return Ok(changes);
        }
        task.record.state.points = points;
        if points < from {
            let why = scaled_down_error(task_id, from, points);
            self.stop_task_runs(
                task_id,
                RunStatus::Stopped,
                Some(why),
                points,
                now,
                &mut changes,
            );
        }
        self.settle(task_id, now, &mut changes);
        Ok(changes)
    }

    /// Ends the task's active runs of points `from_point` and up with `status`, and has
    /// their nodes kill them. A result they still send is refused as stale.
    fn stop_task_runs(
        &mut self,
        task_id: TaskId,
        status: RunStatus,
        error: Option<String>,
        from_point: u32,
        now: f64,
        changes: &mut Vec<Change>,
    ) {
        let runs: Vec<RunId> = self
            .tasks
            .get(&task_id)
            .map(|t| t.runs.range(from_point..).map(|(_, r)| *r).collect())
            .unwrap_or_default();
        for run_id in runs {
            let node_id = self
                .runs
                .get(&run_id)
                .and_then(|r| r.record.node_id.clone());
            self.end_run(run_id, status, error.clone(), now, changes);
            if let Some(node) = node_id.and_then(|id| self.nodes.get_mut(&id)) {
                node.to_cancel.insert(run_id);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Nodes
    // -----------------------------------------------------------------------------------------

    /// Registers or refreshes a node, and reconciles the runs it reports with ours. A node
    /// being adopted by a scale-out is only noted (see `membership.rs`).
    pub fn heartbeat(&mut self, hb: &HeartbeatRequest, now: f64) -> HeartbeatOutcome {
        if let Some(out) = self.held_heartbeat(hb, now) {
            return out;
        }
        self.register(hb, now, None)
    }

    /// [`Scheduler::heartbeat`] for a node that is not held; `group` is the scale-out
    /// group it is admitted with (`None`: a node that joins on its own gets a group of its
    /// own when it first joins, or joins again after it was removed).
    fn register(
        &mut self,
        hb: &HeartbeatRequest,
        now: f64,
        group: Option<NodeGroup>,
    ) -> HeartbeatOutcome {
        let mut out = HeartbeatOutcome::default();
        let node_id = hb.node_id.clone();
        let fresh = !self.nodes.contains_key(&node_id);
        if group.is_none()
            && hb.status == AgentState::Offline
            && self
                .nodes
                .get(&node_id)
                .is_some_and(|n| n.record.status == NodeStatus::Removed)
        {
            // A removed node's agent saying goodbye (it was decommissioned): it stays
            // removed; only the outcome of its commands is news.
            self.command_results(&node_id, &hb.command_results, now, &mut out.changes);
            return out;
        }
        let entry = self
            .nodes
            .entry(node_id.clone())
            .or_insert_with(|| NodeEntry {
                record: NodeRecord {
                    node_id: node_id.clone(),
                    hostname: String::new(),
                    node_type: "cpu".into(),
                    zone: None,
                    resources: hb.resources,
                    meta: serde_json::Map::new(),
                    status: NodeStatus::Offline,
                    version: None,
                    joined_at: now,
                    last_heartbeat: now,
                    sandbox: None,
                    executor: None,
                    drain: None,
                    group: NodeGroup {
                        id: 0,
                        operation_id: None,
                    },
                },
                agent_state: AgentState::Offline,
                load: lull_shared::Load::default(),
                owner_load: None,
                paused_reason: None,
                runs: BTreeSet::new(),
                reserved_cpu: 0.0,
                reserved_memory: 0.0,
                to_cancel: BTreeSet::new(),
                cancel_pulled: BTreeSet::new(),
            });
        // What a heartbeat can change of the record, to save it only when it did: the
        // small fields copied here, the others compared as they are set (cloning the whole
        // record for every heartbeat was a few per cent of a heartbeat's CPU).
        let before = ChangeCheck::of(&entry.record);
        #[cfg(debug_assertions)]
        let whole_before = entry.record.clone();
        entry.load = hb.current_load;
        entry.owner_load = hb.owner_load;
        entry.paused_reason = match hb.status {
            AgentState::Paused => Some(
                hb.paused_reason
                    .clone()
                    .unwrap_or_else(|| "the owner is using the machine".to_string()),
            ),
            _ => None,
        };
        entry.agent_state = hb.status;
        entry.record.resources = hb.resources;
        let record = &mut entry.record;
        let mut replaced = false;
        if let Some(h) = &hb.hostname {
            replaced |= set_if_new(&mut record.hostname, h);
        }
        if let Some(t) = &hb.node_type {
            replaced |= set_if_new(&mut record.node_type, t);
        }
        if hb.zone.is_some() {
            replaced |= set_if_new(&mut record.zone, &hb.zone);
        }
        if hb.version.is_some() {
            replaced |= set_if_new(&mut record.version, &hb.version);
        }
        if hb.sandbox.is_some() {
            replaced |= set_if_new(&mut record.sandbox, &hb.sandbox);
        }
        if hb.executor.is_some() {
            replaced |= set_if_new(&mut record.executor, &hb.executor);
        }
        let back_from_removed =
            before.status == NodeStatus::Removed && hb.status != AgentState::Offline;
        let rejoined = (before.status == NodeStatus::Offline || back_from_removed)
            && hb.status != AgentState::Offline;
        if rejoined {
            entry.record.joined_at = now;
        }
        if let Some(group) = group {
            entry.record.group = group;
            // Joining through a scale-out starts afresh: no operator's drain carries over.
            entry.record.drain = None;
        } else if fresh || back_from_removed {
            entry.record.group = NodeGroup {
                id: self.next_group_id,
                operation_id: None,
            };
            self.next_group_id += 1;
            entry.record.drain = None;
        }
        let leaving = hb.status == AgentState::Offline;
        entry.record.status = match hb.status {
            AgentState::Offline => NodeStatus::Offline,
            // The owner needs the machine: nothing is placed here (see `accepts_work`); its
            // runs stay leased to it, suspended, until they resume or the agent evicts them.
            // `wanted_status` leaves it alone until the agent says otherwise.
            AgentState::Paused => NodeStatus::Paused,
            // Settled by `refresh_busy` below (runs, the agent's own drain, an operator's).
            AgentState::Draining | AgentState::Idle | AgentState::Busy => NodeStatus::Idle,
        };

        // Reconcile: what the node reports against what we placed there.
        let reported: BTreeSet<RunId> = hb.running.iter().chain(&hb.finished).copied().collect();
        let ours: Vec<RunId> = entry.runs.iter().copied().collect();
        let mut lost = Vec::new();
        for run_id in ours {
            let handed_out = self
                .runs
                .get(&run_id)
                .map(|r| r.record.started_at)
                .unwrap_or(now);
            if leaving
                || (!reported.contains(&run_id) && now - handed_out >= self.config.reconcile_grace)
            {
                lost.push(run_id);
            }
        }
        for run_id in lost {
            let why = if leaving {
                format!("node {node_id} left")
            } else {
                format!("node {node_id} no longer reports the run")
            };
            self.lose_run(run_id, &why, now, &mut out.changes);
        }
        let Some(entry) = self.nodes.get_mut(&node_id) else {
            return out;
        };
        // Runs the node holds that are not (or no longer) its own must die there.
        entry.to_cancel.retain(|id| hb.running.contains(id));
        let still = entry.to_cancel.clone();
        entry.cancel_pulled.retain(|id| still.contains(id));
        for run_id in &hb.running {
            if !entry.runs.contains(run_id) {
                entry.to_cancel.insert(*run_id);
            }
        }
        out.cancel = entry.to_cancel.iter().copied().collect();
        if !leaving {
            entry.refresh_busy();
        }
        // Heartbeat times alone are not saved: they are frequent, and after a restart every
        // node gets a fresh TTL anyway. Anything else that changed is.
        let changed = replaced || ChangeCheck::of(&entry.record) != before;
        #[cfg(debug_assertions)]
        debug_assert_eq!(
            changed,
            entry.record != whole_before,
            "change detection disagrees with comparing the whole record"
        );
        entry.record.last_heartbeat = now;
        if changed {
            out.changes.push(Change::NodeSaved(entry.record.clone()));
        }
        out.wake_pullers = entry.accepts_work()
            && (before.status != entry.record.status || before.resources != entry.record.resources);
        self.command_results(&node_id, &hb.command_results, now, &mut out.changes);
        if !leaving {
            out.commands = self.deliver_commands(&node_id, now, &mut out.changes);
        }
        out
    }

    /// Marks nodes whose heartbeats stopped as offline and requeues their runs; expires
    /// legacy leases. Called periodically.
    pub fn tick(&mut self, now: f64) -> Vec<Change> {
        let mut changes = Vec::new();
        let ttl = self.config.node_ttl;
        let silent: Vec<String> = self
            .nodes
            .values()
            .filter(|n| {
                n.record.status != NodeStatus::Offline && n.record.status != NodeStatus::Removed
            })
            .filter(|n| now - n.record.last_heartbeat > ttl)
            .map(|n| n.record.node_id.clone())
            .collect();
        for node_id in silent {
            let runs: Vec<RunId> = self
                .nodes
                .get(&node_id)
                .map(|n| n.runs.iter().copied().collect())
                .unwrap_or_default();
            for run_id in runs {
                let why = format!("node {node_id} went offline (no heartbeat for {ttl} s)");
                self.lose_run(run_id, &why, now, &mut changes);
            }
            if let Some(node) = self.nodes.get_mut(&node_id) {
                node.record.status = NodeStatus::Offline;
                node.agent_state = AgentState::Offline;
                changes.push(Change::NodeSaved(node.record.clone()));
            }
        }
        let lapsed: Vec<RunId> = self
            .runs
            .values()
            .filter(|r| r.lease_deadline.is_some_and(|d| now > d))
            .map(|r| r.record.run_id)
            .collect();
        for run_id in lapsed {
            self.lose_run(
                run_id,
                "no result from the /get_task worker before its lease expired",
                now,
                &mut changes,
            );
        }
        self.enforce_drain_deadlines(now, &mut changes);
        self.expire_commands(now, &mut changes);
        changes
    }

    // -----------------------------------------------------------------------------------------
    // Placement
    // -----------------------------------------------------------------------------------------

    /// Hands the node up to `max` runs that fit its free capacity and match its attributes.
    pub fn pull(
        &mut self,
        node_id: &str,
        max: usize,
        now: f64,
    ) -> Result<PullOutcome, SchedulerError> {
        if self.held.contains_key(node_id) {
            // Being adopted: nothing until the scale-out admits it (the long-poll waits).
            return Ok(PullOutcome::default());
        }
        let node = self
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| SchedulerError::NodeNotFound(node_id.to_string()))?;
        let news: Vec<RunId> = node
            .to_cancel
            .difference(&node.cancel_pulled)
            .copied()
            .collect();
        node.cancel_pulled.extend(news.iter().copied());
        let mut out = PullOutcome {
            cancel: news,
            ..PullOutcome::default()
        };
        if !node.accepts_work() {
            return Ok(out);
        }
        while out.assignments.len() < max {
            let Some(task_id) = self.next_for(node_id) else {
                break;
            };
            let (run, assignment) = self.start_run(task_id, Some(node_id), now, &mut out.changes);
            if let Some(node) = self.nodes.get_mut(node_id) {
                node.runs.insert(run);
                node.reserved_cpu += assignment.resources.cpu;
                node.reserved_memory += assignment.resources.memory;
            }
            out.assignments.push(assignment);
        }
        if let Some(node) = self.nodes.get_mut(node_id)
            && node.refresh_busy()
        {
            out.changes.push(Change::NodeSaved(node.record.clone()));
        }
        Ok(out)
    }

    /// The oldest pending task for the node: one that fits its free capacity, or else, while
    /// fewer than `prefetch` of its runs wait there for a slot, one that will fit when its
    /// runs are over and that no other node has room for now.
    /// A task with several points is only taken by a node that does not run one of its
    /// points already.
    fn next_for(&mut self, node_id: &str) -> Option<TaskId> {
        let node = self.nodes.get(node_id)?;
        let (tasks, runs) = (&self.tasks, &self.runs);
        let eligible = |task_id: TaskId| {
            tasks
                .get(&task_id)
                .is_some_and(|t| t.runs.is_empty() || !holds_run_of(t, node_id, runs))
        };
        if let Some(task_id) = self
            .queue
            .pop_first(|res, cons| node.fits(res, cons), eligible)
        {
            return Some(task_id);
        }
        if self.config.prefetch == 0 || self.waiting_runs(node) >= self.config.prefetch {
            return None;
        }
        let nodes = &self.nodes;
        self.queue.pop_first(
            |res, cons| {
                node.fits_when_free(res, cons)
                    && !nodes.iter().any(|(id, other)| {
                        id != node_id && other.accepts_work() && other.fits(res, cons)
                    })
            },
            eligible,
        )
    }

    /// How many of the node's runs wait there for a slot: those past the longest prefix, in
    /// lease order, that fits its capacity (the agent starts them in that order).
    fn waiting_runs(&self, node: &NodeEntry) -> usize {
        self.waiting_run_ids(node).len()
    }

    /// The runs [`Scheduler::waiting_runs`] counts.
    fn waiting_run_ids(&self, node: &NodeEntry) -> Vec<RunId> {
        let capacity = &node.record.resources;
        let (mut cpu, mut memory) = (0.0, 0.0);
        let mut waiting = Vec::new();
        for run in node.runs.iter().filter_map(|id| self.runs.get(id)) {
            let (c, m) = (cpu + run.resources.cpu, memory + run.resources.memory);
            if waiting.is_empty()
                && c <= capacity.cpu_cores + EPSILON
                && m <= capacity.memory_mb + EPSILON
            {
                (cpu, memory) = (c, m);
            } else {
                waiting.push(run.record.run_id);
            }
        }
        waiting
    }

    /// Leases the oldest unconstrained pending task to a legacy `/get_task` worker.
    pub fn legacy_assign(&mut self, now: f64) -> (Option<LegacyAssignment>, Vec<Change>) {
        let mut changes = Vec::new();
        // A hand-run worker is one anonymous worker: it gets only one-point tasks (points
        // must run on distinct nodes, which it cannot be told apart from).
        let tasks = &self.tasks;
        let Some(task_id) = self.queue.pop_first(
            |_, cons| cons.is_empty(),
            |task_id| tasks.get(&task_id).is_some_and(|t| t.points() == 1),
        ) else {
            return (None, changes);
        };
        let (run_id, assignment) = self.start_run(task_id, None, now, &mut changes);
        let deadline = now + assignment.timeout + self.config.legacy_lease_grace;
        if let Some(run) = self.runs.get_mut(&run_id) {
            run.lease_deadline = Some(deadline);
        }
        let created_at = self
            .tasks
            .get(&task_id)
            .map(|t| t.record.created_at)
            .unwrap_or(now);
        (
            Some(LegacyAssignment {
                task_id,
                run_id,
                code: assignment.code,
                timeout: assignment.timeout,
                created_at,
            }),
            changes,
        )
    }

    fn start_run(
        &mut self,
        task_id: TaskId,
        node_id: Option<&str>,
        now: f64,
        changes: &mut Vec<Change>,
    ) -> (RunId, Assignment) {
        let run_id = self.next_run_id;
        self.next_run_id += 1;
        // The queue only holds ids of tasks in `self.tasks` that have a point to run; see
        // `PendingQueue` and `settle`.
        let task = self.tasks.get_mut(&task_id).expect("queued task is active");
        let point = task.next_point().unwrap_or(0);
        let first_run = task.runs.is_empty();
        task.runs.insert(point, run_id);
        let state = &mut task.record.state;
        state.attempts += 1;
        let attempt = state.attempts;
        let before = state.status;
        if node_id.is_some() {
            state.status = TaskStatus::Running;
        } else if first_run {
            state.status = TaskStatus::Assigned;
        }
        state.node_id = node_id.map(str::to_string);
        if first_run {
            state.started_at = Some(now);
        }
        changes.push(if state.status == before {
            Change::TaskRevised(state.clone())
        } else {
            Change::TaskUpdated(state.clone())
        });
        if task.next_point().is_some() {
            // More points wait: the task keeps its place in the queue.
            self.queue.push(task_id, &task.record.spec);
        }
        let run = RunRecord {
            run_id,
            task_id,
            node_id: node_id.map(str::to_string),
            attempt,
            point,
            status: if node_id.is_some() {
                RunStatus::Running
            } else {
                RunStatus::Assigned
            },
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            error: None,
            started_at: now,
            completed_at: None,
            cpu_seconds: None,
            max_rss_mb: None,
        };
        changes.push(Change::RunSaved(run.clone()));
        let spec = &task.record.spec;
        let assignment = Assignment {
            task_id,
            run_id,
            attempt: run.attempt,
            code: spec.code.to_string(),
            timeout: spec.timeout,
            resources: spec.resources,
            point,
            points: task.record.state.points,
        };
        self.runs.insert(
            run_id,
            RunEntry {
                record: run,
                resources: spec.resources,
                lease_deadline: None,
            },
        );
        (run_id, assignment)
    }

    // -----------------------------------------------------------------------------------------
    // Results
    // -----------------------------------------------------------------------------------------

    /// Records what an agent reports for one of its runs. A report for a run that is not
    /// current, or from a node that does not hold it, is refused: no task completes twice.
    pub fn report(&mut self, report: &RunReport, now: f64) -> Result<Vec<Change>, SchedulerError> {
        let stale = |reason: &str| SchedulerError::StaleLease {
            task_id: report.task_id,
            run_id: report.run_id,
            reason: reason.to_string(),
        };
        let run = self
            .runs
            .get(&report.run_id)
            .ok_or_else(|| stale("it was requeued, cancelled or already reported"))?;
        if run.record.task_id != report.task_id {
            return Err(stale("it belongs to another task"));
        }
        if run.record.node_id.as_deref() != Some(report.node_id.as_str()) {
            return Err(stale("it is leased to another node"));
        }
        let mut changes = Vec::new();
        let completed_at = report.completed_at.unwrap_or(now);
        match report.outcome {
            RunOutcome::Released => {
                self.end_run(
                    report.run_id,
                    RunStatus::Released,
                    report.error.clone(),
                    now,
                    &mut changes,
                );
                self.settle(report.task_id, now, &mut changes);
            }
            RunOutcome::Cancelled => {
                self.end_run(
                    report.run_id,
                    RunStatus::Cancelled,
                    report.error.clone(),
                    now,
                    &mut changes,
                );
                self.settle(report.task_id, now, &mut changes);
            }
            RunOutcome::Lost => {
                let why = format!(
                    "node {} lost the run: {}",
                    report.node_id,
                    report.error.as_deref().unwrap_or("no reason given")
                );
                self.lose_run(report.run_id, &why, now, &mut changes);
            }
            RunOutcome::Completed | RunOutcome::Failed => {
                let completed = report.outcome == RunOutcome::Completed;
                let run_status = if completed {
                    RunStatus::Completed
                } else {
                    RunStatus::Failed
                };
                let Some(mut entry) = self.runs.remove(&report.run_id) else {
                    return Err(stale("it is gone"));
                };
                let point = entry.record.point;
                entry.record.status = run_status;
                entry.record.exit_code = report.exit_code;
                entry.record.stdout = report.stdout.clone();
                entry.record.stderr = report.stderr.clone();
                entry.record.error = report.error.clone();
                entry.record.completed_at = Some(completed_at);
                entry.record.cpu_seconds = report.cpu_seconds;
                entry.record.max_rss_mb = report.max_rss_mb;
                self.release_capacity(&entry, &mut changes);
                changes.push(Change::RunSaved(entry.record));
                let result = result_from_stdout(&report.stdout);
                let Some(task) = self.tasks.get_mut(&report.task_id) else {
                    return Ok(changes);
                };
                task.runs.remove(&point);
                if completed {
                    task.done.insert(point);
                    if point == 0 {
                        task.first_result = Some(result);
                    }
                    self.settle(report.task_id, completed_at, &mut changes);
                } else {
                    // A point's code failed: the task has failed. Its other points stop.
                    let reason = report.error.clone().unwrap_or_else(|| "failed".into());
                    let error = if task.points() > 1 || !task.runs.is_empty() {
                        format!("point {point} failed: {reason}")
                    } else {
                        reason
                    };
                    self.stop_task_runs(
                        report.task_id,
                        RunStatus::Cancelled,
                        Some(format!("cancelled: point {point} of the task failed")),
                        0,
                        now,
                        &mut changes,
                    );
                    self.finish_task(
                        report.task_id,
                        TaskStatus::Failed,
                        Some(result),
                        Some(error),
                        completed_at,
                        &mut changes,
                    );
                }
            }
        }
        Ok(changes)
    }

    /// Records a result posted by a legacy `/submit_result` worker.
    pub fn legacy_result(
        &mut self,
        task_id: TaskId,
        run_id: Option<RunId>,
        result: String,
        error: Option<String>,
        now: f64,
    ) -> Result<Vec<Change>, SchedulerError> {
        let task = self
            .tasks
            .get(&task_id)
            .ok_or(SchedulerError::TaskNotFound(task_id))?;
        // The run a hand-run worker holds: the one without a node.
        let current = task
            .runs
            .values()
            .copied()
            .find(|id| {
                self.runs
                    .get(id)
                    .is_some_and(|r| r.record.node_id.is_none())
            })
            .ok_or(SchedulerError::NoLegacyLease(task_id))?;
        if run_id.is_some_and(|id| id != current) {
            return Err(SchedulerError::StaleLease {
                task_id,
                run_id: run_id.unwrap_or_default(),
                reason: "the lease was requeued".into(),
            });
        }
        let mut changes = Vec::new();
        let Some(mut entry) = self.runs.remove(&current) else {
            return Err(SchedulerError::NoLegacyLease(task_id));
        };
        let point = entry.record.point;
        let failed = error.is_some();
        entry.record.status = if failed {
            RunStatus::Failed
        } else {
            RunStatus::Completed
        };
        entry.record.stdout = result.clone();
        entry.record.error = error.clone();
        entry.record.completed_at = Some(now);
        changes.push(Change::RunSaved(entry.record));
        if let Some(task) = self.tasks.get_mut(&task_id) {
            task.runs.remove(&point);
        }
        if failed {
            self.stop_task_runs(
                task_id,
                RunStatus::Cancelled,
                Some(format!("cancelled: point {point} of the task failed")),
                0,
                now,
                &mut changes,
            );
            self.finish_task(
                task_id,
                TaskStatus::Failed,
                Some(result),
                error,
                now,
                &mut changes,
            );
        } else if let Some(task) = self.tasks.get_mut(&task_id) {
            task.done.insert(point);
            if point == 0 {
                task.first_result = Some(result);
            }
            self.settle(task_id, now, &mut changes);
        }
        Ok(changes)
    }

    // -----------------------------------------------------------------------------------------
    // Internals
    // -----------------------------------------------------------------------------------------

    /// Ends an active run with a status that carries no output, freeing its reservation.
    fn end_run(
        &mut self,
        run_id: RunId,
        status: RunStatus,
        error: Option<String>,
        now: f64,
        changes: &mut Vec<Change>,
    ) {
        let Some(mut entry) = self.runs.remove(&run_id) else {
            return;
        };
        entry.record.status = status;
        entry.record.error = error;
        entry.record.completed_at = Some(now);
        self.release_capacity(&entry, changes);
        if let Some(task) = self.tasks.get_mut(&entry.record.task_id)
            && task.runs.get(&entry.record.point) == Some(&run_id)
        {
            task.runs.remove(&entry.record.point);
        }
        changes.push(Change::RunSaved(entry.record));
    }

    fn release_capacity(&mut self, run: &RunEntry, changes: &mut Vec<Change>) {
        let Some(node_id) = &run.record.node_id else {
            return;
        };
        let resources = run.resources;
        if let Some(node) = self.nodes.get_mut(node_id)
            && node.runs.remove(&run.record.run_id)
        {
            node.reserved_cpu = (node.reserved_cpu - resources.cpu).max(0.0);
            node.reserved_memory = (node.reserved_memory - resources.memory).max(0.0);
            if node.runs.is_empty() {
                // Guard against drift from float sums.
                node.reserved_cpu = 0.0;
                node.reserved_memory = 0.0;
            }
            if node.refresh_busy() {
                changes.push(Change::NodeSaved(node.record.clone()));
            }
        }
    }

    /// A run whose node failed: retry the task elsewhere, or fail it after `max_attempts` losses.
    fn lose_run(&mut self, run_id: RunId, why: &str, now: f64, changes: &mut Vec<Change>) {
        let Some(task_id) = self.runs.get(&run_id).map(|r| r.record.task_id) else {
            return;
        };
        self.end_run(run_id, RunStatus::Lost, Some(why.to_string()), now, changes);
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        task.record.state.losses += 1;
        let losses = task.record.state.losses;
        let max = task.record.spec.max_attempts;
        if losses >= max {
            let error = format!("lost {losses} of {max} allowed attempts; last: {why}");
            // Its other points (on other nodes) stop with it.
            self.stop_task_runs(
                task_id,
                RunStatus::Cancelled,
                Some(format!("cancelled: the task failed ({error})")),
                0,
                now,
                changes,
            );
            self.finish_task(task_id, TaskStatus::Failed, None, Some(error), now, changes);
        } else {
            self.settle(task_id, now, changes);
        }
    }

    /// Brings an active task in line with its runs after one of them ended or its points
    /// changed: completed once every current point is done (`result`: point 0's); else
    /// queued while a point has no run, with the status its runs call for. Records the
    /// change as `TaskUpdated` when the status moved, `TaskRevised` when it did not.
    fn settle(&mut self, task_id: TaskId, now: f64, changes: &mut Vec<Change>) {
        let Some(task) = self.tasks.get(&task_id) else {
            return;
        };
        if task.is_complete() {
            let result = task.first_result.clone();
            self.finish_task(task_id, TaskStatus::Completed, result, None, now, changes);
            return;
        }
        let (status, node_id) = self.derived_status(task_id);
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        if task.next_point().is_some() {
            self.queue.push(task_id, &task.record.spec);
        } else {
            self.queue.remove(task_id);
        }
        let state = &mut task.record.state;
        let before = state.status;
        state.status = status;
        state.node_id = node_id;
        changes.push(if before == status {
            Change::TaskRevised(state.clone())
        } else {
            Change::TaskUpdated(state.clone())
        });
    }

    fn finish_task(
        &mut self,
        task_id: TaskId,
        status: TaskStatus,
        result: Option<String>,
        error: Option<String>,
        now: f64,
        changes: &mut Vec<Change>,
    ) {
        let Some(mut task) = self.tasks.remove(&task_id) else {
            return;
        };
        self.queue.remove(task_id);
        let state = &mut task.record.state;
        state.status = status;
        state.result = result;
        state.error = error;
        state.completed_at = Some(now);
        changes.push(Change::TaskUpdated(state.clone()));
    }
}
