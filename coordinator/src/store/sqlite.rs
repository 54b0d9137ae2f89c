//! The SQLite backend (the embedded default): one file under the data directory, WAL
//! journal, schema from `migrations/`.

use super::{
    CommandQuery, KeyStore, OperationQuery, ResultRow, Store, StoreError, TaskQuery, TaskStats,
};
use crate::keys::{ApiKey, NewKey};
use crate::model::{
    Change, CommandRecord, Drain, NodeGroup, NodeRecord, RunRecord, Snapshot, TaskRecord, TaskSpec,
    TaskState,
};
use crate::operations::{OperationKind, OperationRecord, OperationState, StageRecord};
use async_trait::async_trait;
use lull_shared::{
    CommandKind, CommandStatus, Constraints, NodeResources, NodeStatus, Resources, RunStatus,
    TaskId, TaskStatus,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// How hard a commit pushes data to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// fsync on every commit: survives power loss. Commits are batched, so this is one
    /// fsync per batch, not per request.
    Full,
    /// fsync at checkpoints only: survives a killed process, may lose the last commits on
    /// power loss.
    Normal,
}

impl FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(SyncMode::Full),
            "normal" => Ok(SyncMode::Normal),
            other => Err(format!("unknown sync mode {other:?} (full or normal)")),
        }
    }
}

pub struct SqliteStore {
    pool: SqlitePool,
}

const TASK_COLUMNS: &str = "task_id, code, timeout, cpu, memory_mb, constraints, max_attempts, \
    points, status, result, error, attempts, losses, node_id, created_at, started_at, completed_at, \
    submitted_by";
const RUN_COLUMNS: &str = "run_id, task_id, node_id, attempt, point, status, exit_code, stdout, \
    stderr, error, started_at, completed_at, cpu_seconds, max_rss_mb";
const NODE_COLUMNS: &str = "node_id, hostname, node_type, zone, cpu_cores, memory_mb, meta, \
    status, version, joined_at, last_heartbeat, sandbox, executor, drain_requested_at, \
    drain_deadline, group_id, group_operation";
const OPERATION_COLUMNS: &str = "operation_id, kind, state, operator, stage, stages, \
    additional_data, created_at, start_time, end_time";
const COMMAND_COLUMNS: &str = "command_id, node_id, command, args, status, created_at, \
    delivered_at, completed_at, error";

impl SqliteStore {
    /// Opens (creating if needed) `lull.db` in `data_dir` and brings its schema up to date.
    pub async fn open(data_dir: &Path, sync: SyncMode) -> Result<Arc<SqliteStore>, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("lull.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match sync {
                SyncMode::Full => SqliteSynchronous::Full,
                SyncMode::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(10))
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Arc::new(SqliteStore { pool }))
    }
}

fn corrupt(table: &'static str, what: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        table,
        what: what.into(),
    }
}

fn task_from_row(row: &SqliteRow) -> Result<TaskRecord, StoreError> {
    let task_id: i64 = row.try_get("task_id")?;
    let status: String = row.try_get("status")?;
    let status = TaskStatus::parse(&status)
        .ok_or_else(|| corrupt("tasks", format!("task {task_id} has status {status:?}")))?;
    let constraints: String = row.try_get("constraints")?;
    let constraints: Constraints = serde_json::from_str(&constraints)
        .map_err(|e| corrupt("tasks", format!("task {task_id} constraints: {e}")))?;
    let code: String = row.try_get("code")?;
    Ok(TaskRecord {
        task_id,
        spec: TaskSpec {
            code: code.into(),
            timeout: row.try_get("timeout")?,
            resources: Resources {
                cpu: row.try_get("cpu")?,
                memory: row.try_get("memory_mb")?,
            },
            constraints,
            max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
            submitted_by: row.try_get("submitted_by")?,
        },
        state: TaskState {
            task_id,
            status,
            result: row.try_get("result")?,
            error: row.try_get("error")?,
            attempts: row.try_get::<i64, _>("attempts")? as u32,
            losses: row.try_get::<i64, _>("losses")? as u32,
            points: row.try_get::<i64, _>("points")? as u32,
            node_id: row.try_get("node_id")?,
            started_at: row.try_get("started_at")?,
            completed_at: row.try_get("completed_at")?,
        },
        created_at: row.try_get("created_at")?,
    })
}

