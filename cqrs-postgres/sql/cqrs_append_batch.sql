-- One batch of appends given as JSON, checked and written append by append (for a lone append:
-- its per-append statements cost less than the set-based cqrs_append_arrays). The two-argument
-- form says whether to NOTIFY at commit; the one-argument form (always notifies) stays for nodes
-- of the previous release during a rolling upgrade.
-- An event's tags are "g" (joined by chr(31); tags hold no control characters). An append with a
-- condition carries "q": {"a": after, "i": [{"t": [types], "g": [tags]}]}; it is answered
-- 'condition_failed' (first_position: the first matching event after "a") when an event matching
-- an item is stored after "a". Each event's tags also go to cqrs_event_tags. Boundary locks make the check exact (README, "Dynamic Consistency
-- Boundaries"), and a later append of the batch sees the earlier ones.
-- The live definition (as pg_get_functiondef prints it). Migrations are immutable: change a
-- function here, then copy the changed definition into a new migration; the schema test
-- (tests/it/schema.rs) fails while the migrated database differs from this folder.

CREATE OR REPLACE FUNCTION cqrs_append_batch(appends jsonb)
 RETURNS TABLE(append_index integer, outcome text, actual_version bigint, first_version bigint, last_version bigint, first_position bigint, last_position bigint, duplicate_event_id uuid)
 LANGUAGE sql
AS $function$
    SELECT * FROM cqrs_append_batch(appends, true)
$function$
;

CREATE OR REPLACE FUNCTION cqrs_append_batch(appends jsonb, notify boolean)
 RETURNS TABLE(append_index integer, outcome text, actual_version bigint, first_version bigint, last_version bigint, first_position bigint, last_position bigint, duplicate_event_id uuid)
 LANGUAGE plpgsql
AS $function$
#variable_conflict use_column
DECLARE
    -- The high bits that mark our advisory lock keys: see cqrs_lock_marker and cqrs_read_bound.
    lock_marker CONSTANT bigint := cqrs_lock_marker();
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
    failed_at bigint;
    newest bigint := 0;
    previous_outcome text := NULL;
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
    -- The boundary locks of the whole batch, before any stream row lock or nextval: shared for
    -- every event written, exclusive for every condition item (its first tag, or its types).
    PERFORM cqrs_lock_boundaries(
        ARRAY(SELECT e.value->>'t' FROM jsonb_array_elements(appends) a,
              jsonb_array_elements(a.value->'ev') e),
        ARRAY(SELECT coalesce(e.value->>'g', '') FROM jsonb_array_elements(appends) a,
              jsonb_array_elements(a.value->'ev') e),
        ARRAY(SELECT cqrs_boundary_key(coalesce(ty.ty, '*'), coalesce(it.value->'g'->>0, '*'))
              FROM jsonb_array_elements(appends) a
              CROSS JOIN LATERAL jsonb_array_elements(coalesce(a.value->'q'->'i', '[]')) it
              LEFT JOIN LATERAL jsonb_array_elements_text(it.value->'t') ty(ty) ON true));

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
        -- A chain link ("k": true) is written only right after the append before it was.
        IF coalesce((item->>'k')::boolean, false) AND previous_outcome IS DISTINCT FROM 'appended' THEN
            outcome := 'skipped';
            actual_version := NULL;
            previous_outcome := outcome;
            RETURN NEXT;
            CONTINUE;
        END IF;
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
                previous_outcome := outcome;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;

        IF NOT (expected_kind = 'any'
            OR (expected_kind = 'no_stream' AND current_version = 0)
            OR (expected_kind = 'exists' AND current_version > 0)
            OR (expected_kind = 'exact' AND current_version = (item->>'v')::bigint)) THEN
            outcome := 'conflict';
            previous_outcome := outcome;
            RETURN NEXT;
            CONTINUE;
        END IF;

        -- The condition, under the exclusive boundary locks: every writer of a matching event
        -- that took its shared lock first has committed (and is visible to this statement) or
        -- rolled back; any later one gets a position above this append's.
        IF item ? 'q' THEN
            failed_at := cqrs_first_match((item->'q'->>'a')::bigint, item->'q'->'i');
            IF failed_at IS NOT NULL THEN
                outcome := 'condition_failed';
                first_position := failed_at;
                previous_outcome := outcome;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;

        -- A reused event id: looked up only for a batch of one append. In a larger batch the
        -- unique index aborts the batch, and the caller retries its appends one by one.
        IF single THEN
            -- One index probe per event id, whatever the statistics were when the plan was
            -- cached (a LATERAL subquery that cannot be flattened into a semi-join).
            SELECT f.event_id INTO existing_event
                FROM jsonb_array_elements(item->'ev') e
                CROSS JOIN LATERAL (SELECT ev.event_id FROM cqrs_events ev
                                    WHERE ev.event_id = (e.value->>'id')::uuid OFFSET 0) f
                LIMIT 1;
            IF FOUND THEN
                outcome := 'duplicate_event_id';
                duplicate_event_id := existing_event;
                previous_outcome := outcome;
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
                                 command_id, causation_id, correlation_id, headers, tags)
        SELECT positions[e.ordinality::integer], (e.value->>'id')::uuid, sid, current_version + e.ordinality,
               e.value->>'t', (e.value->>'sv')::integer, e.value->'p', command, (e.value->>'ca')::uuid,
               (e.value->>'co')::uuid, coalesce(e.value->'h', '{}'::jsonb),
               string_to_array(coalesce(e.value->>'g', ''), chr(31))
        FROM jsonb_array_elements(item->'ev') WITH ORDINALITY e;
        -- The ordered tag index (cqrs_event_tags), in the same transaction as the events.
        INSERT INTO cqrs_event_tags (tag, position)
        SELECT DISTINCT g.tag, positions[e.ordinality::integer]
        FROM jsonb_array_elements(item->'ev') WITH ORDINALITY e
        CROSS JOIN LATERAL unnest(string_to_array(coalesce(e.value->>'g', ''), chr(31))) g(tag);
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
        previous_outcome := outcome;
        RETURN NEXT;
    END LOOP;

    -- Delivered at commit only; the payload is a wake-up token, never event data. Sent even
    -- when nothing was appended: this transaction's watermark lock may have held readers back.
    -- Without `notify` the caller sends one later itself (see the header).
    IF notify THEN
        PERFORM pg_notify('cqrs_events', newest::text);
    END IF;
END $function$
;
