-- The cqrs-postgres event store: tables, immutability guards, and the two functions every
-- append and every `read_all` go through. README.md ("Design") explains the ordering rules.

-- Global positions. CACHE 1 (the default) matters: with a per-session cache, `last_value`
-- would no longer be the highest number handed out, and the read bound below would be wrong.
CREATE SEQUENCE cqrs_position_seq AS bigint MINVALUE 1 START WITH 1 INCREMENT BY 1 CACHE 1 NO CYCLE;

-- One row per stream; its row lock serialises the appends to one stream until commit.
CREATE TABLE cqrs_streams (
    stream_id text PRIMARY KEY,
    version bigint NOT NULL DEFAULT 0 CHECK (version >= 0)
);

CREATE TABLE cqrs_events (
    position bigint PRIMARY KEY,
    event_id uuid NOT NULL CONSTRAINT cqrs_events_event_id_key UNIQUE,
    stream_id text NOT NULL,
    version bigint NOT NULL CHECK (version >= 1),
    event_type text NOT NULL,
    schema_version integer NOT NULL CHECK (schema_version >= 0),
    payload jsonb NOT NULL,
    command_id uuid,
    causation_id uuid,
    correlation_id uuid,
    headers jsonb NOT NULL DEFAULT '{}',
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT cqrs_events_stream_version_key UNIQUE (stream_id, version)
);

-- Idempotency: the result of every append that carried a command id, per stream.
CREATE TABLE cqrs_commands (
    stream_id text NOT NULL,
    command_id uuid NOT NULL,
    first_version bigint NOT NULL,
    last_version bigint NOT NULL,
    first_position bigint NOT NULL,
    last_position bigint NOT NULL,
    PRIMARY KEY (stream_id, command_id)
);

