-- Scale-out and shrink (seeds 002 and 003). Every node belongs to the group it joined with:
-- the nodes of one scale-out share a group, a node that joined on its own has one alone.
-- Group ids grow in joining order; nodes from before this migration get one each, in the
-- order they (last) joined.
ALTER TABLE nodes ADD COLUMN group_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN group_operation INTEGER;
UPDATE nodes SET group_id = (
    SELECT COUNT(*) FROM nodes AS earlier
    WHERE earlier.joined_at < nodes.joined_at
       OR (earlier.joined_at = nodes.joined_at AND earlier.node_id <= nodes.node_id)
);

-- Operations (seed 002's DAGs). `stages` is a JSON array of
-- {"name", "state", "message", "start_time", "end_time"}; `additional_data` a JSON object.
CREATE TABLE operations (
    operation_id    INTEGER PRIMARY KEY,
    kind            TEXT NOT NULL,
    state           TEXT NOT NULL,
    operator        TEXT NOT NULL,
    stage           INTEGER NOT NULL,
    stages          TEXT NOT NULL,
    additional_data TEXT NOT NULL DEFAULT '{}',
    created_at      REAL NOT NULL,
    start_time      REAL,
    end_time        REAL
);
CREATE INDEX operations_unfinished ON operations (state) WHERE state IN ('READY', 'RUNNING');
