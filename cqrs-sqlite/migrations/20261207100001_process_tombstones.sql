-- An ended process manager instance keeps its row as a tombstone (ended = 1, with the position
-- of the event that ended it), so a replay after a lagging checkpoint finds its events handled
-- instead of starting it again. Tombstones at or below the process manager's checkpoint are
-- pruned by its scheduler.
ALTER TABLE cqrs_processes ADD COLUMN ended INTEGER NOT NULL DEFAULT 0 CHECK (ended IN (0, 1));
