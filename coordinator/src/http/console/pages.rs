//! The console's templates (in `coordinator/templates/`, compiled in by askama) and the
//! rows they show. Every value a template prints is text prepared here, so the templates
//! hold layout only.

use super::seconds;
use crate::model::{CommandRecord, RunRecord, TaskRecord};
use crate::scheduler::NodeView;
use askama::Template;
use lull_shared::TaskStatus;

/// What every page's frame needs.
pub struct Layout {
    /// Which navigation entry is current.
    pub page: &'static str,
    pub title: String,
    /// `"on"` when requests need an API key: the script then asks for one.
    pub auth: &'static str,
}

#[derive(Template)]
#[template(path = "overview.html")]
pub struct OverviewPage {
    pub layout: Layout,
    pub first: String,
}

#[derive(Template)]
#[template(path = "submit.html")]
pub struct SubmitPage {
    pub layout: Layout,
    pub max_code: usize,
    pub max_timeout: f64,
}

#[derive(Template)]
#[template(path = "tasks.html")]
pub struct TasksPage {
    pub layout: Layout,
    pub part_url: String,
    /// Each status and whether it is the filter in force.
    pub statuses: Vec<(&'static str, bool)>,
    pub first: String,
}

#[derive(Template)]
#[template(path = "task.html")]
pub struct TaskPage {
    pub layout: Layout,
    pub task_id: i64,
    pub first: String,
}

#[derive(Template)]
#[template(path = "nodes.html")]
pub struct NodesPage {
    pub layout: Layout,
    pub first: String,
    pub commands: String,
}

#[derive(Template)]
#[template(path = "operations.html")]
pub struct OperationsPage {
    pub layout: Layout,
}

#[derive(Template)]
#[template(path = "part_error.html")]
pub struct ErrorPart<'a> {
    pub detail: &'a str,
}

pub struct Counter {
    pub label: &'static str,
    pub value: String,
    /// A status whose colour the counter takes ("" for none).
    pub status: &'static str,
}

impl Counter {
    pub fn new(label: &'static str, value: String, status: &'static str) -> Counter {
        Counter {
            label,
            value,
            status,
        }
    }
}

#[derive(Template)]
#[template(path = "part_overview.html")]
pub struct OverviewPart {
    pub counters: Vec<Counter>,
    pub node_total: usize,
    pub node_counts: Vec<Counter>,
    pub throughput: String,
    pub throughput_now: String,
    pub queue: String,
    pub queue_now: usize,
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC (the script shows it in local time).
pub fn utc(ts: f64) -> String {
    let secs = ts.floor() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A moment to show: UTC text and the Unix time for the script to localise.
pub struct Moment {
    pub ts: String,
    pub text: String,
}

impl Moment {
    pub fn of(ts: Option<f64>) -> Option<Moment> {
        ts.filter(|t| t.is_finite() && *t > 0.0).map(|t| Moment {
            ts: format!("{t:.3}"),
            text: utc(t),
        })
    }
}

/// At most `max` characters of `text`, on one line, with `…` when cut.
fn snippet(text: &str, max: usize) -> String {
    let line = text.trim().replace(['\n', '\r'], " ⏎ ");
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max).collect();
    cut.push('…');
    cut
}

fn ago(now: f64, then: f64) -> String {
    let d = (now - then).max(0.0);
    if d < 60.0 {
        format!("{d:.0} s ago")
    } else if d < 3600.0 {
        format!("{:.0} min ago", d / 60.0)
    } else {
        format!("{:.1} h ago", d / 3600.0)
    }
}

pub struct TaskRow {
    pub task_id: i64,
    pub status: &'static str,
    pub node: String,
    pub attempts: u32,
    pub created: Option<Moment>,
    pub took: String,
    /// The result, or the error of a failed task.
    pub outcome: String,
    pub is_error: bool,
}

impl TaskRow {
    pub fn of(t: &TaskRecord, now: f64) -> TaskRow {
        let s = &t.state;
        let took = match (s.started_at, s.completed_at) {
            (Some(a), Some(b)) => seconds(b - a),
            (Some(a), None) => format!("{} so far", seconds(now - a)),
            _ => String::new(),
        };
        let (outcome, is_error) = match (&s.error, &s.result) {
            (Some(e), _) if s.status != TaskStatus::Completed => (snippet(e, 90), true),
            (_, Some(r)) => (snippet(r, 90), false),
            _ => (String::new(), false),
        };
        TaskRow {
            task_id: t.task_id,
            status: s.status.as_str(),
            node: s.node_id.clone().unwrap_or_default(),
            attempts: s.attempts,
            created: Moment::of(Some(t.created_at)),
            took,
            outcome,
            is_error,
        }
    }
}

#[derive(Template)]
#[template(path = "part_tasks.html")]
pub struct TasksPart {
    pub rows: Vec<TaskRow>,
    pub first: u64,
    pub last: u64,
    pub total: u64,
    pub filtered: Option<&'static str>,
    pub newer: Option<String>,
    pub older: Option<String>,
}

pub struct RunRow {
    pub run_id: i64,
    /// Which of the task's points (seed 000) the run is.
    pub point: u32,
    pub node: String,
    pub attempt: u32,
    pub status: &'static str,
    pub started: Option<Moment>,
    pub completed: Option<Moment>,
    pub took: String,
    pub exit_code: String,
    pub error: String,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Template)]
