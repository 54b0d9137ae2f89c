//! The coordinator's domain records and the changes that move them.
//!
//! These are the internal shapes shared by the scheduler (which produces [`Change`]s) and the
//! store (which makes them durable). They are deliberately not `Serialize`: the HTTP layer
//! maps them to wire JSON explicitly, so a field rename here never changes the API.
//!
//! Architecture Invariant: no IO; validation here is pure and answers with the seed's words.

use lull_shared::{
    CommandId, CommandKind, CommandStatus, Constraints, DEFAULT_CPU, DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_SECS, NodeResources, NodeStatus, Protections, Resources,
    RunId, RunStatus, SubmitRequest, TaskId, TaskStatus,
};
use std::sync::Arc;

/// Limits applied when a task is submitted (all configurable on the coordinator).
#[derive(Debug, Clone)]
pub struct TaskLimits {
    pub max_code_chars: usize,
    pub max_timeout_secs: f64,
    pub max_cpu: f64,
    pub max_memory_mb: f64,
    pub max_attempts: u32,
    /// Most nodes one task may run on at once (seed 000's `points`).
    pub max_points: u32,
}

/// Points a task may have unless configured otherwise (`--max-points`).
pub const DEFAULT_MAX_POINTS: u32 = 64;

impl Default for TaskLimits {
    fn default() -> Self {
        TaskLimits {
            max_code_chars: 10_000,
            max_timeout_secs: 7.0 * 24.0 * 3600.0,
            max_cpu: 1024.0,
            max_memory_mb: 4.0 * 1024.0 * 1024.0,
            max_attempts: 100,
            max_points: DEFAULT_MAX_POINTS,
        }
    }
}

/// A submission that failed validation; the message is the `detail` a client sees.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

/// What a task asks for, validated. Fixed once submitted; its `points` are not part of it
/// (they change, see [`TaskState::points`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub code: Arc<str>,
    pub timeout: f64,
    pub resources: Resources,
    pub constraints: Constraints,
    pub max_attempts: u32,
    /// The API key it was submitted with (`None` with auth off, or from the coordinator
    /// itself). Not part of the request: the HTTP edge sets it from the credential.
    pub submitted_by: Option<i64>,
}

/// A validated submission: what the task asks for and on how many nodes at once.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub spec: TaskSpec,
    pub points: u32,
}

/// Checks a task's `points` against the limit: 1 ..= `max_points`.
pub fn validate_points(points: u32, limits: &TaskLimits) -> Result<u32, ValidationError> {
    if points == 0 || points > limits.max_points {
        return Err(ValidationError(format!(
            "points must be between 1 and {}, got {points}",
            limits.max_points
        )));
    }
    Ok(points)
}

impl NewTask {
    /// Validates a submission with the seed's messages where the seed gives one.
    pub fn from_request(
        req: SubmitRequest,
        limits: &TaskLimits,
    ) -> Result<NewTask, ValidationError> {
        let fail = |msg: String| Err(ValidationError(msg));
        let code = req.code.unwrap_or_default();
        if code.trim().is_empty() {
            return fail("Code cannot be empty".into());
        }
        if code.chars().count() > limits.max_code_chars {
            return fail(format!(
                "Code too long (max {} characters)",
                limits.max_code_chars
            ));
        }
        let timeout = req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS);
        if !timeout.is_finite() || timeout <= 0.0 {
            return fail(format!(
                "timeout must be a positive number of seconds, got {timeout}"
            ));
        }
        if timeout > limits.max_timeout_secs {
            return fail(format!(
                "timeout {timeout} s is above the maximum of {} s",
                limits.max_timeout_secs
            ));
        }
        let resources = req.resources.unwrap_or(Resources {
            cpu: DEFAULT_CPU,
            memory: DEFAULT_MEMORY_MB,
        });
        if !resources.cpu.is_finite() || resources.cpu <= 0.0 {
            return fail(format!(
                "resources.cpu must be greater than 0, got {}",
                resources.cpu
            ));
        }
        if resources.cpu > limits.max_cpu {
            return fail(format!(
                "resources.cpu {} is above the maximum of {}",
                resources.cpu, limits.max_cpu
            ));
        }
        if !resources.memory.is_finite() || resources.memory <= 0.0 {
            return fail(format!(
                "resources.memory must be greater than 0 MB, got {}",
                resources.memory
            ));
        }
        if resources.memory > limits.max_memory_mb {
            return fail(format!(
                "resources.memory {} MB is above the maximum of {} MB",
                resources.memory, limits.max_memory_mb
            ));
        }
        let max_attempts = req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts == 0 || max_attempts > limits.max_attempts {
            return fail(format!(
                "max_attempts must be between 1 and {}, got {max_attempts}",
                limits.max_attempts
            ));
        }
        let points = validate_points(req.points.unwrap_or(1), limits)?;
        let constraints = req.constraints.unwrap_or_default();
        Ok(NewTask {
            spec: TaskSpec {
                code: Arc::from(code),
                timeout,
                resources,
                constraints,
                max_attempts,
                submitted_by: None,
            },
            points,
        })
    }
}

