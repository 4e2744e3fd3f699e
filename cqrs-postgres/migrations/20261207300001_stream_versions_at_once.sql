-- cqrs_append_arrays: the streams' new versions are written by one UPDATE over the batch's
-- arrays instead of one UPDATE per stream (a batch of 32 streams ran 32 statements). Nothing
-- else changes: the same locks in the same order, the same watermark and its proof.

CREATE OR REPLACE FUNCTION cqrs_append_arrays(a_stream text[], a_kind text[], a_expected bigint[], a_command uuid[], a_continues boolean[], a_count integer[], e_append integer[], e_stream text[], e_command uuid[], e_id uuid[], e_type text[], e_schema integer[], e_payload jsonb[], e_causation uuid[], e_correlation uuid[], e_headers jsonb[], e_tags text[], notify boolean)
 RETURNS TABLE(append_index integer, outcome text, actual_version bigint, first_version bigint, last_version bigint, first_position bigint, last_position bigint, duplicate_event_id uuid)
 LANGUAGE plpgsql
AS $function$
#variable_conflict use_column
DECLARE
    -- The high bits that mark our advisory lock keys: see cqrs_lock_marker and cqrs_read_bound.
    lock_marker CONSTANT bigint := cqrs_lock_marker();
    n CONSTANT integer := coalesce(cardinality(a_stream), 0);
    n_events CONSTANT integer := coalesce(cardinality(e_id), 0);
    n_missing bigint;
    -- Locked streams, in lock order, with their versions as the decided appends leave them.
    ids text[];
    versions bigint[];
    stored bigint[];
    -- Per append (fixed-width and without nulls where the event INSERT subscripts them).
    outcomes text[] := array_fill(NULL::text, ARRAY[n]);
    appended boolean[] := array_fill(false, ARRAY[n]);
    actuals bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    firsts bigint[] := array_fill(0::bigint, ARRAY[n]);
    lasts bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    first_positions bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    last_positions bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    duplicates uuid[] := array_fill(NULL::uuid, ARRAY[n]);
    position_bases integer[] := array_fill(0, ARRAY[n]);
    event_bases integer[] := array_fill(0, ARRAY[n]);
    -- Earlier results of command ids found in cqrs_commands, per append.
    prior_first bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    prior_last bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    prior_first_position bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    prior_last_position bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    positions bigint[];
    found_row record;
    i integer;
    j integer;
    k integer;
    sid text;
    kind text;
    command uuid;
    current_version bigint;
    counted integer := 0;
    appended_events integer := 0;
    existing_event uuid;
    any_command CONSTANT boolean := cardinality(array_remove(a_command, NULL)) > 0;
    newest bigint := 0;
    caller_plan_cache_mode CONSTANT text := current_setting('plan_cache_mode');
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'cqrs_append_arrays needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    IF cardinality(a_kind) IS DISTINCT FROM n OR cardinality(a_expected) IS DISTINCT FROM n
        OR cardinality(a_command) IS DISTINCT FROM n OR cardinality(a_continues) IS DISTINCT FROM n
        OR cardinality(a_count) IS DISTINCT FROM n
        OR cardinality(e_append) IS DISTINCT FROM n_events OR cardinality(e_stream) IS DISTINCT FROM n_events
        OR cardinality(e_command) IS DISTINCT FROM n_events OR cardinality(e_type) IS DISTINCT FROM n_events
        OR cardinality(e_schema) IS DISTINCT FROM n_events OR cardinality(e_payload) IS DISTINCT FROM n_events
        OR cardinality(e_causation) IS DISTINCT FROM n_events
        OR cardinality(e_correlation) IS DISTINCT FROM n_events
        OR cardinality(e_headers) IS DISTINCT FROM n_events OR cardinality(e_tags) IS DISTINCT FROM n_events THEN
        RAISE EXCEPTION 'cqrs_append_arrays: the input arrays do not fit together'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Generic plans for the statements below (restored before returning): a custom plan would be
    -- made again on every call, since it estimates the batch's arrays at their true length and
    -- so always looks cheaper than the generic one. The lookups are written so that the generic
    -- plan is an index probe per key (see step 2).
    PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
    -- 1. The watermark lock, taken before this transaction's first nextval: its key is at most
    -- every position the transaction will get, and it is held until commit or rollback.
    PERFORM pg_advisory_xact_lock_shared(lock_marker
        + (SELECT CASE WHEN s.is_called THEN s.last_value + 1 ELSE s.last_value END FROM cqrs_position_seq s));
    -- 1b. The shared boundary locks of every event (see cqrs_lock_boundaries), before any stream
    -- row lock or nextval: a conditional append's exclusive lock waits for this batch to end.
    PERFORM cqrs_lock_boundaries(e_type, e_tags, NULL);

    -- 2. Lock every stream of the batch in byte order. The common case, every stream exists:
    -- one statement locks them all, in order. If one is missing (or being created by another
    -- transaction, so not yet visible), that statement locks nothing (its gate is evaluated
    -- once, before any row is locked) and an ordered upsert takes each stream in turn instead:
    -- it locks an existing row or creates the missing one, waiting for a concurrent creator
    -- like the per-append loop does, so no batch ever waits while holding a stream that comes
    -- later in the order. (Stream rows are never deleted: once all exist, all stay.)
    -- Each lookup is a nested loop over the batch's few keys with an index probe each,
    -- whatever the table's statistics: a LATERAL subquery that cannot be flattened.
    SELECT array_agg(l.stream_id ORDER BY d.x COLLATE "C"), array_agg(l.version ORDER BY d.x COLLATE "C"),
           count(*) FILTER (WHERE l.stream_id IS NULL)
        INTO ids, versions, n_missing
        FROM (SELECT u.x FROM (SELECT DISTINCT x FROM unnest(a_stream) x) u ORDER BY u.x COLLATE "C") d
        LEFT JOIN LATERAL (
            SELECT s.stream_id, s.version FROM cqrs_streams s
            WHERE s.stream_id = d.x
              AND (SELECT count(*) FROM (SELECT DISTINCT x FROM unnest(a_stream) x) k
                   CROSS JOIN LATERAL (SELECT 1 FROM cqrs_streams e WHERE e.stream_id = k.x OFFSET 0) f)
                  = (SELECT count(DISTINCT x) FROM unnest(a_stream) x)
            FOR UPDATE) l ON true;
    IF n_missing > 0 THEN
        WITH taken AS (
            INSERT INTO cqrs_streams AS s (stream_id, version)
                SELECT u.x, 0 FROM (SELECT DISTINCT x FROM unnest(a_stream) x) u ORDER BY u.x COLLATE "C"
                ON CONFLICT (stream_id) DO UPDATE SET version = s.version
                RETURNING s.stream_id, s.version
        )
        SELECT array_agg(t.stream_id ORDER BY t.stream_id COLLATE "C"), array_agg(t.version ORDER BY t.stream_id COLLATE "C")
            INTO ids, versions
            FROM taken t;
    END IF;
    stored := versions;

    -- 3. Command ids stored before this batch (looked up after the stream locks: an append of
    -- the same command id that held one has committed or rolled back by now).
    IF any_command THEN
        FOR found_row IN
            SELECT q.i, c.first_version, c.last_version, c.first_position, c.last_position
            FROM unnest(a_stream, a_command) WITH ORDINALITY q(s, c, i)
            CROSS JOIN LATERAL (SELECT c.first_version, c.last_version, c.first_position, c.last_position
                                FROM cqrs_commands c WHERE c.stream_id = q.s AND c.command_id = q.c OFFSET 0) c
        LOOP
            prior_first[found_row.i] := found_row.first_version;
            prior_last[found_row.i] := found_row.last_version;
            prior_first_position[found_row.i] := found_row.first_position;
            prior_last_position[found_row.i] := found_row.last_position;
        END LOOP;
    END IF;

    -- Each append, in input order, on the versions the appends before it leave.
    j := 1;
    FOR i IN 1 .. n LOOP
        sid := a_stream[i];
        kind := a_kind[i];
        command := a_command[i];
        IF a_count[i] IS NULL OR a_count[i] < 1 THEN
            RAISE EXCEPTION 'cqrs_append_arrays: append % has no events', i - 1
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        event_bases[i] := counted;
        counted := counted + a_count[i];
        IF ids[j] IS DISTINCT FROM sid THEN
            j := coalesce(array_position(ids, sid, j), array_position(ids, sid));
        END IF;
        current_version := versions[j];
        actuals[i] := current_version;
        -- A chain link is written only right after the append before it was.
        IF a_continues[i] AND (i = 1 OR NOT appended[i - 1]) THEN
            outcomes[i] := 'skipped';
            actuals[i] := NULL;
            CONTINUE;
        END IF;
        IF command IS NOT NULL THEN
            IF prior_first[i] IS NOT NULL THEN
                outcomes[i] := 'duplicate';
                firsts[i] := prior_first[i];
                lasts[i] := prior_last[i];
                first_positions[i] := prior_first_position[i];
                last_positions[i] := prior_last_position[i];
                CONTINUE;
            END IF;
            -- Stored earlier in this batch: its positions are known only at step 4, so
            -- remember which append it was.
            k := array_position(a_command, command);
            WHILE k IS NOT NULL AND k < i LOOP
                IF a_stream[k] = sid AND appended[k] THEN
                    outcomes[i] := 'duplicate_of';
                    firsts[i] := firsts[k];
                    lasts[i] := lasts[k];
                    position_bases[i] := k;
                    EXIT;
                END IF;
                k := array_position(a_command, command, k + 1);
            END LOOP;
            IF outcomes[i] IS NOT NULL THEN
                CONTINUE;
            END IF;
        END IF;
        IF NOT coalesce(kind = 'any'
            OR (kind = 'no_stream' AND current_version = 0)
            OR (kind = 'exists' AND current_version > 0)
            OR (kind = 'exact' AND current_version = a_expected[i]), false) THEN
            outcomes[i] := 'conflict';
            CONTINUE;
        END IF;
        -- A reused event id: looked up only for a batch of one append.
        IF n = 1 THEN
            SELECT ev.event_id INTO existing_event FROM cqrs_events ev WHERE ev.event_id = ANY (e_id) LIMIT 1;
            IF FOUND THEN
                outcomes[i] := 'duplicate_event_id';
                duplicates[i] := existing_event;
                CONTINUE;
            END IF;
        END IF;
        outcomes[i] := 'appended';
        appended[i] := true;
        firsts[i] := current_version + 1;
        lasts[i] := current_version + a_count[i];
        position_bases[i] := appended_events;
        appended_events := appended_events + a_count[i];
        versions[j] := current_version + a_count[i];
    END LOOP;
    IF counted <> n_events THEN
        RAISE EXCEPTION 'cqrs_append_arrays: % events given, the appends count %', n_events, counted
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- 4. Positions, sorted, so the i-th appended event gets the i-th smallest number.
    IF appended_events > 0 THEN
        IF appended_events = 1 THEN
            positions := ARRAY[nextval('cqrs_position_seq')];
        ELSE
            SELECT array_agg(p.p ORDER BY p.p) INTO positions
                FROM (SELECT nextval('cqrs_position_seq') AS p FROM generate_series(1, appended_events)) p;
        END IF;
        FOR i IN 1 .. n LOOP
            IF appended[i] THEN
                first_positions[i] := positions[position_bases[i] + 1];
                last_positions[i] := positions[position_bases[i] + a_count[i]];
                newest := greatest(newest, last_positions[i]);
            ELSIF outcomes[i] = 'duplicate_of' THEN
                outcomes[i] := 'duplicate';
                first_positions[i] := first_positions[position_bases[i]];
                last_positions[i] := last_positions[position_bases[i]];
            END IF;
        END LOOP;

        -- 5. The events, their tags and the command ids in one statement, then each stream's version. An event's
        -- e_append is its append's 1-based index, and e_stream and e_command repeat that
        -- append's stream and command id (so no per-event lookup walks a variable-width array);
        -- event_bases[a] events come before append a's first.
        WITH events AS (
            INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload,
                                     command_id, causation_id, correlation_id, headers, tags)
            SELECT positions[position_bases[e.a] + e.ord - event_bases[e.a]], e.id, e.s,
                   firsts[e.a] - 1 + e.ord - event_bases[e.a], e.t, e.sv, e.p, e.c, e.ca, e.co,
                   coalesce(e.h, '{}'::jsonb), string_to_array(coalesce(e.g, ''), chr(31))
            FROM unnest(e_append, e_stream, e_command, e_id, e_type, e_schema, e_payload, e_causation,
                        e_correlation, e_headers, e_tags)
                     WITH ORDINALITY AS e(a, s, c, id, t, sv, p, ca, co, h, g, ord)
            WHERE appended[e.a]
            RETURNING position, tags
        ), tagged AS (
            -- The ordered tag index (cqrs_event_tags), in the same statement as the events.
            INSERT INTO cqrs_event_tags (tag, position)
            SELECT DISTINCT g.tag, ev.position FROM events ev CROSS JOIN LATERAL unnest(ev.tags) g(tag)
        )
        INSERT INTO cqrs_commands (stream_id, command_id, first_version, last_version, first_position,
                                   last_position)
        SELECT a.s, a.c, a.f, a.l, a.fp, a.lp
        FROM unnest(a_stream, a_command, appended, firsts, lasts, first_positions, last_positions)
                 AS a(s, c, appended, f, l, fp, lp)
        WHERE a.appended AND a.c IS NOT NULL;
        -- Every stream's new version in one statement; their rows are locked since step 2, so
        -- the order it updates them in cannot deadlock.
        UPDATE cqrs_streams s SET version = u.v
            FROM unnest(ids, versions, stored) u(id, v, old)
            WHERE s.stream_id = u.id AND u.v <> u.old;
    END IF;

    RETURN QUERY
        SELECT (r.i - 1)::integer, r.outcome, r.actual, CASE WHEN r.outcome IN ('appended', 'duplicate') THEN r.f END,
               r.l, r.fp, r.lp, r.d
        FROM unnest(outcomes, actuals, firsts, lasts, first_positions, last_positions, duplicates)
                 WITH ORDINALITY AS r(outcome, actual, f, l, fp, lp, d, i);

    -- Delivered at commit only; the payload is a wake-up token, never event data. Sent even
    -- when nothing was appended: this transaction's watermark lock may have held readers back.
    -- Without `notify` the caller sends one later itself (see the header).
    IF notify THEN
        PERFORM pg_notify('cqrs_events', newest::text);
    END IF;
    PERFORM set_config('plan_cache_mode', caller_plan_cache_mode, true);
END $function$
;