#[template(path = "part_task.html")]
pub struct TaskPart {
    pub task_id: i64,
    pub status: &'static str,
    pub finished: bool,
    pub code: String,
    pub timeout: String,
    pub resources: String,
    pub points: u32,
    pub max_attempts: u32,
    pub constraints: String,
    pub attempts: u32,
    pub node: String,
    pub created: Option<Moment>,
    pub started: Option<Moment>,
    pub completed: Option<Moment>,
    pub result: Option<String>,
    pub error: Option<String>,
    pub runs: Vec<RunRow>,
}

impl TaskPart {
    pub fn of(t: &TaskRecord, runs: &[RunRecord], now: f64) -> TaskPart {
        let s = &t.state;
        let constraints = serde_json::to_string(&t.spec.constraints).unwrap_or_default();
        TaskPart {
            task_id: t.task_id,
            status: s.status.as_str(),
            finished: matches!(
                s.status,
                TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
            ),
            code: t.spec.code.to_string(),
            timeout: seconds(t.spec.timeout),
            resources: format!(
                "{} cpu · {} MB",
                t.spec.resources.cpu, t.spec.resources.memory
            ),
            points: t.state.points,
            max_attempts: t.spec.max_attempts,
            constraints: if constraints == "{}" {
                "none".into()
            } else {
                constraints
            },
            attempts: s.attempts,
            node: s.node_id.clone().unwrap_or_default(),
            created: Moment::of(Some(t.created_at)),
            started: Moment::of(s.started_at),
            completed: Moment::of(s.completed_at),
            result: s.result.clone(),
            error: s.error.clone(),
            runs: runs
                .iter()
                .rev()
                .map(|r| RunRow {
                    run_id: r.run_id,
                    point: r.point,
                    node: r.node_id.clone().unwrap_or_else(|| "(by hand)".into()),
                    attempt: r.attempt,
                    status: r.status.as_str(),
                    started: Moment::of(Some(r.started_at)),
                    completed: Moment::of(r.completed_at),
                    took: match r.completed_at {
                        Some(end) => seconds(end - r.started_at),
                        None => format!("{} so far", seconds(now - r.started_at)),
                    },
                    exit_code: r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                    error: r.error.clone().unwrap_or_default(),
                    stdout: r.stdout.clone(),
                    stderr: r.stderr.clone(),
                })
                .collect(),
        }
    }
}

/// A load bar: a percentage and the level its colour shows.
pub struct Bar {
    pub percent: String,
    pub width: String,
    pub level: &'static str,
}

impl Bar {
    fn of(percent: f64) -> Bar {
        let p = if percent.is_finite() {
            percent.clamp(0.0, 100.0)
        } else {
            0.0
        };
        Bar {
            percent: format!("{p:.0}%"),
            width: format!("{p:.0}"),
            level: if p >= 85.0 {
                "high"
            } else if p >= 60.0 {
                "mid"
            } else {
                "low"
            },
        }
    }
}

