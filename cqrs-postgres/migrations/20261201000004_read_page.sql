-- `cqrs_read_all` that also returns the bound it read under, on every row. A bound B read at
-- some moment stays valid: every event with a position <= B that will ever commit had
-- committed by then (README.md, "A global position that never skips"), so any statement whose
-- snapshot is taken later sees all of them. The store remembers the highest bound it has seen
-- and reads a catch-up page below it with a plain indexed SELECT, without scanning pg_locks
-- and without this function's materialised result.
CREATE FUNCTION cqrs_read_page(after_position bigint, max_count bigint)
RETURNS TABLE (
    event_position bigint,
    event_id uuid,
    stream_id text,
    version bigint,
    event_type text,
    schema_version integer,
    payload jsonb,
    command_id uuid,
    causation_id uuid,
    correlation_id uuid,
    headers jsonb,
    recorded_at_micros bigint,
    read_bound bigint
)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    bound bigint := cqrs_read_bound();
BEGIN
    -- (c), with a snapshot taken after the bound's.
    RETURN QUERY
        SELECT e.position, e.event_id, e.stream_id, e.version, e.event_type, e.schema_version, e.payload,
               e.command_id, e.causation_id, e.correlation_id, e.headers,
               (extract(epoch FROM e.recorded_at) * 1000000)::bigint, bound
        FROM cqrs_events e
        WHERE e.position > after_position AND e.position <= bound
        ORDER BY e.position
        LIMIT max_count;
END $$;
