//! How records look on the wire. Kept apart from the records so a rename inside never
//! changes the API.

use crate::model::{CommandRecord, RunRecord, TaskRecord};
use crate::operations::OperationRecord;
use crate::scheduler::{Explanation, NodeView};
use lull_shared::{RunId, TaskId};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// A task as `/api/v1/tasks` shows it, with its runs for `GET /api/v1/tasks/{id}` and the
/// batch wait. Serialized as it is, not through a `serde_json::Value` (whose map sorts its
/// keys): building that tree for the 1,000 tasks a batch's results come back in took more of
/// the coordinator's time than reading them. So the fields are in sorted order here, the
/// order clients have always had them in (the tests hold it).
#[derive(Debug, Serialize)]
pub struct TaskView<'a> {
    attempts: u32,
    code: &'a str,
    completed_at: Option<f64>,
    constraints: ConstraintsView<'a>,
    created_at: f64,
    error: Option<&'a str>,
    max_attempts: u32,
    node_id: Option<&'a str>,
    points: u32,
    resources: ResourcesView,
    result: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    runs: Option<Vec<RunView<'a>>>,
    started_at: Option<f64>,
    status: &'static str,
    task_id: TaskId,
    timeout: f64,
}

/// A task's constraints, as `Constraints` serializes them but with sorted keys.
#[derive(Debug, Serialize)]
struct ConstraintsView<'a> {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    meta: &'a BTreeMap<String, Value>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    node_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct ResourcesView {
    cpu: f64,
    memory: f64,
}

/// A run as a task's `runs` show it.
#[derive(Debug, Serialize)]
pub struct RunView<'a> {
    attempt: u32,
    completed_at: Option<f64>,
    cpu_seconds: Option<f64>,
    error: Option<&'a str>,
    exit_code: Option<i32>,
    max_rss_mb: Option<f64>,
    node_id: Option<&'a str>,
    point: u32,
    run_id: RunId,
    started_at: f64,
    status: &'static str,
    stderr: &'a str,
    stdout: &'a str,
    task_id: TaskId,
}

/// A task as `/api/v1/tasks` shows it (without runs).
pub fn task(t: &TaskRecord) -> TaskView<'_> {
    let constraints = &t.spec.constraints;
    TaskView {
        attempts: t.state.attempts,
        code: &t.spec.code,
        completed_at: t.state.completed_at,
        constraints: ConstraintsView {
            meta: &constraints.meta,
            node_type: constraints.node_type.as_deref(),
            zone: constraints.zone.as_deref(),
        },
        created_at: t.created_at,
        error: t.state.error.as_deref(),
        max_attempts: t.spec.max_attempts,
        node_id: t.state.node_id.as_deref(),
        points: t.state.points,
        resources: ResourcesView {
            cpu: t.spec.resources.cpu,
            memory: t.spec.resources.memory,
        },
        result: t.state.result.as_deref(),
        runs: None,
        started_at: t.state.started_at,
        status: t.state.status.as_str(),
        task_id: t.task_id,
        timeout: t.spec.timeout,
    }
}

pub fn run(r: &RunRecord) -> RunView<'_> {
    RunView {
        attempt: r.attempt,
        completed_at: r.completed_at,
        cpu_seconds: r.cpu_seconds,
        error: r.error.as_deref(),
        exit_code: r.exit_code,
        max_rss_mb: r.max_rss_mb,
        node_id: r.node_id.as_deref(),
        point: r.point,
        run_id: r.run_id,
        started_at: r.started_at,
        status: r.status.as_str(),
        stderr: &r.stderr,
        stdout: &r.stdout,
        task_id: r.task_id,
    }
}

/// A run without its output, for seed 001's `/status/{id}`.
pub fn run_summary(r: &RunRecord) -> Value {
    json!({
        "run_id": r.run_id,
        "point": r.point,
        "node_id": r.node_id,
        "attempt": r.attempt,
        "status": r.status.as_str(),
        "exit_code": r.exit_code,
        "error": r.error,
        "started_at": r.started_at,
        "completed_at": r.completed_at,
    })
}

/// A task with every run, for `GET /api/v1/tasks/{id}`.
pub fn task_with_runs<'a>(t: &'a TaskRecord, runs: &'a [RunRecord]) -> TaskView<'a> {
    TaskView {
        runs: Some(runs.iter().map(run).collect()),
        ..task(t)
    }
}