fn run_from_row(row: &SqliteRow) -> Result<RunRecord, StoreError> {
    let run_id: i64 = row.try_get("run_id")?;
    let status: String = row.try_get("status")?;
    let status = RunStatus::parse(&status)
        .ok_or_else(|| corrupt("runs", format!("run {run_id} has status {status:?}")))?;
    Ok(RunRecord {
        run_id,
        task_id: row.try_get("task_id")?,
        node_id: row.try_get("node_id")?,
        attempt: row.try_get::<i64, _>("attempt")? as u32,
        point: row.try_get::<i64, _>("point")? as u32,
        status,
        exit_code: row
            .try_get::<Option<i64>, _>("exit_code")?
            .map(|c| c as i32),
        stdout: row.try_get("stdout")?,
        stderr: row.try_get("stderr")?,
        error: row.try_get("error")?,
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
        cpu_seconds: row.try_get("cpu_seconds")?,
        max_rss_mb: row.try_get("max_rss_mb")?,
    })
}

fn node_from_row(row: &SqliteRow) -> Result<NodeRecord, StoreError> {
    let node_id: String = row.try_get("node_id")?;
    let status: String = row.try_get("status")?;
    let status = NodeStatus::parse(&status)
        .ok_or_else(|| corrupt("nodes", format!("node {node_id} has status {status:?}")))?;
    let meta: String = row.try_get("meta")?;
    let meta = match serde_json::from_str(&meta) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => {
            return Err(corrupt(
                "nodes",
                format!("node {node_id} meta is not an object"),
            ));
        }
    };
    Ok(NodeRecord {
        node_id,
        hostname: row.try_get("hostname")?,
        node_type: row.try_get("node_type")?,
        zone: row.try_get("zone")?,
        resources: NodeResources {
            cpu_cores: row.try_get("cpu_cores")?,
            memory_mb: row.try_get("memory_mb")?,
        },
        meta,
        status,
        version: row.try_get("version")?,
        joined_at: row.try_get("joined_at")?,
        last_heartbeat: row.try_get("last_heartbeat")?,
        // An unreadable sandbox report is dropped, not fatal: the next heartbeat brings it.
        sandbox: row
            .try_get::<Option<String>, _>("sandbox")?
            .and_then(|json| serde_json::from_str(&json).ok()),
        executor: row.try_get("executor")?,
        drain: row
            .try_get::<Option<f64>, _>("drain_requested_at")?
            .map(|requested_at| -> Result<Drain, StoreError> {
                Ok(Drain {
                    requested_at,
                    deadline: row.try_get("drain_deadline")?,
                })
            })
            .transpose()?,
        group: NodeGroup {
            id: row.try_get("group_id")?,
            operation_id: row.try_get("group_operation")?,
        },
    })
}

fn stages_to_json(stages: &[StageRecord]) -> String {
    serde_json::Value::Array(
        stages
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "state": s.state.as_str(),
                    "message": s.message,
                    "start_time": s.start_time,
                    "end_time": s.end_time,
                })
            })
            .collect(),
    )
    .to_string()
}

fn stages_from_json(operation_id: i64, text: &str) -> Result<Vec<StageRecord>, StoreError> {
    let bad = |what: &str| corrupt("operations", format!("operation {operation_id} {what}"));
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(&format!("stages: {e}")))?;
    let items = value
        .as_array()
        .ok_or_else(|| bad("stages is not a list"))?;
    items
        .iter()
        .map(|item| {
            let state = item["state"]
                .as_str()
                .and_then(OperationState::parse)
                .ok_or_else(|| bad("has a stage without a state"))?;
            Ok(StageRecord {
                name: item["name"].as_str().unwrap_or_default().to_string(),
                state,
                message: item["message"].as_str().map(str::to_string),
                start_time: item["start_time"].as_f64(),
                end_time: item["end_time"].as_f64(),
            })
        })
        .collect()
}

