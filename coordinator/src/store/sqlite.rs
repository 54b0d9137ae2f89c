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
    CommandId, CommandKind, CommandStatus, Constraints, NodeResources, NodeStatus, Resources,
    RunId, RunStatus, TaskId, TaskStatus,
};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

impl SyncMode {
    /// The value of SQLite's `synchronous` pragma for this mode.
    fn pragma(self) -> &'static str {
        match self {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        }
    }
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
    /// The database file, for the writer's own connection ([`SqliteStore::committer`]).
    path: PathBuf,
    sync: SyncMode,
}

/// How long a connection waits for another's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The data directory for its owner alone ([`lull_agent::private_dir`], which the agent's state
/// directory shares): the database holds every task's code and results, and the local
/// agents' state lives under it (`./lull-data` by default: under whatever directory the
/// coordinator was started in).
fn private_dir(dir: &Path) -> std::io::Result<()> {
    if let Some(was) = lull_agent::private_dir(dir)? {
        tracing::info!(path = %dir.display(), was = format!("{was:o}"), "data directory made private to its owner");
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed, for its owner alone: [`private_dir`]) `lull.db` in
    /// `data_dir` and brings its schema up to date.
    pub async fn open(data_dir: &Path, sync: SyncMode) -> Result<Arc<SqliteStore>, StoreError> {
        private_dir(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let path = data_dir.join("lull.db");
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .pragma("synchronous", sync.pragma())
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            // sqlx pings a connection before lending it by default: one more hand-off to
            // its SQLite thread (and back) on every read and every commit, checking a
            // connection to a local file that cannot have gone away.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Arc::new(SqliteStore { pool, path, sync }))
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

/// What a batch of changes leaves behind: every [`Change`] carries the whole mutable state
/// of its row, so the last change per row is the batch's net effect, and a task created in
/// the batch is inserted directly in its final state. Rows keep the order they first
/// appeared in. The tables have no triggers or foreign keys between them, so applying the
/// net effect table by table, in one transaction, leaves exactly what applying every change
/// in order would.
#[derive(Default)]
struct NetChanges<'a> {
    created: Keyed<TaskId, (&'a TaskRecord, &'a TaskState)>,
    updated: Keyed<TaskId, &'a TaskState>,
    runs: Keyed<RunId, &'a RunRecord>,
    nodes: Keyed<&'a str, &'a NodeRecord>,
    commands: Keyed<CommandId, &'a CommandRecord>,
    operations: Keyed<crate::operations::OperationId, &'a crate::operations::OperationRecord>,
}

/// Rows by key, last write wins, in the order each key was first seen.
struct Keyed<K, V> {
    rows: Vec<V>,
    index: HashMap<K, usize>,
}

impl<K, V> Default for Keyed<K, V> {
    fn default() -> Self {
        Keyed {
            rows: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq, V> Keyed<K, V> {
    fn put(&mut self, key: K, row: V) {
        match self.index.get(&key) {
            Some(&at) => self.rows[at] = row,
            None => {
                self.index.insert(key, self.rows.len());
                self.rows.push(row);
            }
        }
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.index.get(key).map(|&at| &mut self.rows[at])
    }
}

impl<'a> NetChanges<'a> {
    fn of(changes: &'a [Change]) -> NetChanges<'a> {
        let mut net = NetChanges::default();
        for change in changes {
            match change {
                Change::TaskCreated(t) => net.created.put(t.task_id, (t, &t.state)),
                Change::TaskUpdated(s) | Change::TaskRevised(s) => {
                    match net.created.get_mut(&s.task_id) {
                        Some(created) => created.1 = s,
                        None => net.updated.put(s.task_id, s),
                    }
                }
                Change::RunSaved(r) => net.runs.put(r.run_id, r),
                Change::NodeSaved(n) => net.nodes.put(n.node_id.as_str(), n),
                Change::CommandSaved(c) => net.commands.put(c.command_id, c),
                Change::OperationSaved(o) => net.operations.put(o.operation_id, o),
            }
        }
        net
    }
}

/// Most rows one multi-row statement writes. Longer lists are split into statements of
/// this size and then of halving sizes (64, 32, ... 1), so that only a handful of distinct
/// statements exist per table: each stays prepared in the connection's statement cache.
const MAX_ROWS_PER_STATEMENT: usize = 128;

/// The row counts [`MAX_ROWS_PER_STATEMENT`] splits `n` rows into.
fn statement_sizes(mut n: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let size = if n >= MAX_ROWS_PER_STATEMENT {
            MAX_ROWS_PER_STATEMENT
        } else {
            1 << n.ilog2()
        };
        n -= size;
        Some(size)
    })
}

/// `(?, ?, ?), (?, ?, ?)`: `rows` tuples of `columns` placeholders.
fn placeholders(columns: usize, rows: usize) -> String {
    let tuple = format!("({})", vec!["?"; columns].join(", "));
    vec![tuple; rows].join(", ")
}

/// The writer's own connection to the store's file: every commit is applied through it, on
/// the writer's thread, in one call (see [`super::writer`]). Reads go through the pool.
pub struct SqliteCommitter {
    conn: rusqlite::Connection,
    insert_tasks: MultiRowSql,
    update_tasks: MultiRowSql,
    save_runs: MultiRowSql,
}

/// One multi-row statement's text for each size [`statement_sizes`] yields (1, 2, 4, ...
/// [`MAX_ROWS_PER_STATEMENT`]), written once rather than on every commit.
struct MultiRowSql(Vec<String>);

impl MultiRowSql {
    fn new(sql: impl Fn(usize) -> String) -> Self {
        MultiRowSql(
            (0..=MAX_ROWS_PER_STATEMENT.ilog2())
                .map(|power| sql(1 << power))
                .collect(),
        )
    }

    /// The text for `rows` rows, a power of two no larger than [`MAX_ROWS_PER_STATEMENT`].
    fn of(&self, rows: usize) -> &str {
        &self.0[rows.ilog2() as usize]
    }
}

/// Distinct statements the committer keeps prepared: up to eight sizes for each of the
/// three multi-row statements, and one each for nodes, commands and operations.
const PREPARED_STATEMENTS: usize = 64;

impl SqliteStore {
    /// Opens the connection the store's writer commits through. The schema must be in place
    /// (it is once [`SqliteStore::open`] has returned).
    pub fn committer(&self) -> Result<SqliteCommitter, StoreError> {
        let conn = rusqlite::Connection::open(&self.path)?;
        // WAL is the file's (set by `open`); durability, the busy wait and temp storage
        // are the connection's own, as on the pool's connections.
        conn.pragma_update(None, "synchronous", self.sync.pragma())?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
        Ok(SqliteCommitter {
            conn,
            insert_tasks: MultiRowSql::new(|n| {
                format!(
                    "INSERT INTO tasks ({TASK_COLUMNS}) VALUES {}",
                    placeholders(column_count(TASK_COLUMNS), n)
                )
            }),
            update_tasks: MultiRowSql::new(|n| {
                format!(
                    "UPDATE tasks SET status = v.column2, result = v.column3, error = v.column4, \
                     attempts = v.column5, losses = v.column6, node_id = v.column7, \
                     started_at = v.column8, completed_at = v.column9, points = v.column10 \
                     FROM (VALUES {}) AS v WHERE tasks.task_id = v.column1",
                    placeholders(10, n)
                )
            }),
            save_runs: MultiRowSql::new(|n| {
                format!(
                    "INSERT INTO runs ({RUN_COLUMNS}) VALUES {} \
                     ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, \
                     exit_code = excluded.exit_code, stdout = excluded.stdout, \
                     stderr = excluded.stderr, error = excluded.error, \
                     completed_at = excluded.completed_at, cpu_seconds = excluded.cpu_seconds, \
                     max_rss_mb = excluded.max_rss_mb",
                    placeholders(column_count(RUN_COLUMNS), n)
                )
            }),
        })
    }
}

impl super::Committer for SqliteCommitter {
    fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let net = NetChanges::of(changes);
        // Immediate: the write lock is taken (waiting up to the busy timeout for a key
        // being written through the pool) before anything is read, never upgraded midway.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        insert_tasks(&tx, &self.insert_tasks, &net.created.rows)?;
        update_tasks(&tx, &self.update_tasks, &net.updated.rows)?;
        save_runs(&tx, &self.save_runs, &net.runs.rows)?;
        for node in net.nodes.rows {
            save_node(&tx, node)?;
        }
        for command in net.commands.rows {
            save_command(&tx, command)?;
        }
        for operation in net.operations.rows {
            save_operation(&tx, operation)?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Binds one statement's parameters in order; the first error is kept for [`Self::execute`].
struct Binder<'s, 'c> {
    statement: &'s mut rusqlite::Statement<'c>,
    next: usize,
    error: Option<rusqlite::Error>,
}

impl<'s, 'c> Binder<'s, 'c> {
    fn new(statement: &'s mut rusqlite::Statement<'c>) -> Self {
        Binder {
            statement,
            next: 1,
            error: None,
        }
    }

    fn put(&mut self, value: impl rusqlite::ToSql) -> &mut Self {
        if self.error.is_none()
            && let Err(e) = self.statement.raw_bind_parameter(self.next, value)
        {
            self.error = Some(e);
        }
        self.next += 1;
        self
    }

    /// Runs the statement with what was bound, or says what could not be bound.
    fn execute(self) -> Result<(), StoreError> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        self.statement.raw_execute()?;
        Ok(())
    }

    /// A task's outcome columns, in the order both the insert and the update name them:
    /// status, result, error, attempts, losses, node_id.
    fn put_outcome(&mut self, s: &TaskState) -> &mut Self {
        self.put(s.status.as_str())
            .put(&s.result)
            .put(&s.error)
            .put(s.attempts as i64)
            .put(s.losses as i64)
            .put(&s.node_id)
    }
}

/// Runs `sql(rows)` for each statement-sized slice of `rows`, binding each row with `bind`.
fn write_rows<T>(
    tx: &rusqlite::Transaction<'_>,
    sql: &MultiRowSql,
    rows: &[T],
    bind: impl Fn(&mut Binder<'_, '_>, &T) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut rest = rows;
    for size in statement_sizes(rows.len()) {
        let (chunk, after) = rest.split_at(size);
        rest = after;
        let mut statement = tx.prepare_cached(sql.of(size))?;
        let mut binder = Binder::new(&mut statement);
        for row in chunk {
            bind(&mut binder, row)?;
        }
        binder.execute()?;
    }
    Ok(())
}

/// Runs the one-row statement `sql` with what `bind` binds.
fn write_one(
    tx: &rusqlite::Transaction<'_>,
    sql: &str,
    bind: impl FnOnce(&mut Binder<'_, '_>),
) -> Result<(), StoreError> {
    let mut statement = tx.prepare_cached(sql)?;
    let mut binder = Binder::new(&mut statement);
    bind(&mut binder);
    binder.execute()
}

/// How many columns a list like [`TASK_COLUMNS`] names.
fn column_count(columns: &str) -> usize {
    columns.split(',').count()
}

fn insert_tasks(
    tx: &rusqlite::Transaction<'_>,
    sql: &MultiRowSql,
    rows: &[(&TaskRecord, &TaskState)],
) -> Result<(), StoreError> {
    write_rows(tx, sql, rows, |b, (t, s)| {
        let constraints = serde_json::to_string(&t.spec.constraints)
            .map_err(|e| corrupt("tasks", e.to_string()))?;
        b.put(t.task_id)
            .put(&*t.spec.code)
            .put(t.spec.timeout)
            .put(t.spec.resources.cpu)
            .put(t.spec.resources.memory)
            .put(constraints)
            .put(t.spec.max_attempts as i64)
            .put(s.points as i64)
            .put_outcome(s)
            .put(t.created_at)
            .put(s.started_at)
            .put(s.completed_at)
            .put(t.spec.submitted_by);
        Ok(())
    })
}

fn update_tasks(
    tx: &rusqlite::Transaction<'_>,
    sql: &MultiRowSql,
    rows: &[&TaskState],
) -> Result<(), StoreError> {
    write_rows(tx, sql, rows, |b, s| {
        b.put(s.task_id)
            .put_outcome(s)
            .put(s.started_at)
            .put(s.completed_at)
            .put(s.points as i64);
        Ok(())
    })
}

fn save_runs(
    tx: &rusqlite::Transaction<'_>,
    sql: &MultiRowSql,
    rows: &[&RunRecord],
) -> Result<(), StoreError> {
    write_rows(tx, sql, rows, |b, r| {
        b.put(r.run_id)
            .put(r.task_id)
            .put(&r.node_id)
            .put(r.attempt as i64)
            .put(r.point as i64)
            .put(r.status.as_str())
            .put(r.exit_code.map(i64::from))
            .put(&r.stdout)
            .put(&r.stderr)
            .put(&r.error)
            .put(r.started_at)
            .put(r.completed_at)
            .put(r.cpu_seconds)
            .put(r.max_rss_mb);
        Ok(())
    })
}

fn save_node(tx: &rusqlite::Transaction<'_>, n: &NodeRecord) -> Result<(), StoreError> {
    let meta = serde_json::Value::Object(n.meta.clone()).to_string();
    let sandbox = n
        .sandbox
        .as_ref()
        .and_then(|p| serde_json::to_string(p).ok());
    write_one(
        tx,
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
        |b| {
            b.put(&n.node_id)
                .put(&n.hostname)
                .put(&n.node_type)
                .put(&n.zone)
                .put(n.resources.cpu_cores)
                .put(n.resources.memory_mb)
                .put(meta)
                .put(n.status.as_str())
                .put(&n.version)
                .put(n.joined_at)
                .put(n.last_heartbeat)
                .put(sandbox)
                .put(&n.executor)
                .put(n.drain.map(|d| d.requested_at))
                .put(n.drain.and_then(|d| d.deadline))
                .put(n.group.id)
                .put(n.group.operation_id);
        },
    )
}

fn save_operation(
    tx: &rusqlite::Transaction<'_>,
    o: &crate::operations::OperationRecord,
) -> Result<(), StoreError> {
    write_one(
        tx,
        "INSERT INTO operations (operation_id, kind, state, operator, stage, stages, \
         additional_data, created_at, start_time, end_time) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (operation_id) DO UPDATE SET state = excluded.state, \
         operator = excluded.operator, stage = excluded.stage, stages = excluded.stages, \
         additional_data = excluded.additional_data, start_time = excluded.start_time, \
         end_time = excluded.end_time",
        |b| {
            b.put(o.operation_id)
                .put(o.kind.as_str())
                .put(o.state.as_str())
                .put(&o.operator)
                .put(o.stage as i64)
                .put(stages_to_json(&o.stages))
                .put(serde_json::Value::Object(o.additional_data.clone()).to_string())
                .put(o.created_at)
                .put(o.start_time)
                .put(o.end_time);
        },
    )
}

fn save_command(tx: &rusqlite::Transaction<'_>, c: &CommandRecord) -> Result<(), StoreError> {
    let args = serde_json::Value::Object(c.args.clone()).to_string();
    write_one(
        tx,
        "INSERT INTO node_commands (command_id, node_id, command, args, status, \
             created_at, delivered_at, completed_at, error) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (command_id) DO UPDATE SET status = excluded.status, \
             delivered_at = excluded.delivered_at, completed_at = excluded.completed_at, \
             error = excluded.error",
        |b| {
            b.put(c.command_id)
                .put(&c.node_id)
                .put(c.kind.as_str())
                .put(args)
                .put(c.status.as_str())
                .put(c.created_at)
                .put(c.delivered_at)
                .put(c.completed_at)
                .put(&c.error);
        },
    )
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

    async fn task_with_runs(
        &self,
        task_id: TaskId,
    ) -> Result<Option<(TaskRecord, Vec<RunRecord>)>, StoreError> {
        // One read transaction: in WAL mode it reads one snapshot, whatever commits meanwhile.
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = ?"
        ))
        .bind(task_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(None);
        };
        let task = task_from_row(&row)?;
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE task_id = ? ORDER BY run_id"
        ))
        .bind(task_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let runs = rows.iter().map(run_from_row).collect::<Result<_, _>>()?;
        Ok(Some((task, runs)))
    }

    async fn tasks_with_runs(
        &self,
        task_ids: &[TaskId],
    ) -> Result<Vec<(TaskRecord, Vec<RunRecord>)>, StoreError> {
        // The ids travel as one JSON array: one statement whatever their number.
        let ids = format!(
            "[{}]",
            task_ids
                .iter()
                .map(TaskId::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut tx = self.pool.begin().await?;
        let task_rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE task_id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let run_rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE task_id IN (SELECT value FROM json_each(?1)) \
             ORDER BY run_id"
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut runs: HashMap<TaskId, Vec<RunRecord>> = HashMap::new();
        for row in &run_rows {
            let run = run_from_row(row)?;
            runs.entry(run.task_id).or_default().push(run);
        }
        task_rows
            .iter()
            .map(|row| {
                let task = task_from_row(row)?;
                let its_runs = runs.remove(&task.task_id).unwrap_or_default();
                Ok((task, its_runs))
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TaskSpec;
    use crate::store::Committer;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode_of(dir: &Path) -> u32 {
        std::fs::metadata(dir)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test]
    async fn the_data_directory_is_its_owner_s_alone_new_or_existing() {
        let root = tempfile::tempdir().expect("temp dir");
        let new = root.path().join("a/new");
        SqliteStore::open(&new, SyncMode::Normal)
            .await
            .expect("store");
        assert_eq!(mode_of(&new), 0o700);
        let existing = root.path().join("existing");
        std::fs::create_dir(&existing).expect("dir");
        std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        SqliteStore::open(&existing, SyncMode::Normal)
            .await
            .expect("store");
        assert_eq!(mode_of(&existing), 0o700);
    }

    fn task(task_id: TaskId, at: f64) -> TaskRecord {
        TaskRecord {
            task_id,
            spec: TaskSpec {
                code: format!("print({task_id})").into(),
                timeout: 30.0,
                resources: Resources {
                    cpu: 1.0,
                    memory: 256.0,
                },
                constraints: Constraints::default(),
                max_attempts: 3,
                submitted_by: None,
            },
            state: TaskState {
                task_id,
                points: 1,
                status: TaskStatus::Pending,
                result: None,
                error: None,
                attempts: 0,
                losses: 0,
                node_id: None,
                started_at: None,
                completed_at: None,
            },
            created_at: at,
        }
    }

    fn running(t: &TaskRecord, node: &str, at: f64) -> TaskState {
        TaskState {
            status: TaskStatus::Running,
            attempts: t.state.attempts + 1,
            node_id: Some(node.into()),
            started_at: Some(at),
            ..t.state.clone()
        }
    }

    fn completed(state: &TaskState, result: &str, at: f64) -> TaskState {
        TaskState {
            status: TaskStatus::Completed,
            result: Some(result.into()),
            completed_at: Some(at),
            ..state.clone()
        }
    }

    fn run(run_id: RunId, task_id: TaskId, node: &str, at: f64) -> RunRecord {
        RunRecord {
            node_id: Some(node.into()),
            started_at: at,
            ..RunRecord::sample(run_id, task_id, RunStatus::Running)
        }
    }

    async fn store() -> (tempfile::TempDir, Arc<SqliteStore>, SqliteCommitter) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path(), SyncMode::Normal)
            .await
            .expect("store opens");
        let committer = store.committer().expect("committer opens");
        (dir, store, committer)
    }

    #[test]
    fn statements_come_in_a_few_fixed_sizes_that_add_up() {
        for n in [0, 1, 2, 3, 7, 64, 127, 128, 129, 300, 1000, 4096] {
            let sizes: Vec<usize> = statement_sizes(n).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n, "{n}: {sizes:?}");
            assert!(
                sizes
                    .iter()
                    .all(|s| s.is_power_of_two() && *s <= MAX_ROWS_PER_STATEMENT),
                "{n}: {sizes:?}"
            );
        }
        assert_eq!(
            statement_sizes(300).collect::<Vec<_>>(),
            [128, 128, 32, 8, 4]
        );
    }

    #[test]
    fn every_statement_size_has_its_text_written_once() {
        let sql = MultiRowSql::new(|n| placeholders(2, n));
        for n in [1, 2, 3, 7, 64, 127, 128, 129, 300, 1000] {
            for size in statement_sizes(n) {
                assert_eq!(sql.of(size).matches("(?, ?)").count(), size, "{n}: {size}");
            }
        }
    }

    #[tokio::test]
    async fn a_batch_leaves_each_rows_last_state() {
        let (_dir, store, mut committer) = store().await;
        let first = task(1, 10.0);
        let second = task(2, 10.5);
        let started = running(&first, "n1", 11.0);
        let finished = completed(&started, "42", 12.0);
        let mut run_done = run(7, 1, "n1", 11.0);
        run_done.status = RunStatus::Completed;
        run_done.stdout = "42\n".into();
        run_done.exit_code = Some(0);
        run_done.completed_at = Some(12.0);
        // Created, started, run saved twice and finished, all in one commit.
        committer
            .apply(&[
                Change::TaskCreated(first.clone()),
                Change::TaskUpdated(started.clone()),
                Change::RunSaved(run(7, 1, "n1", 11.0)),
                Change::TaskCreated(second.clone()),
                Change::RunSaved(run_done.clone()),
                Change::TaskUpdated(finished.clone()),
            ])
            .expect("applied");

        let stored = store.task(1).await.expect("read").expect("task 1");
        assert_eq!(stored.state, finished);
        assert_eq!(stored.spec, first.spec);
        assert_eq!(stored.created_at, 10.0);
        assert_eq!(store.runs(1).await.expect("runs"), [run_done]);
        let pending = store.task(2).await.expect("read").expect("task 2");
        assert_eq!(pending.state, second.state);

        // A later commit updates rows that exist: the update path, not the insert.
        let second_started = running(&second, "n2", 13.0);
        committer
            .apply(&[
                Change::TaskUpdated(second_started.clone()),
                Change::RunSaved(run(8, 2, "n2", 13.0)),
            ])
            .expect("applied");
        let stored = store.task(2).await.expect("read").expect("task 2");
        assert_eq!(stored.state, second_started);
        assert_eq!(store.runs(2).await.expect("runs"), [run(8, 2, "n2", 13.0)]);
        assert_eq!(
            store.task(1).await.expect("read").expect("task 1").state,
            finished,
            "untouched"
        );
    }

    #[tokio::test]
    async fn long_batches_span_several_statements() {
        let (_dir, store, mut committer) = store().await;
        let n: TaskId = 300;
        let tasks: Vec<TaskRecord> = (1..=n).map(|id| task(id, id as f64)).collect();
        let created: Vec<Change> = tasks.iter().cloned().map(Change::TaskCreated).collect();
        committer.apply(&created).expect("created");
        assert_eq!(
            store
                .count_tasks(Some(TaskStatus::Pending), None)
                .await
                .expect("count"),
            300
        );

        let mut leases = Vec::new();
        let mut results = Vec::new();
        for t in &tasks {
            let started = running(t, "n1", 1000.0 + t.task_id as f64);
            leases.push(Change::TaskUpdated(started.clone()));
            leases.push(Change::RunSaved(run(
                t.task_id + 1000,
                t.task_id,
                "n1",
                1000.0,
            )));
            results.push(Change::TaskUpdated(completed(
                &started,
                &t.task_id.to_string(),
                2000.0,
            )));
        }
        committer.apply(&leases).expect("leased");
        assert_eq!(
            store
                .count_tasks(Some(TaskStatus::Running), None)
                .await
                .expect("count"),
            300
        );
        committer.apply(&results).expect("finished");
        assert_eq!(
            store
                .count_tasks(Some(TaskStatus::Completed), None)
                .await
                .expect("count"),
            300
        );
        for id in [1, 128, 129, 256, 257, 299, 300] {
            let t = store.task(id).await.expect("read").expect("task");
            assert_eq!(t.state.result.as_deref(), Some(id.to_string().as_str()));
            assert_eq!(t.state.started_at, Some(1000.0 + id as f64));
            assert_eq!(t.spec.code.as_ref(), format!("print({id})"));
            assert_eq!(store.runs(id).await.expect("runs").len(), 1);
        }
    }
}
