-- The position of the first event after `after_position` that matches one of `items` (a
-- condition's query as JSON: [{"t": [types], "g": [tags]}], either may be absent), or NULL: the
-- check of a conditional append, run after its boundary locks (cqrs_append_batch). One indexed
-- statement per item, each stopping at its first match: an item with tags walks its first tag's
-- positions in order in cqrs_event_tags (its other tags and its types checked on the event row,
-- probed by position in a subquery the planner cannot turn into a join that walks the log);
-- one with types only walks (event_type, position); one with neither takes the first position.
-- The live definition (as pg_get_functiondef prints it). Migrations are immutable: change a
-- function here, then copy the changed definition into a new migration; the schema test
-- (tests/it/schema.rs) fails while the migrated database differs from this folder.

CREATE OR REPLACE FUNCTION cqrs_first_match(after_position bigint, items jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
AS $function$
DECLARE
    item jsonb;
    item_types text[];
    item_tags text[];
    found_position bigint;
    first_found bigint;
BEGIN
    FOR item IN SELECT i.value FROM jsonb_array_elements(items) i LOOP
        item_types := ARRAY(SELECT jsonb_array_elements_text(coalesce(item->'t', '[]')));
        item_tags := ARRAY(SELECT jsonb_array_elements_text(coalesce(item->'g', '[]')));
        found_position := NULL;
        IF cardinality(item_tags) > 0 THEN
            -- Only a match below the best one so far can change the answer.
            IF cardinality(item_types) > 0 THEN
                SELECT t.position INTO found_position FROM cqrs_event_tags t
                    WHERE t.tag = item_tags[1] AND t.position > after_position
                      AND t.position < coalesce(first_found, 9223372036854775807)
                      AND EXISTS (SELECT 1 FROM cqrs_events e WHERE e.position = t.position
                                  AND e.tags @> item_tags AND e.event_type = ANY (item_types) OFFSET 0)
                    ORDER BY t.position LIMIT 1;
            ELSIF cardinality(item_tags) > 1 THEN
                SELECT t.position INTO found_position FROM cqrs_event_tags t
                    WHERE t.tag = item_tags[1] AND t.position > after_position
                      AND t.position < coalesce(first_found, 9223372036854775807)
                      AND EXISTS (SELECT 1 FROM cqrs_events e WHERE e.position = t.position
                                  AND e.tags @> item_tags OFFSET 0)
                    ORDER BY t.position LIMIT 1;
            ELSE
                SELECT t.position INTO found_position FROM cqrs_event_tags t
                    WHERE t.tag = item_tags[1] AND t.position > after_position
                    ORDER BY t.position LIMIT 1;
            END IF;
        ELSIF cardinality(item_types) > 0 THEN
            SELECT min(e.position) INTO found_position FROM cqrs_events e
                WHERE e.position > after_position AND e.event_type = ANY (item_types);
        ELSE
            SELECT min(e.position) INTO found_position FROM cqrs_events e WHERE e.position > after_position;
        END IF;
        first_found := least(first_found, found_position);
    END LOOP;
    RETURN first_found;
END $function$
;
