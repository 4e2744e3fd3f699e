-- Events after a position, never past one that an in-flight writer may still commit, with the
-- bound they were read under on every row (the store reads catch-up pages below a bound it has
-- seen with a plain indexed SELECT instead).
-- The live definition (as pg_get_functiondef prints it). Migrations are immutable: change a
-- function here, then copy the changed definition into a new migration; the schema test
-- (tests/it/schema.rs) fails while the migrated database differs from this folder.

CREATE OR REPLACE FUNCTION cqrs_read_page(after_position bigint, max_count bigint)
 RETURNS TABLE(event_position bigint, event_id uuid, stream_id text, version bigint, event_type text, schema_version integer, payload jsonb, command_id uuid, causation_id uuid, correlation_id uuid, headers jsonb, recorded_at_micros bigint, read_bound bigint, tags text[])
 LANGUAGE plpgsql
AS $function$
#variable_conflict use_column
DECLARE
    bound bigint := cqrs_read_bound();
BEGIN
    -- (c), with a snapshot taken after the bound's.
    RETURN QUERY
        SELECT e.position, e.event_id, e.stream_id, e.version, e.event_type, e.schema_version, e.payload,
               e.command_id, e.causation_id, e.correlation_id, e.headers,
               (extract(epoch FROM e.recorded_at) * 1000000)::bigint, bound, e.tags
        FROM cqrs_events e
        WHERE e.position > after_position AND e.position <= bound
        ORDER BY e.position
        LIMIT max_count;
END $function$
;
