-- One row per event (issue 23, item 1). An append wrote three rows: its events, its stream's
-- version (`cqrs_streams`) and its command id (`cqrs_commands`, with a second index for
-- retention). Each touched its own pages, and every dirty page is a WAL frame the commit's
-- fsync waits for. The event row carries both already:
--
-- - a stream's version is the largest `version` of its events, one step down the
--   (stream_id, version) key (events are never deleted, so it only grows);
-- - an append's command id is the `command_id` of each of its events (every event of an append
--   shares it, and an append has at least one), found by the partial index below; its first
--   outcome is the smallest and largest version and position of those events.
--
-- Retention (`prune_commands`) cannot delete immutable rows, so it forgets by position: the
-- command ids of events at or below `cqrs_command_horizon.position` are forgotten. Positions
-- follow commit order and each commit's `recorded_at` is taken when it starts, so the log's
-- prefix recorded before a time is what pruning up to that time forgets.
CREATE INDEX cqrs_events_command ON cqrs_events (command_id, stream_id) WHERE command_id IS NOT NULL;

CREATE TABLE cqrs_command_horizon (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    position INTEGER NOT NULL CHECK (position >= 0)
) STRICT;

-- Command ids pruned before this migration: their events carry the id but their row is gone.
-- The horizon goes past the last of them. Every id still kept has its events above it: pruning
-- forgot every row recorded before some time, rows were recorded when their events committed
-- (or, for rows older than retention itself, all at once when it came, after their events), so
-- a kept id's events committed after every forgotten one's (unless the clock went back between
-- them: then that id is forgotten early, as pruning itself would have done).
INSERT INTO cqrs_command_horizon (id, position)
SELECT 1, coalesce(max(event.position), 0)
FROM cqrs_events AS event
WHERE event.command_id IS NOT NULL
  AND NOT EXISTS (
      SELECT 1 FROM cqrs_commands AS command
      WHERE command.command_id = event.command_id
        AND command.stream_id = event.stream_id
        AND event.position BETWEEN command.first_position AND command.last_position
  );

DROP TABLE cqrs_commands;
DROP TABLE cqrs_streams;
