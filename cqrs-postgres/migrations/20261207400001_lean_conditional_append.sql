-- cqrs_append_conditional: a lone conditional append of one event in a few statements, with
-- the locks, checks and answers of cqrs_append_batch (see sql/cqrs_append_conditional.sql).
-- cqrs_append_batch stays as it is: the writer of the previous release keeps calling it, and this
-- one still does for every other batch.

CREATE OR REPLACE FUNCTION cqrs_append_conditional(a_stream text, a_kind text, a_expected bigint, a_command uuid, e_id uuid, e_type text, e_schema integer, e_payload jsonb, e_causation uuid, e_correlation uuid, e_headers jsonb, e_tags text[], q_after bigint, q_items jsonb, notify boolean)
 RETURNS TABLE(append_index integer, outcome text, actual_version bigint, first_version bigint, last_version bigint, first_position bigint, last_position bigint, duplicate_event_id uuid)
 LANGUAGE plpgsql
AS $function$
#variable_conflict use_column
DECLARE
    current_version bigint;
    prior record;
    failed_at bigint;
    new_position bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'cqrs_append_conditional needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    append_index := 0;
    -- The watermark lock, taken before this transaction's first nextval; then the boundary
    -- locks as cqrs_lock_boundaries takes them for a batch with a condition and at most 512
    -- keys of each kind (the caller sends no other): the batch-wide key shared, then every key
    -- once, in ascending order, exclusive if the condition's, else shared.
    PERFORM pg_advisory_xact_lock_shared(cqrs_lock_marker()
        + (SELECT CASE WHEN s.is_called THEN s.last_value + 1 ELSE s.last_value END FROM cqrs_position_seq s)),
            pg_advisory_xact_lock_shared(17476, 0);
    PERFORM CASE WHEN k.x THEN pg_advisory_xact_lock(17475, k.key) ELSE pg_advisory_xact_lock_shared(17475, k.key) END
    FROM (SELECT a.key, bool_or(a.x) AS x
          FROM (SELECT cqrs_boundary_key(w.ty, g.tg) AS key, false AS x
                FROM unnest(e_tags || '*'::text) g(tg) CROSS JOIN (VALUES (e_type), ('*')) w(ty)
                UNION ALL
                SELECT cqrs_boundary_key(coalesce(ty.ty, '*'), coalesce(it.value->'g'->>0, '*')), true
                FROM jsonb_array_elements(q_items) it
                LEFT JOIN LATERAL jsonb_array_elements_text(it.value->'t') ty(ty) ON true) a
          GROUP BY a.key ORDER BY a.key) k;
    -- The stream row, before any position: per-stream order is position order.
    SELECT s.version INTO current_version FROM cqrs_streams s WHERE s.stream_id = a_stream FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO cqrs_streams AS s (stream_id, version) VALUES (a_stream, 0) ON CONFLICT (stream_id) DO NOTHING;
        SELECT s.version INTO current_version FROM cqrs_streams s WHERE s.stream_id = a_stream FOR UPDATE;
    END IF;
    actual_version := current_version;
    IF a_command IS NOT NULL THEN
        SELECT c.first_version, c.last_version, c.first_position, c.last_position INTO prior
            FROM cqrs_commands c WHERE c.stream_id = a_stream AND c.command_id = a_command;
        IF FOUND THEN
            outcome := 'duplicate';
            first_version := prior.first_version;
            last_version := prior.last_version;
            first_position := prior.first_position;
            last_position := prior.last_position;
        END IF;
    END IF;
    IF outcome IS NULL AND NOT (a_kind = 'any' OR (a_kind = 'no_stream' AND current_version = 0)
        OR (a_kind = 'exists' AND current_version > 0) OR (a_kind = 'exact' AND current_version = a_expected)) THEN
        outcome := 'conflict';
    END IF;
    -- The condition, under the exclusive boundary locks: every writer of a matching event that
    -- took its shared lock first has committed (and is visible to this statement) or rolled
    -- back; any later one gets a position above this append's.
    IF outcome IS NULL THEN
        failed_at := cqrs_first_match(q_after, q_items);
        IF failed_at IS NOT NULL THEN
            outcome := 'condition_failed';
            first_position := failed_at;
        END IF;
    END IF;
    IF outcome IS NULL THEN
        SELECT ev.event_id INTO duplicate_event_id FROM cqrs_events ev WHERE ev.event_id = e_id;
        IF FOUND THEN
            outcome := 'duplicate_event_id';
        END IF;
    END IF;
    IF outcome IS NULL THEN
        new_position := nextval('cqrs_position_seq');
        -- The event, its tags, the command id and the stream's version in one statement.
        WITH written AS (
            INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload,
                                     command_id, causation_id, correlation_id, headers, tags)
            VALUES (new_position, e_id, a_stream, current_version + 1, e_type, e_schema, e_payload, a_command,
                    e_causation, e_correlation, e_headers, e_tags)
        ), tagged AS (
            INSERT INTO cqrs_event_tags (tag, position)
            SELECT DISTINCT g.tag, new_position FROM unnest(e_tags) g(tag)
        ), commanded AS (
            INSERT INTO cqrs_commands (stream_id, command_id, first_version, last_version, first_position,
                                       last_position)
            SELECT a_stream, a_command, current_version + 1, current_version + 1, new_position, new_position
            WHERE a_command IS NOT NULL
        )
        UPDATE cqrs_streams s SET version = current_version + 1 WHERE s.stream_id = a_stream;
        outcome := 'appended';
        first_version := current_version + 1;
        last_version := current_version + 1;
        first_position := new_position;
        last_position := new_position;
    END IF;
    RETURN NEXT;
    -- Delivered at commit only; the payload is a wake-up token, never event data. Sent even
    -- when nothing was appended: this transaction's watermark lock may have held readers back.
    IF notify THEN
        PERFORM pg_notify('cqrs_events', coalesce(new_position, 0)::text);
    END IF;
END $function$
;
