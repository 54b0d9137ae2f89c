//! Wire types spoken between Lull's coordinator, its agents and its HTTP clients.
//!
//! Everything here is serialisable and nothing else is: this crate is the IPC boundary.
//! Internal state (the scheduler's tables, the store's rows) lives in the coordinator and
//! never derives `Serialize`. Adding a field here is a protocol change: new fields are
//! optional (`#[serde(default)]`) so an older peer keeps working.
//!
//! Architecture Invariant: no IO, no async, no dependency beyond serde.

#![forbid(unsafe_code)]

pub mod signing;
pub mod standby;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Bumped when the agent <-> coordinator protocol changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default task timeout in seconds (seed 001).
pub const DEFAULT_TIMEOUT_SECS: f64 = 300.0;
/// Default CPU reservation per task (seed 001).
pub const DEFAULT_CPU: f64 = 1.0;
/// Default memory reservation per task in MB (seed 001).
pub const DEFAULT_MEMORY_MB: f64 = 512.0;
/// Default number of runs a task may lose to failing nodes before it is failed.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// A task's identifier: an increasing integer, as in seed 001.
pub type TaskId = i64;
/// A run's identifier, which is also its lease: a result is accepted only for the current run.
pub type RunId = i64;

// ---------------------------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------------------------

/// What a task reserves on the node that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (fractional allowed, > 0).
    #[serde(default = "default_cpu")]
    pub cpu: f64,
    /// Memory in MB (> 0).
    #[serde(default = "default_memory")]
    pub memory: f64,
}

fn default_cpu() -> f64 {
    DEFAULT_CPU
}
fn default_memory() -> f64 {
    DEFAULT_MEMORY_MB
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu: DEFAULT_CPU,
            memory: DEFAULT_MEMORY_MB,
        }
    }
}

/// Where a task may run: every given field must equal the node's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub node_type: Option<String>,
    /// Each key must be present in the node's `meta` with an equal JSON value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, serde_json::Value>,
}

impl Constraints {
    pub fn is_empty(&self) -> bool {
        self.zone.is_none() && self.node_type.is_none() && self.meta.is_empty()
    }
}

/// Body of `POST /submit` and `POST /api/v1/tasks`.
///
/// Fields are optional on the wire so that validation can answer with the seed's own
/// messages (`"Code cannot be empty"`) rather than a generic deserialisation error.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Constraints>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Pending,
    Assigned,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Pending,
        TaskStatus::Assigned,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Assigned => "assigned",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The life of one run (one attempt of a task on one node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Handed to a node (or a legacy `/get_task` worker); not yet confirmed started.
    Assigned,
    Running,
    Completed,
    Failed,
    /// The node was lost (offline, reconciled away, crashed) before a result came back.
    Lost,
    /// Handed back by an agent that was shutting down before it started or finished.
    Released,
    Cancelled,
    /// Stopped because its task's `points` were lowered (seed 000's change_points): neither
    /// a failure nor a loss, and never retried.
    Stopped,
}

impl RunStatus {
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Assigned,
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Lost,
        RunStatus::Released,
        RunStatus::Cancelled,
        RunStatus::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Assigned => "assigned",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Lost => "lost",
            RunStatus::Released => "released",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_active(self) -> bool {
        matches!(self, RunStatus::Assigned | RunStatus::Running)
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Idle,
    Busy,
    Paused,
    Draining,
    Drained,
    Offline,
    Removed,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 7] = [
        NodeStatus::Idle,
        NodeStatus::Busy,
        NodeStatus::Paused,
        NodeStatus::Draining,
        NodeStatus::Drained,
        NodeStatus::Offline,
        NodeStatus::Removed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Idle => "idle",
            NodeStatus::Busy => "busy",
            NodeStatus::Paused => "paused",
            NodeStatus::Draining => "draining",
            NodeStatus::Drained => "drained",
            NodeStatus::Offline => "offline",
            NodeStatus::Removed => "removed",
        }
    }

    pub fn parse(s: &str) -> Option<NodeStatus> {
        NodeStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the agent declares it lends (seed 001's heartbeat `resources`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NodeResources {
    pub cpu_cores: f64,
    pub memory_mb: f64,
}

/// Host load as the agent measures it (seed 001's heartbeat `current_load`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub cpu_percent: f64,
    pub memory_percent: f64,
}

