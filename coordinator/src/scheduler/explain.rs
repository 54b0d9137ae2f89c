//! Why a task is not running: each node's verdict on it, and one sentence for people.
//!
//! Architecture Invariant: a read of memory only; it changes nothing and does no IO.

use super::{EPSILON, NodeEntry, Scheduler, holds_run_of};
use lull_shared::{NodeStatus, RunId, TaskId, TaskStatus};

/// One node's verdict on a pending task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It fits now: the task starts at the node's next pull.
    Fits,
    /// It matches and is big enough, but its free capacity is short now.
    Full,
    /// It matches, but even empty it is too small.
    TooSmall,
    /// Its zone, type or meta do not match the task's constraints.
    Mismatch,
    /// It matches but takes no work: paused, draining, drained, offline or removed.
    Unavailable,
    /// It already runs one of the task's points (a task's points run on distinct nodes).
    RunsAPoint,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Fits => "fits",
            Verdict::Full => "full",
            Verdict::TooSmall => "too_small",
            Verdict::Mismatch => "constraints",
            Verdict::Unavailable => "unavailable",
            Verdict::RunsAPoint => "runs_a_point",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeVerdict {
    pub node_id: String,
    pub status: NodeStatus,
    pub verdict: Verdict,
    /// What is short (`cpu`, `memory`) for `full` and `too_small`.
    pub short: Vec<&'static str>,
    /// One line: which constraint differs, what is free against what is needed.
    pub detail: String,
}

/// One active run of a task, by point.
#[derive(Debug, Clone, PartialEq)]
pub struct PointRun {
    pub point: u32,
    pub run_id: RunId,
    /// `None` for a `/get_task` worker.
    pub node_id: Option<String>,
}

/// Why an active task is where it is.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub task_id: TaskId,
    pub status: TaskStatus,
    pub reason: String,
    /// Where its newest run runs (running or assigned).
    pub node_id: Option<String>,
    pub run_id: Option<RunId>,
    /// How many nodes it runs on at once.
    pub points: u32,
    /// Its active runs, by point.
    pub runs: Vec<PointRun>,
    /// Points that completed.
    pub done_points: Vec<u32>,
    /// Points waiting for a node.
    pub waiting_points: Vec<u32>,
    /// While a point waits: older pending tasks ahead of it.
    pub queued_ahead: Option<usize>,
    /// While a point waits: every node's verdict, ordered by node id.
    pub nodes: Vec<NodeVerdict>,
}

impl Scheduler {
    /// Explains an active task; `None` when it is not active (finished or unknown: the
    /// caller asks the store).
    pub fn explain(&self, task_id: TaskId) -> Option<Explanation> {
        let task = self.tasks.get(&task_id)?;
        let state = &task.record.state;
        let runs: Vec<PointRun> = task
            .runs
            .iter()
            .filter_map(|(point, run_id)| {
                Some(PointRun {
                    point: *point,
                    run_id: *run_id,
                    node_id: self.runs.get(run_id)?.record.node_id.clone(),
                })
            })
            .collect();
        let newest = runs.iter().max_by_key(|r| r.run_id);
        let mut out = Explanation {
            task_id,
            status: state.status,
            reason: String::new(),
            node_id: newest.and_then(|r| r.node_id.clone()),
            run_id: newest.map(|r| r.run_id),
            points: state.points,
            done_points: task
                .done
                .iter()
                .copied()
                .filter(|p| *p < state.points)
                .collect(),
            waiting_points: (0..state.points)
                .filter(|p| !task.runs.contains_key(p) && !task.done.contains(p))
                .collect(),
            runs,
            queued_ahead: None,
            nodes: Vec::new(),
        };
        let running = running_summary(&out);
        if out.waiting_points.is_empty() {
            out.reason = running;
            return Some(out);
        }
        let spec = &task.record.spec;
        let mut nodes: Vec<&NodeEntry> = self.nodes.values().collect();
        nodes.sort_by(|a, b| a.record.node_id.cmp(&b.record.node_id));
        out.nodes = nodes
            .iter()
            .map(|n| {
                if holds_run_of(task, &n.record.node_id, &self.runs) {
                    runs_a_point(n)
                } else {
                    verdict(n, &spec.resources, &spec.constraints)
                }
            })
            .collect();
        out.queued_ahead = Some(self.queue.ahead_of(task_id));
        let waiting = summary(&out, spec);
        out.reason = if state.points == 1 {
            waiting
        } else {
            let points = list_points(&out.waiting_points);
            let verb = if out.waiting_points.len() == 1 {
                "waits"
            } else {
                "wait"
            };
            if running.is_empty() {
                format!("{points} {verb} for a node: {waiting}")
            } else {
                format!("{running}; {points} {verb} for a node: {waiting}")
            }
        };
        Some(out)
    }
}

/// `point 2` or `points 1, 2`.
fn list_points(points: &[u32]) -> String {
    let list: Vec<String> = points.iter().map(u32::to_string).collect();
    match points.len() {
        1 => format!("point {}", list.join("")),
        _ => format!("points {}", list.join(", ")),
    }
}

/// What runs (and what is done) of an active task, in one sentence; empty when nothing
/// runs and nothing is done.
fn running_summary(e: &Explanation) -> String {
    let place = |r: &PointRun| match &r.node_id {
        Some(node) => format!("node {node} (run {})", r.run_id),
        None => format!("a /get_task worker (run {})", r.run_id),
    };
    if e.points == 1 {
        return match e.runs.first() {
            Some(r) if r.node_id.is_some() => format!("it is running on {}", place(r)),
            Some(r) => format!("it is leased to {}", place(r)),
            None => String::new(),
        };
    }
    let mut parts = Vec::new();
    if !e.runs.is_empty() {
        let on: Vec<String> = e
            .runs
            .iter()
            .map(|r| format!("point {} on {}", r.point, place(r)))
            .collect();
        parts.push(format!(
            "{} of its {} points run: {}",
            e.runs.len(),
            e.points,
            on.join(", ")
        ));
    }
    if !e.done_points.is_empty() {
        parts.push(format!("{} completed", list_points(&e.done_points)));
    }
    parts.join("; ")
}

