-- The highest position a reader may read up to now: no transaction still in flight can commit
-- an event at or below it. Two statements, two snapshots, in this order: (a) the highest position
-- handed out; (b) the smallest watermark lock key still held in this database. The proof is in
-- ../README.md ("A global position that never skips").
-- The live definition (as pg_get_functiondef prints it). Migrations are immutable: change a
-- function here, then copy the changed definition into a new migration; the schema test
-- (tests/it/schema.rs) fails while the migrated database differs from this folder.

CREATE OR REPLACE FUNCTION cqrs_read_bound()
 RETURNS bigint
 LANGUAGE plpgsql
AS $function$
DECLARE
    lock_marker CONSTANT bigint := cqrs_lock_marker();
    allocated bigint;
    oldest_writer bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'cqrs_read_bound needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    -- (a)
    SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END INTO allocated FROM cqrs_position_seq s;
    -- (b) A bigint advisory key k shows as classid = k >> 32, objid = k & 0xffffffff, objsubid = 1.
    SELECT min((l.classid::bigint << 32) | l.objid::bigint) - lock_marker INTO oldest_writer
        FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND (l.classid::bigint >> 16) = (lock_marker >> 48)
          AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database());
    RETURN least(allocated, oldest_writer - 1);
END $function$
;
