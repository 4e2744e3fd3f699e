-- The high 16 bits (0x4351) that mark this store's advisory lock keys, in one place: a writer's
-- watermark lock is `cqrs_lock_marker() + its first position` (cqrs_append_batch,
-- cqrs_append_arrays), and cqrs_read_bound finds the oldest one held by these bits in pg_locks.
-- The live definition (as pg_get_functiondef prints it). Migrations are immutable: change a
-- function here, then copy the changed definition into a new migration; the schema test
-- (tests/it/schema.rs) fails while the migrated database differs from this folder.

CREATE OR REPLACE FUNCTION cqrs_lock_marker()
 RETURNS bigint
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$ SELECT 4850658273654734848::bigint $function$
;