/// A task as stored. `code` is shared so that copies for the writer are cheap.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub task_id: TaskId,
    pub spec: TaskSpec,
    pub state: TaskState,
    pub created_at: f64,
}

/// The part of a task that changes after submission.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    pub task_id: TaskId,
    pub status: TaskStatus,
    pub result: Option<String>,
    pub error: Option<String>,
    /// Runs started so far.
    pub attempts: u32,
    /// Runs lost to failing nodes (counted against `max_attempts`, over all its points).
    pub losses: u32,
    /// How many nodes run it at once (seed 000); changed by `change_points`.
    pub points: u32,
    pub node_id: Option<String>,
    pub started_at: Option<f64>,
    pub completed_at: Option<f64>,
}

/// One run of a task. `node_id` is `None` for a run leased through the legacy `/get_task`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub run_id: RunId,
    pub task_id: TaskId,
    pub node_id: Option<String>,
    pub attempt: u32,
    /// Which of the task's points it runs (0-based; always 0 for a one-point task).
    pub point: u32,
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub error: Option<String>,
    pub started_at: f64,
    pub completed_at: Option<f64>,
    pub cpu_seconds: Option<f64>,
    pub max_rss_mb: Option<f64>,
}

#[cfg(test)]
impl RunRecord {
    /// For tests: a first attempt of `task_id`'s only point on node `n1`, started at 1.0,
    /// with nothing to tell yet; a test sets what it needs with struct update syntax.
    pub(crate) fn sample(run_id: RunId, task_id: TaskId, status: RunStatus) -> RunRecord {
        RunRecord {
            run_id,
            task_id,
            node_id: Some("n1".into()),
            attempt: 1,
            point: 0,
            status,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            error: None,
            started_at: 1.0,
            completed_at: None,
            cpu_seconds: None,
            max_rss_mb: None,
        }
    }
}

/// A node as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    pub node_id: String,
    pub hostname: String,
    pub node_type: String,
    pub zone: Option<String>,
    pub resources: NodeResources,
    pub meta: serde_json::Map<String, serde_json::Value>,
    pub status: NodeStatus,
    pub version: Option<String>,
    pub joined_at: f64,
    pub last_heartbeat: f64,
    /// The protections its runs get, as the agent probed them.
    pub sandbox: Option<Protections>,
    /// `cold` or `zygote`.
    pub executor: Option<String>,
    /// Set while an operator has the node drained (or draining); cleared by undrain.
    pub drain: Option<Drain>,
    /// The group it joined with: the nodes of one scale-out, or itself alone when it joined
    /// on its own. Shrink removes whole groups, newest first.
    pub group: NodeGroup,
}

/// A scale-out group. Group ids grow in the order groups joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeGroup {
    pub id: i64,
    /// The scale-out operation the group joined through; `None` for a node that joined on
    /// its own.
    pub operation_id: Option<i64>,
}

/// An operator's drain of a node: no new runs; at `deadline` what still runs is stopped
/// and requeued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drain {
    pub requested_at: f64,
    /// `None`: running runs may take as long as they need.
    pub deadline: Option<f64>,
}

/// A command to a node, as stored (`GET /api/v1/nodes/commands`).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub command_id: CommandId,
    pub node_id: String,
    pub kind: CommandKind,
    /// What the command was given (`{"timeout": 60}` for a drain), always an object.
    pub args: serde_json::Map<String, serde_json::Value>,
    pub status: CommandStatus,
    pub created_at: f64,
    pub delivered_at: Option<f64>,
    pub completed_at: Option<f64>,
    pub error: Option<String>,
}