pub struct NodeRow {
    pub node_id: String,
    pub hostname: String,
    pub status: &'static str,
    pub paused_reason: Option<String>,
    pub drain: String,
    pub kind: String,
    pub cpu: Bar,
    pub memory: Bar,
    pub owner: Option<(Bar, Bar)>,
    pub capacity: String,
    pub reserved: Bar,
    pub running: usize,
    pub sandbox: String,
    pub sandbox_missing: String,
    pub executor: String,
    pub heartbeat: String,
    pub meta: String,
    /// `removed` nodes take no commands.
    pub removed: bool,
}

impl NodeRow {
    pub fn of(n: &NodeView, now: f64) -> NodeRow {
        let r = &n.record;
        let cap = &r.resources;
        let reserved_share = if cap.cpu_cores > 0.0 {
            n.reserved_cpu / cap.cpu_cores * 100.0
        } else {
            0.0
        };
        let drain = match r.drain {
            Some(d) => match d.deadline {
                Some(deadline) if deadline > now => {
                    format!("drain deadline in {}", seconds(deadline - now))
                }
                Some(_) => "drain deadline passed".into(),
                None => "drain without deadline".into(),
            },
            None => String::new(),
        };
        NodeRow {
            node_id: r.node_id.clone(),
            hostname: r.hostname.clone(),
            status: r.status.as_str(),
            paused_reason: n.paused_reason.clone(),
            drain,
            kind: match &r.zone {
                Some(z) => format!("{} · {z}", r.node_type),
                None => r.node_type.clone(),
            },
            cpu: Bar::of(n.load.cpu_percent),
            memory: Bar::of(n.load.memory_percent),
            owner: n
                .owner_load
                .map(|o| (Bar::of(o.cpu_percent), Bar::of(o.memory_percent))),
            capacity: format!("{} cpu · {:.0} MB", cap.cpu_cores, cap.memory_mb),
            reserved: Bar::of(reserved_share),
            running: n.running.len(),
            sandbox: r
                .sandbox
                .as_ref()
                .map_or("unknown".into(), |p| p.level.as_str().to_string()),
            sandbox_missing: r
                .sandbox
                .as_ref()
                .map(|p| p.missing.join(", "))
                .unwrap_or_default(),
            executor: r.executor.clone().unwrap_or_else(|| "unknown".into()),
            heartbeat: ago(now, r.last_heartbeat),
            meta: serde_json::to_string_pretty(&r.meta).unwrap_or_else(|_| "{}".into()),
            removed: r.status.as_str() == "removed",
        }
    }
}

#[derive(Template)]
#[template(path = "part_nodes.html")]
pub struct NodesPart {
    pub rows: Vec<NodeRow>,
    pub max_timeout: f64,
}

pub struct CommandRow {
    pub id: i64,
    pub node_id: String,
    pub command: &'static str,
    pub args: String,
    pub status: &'static str,
    pub created: Option<Moment>,
    pub delivered: Option<Moment>,
    pub completed: Option<Moment>,
    pub error: String,
}

impl CommandRow {
    pub fn of(c: &CommandRecord) -> CommandRow {
        CommandRow {
            id: c.command_id,
            node_id: c.node_id.clone(),
            command: c.kind.as_str(),
            args: if c.args.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&c.args).unwrap_or_default()
            },
            status: c.status.as_str(),
            created: Moment::of(Some(c.created_at)),
            delivered: Moment::of(c.delivered_at),
            completed: Moment::of(c.completed_at),
            error: c.error.clone().unwrap_or_default(),
        }
    }
}

#[derive(Template)]
#[template(path = "part_commands.html")]
pub struct CommandsPart {
    pub rows: Vec<CommandRow>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00");
        assert_eq!(utc(1_767_225_600.5), "2026-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000.0), "2023-11-14 22:13:20");
    }

    #[test]
    fn snippets_are_one_bounded_line() {
        assert_eq!(snippet("a\nb", 10), "a ⏎ b");
        assert_eq!(snippet("abcdef", 3), "abc…");
    }

    #[test]
    fn bars_clamp() {
        assert_eq!(Bar::of(150.0).width, "100");
        assert_eq!(Bar::of(f64::NAN).width, "0");
        assert_eq!(Bar::of(70.0).level, "mid");
    }
}