/// A node as `GET /api/v1/nodes` shows it.
pub fn node(n: &NodeView) -> Value {
    let r = &n.record;
    json!({
        "node_id": r.node_id,
        "hostname": r.hostname,
        "type": r.node_type,
        "zone": r.zone,
        "status": r.status.as_str(),
        "resources": {"cpu_cores": r.resources.cpu_cores, "memory_mb": r.resources.memory_mb},
        "reserved": {"cpu": n.reserved_cpu, "memory": n.reserved_memory},
        "current_load": {"cpu_percent": n.load.cpu_percent, "memory_percent": n.load.memory_percent},
        "owner_load": n.owner_load.map(|o| json!({"cpu_percent": o.cpu_percent, "memory_percent": o.memory_percent})),
        "paused_reason": n.paused_reason,
        "running": n.running,
        "meta": Value::Object(r.meta.clone()),
        "drain": r.drain.map(|d| json!({"requested_at": d.requested_at, "deadline": d.deadline})),
        "sandbox": r.sandbox.as_ref().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)),
        "sandbox_level": r.sandbox.as_ref().map(|p| p.level.as_str()),
        "executor": r.executor,
        "version": r.version,
        "joined_at": r.joined_at,
        "last_heartbeat": r.last_heartbeat,
        "group": {"id": r.group.id, "operation_id": r.group.operation_id},
    })
}

/// An operation as seed 002's `DagDetailDTO`: `nodes` are its stages, in order.
pub fn operation(o: &OperationRecord) -> Value {
    let time = |t: Option<f64>| t.map(rfc3339);
    json!({
        "id": o.operation_id.to_string(),
        "dag_id": o.operation_id,
        "name": o.kind.title(),
        "type": o.kind.as_str(),
        "stage": o.stage,
        "max_stage": o.max_stage(),
        "stage_name": o.stage_name(),
        "state": o.state.as_str(),
        "operator": o.operator,
        "created_at": rfc3339(o.created_at),
        "start_time": time(o.start_time),
        "end_time": time(o.end_time),
        "additional_data": Value::Object(o.additional_data.clone()),
        "nodes": o.stages.iter().enumerate().map(|(i, s)| json!({
            "id": format!("{}-{}", o.operation_id, i + 1),
            "stage": i + 1,
            "name": s.name,
            "state": s.state.as_str(),
            "message": s.message,
            "start_time": time(s.start_time),
            "end_time": time(s.end_time),
        })).collect::<Vec<_>>(),
    })
}

/// Unix seconds as RFC 3339 in UTC with milliseconds (`2024-01-09T12:40:00.862Z`), the
/// form of seed 002's `time.Time` fields.
pub fn rfc3339(unix: f64) -> String {
    let millis_total = (unix * 1000.0).round() as i64;
    let secs = millis_total.div_euclid(1000);
    let millis = millis_total.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
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
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        of_day / 3600,
        (of_day % 3600) / 60,
        of_day % 60
    )
}

/// A node command as `GET /api/v1/nodes/commands` shows it (seed 004's `NodeCommand`).
pub fn command(c: &CommandRecord) -> Value {
    json!({
        "id": c.command_id,
        "node_id": c.node_id,
        "command": c.kind.as_str(),
        "args": Value::Object(c.args.clone()),
        "status": c.status.as_str(),
        "created_at": c.created_at,
        "delivered_at": c.delivered_at,
        "completed_at": c.completed_at,
        "error": c.error,
    })
}

