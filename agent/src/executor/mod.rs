//! How a run's Python code is executed: the [`Executor`] seam and its implementations.
//!
//! An executor turns a [`Job`] into an [`Execution`]: it never fails, it reports. A Python
//! that cannot be started, a timeout or a cancel are all outcomes of the execution.
//!
//! Architecture Invariant: executors know nothing of the coordinator, the outbox or node ids;
//! the agent maps an [`Execution`] to a wire `RunReport`.

mod cold;
mod control;
mod zygote;
pub mod zygote_protocol;

pub use cold::ColdExecutor;
pub use control::{PauseClock, PauseState, PauseSwitch, RunControl, RunProcess, RunTimer};
pub use zygote::{ZygoteExecutor, ZygoteSettings};

use lull_shared::{Resources, RunId, RunOutcome, TaskId};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// Which executor runs this agent's tasks: chosen by configuration, reported to the
/// coordinator as [`Executor::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutorKind {
    /// `python3 -I -u -c CODE` per run, through the `lull-sandbox` launcher.
    Cold,
    /// A fork of a warm `lull-zygote` per run; falls back to `Cold` where it cannot start.
    #[default]
    Zygote,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Cold => "cold",
            ExecutorKind::Zygote => "zygote",
        }
    }

    pub fn parse(name: &str) -> Option<ExecutorKind> {
        [ExecutorKind::Cold, ExecutorKind::Zygote]
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

/// Runs one job to its end. Generic rather than object-safe: the agent is generic over its
/// executor, so `async fn` in the implementation is fine.
pub trait Executor: Send + Sync + 'static {
    /// `cold` or `zygote`, as reported to the coordinator.
    fn kind(&self) -> &'static str;

    /// The protections every run of this executor gets (never more than were applied).
    fn protections(&self) -> lull_shared::Protections;

    /// Runs `job` until it exits, times out (`job.timeout`, enforced by the executor) or
    /// `cancel` fires; in the last case the outcome is [`RunOutcome::Cancelled`].
    fn run(&self, job: Job, cancel: CancellationToken) -> impl Future<Output = Execution> + Send;
}

/// One run to execute.
#[derive(Debug, Clone)]
pub struct Job {
    pub task_id: TaskId,
    pub run_id: RunId,
    pub code: String,
    pub timeout: Duration,
    /// What the coordinator reserved for the run; the cold executor does not enforce it yet.
    pub resources: Resources,
    /// Which of its task's points the run is (`LULL_POINT_INDEX` of `LULL_POINTS`).
    pub point: RunPoint,
    /// Where the executor reports the run's process, and the clock its `timeout` runs on
    /// (it stands still while the node is paused). `RunControl::default()` without an agent.
    pub control: RunControl,
}

/// Which of its task's points a run is: `index` (0-based) of `of`. A task with several
/// points runs on that many nodes at once; the run sees both in its environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunPoint {
    pub index: u32,
    pub of: u32,
}

impl Default for RunPoint {
    fn default() -> Self {
        RunPoint { index: 0, of: 1 }
    }
}

impl RunPoint {
    /// The variables a run gets for it: `LULL_POINT_INDEX` and `LULL_POINTS`.
    pub fn environment(self) -> [(&'static str, String); 2] {
        [
            ("LULL_POINT_INDEX", self.index.to_string()),
            ("LULL_POINTS", self.of.to_string()),
        ]
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    /// `Completed`, `Failed` or `Cancelled`; `Lost` only when the executor lost the run
    /// through no fault of its code (the zygote died under it): it is retried, and counts
    /// against `max_attempts`. Never `Released` (that is the agent's verdict on shutdown).
    pub outcome: RunOutcome,
    /// The process's exit code; `None` when it was killed by a signal or never started.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// A one-line reason when the outcome is not `Completed`.
    pub error: Option<String>,
    /// Unix seconds.
    pub started_at: f64,
    pub completed_at: f64,
    pub cpu_seconds: Option<f64>,
    pub max_rss_mb: Option<f64>,
}

impl Execution {
    /// A run stopped while it waited for a slot: it never started.
    pub(crate) fn cancelled_before_start() -> Self {
        let now = unix_now();
        Execution {
            outcome: RunOutcome::Cancelled,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            error: Some("cancelled before it started".to_string()),
            started_at: now,
            completed_at: now,
            cpu_seconds: None,
            max_rss_mb: None,
        }
    }

    /// A run that never got as far as a process (no working directory, no interpreter).
    pub(crate) fn not_started(started_at: f64, error: String) -> Self {
        Execution {
            outcome: RunOutcome::Failed,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            error: Some(error),
            started_at,
            completed_at: unix_now(),
            cpu_seconds: None,
            max_rss_mb: None,
        }
    }
}

/// Now, in Unix seconds.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Seconds as people write them: `5`, `0.5`, `1.25` (millisecond precision, no trailing zeros).
pub(crate) fn format_seconds(duration: Duration) -> String {
    // Rounded, so that a timeout given as 0.3 (0.29999... s as a Duration) prints as 0.3.
    let millis = duration.as_nanos().saturating_add(500_000) / 1_000_000;
    let (secs, frac) = (millis / 1000, millis % 1000);
    if frac == 0 {
        return secs.to_string();
    }
    let frac = format!("{frac:03}");
    format!("{secs}.{}", frac.trim_end_matches('0'))
}

/// Removes a finished run's cgroup on a blocking thread, not waited for: removing a v1 memory
/// cgroup takes milliseconds (`perf trace`: 5-7 ms per `rmdir` on this VM), which on an async
/// worker stalled every other run the agent was supervising. The run is over and its result
/// does not depend on it; a cgroup that is still there later is swept as stale.
pub(crate) fn remove_run_cgroup_in_background(name: String) {
    tokio::task::spawn_blocking(move || crate::sandbox::remove_run_cgroup(&name));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_print_without_needless_decimals() {
        assert_eq!(format_seconds(Duration::from_secs(5)), "5");
        assert_eq!(format_seconds(Duration::from_secs_f64(0.5)), "0.5");
        assert_eq!(format_seconds(Duration::from_secs_f64(1.25)), "1.25");
        assert_eq!(format_seconds(Duration::from_secs_f64(300.0)), "300");
        assert_eq!(format_seconds(Duration::from_millis(20_050)), "20.05");
        assert_eq!(format_seconds(Duration::from_secs_f64(0.3)), "0.3");
    }
}