fn operation_from_row(row: &SqliteRow) -> Result<OperationRecord, StoreError> {
    let operation_id: i64 = row.try_get("operation_id")?;
    let bad = |what: String| corrupt("operations", format!("operation {operation_id} {what}"));
    let kind: String = row.try_get("kind")?;
    let kind = OperationKind::parse(&kind).ok_or_else(|| bad(format!("has kind {kind:?}")))?;
    let state: String = row.try_get("state")?;
    let state = OperationState::parse(&state).ok_or_else(|| bad(format!("has state {state:?}")))?;
    let stages: String = row.try_get("stages")?;
    let data: String = row.try_get("additional_data")?;
    let additional_data = match serde_json::from_str(&data) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => return Err(bad("additional_data is not an object".into())),
    };
    Ok(OperationRecord {
        operation_id,
        kind,
        state,
        operator: row.try_get("operator")?,
        stage: row.try_get::<i64, _>("stage")?.max(1) as usize,
        stages: stages_from_json(operation_id, &stages)?,
        created_at: row.try_get("created_at")?,
        start_time: row.try_get("start_time")?,
        end_time: row.try_get("end_time")?,
        additional_data,
    })
}

fn command_from_row(row: &SqliteRow) -> Result<CommandRecord, StoreError> {
    let command_id: i64 = row.try_get("command_id")?;
    let kind: String = row.try_get("command")?;
    let kind = CommandKind::parse(&kind)
        .ok_or_else(|| corrupt("node_commands", format!("command {command_id} is {kind:?}")))?;
    let status: String = row.try_get("status")?;
    let status = CommandStatus::parse(&status).ok_or_else(|| {
        corrupt(
            "node_commands",
            format!("command {command_id} has status {status:?}"),
        )
    })?;
    let args: String = row.try_get("args")?;
    let args = match serde_json::from_str(&args) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => {
            return Err(corrupt(
                "node_commands",
                format!("command {command_id} args are not an object"),
            ));
        }
    };
    Ok(CommandRecord {
        command_id,
        node_id: row.try_get("node_id")?,
        kind,
        args,
        status,
        created_at: row.try_get("created_at")?,
        delivered_at: row.try_get("delivered_at")?,
        completed_at: row.try_get("completed_at")?,
        error: row.try_get("error")?,
    })
}