/// How strongly an agent isolates the runs it executes, weakest first.
///
/// - `none`: a process group and a clean environment only (no launcher available).
/// - `basic`: + own session, rlimits, `no_new_privs`, seccomp filter, private working dir.
/// - `isolated`: + PID, mount, network, IPC and UTS namespaces (no network, private `/tmp`,
///   the whole tree dies with the run), but the code keeps the agent's user.
/// - `full`: + an unprivileged uid/gid with no supplementary groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxLevel {
    None,
    Basic,
    Isolated,
    Full,
}

impl SandboxLevel {
    pub const ALL: [SandboxLevel; 4] = [
        SandboxLevel::None,
        SandboxLevel::Basic,
        SandboxLevel::Isolated,
        SandboxLevel::Full,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxLevel::None => "none",
            SandboxLevel::Basic => "basic",
            SandboxLevel::Isolated => "isolated",
            SandboxLevel::Full => "full",
        }
    }

    pub fn parse(s: &str) -> Option<SandboxLevel> {
        SandboxLevel::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

impl fmt::Display for SandboxLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protections an agent applies to every run, as found by trying them on this host.
/// Only what was actually applied in the probe is `true`; `missing` says what was not, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protections {
    pub level: SandboxLevel,
    /// A launcher process sets up each run (session, rlimits, `no_new_privs`).
    pub launcher: bool,
    /// PID, mount, network, IPC and UTS namespaces per run.
    pub namespaces: bool,
    /// Runs execute as an unprivileged uid/gid without supplementary groups.
    pub drop_user: bool,
    pub seccomp: bool,
    /// Per-run cgroup memory and process limits.
    pub cgroups: bool,
    #[serde(default)]
    pub missing: Vec<String>,
}

impl Protections {
    /// Nothing applied, with the reason.
    pub fn none(why: impl Into<String>) -> Protections {
        Protections {
            level: SandboxLevel::None,
            launcher: false,
            namespaces: false,
            drop_user: false,
            seccomp: false,
            cgroups: false,
            missing: vec![why.into()],
        }
    }

    /// The level these flags amount to.
    pub fn derived_level(&self) -> SandboxLevel {
        match (
            self.launcher && self.seccomp,
            self.namespaces,
            self.drop_user,
        ) {
            (false, _, _) => SandboxLevel::None,
            (true, true, true) => SandboxLevel::Full,
            (true, true, false) => SandboxLevel::Isolated,
            (true, false, _) => SandboxLevel::Basic,
        }
    }
}

/// What the agent states about itself in `POST /internal/heartbeat`: `idle`/`busy` while it
/// works, `paused` while the host's owner needs the machine (place nothing; its runs are
/// suspended; `paused_reason` says why), `draining` while it shuts down (place nothing
/// more), `offline` when it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Idle,
    Busy,
    Paused,
    Draining,
    Offline,
}

/// Body of `POST /internal/heartbeat`. The first four fields are seed 001's example, which
/// is accepted on its own: everything else is optional.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub node_id: String,
    #[serde(default = "default_agent_state")]
    pub status: AgentState,
    pub resources: NodeResources,
    #[serde(default)]
    pub current_load: Load,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub node_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Runs the agent is executing now.
    #[serde(default)]
    pub running: Vec<RunId>,
    /// Runs that finished on the agent whose result it has not yet had acknowledged
    /// (kept in its outbox). The coordinator must not treat these as lost.
    #[serde(default)]
    pub finished: Vec<RunId>,
    /// The protections every run on this node gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Protections>,
    /// `cold` or `zygote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
    /// Outcomes of node commands the agent carried out (or refused) since its last
    /// acknowledged heartbeat. Repeating one is harmless: the coordinator keeps the first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command_results: Vec<CommandResult>,
    /// The host's load that is not Lull's (everything but the agent and its runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_load: Option<Load>,
    /// Why the node is `paused`, e.g. `owner CPU 87% > 50% for 10 s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<String>,
}

fn default_agent_state() -> AgentState {
    AgentState::Idle
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub status: String,
    pub node_id: String,
    /// Runs the agent must kill (whole process tree) and forget: cancelled, or moved elsewhere.
    #[serde(default)]
    pub cancel: Vec<RunId>,
    /// The interval the coordinator expects heartbeats at, in seconds.
    #[serde(default)]
    pub heartbeat_interval: f64,
    pub server_id: String,
    /// Node commands for the agent to carry out, oldest first. Repeated in every answer
    /// until the agent reports an outcome, so the agent must ignore ids it already handled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<AgentCommand>,
}

