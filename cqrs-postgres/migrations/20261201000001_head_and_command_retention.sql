-- The store's head (`EventStore::head`) and the retention of command ids
-- (`EventStore::prune_commands`).

-- When each command id was stored, so ids older than the retention can be forgotten.
ALTER TABLE cqrs_commands ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX cqrs_commands_recorded_at ON cqrs_commands (recorded_at);

-- The highest position a reader may read up to now: no transaction that is still in flight can
-- commit an event at or below it. Two statements, two snapshots, in this order: (a) the highest
-- position handed out; (b) the smallest watermark lock key still held in this database.
-- README.md ("Design") has the proof.
CREATE FUNCTION cqrs_read_bound() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    lock_marker CONSTANT bigint := 4850658273654734848;
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
        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND (l.classid::bigint >> 16) = 17233
          AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database());
    RETURN least(allocated, oldest_writer - 1);
END $$;

-- Reads events after a position, never past one that an in-flight writer may still commit
-- (the same function as before, with the bound computed by cqrs_read_bound).
CREATE OR REPLACE FUNCTION cqrs_read_all(after_position bigint, max_count bigint)
RETURNS TABLE (
    event_position bigint, -- `position` cannot name a parameter
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
    recorded_at_micros bigint
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
               (extract(epoch FROM e.recorded_at) * 1000000)::bigint
        FROM cqrs_events e
        WHERE e.position > after_position AND e.position <= bound
        ORDER BY e.position
        LIMIT max_count;
END $$;

-- The position of the last event `cqrs_read_all` can return now (0 if none).
CREATE FUNCTION cqrs_head() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    bound bigint := cqrs_read_bound();
BEGIN
    RETURN coalesce((SELECT max(e.position) FROM cqrs_events e WHERE e.position <= bound), 0);
END $$;