/// One durable state change, produced by the scheduler and applied by the store in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    TaskCreated(TaskRecord),
    /// A task's status changed.
    TaskUpdated(TaskState),
    /// An active task changed without a status change (its points, another point started,
    /// a point requeued). Stored like `TaskUpdated`; the feed tells them apart.
    TaskRevised(TaskState),
    RunSaved(RunRecord),
    NodeSaved(NodeRecord),
    CommandSaved(CommandRecord),
    OperationSaved(crate::operations::OperationRecord),
}

/// The state the coordinator restarts from: everything not yet finished.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Tasks that are pending, assigned or running.
    pub active_tasks: Vec<TaskRecord>,
    /// Runs that are assigned or running.
    pub active_runs: Vec<RunRecord>,
    /// `(task_id, point, stdout)` of every completed run of an active task: the points of a
    /// multi-point task that are done.
    pub completed_points: Vec<(TaskId, u32, String)>,
    pub nodes: Vec<NodeRecord>,
    /// Commands not yet succeeded, failed or expired.
    pub active_commands: Vec<CommandRecord>,
    pub max_command_id: CommandId,
    pub max_task_id: TaskId,
    pub max_run_id: RunId,
    pub total_tasks: u64,
    /// Operations that were `READY` or `RUNNING` when the coordinator stopped.
    pub unfinished_operations: Vec<crate::operations::OperationRecord>,
    pub max_operation_id: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(code: &str) -> SubmitRequest {
        SubmitRequest {
            code: Some(code.into()),
            ..SubmitRequest::default()
        }
    }

    fn detail(req: SubmitRequest) -> String {
        match NewTask::from_request(req, &TaskLimits::default()) {
            Ok(task) => panic!("expected a validation error, got {task:?}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn defaults_follow_the_seed() {
        let NewTask { spec, points } =
            NewTask::from_request(submit("print(1)"), &TaskLimits::default()).expect("valid");
        assert_eq!(spec.timeout, 300.0);
        assert_eq!(
            spec.resources,
            Resources {
                cpu: 1.0,
                memory: 512.0
            }
        );
        assert_eq!(spec.max_attempts, 3);
        assert_eq!(points, 1);
    }

    #[test]
    fn seed_messages_for_empty_and_long_code() {
        assert_eq!(detail(submit("")), "Code cannot be empty");
        assert_eq!(detail(submit("   \n")), "Code cannot be empty");
        assert_eq!(detail(SubmitRequest::default()), "Code cannot be empty");
        assert_eq!(
            detail(submit(&"x".repeat(10_001))),
            "Code too long (max 10000 characters)"
        );
        // Characters, not bytes: 10,000 non-ASCII characters are allowed.
        assert!(NewTask::from_request(submit(&"é".repeat(10_000)), &TaskLimits::default()).is_ok());
    }

    #[test]
    fn absurd_numbers_are_refused_with_what_is_wrong() {
        let mut req = submit("print(1)");
        req.timeout = Some(-1.0);
        assert!(detail(req.clone()).contains("timeout"));
        req.timeout = Some(1e12);
        assert!(detail(req.clone()).contains("above the maximum"));
        req.timeout = None;
        req.resources = Some(Resources {
            cpu: 0.0,
            memory: 512.0,
        });
        assert!(detail(req.clone()).contains("resources.cpu"));
        req.resources = Some(Resources {
            cpu: 1.0,
            memory: -5.0,
        });
        assert!(detail(req.clone()).contains("resources.memory"));
        req.resources = None;
        req.max_attempts = Some(0);
        assert!(detail(req.clone()).contains("max_attempts"));
        req.max_attempts = None;
        req.points = Some(0);
        assert_eq!(
            detail(req.clone()),
            "points must be between 1 and 64, got 0"
        );
        req.points = Some(65);
        assert_eq!(
            detail(req.clone()),
            "points must be between 1 and 64, got 65"
        );
        req.points = Some(64);
        assert_eq!(
            NewTask::from_request(req, &TaskLimits::default()).map(|t| t.points),
            Ok(64)
        );
    }
}
