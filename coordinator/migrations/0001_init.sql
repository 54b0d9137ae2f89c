-- Lull's durable state. Times are unix seconds (REAL). JSON columns hold TEXT.

CREATE TABLE tasks (
    task_id      INTEGER PRIMARY KEY,
    code         TEXT    NOT NULL,
    timeout      REAL    NOT NULL,
    cpu          REAL    NOT NULL,
    memory_mb    REAL    NOT NULL,
    constraints  TEXT    NOT NULL DEFAULT '{}',
    max_attempts INTEGER NOT NULL,
    points       INTEGER NOT NULL DEFAULT 1,
    status       TEXT    NOT NULL,
    result       TEXT,
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    losses       INTEGER NOT NULL DEFAULT 0,
    node_id      TEXT,
    created_at   REAL    NOT NULL,
    started_at   REAL,
    completed_at REAL
);
CREATE INDEX tasks_status ON tasks (status, task_id);
CREATE INDEX tasks_completed_at ON tasks (completed_at);

CREATE TABLE runs (
    run_id       INTEGER PRIMARY KEY,
    task_id      INTEGER NOT NULL,
    node_id      TEXT,
    attempt      INTEGER NOT NULL,
    status       TEXT    NOT NULL,
    exit_code    INTEGER,
    stdout       TEXT    NOT NULL DEFAULT '',
    stderr       TEXT    NOT NULL DEFAULT '',
    error        TEXT,
    started_at   REAL    NOT NULL,
    completed_at REAL,
    cpu_seconds  REAL,
    max_rss_mb   REAL
);
CREATE INDEX runs_task ON runs (task_id, run_id);
CREATE INDEX runs_active ON runs (status) WHERE status IN ('assigned', 'running');

CREATE TABLE nodes (
    node_id        TEXT PRIMARY KEY,
    hostname       TEXT NOT NULL,
    node_type      TEXT NOT NULL,
    zone           TEXT,
    cpu_cores      REAL NOT NULL,
    memory_mb      REAL NOT NULL,
    meta           TEXT NOT NULL DEFAULT '{}',
    status         TEXT NOT NULL,
    version        TEXT,
    joined_at      REAL NOT NULL,
    last_heartbeat REAL NOT NULL
);
