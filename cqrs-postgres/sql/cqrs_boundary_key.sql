-- The advisory lock key of one consistency boundary, a pair (event type, tag) where '*' stands
-- for "any": taken SHARED by every writer of a matching event, EXCLUSIVE by a conditional append
-- (cqrs_lock_boundaries). A hash collision only serialises more, never less. The keys use the
-- two-int4 form of the advisory locks with class 17475 (0x4443), so they never look like the
-- watermark's bigint keys that cqrs_read_bound scans for (objsubid 2, not 1).
-- The live definition (as pg_get_functiondef prints it). Migrations are immutable: change a
-- function here, then copy the changed definition into a new migration; the schema test
-- (tests/it/schema.rs) fails while the migrated database differs from this folder.

CREATE OR REPLACE FUNCTION cqrs_boundary_key(event_type text, tag text)
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$ SELECT hashtext(event_type || chr(31) || tag) $function$
;
