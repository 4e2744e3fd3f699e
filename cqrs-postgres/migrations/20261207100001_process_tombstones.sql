-- An ended process manager instance keeps its row as a tombstone (ended, with the position of
-- the event that ended it), so a replay after a lagging checkpoint finds its events handled
-- instead of starting it again. Tombstones at or below the process manager's checkpoint are
-- pruned by its scheduler.
ALTER TABLE cqrs_processes ADD COLUMN ended boolean NOT NULL DEFAULT false;
