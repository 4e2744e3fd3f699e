-- The position of the last event a reader can read now (0 if none): EventStore::head.
-- The live definition (as pg_get_functiondef prints it). Migrations are immutable: change a
-- function here, then copy the changed definition into a new migration; the schema test
-- (tests/it/schema.rs) fails while the migrated database differs from this folder.

CREATE OR REPLACE FUNCTION cqrs_head()
 RETURNS bigint
 LANGUAGE plpgsql
AS $function$
DECLARE
    bound bigint := cqrs_read_bound();
BEGIN
    RETURN coalesce((SELECT max(e.position) FROM cqrs_events e WHERE e.position <= bound), 0);
END $function$
;
