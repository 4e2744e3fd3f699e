-- The retention of command ids (`EventStore::prune_commands`): when each was stored, in
-- microseconds since the Unix epoch. Rows stored before this migration count from now.
ALTER TABLE cqrs_commands ADD COLUMN recorded_at INTEGER NOT NULL DEFAULT 0;
UPDATE cqrs_commands SET recorded_at = CAST(strftime('%s', 'now') AS INTEGER) * 1000000;
CREATE INDEX cqrs_commands_recorded_at ON cqrs_commands (recorded_at);