fn runs_a_point(node: &NodeEntry) -> NodeVerdict {
    NodeVerdict {
        node_id: node.record.node_id.clone(),
        status: node.record.status,
        verdict: Verdict::RunsAPoint,
        short: Vec::new(),
        detail: "it already runs one of the task's points; its points run on distinct nodes".into(),
    }
}

fn verdict(
    node: &NodeEntry,
    resources: &lull_shared::Resources,
    constraints: &lull_shared::Constraints,
) -> NodeVerdict {
    let r = &node.record;
    let mut v = NodeVerdict {
        node_id: r.node_id.clone(),
        status: r.status,
        verdict: Verdict::Fits,
        short: Vec::new(),
        detail: String::new(),
    };
    if let Some(why) = mismatch(node, constraints) {
        v.verdict = Verdict::Mismatch;
        v.detail = why;
        return v;
    }
    let cap = &r.resources;
    if resources.cpu > cap.cpu_cores + EPSILON {
        v.short.push("cpu");
    }
    if resources.memory > cap.memory_mb + EPSILON {
        v.short.push("memory");
    }
    if !v.short.is_empty() {
        v.verdict = Verdict::TooSmall;
        v.detail = format!(
            "it lends {} cores and {} MB; the task needs {} cpu and {} MB",
            cap.cpu_cores, cap.memory_mb, resources.cpu, resources.memory
        );
        return v;
    }
    if !node.accepts_work() {
        v.verdict = Verdict::Unavailable;
        v.detail = format!("it is {}", r.status);
        return v;
    }
    let free_cpu = cap.cpu_cores - node.reserved_cpu;
    let free_memory = cap.memory_mb - node.reserved_memory;
    if resources.cpu > free_cpu + EPSILON {
        v.short.push("cpu");
    }
    if resources.memory > free_memory + EPSILON {
        v.short.push("memory");
    }
    if v.short.is_empty() {
        v.detail = format!("{free_cpu} cores and {free_memory} MB free");
    } else {
        v.verdict = Verdict::Full;
        v.detail = format!(
            "{free_cpu} of {} cores and {free_memory} of {} MB free; the task needs {} cpu and {} MB",
            cap.cpu_cores, cap.memory_mb, resources.cpu, resources.memory
        );
    }
    v
}

/// Which constraint the node fails, if any.
fn mismatch(node: &NodeEntry, constraints: &lull_shared::Constraints) -> Option<String> {
    let r = &node.record;
    if let Some(zone) = &constraints.zone
        && r.zone.as_deref() != Some(zone.as_str())
    {
        return Some(format!(
            "zone is {}, the task wants {zone}",
            r.zone.as_deref().unwrap_or("unset")
        ));
    }
    if let Some(node_type) = &constraints.node_type
        && &r.node_type != node_type
    {
        return Some(format!(
            "type is {}, the task wants {node_type}",
            r.node_type
        ));
    }
    for (key, want) in &constraints.meta {
        match r.meta.get(key) {
            Some(have) if have == want => {}
            Some(have) => return Some(format!("meta.{key} is {have}, the task wants {want}")),
            None => return Some(format!("meta.{key} is not set, the task wants {want}")),
        }
    }
    None
}

fn summary(e: &Explanation, spec: &crate::model::TaskSpec) -> String {
    let count = |v: Verdict| e.nodes.iter().filter(|n| n.verdict == v).count();
    let ahead = e.queued_ahead.unwrap_or(0);
    if e.nodes.is_empty() {
        return "no node has joined the pool".into();
    }
    if count(Verdict::Fits) > 0 {
        let fits: Vec<&str> = e
            .nodes
            .iter()
            .filter(|n| n.verdict == Verdict::Fits)
            .map(|n| n.node_id.as_str())
            .collect();
        return format!(
            "it fits on {} now and starts at that node's next pull ({ahead} older pending tasks ahead of it)",
            fits.join(", ")
        );
    }
    let matching = e.nodes.len() - count(Verdict::Mismatch) - count(Verdict::RunsAPoint);
    if matching == 0 && count(Verdict::RunsAPoint) > 0 {
        return format!(
            "every node that matches already runs one of its points; it needs {} more node(s)",
            e.waiting_points.len()
        );
    }
    if matching == 0 {
        return format!(
            "no node matches its constraints ({})",
            serde_json::to_string(&spec.constraints).unwrap_or_default()
        );
    }
    if count(Verdict::TooSmall) == matching {
        return format!(
            "no matching node is big enough: it needs {} cpu and {} MB",
            spec.resources.cpu, spec.resources.memory
        );
    }
    let list = |v: Verdict| -> String {
        e.nodes
            .iter()
            .filter(|n| n.verdict == v)
            .map(|n| match v {
                Verdict::Unavailable => format!("{} {}", n.node_id, n.status),
                _ => format!("{} short of {}", n.node_id, n.short.join(" and ")),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (count(Verdict::Full), count(Verdict::Unavailable)) {
        (0, _) => format!(
            "every matching node is unavailable: {}",
            list(Verdict::Unavailable)
        ),
        (_, 0) => format!("every matching node is full: {}", list(Verdict::Full)),
        _ => format!(
            "every matching node is full ({}) or unavailable ({})",
            list(Verdict::Full),
            list(Verdict::Unavailable)
        ),
    }
}