CREATE TABLE cqrs_checkpoints (
    name text PRIMARY KEY,
    position bigint NOT NULL CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Stored events are immutable.
CREATE FUNCTION cqrs_events_are_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cqrs_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER cqrs_events_no_update_or_delete BEFORE UPDATE OR DELETE ON cqrs_events
    FOR EACH ROW EXECUTE FUNCTION cqrs_events_are_immutable();
CREATE TRIGGER cqrs_events_no_truncate BEFORE TRUNCATE ON cqrs_events
    FOR EACH STATEMENT EXECUTE FUNCTION cqrs_events_are_immutable();

-- Appends a batch of appends in the caller's transaction, each checked and answered on its own.
--
-- `appends` is a JSON array of {"s": stream id, "e": "any" | "no_stream" | "exists" | "exact",
-- "v": expected version (for "exact"), "c": command id or null, "ev": [{"id": event id,
-- "t": type, "sv": schema version, "p": payload, "ca": causation id, "co": correlation id,
-- "h": headers}]}. One result row per append, in input order: outcome "appended",
-- "duplicate" (the command id was already stored: the first result is returned),
-- "conflict" (expected version refused; `actual_version` says why) or "duplicate_event_id"
-- (checked only for a batch of one append: in a larger batch a reused event id fails the whole
-- batch with a unique violation on cqrs_events_event_id_key).
-- A refused append writes nothing (its checks run before its first write), so no savepoint is
-- needed. The caller sorts appends by stream id, so concurrent batches lock streams in one order.
CREATE FUNCTION cqrs_append_batch(appends jsonb)
RETURNS TABLE (
    append_index integer,
    outcome text,
    actual_version bigint,
    first_version bigint,
    last_version bigint,
    first_position bigint,
    last_position bigint,
    duplicate_event_id uuid
)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    -- High bits that mark our advisory lock keys (0x4351 << 48): see cqrs_read_all.
    lock_marker CONSTANT bigint := 4850658273654734848;
    next_position bigint;
    item jsonb;
    item_index integer;
    sid text;
    expected_kind text;
    command uuid;
    current_version bigint;
    n_events integer;
    positions bigint[];
    existing_event uuid;
    prior record;
    newest bigint := 0;
    single CONSTANT boolean := jsonb_array_length(appends) = 1;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'cqrs_append_batch needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    -- The watermark lock, taken before this transaction's first nextval: its key is at most
    -- every position the transaction will get, and it is held until commit or rollback.
    SELECT CASE WHEN s.is_called THEN s.last_value + 1 ELSE s.last_value END
        INTO next_position FROM cqrs_position_seq s;
    PERFORM pg_advisory_xact_lock_shared(lock_marker + next_position);

    FOR item, item_index IN
        SELECT a.value, (a.ordinality - 1)::integer FROM jsonb_array_elements(appends) WITH ORDINALITY a
    LOOP
        sid := item->>'s';
        expected_kind := item->>'e';
        command := (item->>'c')::uuid;
        append_index := item_index;
        first_version := NULL;
        last_version := NULL;
        first_position := NULL;
        last_position := NULL;
        duplicate_event_id := NULL;
        -- Lock the stream row before allocating any position for it: per-stream order is then
        -- position order, and the checks below cannot race. (Insert it first if it is new.)
        SELECT s.version INTO current_version FROM cqrs_streams s WHERE s.stream_id = sid FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO cqrs_streams AS s (stream_id, version) VALUES (sid, 0) ON CONFLICT (stream_id) DO NOTHING;
            SELECT s.version INTO current_version FROM cqrs_streams s WHERE s.stream_id = sid FOR UPDATE;
        END IF;
        actual_version := current_version;

        IF command IS NOT NULL THEN
            SELECT c.first_version, c.last_version, c.first_position, c.last_position INTO prior
                FROM cqrs_commands c WHERE c.stream_id = sid AND c.command_id = command;
            IF FOUND THEN
                outcome := 'duplicate';
                first_version := prior.first_version;
                last_version := prior.last_version;
                first_position := prior.first_position;
                last_position := prior.last_position;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;

        IF NOT (expected_kind = 'any'
            OR (expected_kind = 'no_stream' AND current_version = 0)
            OR (expected_kind = 'exists' AND current_version > 0)
            OR (expected_kind = 'exact' AND current_version = (item->>'v')::bigint)) THEN
            outcome := 'conflict';
            RETURN NEXT;
            CONTINUE;
        END IF;

        -- A reused event id: looked up only for a batch of one append. In a larger batch the
        -- unique index aborts the batch, and the caller retries its appends one by one.
        IF single THEN
            SELECT ev.event_id INTO existing_event FROM cqrs_events ev
                WHERE ev.event_id IN (SELECT (e.value->>'id')::uuid FROM jsonb_array_elements(item->'ev') e)
                LIMIT 1;
            IF FOUND THEN
                outcome := 'duplicate_event_id';
                duplicate_event_id := existing_event;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;

        n_events := jsonb_array_length(item->'ev');
        IF n_events = 1 THEN
            positions := ARRAY[nextval('cqrs_position_seq')];
        ELSE
            -- Sorted, so the i-th event gets the i-th smallest number whatever the evaluation order.
            SELECT array_agg(allocated.p ORDER BY allocated.p) INTO positions
                FROM (SELECT nextval('cqrs_position_seq') AS p FROM generate_series(1, n_events)) allocated;
        END IF;
        INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload,
                                 command_id, causation_id, correlation_id, headers)
        SELECT positions[e.ordinality::integer], (e.value->>'id')::uuid, sid, current_version + e.ordinality,
               e.value->>'t', (e.value->>'sv')::integer, e.value->'p', command, (e.value->>'ca')::uuid,
               (e.value->>'co')::uuid, coalesce(e.value->'h', '{}'::jsonb)
        FROM jsonb_array_elements(item->'ev') WITH ORDINALITY e;
        UPDATE cqrs_streams s SET version = current_version + n_events WHERE s.stream_id = sid;
        IF command IS NOT NULL THEN
            INSERT INTO cqrs_commands (stream_id, command_id, first_version, last_version, first_position,
                                       last_position)
            VALUES (sid, command, current_version + 1, current_version + n_events, positions[1],
                    positions[n_events]);
        END IF;
        newest := greatest(newest, positions[n_events]);
        outcome := 'appended';
        first_version := current_version + 1;
        last_version := current_version + n_events;
        first_position := positions[1];
        last_position := positions[n_events];
        RETURN NEXT;
    END LOOP;

    -- Delivered at commit only; the payload is a wake-up token, never event data. Sent even
    -- when nothing was appended: this transaction's watermark lock may have held readers back.
    PERFORM pg_notify('cqrs_events', newest::text);
END $$;

-- Reads events after a position, never past one that an in-flight writer may still commit.
--
-- Three statements, three snapshots (a VOLATILE plpgsql function under READ COMMITTED takes a
-- fresh snapshot per statement), in this order: (a) the highest position handed out;
-- (b) the smallest watermark lock key still held in this database; (c) the events up to
-- least(a, b - 1). README.md ("Design") has the proof that (c) misses no event below its bound.
CREATE FUNCTION cqrs_read_all(after_position bigint, max_count bigint)
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
    lock_marker CONSTANT bigint := 4850658273654734848;
    allocated bigint;
    oldest_writer bigint;
    bound bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'cqrs_read_all needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    -- (a)
    SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END INTO allocated FROM cqrs_position_seq s;
    -- (b) A bigint advisory key k shows as classid = k >> 32, objid = k & 0xffffffff, objsubid = 1.
    SELECT min((l.classid::bigint << 32) | l.objid::bigint) - lock_marker INTO oldest_writer
        FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND (l.classid::bigint >> 16) = 17233
          AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database());
    bound := least(allocated, oldest_writer - 1);
    -- (c)
    RETURN QUERY
        SELECT e.position, e.event_id, e.stream_id, e.version, e.event_type, e.schema_version, e.payload,
               e.command_id, e.causation_id, e.correlation_id, e.headers,
               (extract(epoch FROM e.recorded_at) * 1000000)::bigint
        FROM cqrs_events e
        WHERE e.position > after_position AND e.position <= bound
        ORDER BY e.position
        LIMIT max_count;
END $$;
