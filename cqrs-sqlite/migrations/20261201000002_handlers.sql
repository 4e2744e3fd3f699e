-- What handlers keep beside their checkpoints: claims (one active consumer per handler across
-- the processes that open this file), parked events, process manager state and scheduled
-- commands. Times are microseconds since the Unix epoch, by the writing process's clock (all
-- processes on one SQLite file share a machine, hence a clock).

CREATE TABLE cqrs_claims (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    token INTEGER NOT NULL CHECK (token >= 1),
    expires_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE cqrs_parked (
    handler TEXT NOT NULL,
    position INTEGER NOT NULL,
    event_id BLOB NOT NULL CHECK (length(event_id) = 16),
    stream_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    sequence TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL CHECK (attempts >= 0),
    parked_at INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('parked', 'retry')),
    PRIMARY KEY (handler, position)
) STRICT, WITHOUT ROWID;

CREATE TABLE cqrs_processes (
    process TEXT NOT NULL,
    key TEXT NOT NULL,
    state TEXT NOT NULL,
    position INTEGER NOT NULL CHECK (position >= 0),
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (process, key)
) STRICT, WITHOUT ROWID;

CREATE TABLE cqrs_scheduled (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    due INTEGER NOT NULL,
    command TEXT NOT NULL,
    command_id BLOB NOT NULL CHECK (length(command_id) = 16),
    PRIMARY KEY (owner, key, name)
) STRICT, WITHOUT ROWID;
CREATE INDEX cqrs_scheduled_due ON cqrs_scheduled (owner, due);