/// What an operator asks of a node (`POST /api/v1/nodes/{id}/drain`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Take no new runs; the coordinator stops what remains at the deadline.
    Drain,
    /// Back into service after a drain.
    Undrain,
    /// Stop taking work, let runs finish (bounded by the shutdown grace), restart the
    /// executor and the agent itself, rejoin with the same node id.
    Restart,
    /// Leave the pool for good (shrink): stop taking work, let what runs finish (the
    /// coordinator has drained the node first), say goodbye; an adopted standby agent goes
    /// back to standby, an agent started on its own exits.
    Decommission,
}

impl CommandKind {
    pub const ALL: [CommandKind; 4] = [
        CommandKind::Drain,
        CommandKind::Undrain,
        CommandKind::Restart,
        CommandKind::Decommission,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Drain => "drain",
            CommandKind::Undrain => "undrain",
            CommandKind::Restart => "restart",
            CommandKind::Decommission => "decommission",
        }
    }

    pub fn parse(s: &str) -> Option<CommandKind> {
        CommandKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The life of a node command: `pending` (queued) → `delivered` (in a heartbeat answer)
/// → `succeeded` | `failed` (the agent's outcome), or `expired` (no outcome in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Pending,
    Delivered,
    Succeeded,
    Failed,
    Expired,
}

impl CommandStatus {
    pub const ALL: [CommandStatus; 5] = [
        CommandStatus::Pending,
        CommandStatus::Delivered,
        CommandStatus::Succeeded,
        CommandStatus::Failed,
        CommandStatus::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Pending => "pending",
            CommandStatus::Delivered => "delivered",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<CommandStatus> {
        CommandStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CommandStatus::Succeeded | CommandStatus::Failed | CommandStatus::Expired
        )
    }
}

impl fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command's identifier (increasing).
pub type CommandId = i64;

/// One command in a heartbeat answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentCommand {
    pub id: CommandId,
    pub command: CommandKind,
    #[serde(default)]
    pub args: serde_json::Value,
}

/// How the agent says a command ended, in its next heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: CommandId,
    /// `true`: `succeeded`; `false`: `failed` with `error`.
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One run handed to an agent by `GET /internal/task`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub task_id: TaskId,
    pub run_id: RunId,
    pub attempt: u32,
    pub code: String,
    pub timeout: f64,
    pub resources: Resources,
    /// Which of the task's points this run is (`LULL_POINT_INDEX`, 0-based).
    #[serde(default)]
    pub point: u32,
    /// How many points the task had when the run was handed out (`LULL_POINTS`).
    #[serde(default = "one_point")]
    pub points: u32,
}

fn one_point() -> u32 {
    1
}

/// Answer to `GET /internal/task?node_id=..&wait=..&max=..`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PullResponse {
    /// Runs to start now (empty when the long-poll timed out).
    pub tasks: Vec<Assignment>,
    /// Runs the agent must kill, as in the heartbeat answer (delivered here too so that a
    /// cancel does not wait for the next heartbeat).
    #[serde(default)]
    pub cancel: Vec<RunId>,
}

/// How a run ended, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// The program exited 0.
    Completed,
    /// The program failed: non-zero exit, exception, timeout, limit breached.
    Failed,
    /// The agent gave the run back without a verdict (it is shutting down); requeue it.
    Released,
    /// The agent killed the run because it was told to (cancel); nothing to record.
    Cancelled,
    /// The agent lost the run to a failure of its own (its zygote died): not the code's
    /// fault, so it is retried, but it counts against `max_attempts` like a lost node.
    Lost,
}

/// Body of `POST /internal/result`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub node_id: String,
    pub task_id: TaskId,
    pub run_id: RunId,
    pub outcome: RunOutcome,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    /// A one-line reason for a failure ("timed out after 5 s", the exception's last line).
    #[serde(default)]
    pub error: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub started_at: Option<f64>,
    #[serde(default)]
    pub completed_at: Option<f64>,
    /// CPU seconds used by the run's processes (user + system), when known.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// Peak resident memory of the run in MB, when known.
    #[serde(default)]
    pub max_rss_mb: Option<f64>,
}

