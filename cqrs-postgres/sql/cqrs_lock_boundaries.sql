-- The boundary locks of one batch (README, "Dynamic Consistency Boundaries"), taken right after
-- the watermark lock and before any stream row lock or nextval: SHARED on (type, *), (*, *),
-- (type, tag) and (*, tag) for every event written (ev_types[i], with its tags joined by chr(31)
-- in ev_tags[i]), EXCLUSIVE on the keys of the conditions (`exclusive`). All keys of the batch
-- in ascending order, each once (exclusive wins), so every transaction locks in one global
-- order and boundary locks cannot deadlock.
-- The live definition (as pg_get_functiondef prints it). Migrations are immutable: change a
-- function here, then copy the changed definition into a new migration; the schema test
-- (tests/it/schema.rs) fails while the migrated database differs from this folder.

CREATE OR REPLACE FUNCTION cqrs_lock_boundaries(ev_types text[], ev_tags text[], exclusive integer[])
 RETURNS void
 LANGUAGE plpgsql
AS $function$
BEGIN
    -- The sorted subquery feeds the lock calls in key order.
    PERFORM CASE WHEN k.x THEN pg_advisory_xact_lock(17475, k.key)
                 ELSE pg_advisory_xact_lock_shared(17475, k.key) END
    FROM (SELECT a.key, bool_or(a.x) AS x
          FROM (SELECT cqrs_boundary_key(p.ty, p.tg) AS key, false AS x
                FROM (SELECT DISTINCT v.ty, v.tg
                      FROM unnest(ev_types, ev_tags) e(t, g)
                      CROSS JOIN LATERAL (
                          SELECT e.t, '*' UNION ALL SELECT '*', '*'
                          UNION ALL
                          SELECT w.ty, tg.tg FROM unnest(string_to_array(e.g, chr(31))) tg(tg),
                                                  (VALUES (e.t), ('*')) w(ty)) v(ty, tg)) p
                UNION ALL
                SELECT x.key, true FROM unnest(exclusive) x(key)) a
          GROUP BY a.key
          ORDER BY a.key) k;
END $function$
;
