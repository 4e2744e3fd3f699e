-- The cqrs-sqlite event store. README.md ("Design") explains the ordering rules. All tables are
-- STRICT, so a value of the wrong type is refused instead of silently stored.

-- One row per stream: its current version, checked against each append's expectation.
CREATE TABLE cqrs_streams (
    stream_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL CHECK (version >= 0)
) STRICT, WITHOUT ROWID;

-- The log. `position` is the rowid, assigned by the single writer in commit order.
CREATE TABLE cqrs_events (
    position INTEGER PRIMARY KEY CHECK (position >= 1),
    event_id BLOB NOT NULL CHECK (length(event_id) = 16),
    stream_id TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    event_type TEXT NOT NULL,
    schema_version INTEGER NOT NULL CHECK (schema_version >= 0),
    payload TEXT NOT NULL,
    command_id BLOB,
    causation_id BLOB,
    correlation_id BLOB,
    headers TEXT NOT NULL DEFAULT '{}',
    -- Microseconds since the Unix epoch.
    recorded_at INTEGER NOT NULL
) STRICT;

CREATE UNIQUE INDEX cqrs_events_event_id_key ON cqrs_events (event_id);
CREATE UNIQUE INDEX cqrs_events_stream_version_key ON cqrs_events (stream_id, version);

-- Idempotency: the result of every append that carried a command id, per stream.
CREATE TABLE cqrs_commands (
    stream_id TEXT NOT NULL,
    command_id BLOB NOT NULL,
    first_version INTEGER NOT NULL,
    last_version INTEGER NOT NULL,
    first_position INTEGER NOT NULL,
    last_position INTEGER NOT NULL,
    PRIMARY KEY (stream_id, command_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE cqrs_checkpoints (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL CHECK (position >= 0),
    -- Microseconds since the Unix epoch.
    updated_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Stored events are immutable.
CREATE TRIGGER cqrs_events_no_update BEFORE UPDATE ON cqrs_events
BEGIN
    SELECT RAISE(ABORT, 'cqrs_events is append-only: UPDATE is not allowed');
END;

CREATE TRIGGER cqrs_events_no_delete BEFORE DELETE ON cqrs_events
BEGIN
    SELECT RAISE(ABORT, 'cqrs_events is append-only: DELETE is not allowed');
END;