/// Answer to `POST /internal/result`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReportAck {
    pub status: String,
    pub task_id: TaskId,
    pub run_id: RunId,
}

/// Most tasks one `POST /api/v1/tasks/batch` may hold.
pub const MAX_TASK_BATCH: usize = 1000;

/// Most reports one `POST /internal/results` may hold.
pub const MAX_RESULT_BATCH: usize = 1000;

/// Body of `POST /internal/results`: the outcomes of several runs at once (an agent sends
/// the results that are ready together). Each is settled on its own; see [`ResultsAck`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReportBatch {
    pub results: Vec<RunReport>,
}

/// What became of one report of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportVerdict {
    /// Recorded (durable before the answer): forget it.
    Accepted,
    /// The run is no longer the sender's (requeued, cancelled, already reported, another
    /// node's): sending it again can never succeed. `POST /internal/result` says 404/409.
    Refused,
    /// The report itself is malformed. `POST /internal/result` says 422.
    Rejected,
}

/// One report's answer, in the order the reports were sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportItemAck {
    pub status: ReportVerdict,
    /// The status `POST /internal/result` would have answered for this report alone.
    pub code: u16,
    /// `None` only for a report too malformed to name them.
    pub task_id: Option<TaskId>,
    pub run_id: Option<RunId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Answer to `POST /internal/results`: one entry per report, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultsAck {
    pub results: Vec<ReportItemAck>,
    /// With `?node_id=..&max=..`: runs handed to that node with this answer, exactly as
    /// `GET /internal/task` would hand them out, leased in the results' commit. The
    /// capacity the results freed is refilled without another round trip.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<Assignment>,
    /// Runs that node must kill, as in a pull answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cancel: Vec<RunId>,
}

/// The `{"detail": ...}` error body used everywhere but the seed 000/002 envelopes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub detail: String,
}

/// The program's result as seed 001 defines it: its standard output without the one
/// trailing newline `print` adds (`print('Hello World')` gives `"Hello World"`).
pub fn result_from_stdout(stdout: &str) -> String {
    let s = stdout.strip_suffix('\n').unwrap_or(stdout);
    let s = s.strip_suffix('\r').unwrap_or(s);
    s.to_string()
}

// ---------------------------------------------------------------------------------------------
// Live feed (`WS /ws/updates`)
// ---------------------------------------------------------------------------------------------

/// What a live-feed message reports. Every kind but `lagged` is an event a client may ask for
/// with `?events=`; `lagged` is a notice about the feed itself, sent whatever the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedEventKind {
    TaskCreated,
    TaskStarted,
    /// Back to `pending` after its run was lost or handed back; it will start again.
    TaskRequeued,
    TaskCompleted,
    TaskFailed,
    TaskCancelled,
    /// Still active, changed without a status change: its `points` were changed, another
    /// of its points started, or one of them was requeued.
    TaskUpdated,
    /// One run of a multi-point task was stopped because its points were lowered.
    RunStopped,
    NodeJoined,
    NodeLeft,
    NodeUpdated,
    /// Reserved for operations (bulk actions on nodes and tasks), which arrive later.
    OperationUpdated,
    Lagged,
}

