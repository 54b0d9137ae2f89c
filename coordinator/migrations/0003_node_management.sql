-- Node management (seed 004): an operator's drain of a node, and the commands sent to nodes.
ALTER TABLE nodes ADD COLUMN drain_requested_at REAL;
ALTER TABLE nodes ADD COLUMN drain_deadline REAL;

CREATE TABLE node_commands (
    command_id   INTEGER PRIMARY KEY,
    node_id      TEXT NOT NULL,
    command      TEXT NOT NULL,
    args         TEXT NOT NULL DEFAULT '{}',
    status       TEXT NOT NULL,
    created_at   REAL NOT NULL,
    delivered_at REAL,
    completed_at REAL,
    error        TEXT
);
CREATE INDEX node_commands_active ON node_commands (status)
    WHERE status IN ('pending', 'delivered');
