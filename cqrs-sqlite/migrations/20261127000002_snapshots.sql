-- Aggregate snapshots: a cache of one state per stream (the newest wins). Deleting rows here
-- changes nothing but load time.
CREATE TABLE cqrs_snapshots (
    stream_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL CHECK (version >= 0),
    schema_version INTEGER NOT NULL CHECK (schema_version >= 0),
    state TEXT NOT NULL,
    -- Microseconds since the Unix epoch.
    saved_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