impl FeedEventKind {
    pub const ALL: [FeedEventKind; 13] = [
        FeedEventKind::TaskCreated,
        FeedEventKind::TaskStarted,
        FeedEventKind::TaskRequeued,
        FeedEventKind::TaskCompleted,
        FeedEventKind::TaskFailed,
        FeedEventKind::TaskCancelled,
        FeedEventKind::TaskUpdated,
        FeedEventKind::RunStopped,
        FeedEventKind::NodeJoined,
        FeedEventKind::NodeLeft,
        FeedEventKind::NodeUpdated,
        FeedEventKind::OperationUpdated,
        FeedEventKind::Lagged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FeedEventKind::TaskCreated => "task_created",
            FeedEventKind::TaskStarted => "task_started",
            FeedEventKind::TaskRequeued => "task_requeued",
            FeedEventKind::TaskCompleted => "task_completed",
            FeedEventKind::TaskFailed => "task_failed",
            FeedEventKind::TaskCancelled => "task_cancelled",
            FeedEventKind::TaskUpdated => "task_updated",
            FeedEventKind::RunStopped => "run_stopped",
            FeedEventKind::NodeJoined => "node_joined",
            FeedEventKind::NodeLeft => "node_left",
            FeedEventKind::NodeUpdated => "node_updated",
            FeedEventKind::OperationUpdated => "operation_updated",
            FeedEventKind::Lagged => "lagged",
        }
    }

    pub fn parse(s: &str) -> Option<FeedEventKind> {
        FeedEventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for FeedEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One live-feed message: `{"event", "data", "seq", "ts"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedMessage {
    pub event: FeedEventKind,
    /// [`TaskEventData`], [`NodeEventData`] or [`LaggedData`], by `event`.
    pub data: serde_json::Value,
    /// The event's place in the feed (1, 2, 3, ... in the order the changes became durable;
    /// it starts again at 1 when the coordinator restarts). For `lagged`, the last seq
    /// before the gap.
    pub seq: u64,
    /// Unix seconds when it was published (just after its commit).
    pub ts: f64,
}

/// `data` of the `task_*` events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEventData {
    pub task_id: TaskId,
    pub status: TaskStatus,
    /// The node running it (`null` before it starts, after a requeue, and for a task leased
    /// through `/get_task`).
    pub node_id: Option<String>,
    /// Runs started so far.
    pub attempts: u32,
    /// Why it failed or was cancelled (at most 1000 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How many nodes run it at once (seed 000's `points`).
    #[serde(default = "one_point")]
    pub points: u32,
}

/// `data` of `run_stopped`: a run ended because its task's points were lowered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEventData {
    pub task_id: TaskId,
    pub run_id: RunId,
    pub node_id: Option<String>,
    /// The run's point index.
    pub point: u32,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `data` of the `node_*` events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEventData {
    pub node_id: String,
    pub status: NodeStatus,
    /// `null` the first time the coordinator sees the node.
    pub previous_status: Option<NodeStatus>,
    pub hostname: String,
    #[serde(rename = "type")]
    pub node_type: String,
    pub zone: Option<String>,
}

/// `data` of a `lagged` notice: events the client will never receive on this connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaggedData {
    /// Feed events dropped after `seq` (counted whatever the filter); `null` when unknown
    /// (the client's `since` is ahead of the feed: the coordinator restarted).
    pub missed: Option<u64>,
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_drops_exactly_one_trailing_newline() {
        assert_eq!(result_from_stdout("Hello World\n"), "Hello World");
        assert_eq!(result_from_stdout("a\n\n"), "a\n");
        assert_eq!(result_from_stdout("a\r\n"), "a");
        assert_eq!(result_from_stdout("no newline"), "no newline");
        assert_eq!(result_from_stdout(""), "");
    }

    #[test]
    fn seed_heartbeat_body_is_accepted_as_is() {
        let body = r#"{"node_id": "node-001", "status": "idle",
            "resources": {"cpu_cores": 8, "memory_mb": 16384},
            "current_load": {"cpu_percent": 15.5, "memory_percent": 45.2}}"#;
        let hb: HeartbeatRequest = serde_json::from_str(body).expect("seed body parses");
        assert_eq!(hb.node_id, "node-001");
        assert_eq!(hb.status, AgentState::Idle);
        assert_eq!(hb.resources.cpu_cores, 8.0);
        assert!(hb.running.is_empty());
    }

    #[test]
    fn levels_order_weakest_first_and_derive_from_flags() {
        assert!(SandboxLevel::None < SandboxLevel::Basic);
        assert!(SandboxLevel::Isolated < SandboxLevel::Full);
        let mut p = Protections::none("test");
        assert_eq!(p.derived_level(), SandboxLevel::None);
        p.launcher = true;
        p.seccomp = true;
        assert_eq!(p.derived_level(), SandboxLevel::Basic);
        p.namespaces = true;
        assert_eq!(p.derived_level(), SandboxLevel::Isolated);
        p.drop_user = true;
        assert_eq!(p.derived_level(), SandboxLevel::Full);
        for l in SandboxLevel::ALL {
            assert_eq!(SandboxLevel::parse(l.as_str()), Some(l));
        }
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for st in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(st.as_str()), Some(st));
            assert_eq!(
                serde_json::to_string(&st).expect("serialise"),
                format!("\"{st}\"")
            );
        }
        for st in RunStatus::ALL {
            assert_eq!(RunStatus::parse(st.as_str()), Some(st));
        }
        for st in NodeStatus::ALL {
            assert_eq!(NodeStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(TaskStatus::parse("nope"), None);
    }
}