/// `GET /api/v1/tasks/{id}/explain`.
pub fn explanation(e: &Explanation) -> Value {
    json!({
        "task_id": e.task_id,
        "status": e.status.as_str(),
        "reason": e.reason,
        "node_id": e.node_id,
        "run_id": e.run_id,
        "points": e.points,
        "runs": e.runs.iter().map(|r| json!({
            "point": r.point,
            "run_id": r.run_id,
            "node_id": r.node_id,
        })).collect::<Vec<_>>(),
        "done_points": e.done_points,
        "waiting_points": e.waiting_points,
        "queued_ahead": e.queued_ahead,
        "nodes": e.nodes.iter().map(|n| json!({
            "node_id": n.node_id,
            "status": n.status.as_str(),
            "verdict": n.verdict.as_str(),
            "short": n.short,
            "detail": n.detail,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{TaskSpec, TaskState};
    use lull_shared::{Constraints, Resources, RunStatus, TaskStatus};

    /// A finished task with two runs, with every field that can be absent both absent and set
    /// somewhere, and constraints of every kind.
    fn finished_task() -> (TaskRecord, Vec<RunRecord>) {
        let task = TaskRecord {
            task_id: 7,
            spec: TaskSpec {
                code: "print(\"hé\")".into(),
                timeout: 30.5,
                resources: Resources {
                    cpu: 0.5,
                    memory: 256.0,
                },
                constraints: Constraints {
                    zone: Some("eu".into()),
                    node_type: Some("gpu".into()),
                    meta: [
                        ("rack".to_string(), json!(3)),
                        ("arch".to_string(), json!("x86")),
                    ]
                    .into_iter()
                    .collect(),
                },
                max_attempts: 3,
                submitted_by: None,
            },
            state: TaskState {
                task_id: 7,
                status: TaskStatus::Completed,
                result: Some("hé".into()),
                error: None,
                attempts: 2,
                losses: 1,
                points: 1,
                node_id: Some("n1".into()),
                started_at: Some(1_700_000_000.25),
                completed_at: Some(1_700_000_001.5),
            },
            created_at: 1_699_999_999.125,
        };
        let lost = RunRecord {
            run_id: 11,
            task_id: 7,
            node_id: None,
            attempt: 1,
            point: 0,
            status: RunStatus::Lost,
            exit_code: None,
            stdout: String::new(),
            stderr: "line\n\"quoted\"".into(),
            error: Some("node lost".into()),
            started_at: 1_700_000_000.0,
            completed_at: None,
            cpu_seconds: None,
            max_rss_mb: None,
        };
        let done = RunRecord {
            run_id: 12,
            node_id: Some("n1".into()),
            attempt: 2,
            status: RunStatus::Completed,
            exit_code: Some(0),
            stdout: "hé\n".into(),
            stderr: String::new(),
            error: None,
            started_at: 1_700_000_000.25,
            completed_at: Some(1_700_000_001.5),
            cpu_seconds: Some(0.01),
            max_rss_mb: Some(7.5),
            ..lost.clone()
        };
        (task, vec![lost, done])
    }

    #[test]
    fn a_task_serializes_with_its_keys_sorted_as_a_json_value_has_them() {
        let (task, runs) = finished_task();
        for view in [task_with_runs(&task, &runs), super::task(&task)] {
            let typed = serde_json::to_string(&view).expect("serializes");
            // Through a `Value`, whose map sorts keys: the same text only if the typed view's
            // fields are in sorted order at every level.
            let value: Value = serde_json::from_str(&typed).expect("parses");
            assert_eq!(typed, serde_json::to_string(&value).expect("serializes"));
        }
    }

    #[test]
    fn a_task_shows_every_field_clients_read() {
        let (task, runs) = finished_task();
        let value = serde_json::to_value(task_with_runs(&task, &runs)).expect("serializes");
        assert_eq!(
            value,
            json!({
                "task_id": 7,
                "status": "completed",
                "code": "print(\"hé\")",
                "timeout": 30.5,
                "resources": {"cpu": 0.5, "memory": 256.0},
                "constraints": {"zone": "eu", "type": "gpu", "meta": {"arch": "x86", "rack": 3}},
                "max_attempts": 3,
                "points": 1,
                "result": "hé",
                "error": null,
                "attempts": 2,
                "node_id": "n1",
                "created_at": 1_699_999_999.125,
                "started_at": 1_700_000_000.25,
                "completed_at": 1_700_000_001.5,
                "runs": [
                    {
                        "run_id": 11, "task_id": 7, "node_id": null, "attempt": 1, "point": 0,
                        "status": "lost", "exit_code": null, "stdout": "",
                        "stderr": "line\n\"quoted\"", "error": "node lost",
                        "started_at": 1_700_000_000.0, "completed_at": null,
                        "cpu_seconds": null, "max_rss_mb": null,
                    },
                    {
                        "run_id": 12, "task_id": 7, "node_id": "n1", "attempt": 2, "point": 0,
                        "status": "completed", "exit_code": 0, "stdout": "hé\n", "stderr": "",
                        "error": null, "started_at": 1_700_000_000.25,
                        "completed_at": 1_700_000_001.5, "cpu_seconds": 0.01, "max_rss_mb": 7.5,
                    },
                ],
            })
        );
        let without_constraints = TaskRecord {
            spec: TaskSpec {
                constraints: Constraints::default(),
                ..task.spec.clone()
            },
            ..task.clone()
        };
        let value = serde_json::to_value(super::task(&without_constraints)).expect("serializes");
        assert_eq!(value["constraints"], json!({}));
        assert!(value.get("runs").is_none());
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        // 2024-01-09T12:40:00.862Z (seed 002's example instant, in UTC).
        assert_eq!(rfc3339(1_704_804_000.862), "2024-01-09T12:40:00.862Z");
        // A leap day, and the last millisecond of a year.
        assert_eq!(rfc3339(951_782_400.0), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_704_067_199.999), "2023-12-31T23:59:59.999Z");
    }
}
