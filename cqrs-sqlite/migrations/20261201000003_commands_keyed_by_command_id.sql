-- Command ids are time-ordered (UUID v7). Keyed by (stream_id, command_id), the command rows
-- of one group commit over many streams each landed on a random leaf of the key (one dirty
-- page, one WAL frame per stream); keyed by (command_id, stream_id) they land together on the
-- rightmost leaves. Every lookup gives both columns, so any order of the key serves it.
CREATE TABLE cqrs_commands_by_id (
    command_id BLOB NOT NULL,
    stream_id TEXT NOT NULL,
    first_version INTEGER NOT NULL,
    last_version INTEGER NOT NULL,
    first_position INTEGER NOT NULL,
    last_position INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (command_id, stream_id)
) STRICT, WITHOUT ROWID;

INSERT INTO cqrs_commands_by_id
    (command_id, stream_id, first_version, last_version, first_position, last_position, recorded_at)
SELECT command_id, stream_id, first_version, last_version, first_position, last_position, recorded_at
FROM cqrs_commands;

DROP TABLE cqrs_commands;
ALTER TABLE cqrs_commands_by_id RENAME TO cqrs_commands;
CREATE INDEX cqrs_commands_recorded_at ON cqrs_commands (recorded_at);
