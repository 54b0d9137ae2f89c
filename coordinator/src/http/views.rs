//! How records look on the wire. Kept apart from the records so a rename inside never
//! changes the API.

use crate::model::{CommandRecord, RunRecord, TaskRecord};
use crate::operations::OperationRecord;
use crate::scheduler::{Explanation, NodeView};
use serde_json::{Value, json};

/// A task as `/api/v1/tasks` shows it (without runs).
pub fn task(t: &TaskRecord) -> Value {
    json!({
        "task_id": t.task_id,
        "status": t.state.status.as_str(),
        "code": &*t.spec.code,
        "timeout": t.spec.timeout,
        "resources": {"cpu": t.spec.resources.cpu, "memory": t.spec.resources.memory},
        "constraints": serde_json::to_value(&t.spec.constraints).unwrap_or(Value::Null),
        "max_attempts": t.spec.max_attempts,
        "points": t.state.points,
        "result": t.state.result,
        "error": t.state.error,
        "attempts": t.state.attempts,
        "node_id": t.state.node_id,
        "created_at": t.created_at,
        "started_at": t.state.started_at,
        "completed_at": t.state.completed_at,
    })
}

pub fn run(r: &RunRecord) -> Value {
    json!({
        "run_id": r.run_id,
        "task_id": r.task_id,
        "node_id": r.node_id,
        "attempt": r.attempt,
        "point": r.point,
        "status": r.status.as_str(),
        "exit_code": r.exit_code,
        "stdout": r.stdout,
        "stderr": r.stderr,
        "error": r.error,
        "started_at": r.started_at,
        "completed_at": r.completed_at,
        "cpu_seconds": r.cpu_seconds,
        "max_rss_mb": r.max_rss_mb,
    })
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
pub fn task_with_runs(t: &TaskRecord, runs: &[RunRecord]) -> Value {
    let mut value = task(t);
    if let Value::Object(map) = &mut value {
        map.insert("runs".into(), Value::Array(runs.iter().map(run).collect()));
    }
    value
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
    use super::rfc3339;

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