async fn apply_one(tx: &mut Transaction<'_, Sqlite>, change: &Change) -> Result<(), StoreError> {
    match change {
        Change::TaskCreated(t) => {
            let constraints = serde_json::to_string(&t.spec.constraints)
                .map_err(|e| corrupt("tasks", e.to_string()))?;
            sqlx::query(
                "INSERT INTO tasks (task_id, code, timeout, cpu, memory_mb, constraints, \
                 max_attempts, points, status, attempts, losses, created_at, submitted_by) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(t.task_id)
            .bind(&*t.spec.code)
            .bind(t.spec.timeout)
            .bind(t.spec.resources.cpu)
            .bind(t.spec.resources.memory)
            .bind(constraints)
            .bind(t.spec.max_attempts as i64)
            .bind(t.state.points as i64)
            .bind(t.state.status.as_str())
            .bind(t.state.attempts as i64)
            .bind(t.state.losses as i64)
            .bind(t.created_at)
            .bind(t.spec.submitted_by)
            .execute(&mut **tx)
            .await?;
        }
        Change::TaskUpdated(s) | Change::TaskRevised(s) => {
            sqlx::query(
                "UPDATE tasks SET status = ?, result = ?, error = ?, attempts = ?, losses = ?, \
                 node_id = ?, started_at = ?, completed_at = ?, points = ? WHERE task_id = ?",
            )
            .bind(s.status.as_str())
            .bind(&s.result)
            .bind(&s.error)
            .bind(s.attempts as i64)
            .bind(s.losses as i64)
            .bind(&s.node_id)
            .bind(s.started_at)
            .bind(s.completed_at)
            .bind(s.points as i64)
            .bind(s.task_id)
            .execute(&mut **tx)
            .await?;
        }
        Change::RunSaved(r) => {
            sqlx::query(
                "INSERT INTO runs (run_id, task_id, node_id, attempt, point, status, exit_code, \
                 stdout, stderr, error, started_at, completed_at, cpu_seconds, max_rss_mb) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, \
                 exit_code = excluded.exit_code, stdout = excluded.stdout, stderr = excluded.stderr, \
                 error = excluded.error, completed_at = excluded.completed_at, \
                 cpu_seconds = excluded.cpu_seconds, max_rss_mb = excluded.max_rss_mb",
            )
            .bind(r.run_id)
            .bind(r.task_id)
            .bind(&r.node_id)
            .bind(r.attempt as i64)
            .bind(r.point as i64)
            .bind(r.status.as_str())
            .bind(r.exit_code.map(i64::from))
            .bind(&r.stdout)
            .bind(&r.stderr)
            .bind(&r.error)
            .bind(r.started_at)
            .bind(r.completed_at)
            .bind(r.cpu_seconds)
            .bind(r.max_rss_mb)
            .execute(&mut **tx)
            .await?;
        }
        Change::NodeSaved(n) => {
            let meta = serde_json::Value::Object(n.meta.clone()).to_string();
            let sandbox = n
                .sandbox
                .as_ref()
                .and_then(|p| serde_json::to_string(p).ok());
            sqlx::query(
                "INSERT INTO nodes (node_id, hostname, node_type, zone, cpu_cores, memory_mb, meta, \
                 status, version, joined_at, last_heartbeat, sandbox, executor, \
                 drain_requested_at, drain_deadline, group_id, group_operation) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (node_id) DO UPDATE SET hostname = excluded.hostname, \
                 node_type = excluded.node_type, zone = excluded.zone, cpu_cores = excluded.cpu_cores, \
                 memory_mb = excluded.memory_mb, meta = excluded.meta, status = excluded.status, \
                 version = excluded.version, joined_at = excluded.joined_at, \
                 last_heartbeat = excluded.last_heartbeat, sandbox = excluded.sandbox, \
                 executor = excluded.executor, \
                 drain_requested_at = excluded.drain_requested_at, \
                 drain_deadline = excluded.drain_deadline, \
                 group_id = excluded.group_id, group_operation = excluded.group_operation",
            )
            .bind(&n.node_id)
            .bind(&n.hostname)
            .bind(&n.node_type)
            .bind(&n.zone)
            .bind(n.resources.cpu_cores)
            .bind(n.resources.memory_mb)
            .bind(meta)
            .bind(n.status.as_str())
            .bind(&n.version)
            .bind(n.joined_at)
            .bind(n.last_heartbeat)
            .bind(sandbox)
            .bind(&n.executor)
            .bind(n.drain.map(|d| d.requested_at))
            .bind(n.drain.and_then(|d| d.deadline))
            .bind(n.group.id)
            .bind(n.group.operation_id)
            .execute(&mut **tx)
            .await?;
        }
        Change::OperationSaved(o) => {
            sqlx::query(
                "INSERT INTO operations (operation_id, kind, state, operator, stage, stages, \
                 additional_data, created_at, start_time, end_time) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (operation_id) DO UPDATE SET state = excluded.state, \
                 operator = excluded.operator, stage = excluded.stage, stages = excluded.stages, \
                 additional_data = excluded.additional_data, start_time = excluded.start_time, \
                 end_time = excluded.end_time",
            )
            .bind(o.operation_id)
            .bind(o.kind.as_str())
            .bind(o.state.as_str())
            .bind(&o.operator)
            .bind(o.stage as i64)
            .bind(stages_to_json(&o.stages))
            .bind(serde_json::Value::Object(o.additional_data.clone()).to_string())
            .bind(o.created_at)
            .bind(o.start_time)
            .bind(o.end_time)
            .execute(&mut **tx)
            .await?;
        }
        Change::CommandSaved(c) => {
            let args = serde_json::Value::Object(c.args.clone()).to_string();
            sqlx::query(
                "INSERT INTO node_commands (command_id, node_id, command, args, status, \
                 created_at, delivered_at, completed_at, error) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (command_id) DO UPDATE SET status = excluded.status, \
                 delivered_at = excluded.delivered_at, completed_at = excluded.completed_at, \
                 error = excluded.error",
            )
            .bind(c.command_id)
            .bind(&c.node_id)
            .bind(c.kind.as_str())
            .bind(args)
            .bind(c.status.as_str())
            .bind(c.created_at)
            .bind(c.delivered_at)
            .bind(c.completed_at)
            .bind(&c.error)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self) -> Result<Snapshot, StoreError> {
        let tasks = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE status IN ('pending', 'assigned', 'running') \
             ORDER BY task_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        let runs = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('assigned', 'running') ORDER BY run_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        // The points a multi-point task has done so far (its completed runs).
        let completed = sqlx::query(
            "SELECT r.task_id, r.point, r.stdout FROM runs r JOIN tasks t ON t.task_id = r.task_id \
             WHERE t.status IN ('pending', 'assigned', 'running') AND r.status = 'completed' \
             ORDER BY r.run_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let nodes = sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes"))
            .fetch_all(&self.pool)
            .await?;
        let commands = sqlx::query(&format!(
            "SELECT {COMMAND_COLUMNS} FROM node_commands \
             WHERE status IN ('pending', 'delivered') ORDER BY command_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        let operations = sqlx::query(&format!(
            "SELECT {OPERATION_COLUMNS} FROM operations \
             WHERE state IN ('READY', 'RUNNING') ORDER BY operation_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        let ids = sqlx::query(
            "SELECT (SELECT COALESCE(MAX(task_id), 0) FROM tasks) AS max_task, \
             (SELECT COALESCE(MAX(operation_id), 0) FROM operations) AS max_operation, \
             (SELECT COALESCE(MAX(command_id), 0) FROM node_commands) AS max_command, \
             (SELECT COALESCE(MAX(run_id), 0) FROM runs) AS max_run, \
             (SELECT COUNT(*) FROM tasks) AS total",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Snapshot {
            active_tasks: tasks.iter().map(task_from_row).collect::<Result<_, _>>()?,
            active_runs: runs.iter().map(run_from_row).collect::<Result<_, _>>()?,
            completed_points: completed
                .iter()
                .map(|row| -> Result<_, StoreError> {
                    Ok((
                        row.try_get("task_id")?,
                        row.try_get::<i64, _>("point")? as u32,
                        row.try_get("stdout")?,
                    ))
                })
                .collect::<Result<_, _>>()?,
            nodes: nodes.iter().map(node_from_row).collect::<Result<_, _>>()?,
            active_commands: commands
                .iter()
                .map(command_from_row)
                .collect::<Result<_, _>>()?,
            max_command_id: ids.try_get("max_command")?,
            max_task_id: ids.try_get("max_task")?,
            max_run_id: ids.try_get("max_run")?,
            total_tasks: ids.try_get::<i64, _>("total")? as u64,
            unfinished_operations: operations
                .iter()
                .map(operation_from_row)
                .collect::<Result<_, _>>()?,
            max_operation_id: ids.try_get("max_operation")?,
        })
    }

    async fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for change in changes {
            apply_one(&mut tx, change).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn task(&self, task_id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = ?"
        ))
        .bind(task_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(task_from_row).transpose()
    }

    async fn runs(&self, task_id: TaskId) -> Result<Vec<RunRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE task_id = ? ORDER BY run_id"
        ))
        .bind(task_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn tasks(&self, query: &TaskQuery) -> Result<Vec<TaskRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE (?1 IS NULL OR status = ?1) \
             AND task_id > ?2 AND (?5 IS NULL OR submitted_by = ?5) \
             ORDER BY task_id LIMIT ?3 OFFSET ?4"
        ))
        .bind(query.status.map(|s| s.as_str()))
        .bind(query.after.unwrap_or(0))
        .bind(query.limit as i64)
        .bind(query.offset as i64)
        .bind(query.submitted_by)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(task_from_row).collect()
    }

    async fn count_tasks(
        &self,
        status: Option<TaskStatus>,
        submitted_by: Option<i64>,
    ) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM tasks WHERE (?1 IS NULL OR status = ?1) \
             AND (?2 IS NULL OR submitted_by = ?2)",
        )
        .bind(status.map(|s| s.as_str()))
        .bind(submitted_by)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }

    async fn results(
        &self,
        limit: u32,
        offset: u64,
        after: Option<TaskId>,
        submitted_by: Option<i64>,
    ) -> Result<Vec<ResultRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT task_id, result, completed_at FROM tasks WHERE status = 'completed' \
             AND task_id > ?1 AND (?4 IS NULL OR submitted_by = ?4) \
             ORDER BY task_id LIMIT ?2 OFFSET ?3",
        )
        .bind(after.unwrap_or(0))
        .bind(limit as i64)
        .bind(offset as i64)
        .bind(submitted_by)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ResultRow {
                    task_id: row.try_get("task_id")?,
                    result: row.try_get("result")?,
                    completed_at: row.try_get("completed_at")?,
                })
            })
            .collect()
    }

    async fn stats(&self, now: f64) -> Result<TaskStats, StoreError> {
        let mut stats = TaskStats::default();
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            let status: String = row.try_get("status")?;
            let n = row.try_get::<i64, _>("n")? as u64;
            stats.total += n;
            if let Some(status) = TaskStatus::parse(&status) {
                stats.by_status.push((status, n));
            }
        }
        let row = sqlx::query(
            "SELECT (SELECT AVG(completed_at - started_at) FROM tasks \
                     WHERE status = 'completed' AND started_at IS NOT NULL) AS avg_time, \
                    (SELECT COUNT(*) FROM tasks WHERE status IN ('completed', 'failed') \
                     AND completed_at >= ?) AS last_hour, \
                    (SELECT COALESCE(SUM(completed_at - started_at), 0.0) FROM runs \
                     WHERE completed_at IS NOT NULL) AS compute",
        )
        .bind(now - 3600.0)
        .fetch_one(&self.pool)
        .await?;
        stats.avg_time = row.try_get("avg_time")?;
        stats.finished_last_hour = row.try_get::<i64, _>("last_hour")? as u64;
        stats.compute_seconds = row.try_get("compute")?;
        Ok(stats)
    }

    async fn completed_per_minute(&self, since: f64) -> Result<Vec<(i64, u64)>, StoreError> {
        // `tasks_completed_at` bounds the scan to the window.
        let rows = sqlx::query(
            "SELECT CAST(completed_at / 60 AS INTEGER) AS minute, COUNT(*) AS n FROM tasks \
             WHERE completed_at >= ? AND status = 'completed' GROUP BY minute ORDER BY minute",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("minute")?, row.try_get::<i64, _>("n")? as u64)))
            .collect()
    }

    async fn commands(&self, query: &CommandQuery) -> Result<Vec<CommandRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COMMAND_COLUMNS} FROM node_commands WHERE (?1 IS NULL OR node_id = ?1) \
             AND (?2 IS NULL OR status = ?2) ORDER BY command_id DESC LIMIT ?3"
        ))
        .bind(query.node_id.as_deref())
        .bind(query.status.map(|s| s.as_str()))
        .bind(query.limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(command_from_row).collect()
    }

    async fn operation(&self, operation_id: i64) -> Result<Option<OperationRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {OPERATION_COLUMNS} FROM operations WHERE operation_id = ?"
        ))
        .bind(operation_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(operation_from_row)
        .transpose()
    }

    async fn operations(&self, query: &OperationQuery) -> Result<Vec<OperationRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {OPERATION_COLUMNS} FROM operations \
             WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR state = ?2) \
             ORDER BY operation_id DESC LIMIT ?3 OFFSET ?4"
        ))
        .bind(query.kind.map(OperationKind::as_str))
        .bind(query.state.map(OperationState::as_str))
        .bind(i64::from(query.limit))
        .bind(i64::try_from(query.offset).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(operation_from_row).collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

const KEY_COLUMNS: &str = "key_id, name, role, mode, token_hash, secret, created_at, revoked_at";

fn key_from_row(row: &SqliteRow) -> Result<ApiKey, StoreError> {
    let key_id: i64 = row.try_get("key_id")?;
    let role: String = row.try_get("role")?;
    let mode: String = row.try_get("mode")?;
    Ok(ApiKey {
        key_id,
        name: row.try_get("name")?,
        role: role
            .parse()
            .map_err(|e| corrupt("api_keys", format!("key {key_id}: {e}")))?,
        mode: mode
            .parse()
            .map_err(|e| corrupt("api_keys", format!("key {key_id}: {e}")))?,
        token_hash: row.try_get("token_hash")?,
        secret: row.try_get("secret")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn create_key(&self, key: &NewKey, now: f64) -> Result<ApiKey, StoreError> {
        let row = sqlx::query(&format!(
            "INSERT INTO api_keys (name, role, mode, token_hash, secret, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) RETURNING {KEY_COLUMNS}"
        ))
        .bind(&key.name)
        .bind(key.role.as_str())
        .bind(key.mode.as_str())
        .bind(key.token_hash())
        .bind(key.secret.as_deref())
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        key_from_row(&row)
    }

    async fn keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY key_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn key_by_token_hash(&self, token_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE token_hash = ?"
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn revoke_key(&self, key_id: i64, now: f64) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ? \
             RETURNING {KEY_COLUMNS}"
        ))
        .bind(now)
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }
}
