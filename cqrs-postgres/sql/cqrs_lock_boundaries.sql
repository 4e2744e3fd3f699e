-- The boundary locks of one batch (README, "Dynamic Consistency Boundaries"), taken right after
-- the watermark lock and before any stream row lock or nextval: SHARED on (type, *), (*, *),
-- (type, tag) and (*, tag) for every event written (ev_types[i], with its tags joined by chr(31)
-- in ev_tags[i]), EXCLUSIVE on the keys of the conditions (`exclusive`), in ascending key order,
-- each once (exclusive wins), so every transaction locks in one global order.
-- Bounded, so a large batch cannot fill the server's lock table: more than 512 shared keys
-- become one EXCLUSIVE batch-wide lock (class 17476, key 0), which every batch with a condition
-- takes SHARED (first, before the keys); more than 512 exclusive keys become (*, *), which every
-- other writer shares.
-- The live definition (as pg_get_functiondef prints it). Migrations are immutable: change a
-- function here, then copy the changed definition into a new migration; the schema test
-- (tests/it/schema.rs) fails while the migrated database differs from this folder.

CREATE OR REPLACE FUNCTION cqrs_lock_boundaries(ev_types text[], ev_tags text[], exclusive integer[])
 RETURNS void
 LANGUAGE plpgsql
AS $function$
DECLARE
    most_keys CONSTANT integer := 512;
    shared_keys integer[];
    exclusive_keys integer[] := ARRAY(SELECT DISTINCT x.key FROM unnest(exclusive) x(key));
BEGIN
    shared_keys := ARRAY(
        SELECT DISTINCT cqrs_boundary_key(v.ty, v.tg)
        FROM unnest(ev_types, ev_tags) e(t, g)
        CROSS JOIN LATERAL (
            SELECT e.t, '*' UNION ALL SELECT '*', '*'
            UNION ALL
            SELECT w.ty, tg.tg FROM unnest(string_to_array(e.g, chr(31))) tg(tg), (VALUES (e.t), ('*')) w(ty)
        ) v(ty, tg));
    IF cardinality(exclusive_keys) > most_keys THEN
        exclusive_keys := ARRAY[cqrs_boundary_key('*', '*')];
    END IF;
    IF cardinality(shared_keys) > most_keys THEN
        shared_keys := '{}';
        PERFORM pg_advisory_xact_lock(17476, 0);
    ELSIF cardinality(exclusive_keys) > 0 THEN
        PERFORM pg_advisory_xact_lock_shared(17476, 0);
    END IF;
    -- The sorted subquery feeds the lock calls in key order.
    PERFORM CASE WHEN k.x THEN pg_advisory_xact_lock(17475, k.key)
                 ELSE pg_advisory_xact_lock_shared(17475, k.key) END
    FROM (SELECT a.key, bool_or(a.x) AS x
          FROM (SELECT s.key, false AS x FROM unnest(shared_keys) s(key)
                UNION ALL
                SELECT x.key, true FROM unnest(exclusive_keys) x(key)) a
          GROUP BY a.key
          ORDER BY a.key) k;
END $function$
;
