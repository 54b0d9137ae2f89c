//! Durable state: one [`Store`] trait, a SQLite backend, and the [`Writer`] that batches
//! every change into group commits.
//!
//! The store is the read model: every HTTP read of tasks, runs and results is answered from
//! here (the scheduler only holds unfinished work). Writes come only through the writer,
//! in the order the scheduler produced them.
//!
//! Architecture Invariant: only this module knows SQL. Nothing here decides anything about
//! scheduling; a change is applied as given.

pub mod key_cache;
mod sqlite;
mod writer;

pub use key_cache::CachedKeys;
pub use sqlite::{SqliteCommitter, SqliteStore, SyncMode};
pub use writer::{Ack, CommitObserver, Writer, WriterHandle, WriterStopped};

use crate::keys::{ApiKey, NewKey};
use crate::model::{Change, CommandRecord, RunRecord, Snapshot, TaskRecord};
use async_trait::async_trait;
use lull_shared::{CommandStatus, TaskId, TaskStatus};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row in {table}: {what}")]
    Corrupt { table: &'static str, what: String },
    #[error("could not prepare the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("could not start the store writer's thread: {0}")]
    WriterThread(std::io::Error),
    #[error("the store writer has stopped")]
    WriterGone,
}

/// Which tasks to list, and which page.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub status: Option<TaskStatus>,
    pub limit: u32,
    pub offset: u64,
    /// Keyset paging: only tasks with a larger id.
    pub after: Option<TaskId>,
    /// Only tasks submitted with this API key (a submitter sees its own).
    pub submitted_by: Option<i64>,
}

/// Which node commands to list: newest first, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct CommandQuery {
    pub node_id: Option<String>,
    pub status: Option<CommandStatus>,
    pub limit: u32,
}

/// Which operations to list: newest first, one page.
#[derive(Debug, Clone, Default)]
pub struct OperationQuery {
    pub kind: Option<crate::operations::OperationKind>,
    pub state: Option<crate::operations::OperationState>,
    pub limit: u32,
    pub offset: u64,
}

/// A page of results (seed 001's `/results`).
#[derive(Debug, Clone)]
pub struct ResultRow {
    pub task_id: TaskId,
    pub result: Option<String>,
    pub completed_at: Option<f64>,
}

/// Figures for `/stats`.
#[derive(Debug, Clone, Default)]
pub struct TaskStats {
    pub total: u64,
    pub by_status: Vec<(TaskStatus, u64)>,
    /// Mean seconds from start to completion of completed tasks.
    pub avg_time: Option<f64>,
    /// Tasks that finished (completed or failed) in the last hour.
    pub finished_last_hour: u64,
    /// Seconds of run time summed over every finished run.
    pub compute_seconds: f64,
}

impl TaskStats {
    pub fn count(&self, status: TaskStatus) -> u64 {
        self.by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    }
}

/// Applies the writer's commits: blocking, on the writer's own thread, one call per commit.
pub trait Committer: Send + 'static {
    /// Applies changes in order, atomically.
    fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError>;
}

/// The read model (and what a restart resumes from); written only through a [`Committer`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Everything the scheduler needs to resume after a restart.
    async fn load(&self) -> Result<Snapshot, StoreError>;
    async fn task(&self, task_id: TaskId) -> Result<Option<TaskRecord>, StoreError>;
    async fn runs(&self, task_id: TaskId) -> Result<Vec<RunRecord>, StoreError>;
    /// The task and its runs from one snapshot: read apart, a commit in between could show a
    /// task still pending beside its running runs.
    async fn task_with_runs(
        &self,
        task_id: TaskId,
    ) -> Result<Option<(TaskRecord, Vec<RunRecord>)>, StoreError>;
    /// The tasks of `task_ids` that exist, each with its runs, from one snapshot (in no
    /// particular order).
    async fn tasks_with_runs(
        &self,
        task_ids: &[TaskId],
    ) -> Result<Vec<(TaskRecord, Vec<RunRecord>)>, StoreError>;
    async fn tasks(&self, query: &TaskQuery) -> Result<Vec<TaskRecord>, StoreError>;
    /// Tasks with `status` (any if `None`), submitted with key `submitted_by` if given.
    async fn count_tasks(
        &self,
        status: Option<TaskStatus>,
        submitted_by: Option<i64>,
    ) -> Result<u64, StoreError>;
    /// Completed tasks' results; only those submitted with key `submitted_by` if given.
    async fn results(
        &self,
        limit: u32,
        offset: u64,
        after: Option<TaskId>,
        submitted_by: Option<i64>,
    ) -> Result<Vec<ResultRow>, StoreError>;
    async fn stats(&self, now: f64) -> Result<TaskStats, StoreError>;
    /// Tasks completed per whole minute (Unix seconds / 60) since `since`, oldest first;
    /// minutes with none are left out.
    async fn completed_per_minute(&self, since: f64) -> Result<Vec<(i64, u64)>, StoreError>;
    /// Node commands, newest first.
    async fn commands(&self, query: &CommandQuery) -> Result<Vec<CommandRecord>, StoreError>;
    /// One operation (scale-out, shrink).
    async fn operation(
        &self,
        operation_id: i64,
    ) -> Result<Option<crate::operations::OperationRecord>, StoreError>;
    /// Operations, newest first.
    async fn operations(
        &self,
        query: &OperationQuery,
    ) -> Result<Vec<crate::operations::OperationRecord>, StoreError>;
    /// A cheap liveness check for `/health`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// API keys (see [`crate::keys`]). Read on every authenticated request; written by the
/// `keys` CLI and `/api/v1/keys`, directly (keys are not scheduler state).
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a new key (its token hashed) and answers it as stored.
    async fn create_key(&self, key: &NewKey, now: f64) -> Result<ApiKey, StoreError>;
    /// Every key, revoked ones too, oldest first.
    async fn keys(&self) -> Result<Vec<ApiKey>, StoreError>;
    /// The key whose token hashes to `token_hash`, revoked or not.
    async fn key_by_token_hash(&self, token_hash: &str) -> Result<Option<ApiKey>, StoreError>;
    /// Marks a key revoked (once: revoking again keeps the first time). `None` if unknown.
    async fn revoke_key(&self, key_id: i64, now: f64) -> Result<Option<ApiKey>, StoreError>;
}
