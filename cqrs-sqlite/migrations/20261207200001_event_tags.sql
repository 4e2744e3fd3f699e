-- Dynamic Consistency Boundaries (`EventStore::read_query`, `append_with_condition`): each
-- event's tags, in the order they were given, as a JSON array of strings (events stored before
-- this migration have none), and two indexes so a read or a condition by query never scans the
-- log: tag -> positions, event type -> positions.
ALTER TABLE cqrs_events ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';

-- One row per (distinct) tag of each event, written in the same transaction as the event.
CREATE TABLE cqrs_event_tags (
    tag TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (tag, position)
) STRICT, WITHOUT ROWID;

-- An index of a rowid table ends with the rowid, here the position: this is
-- (event_type, position).
CREATE INDEX cqrs_events_event_type ON cqrs_events (event_type);

-- Like the events, their tags are immutable.
CREATE TRIGGER cqrs_event_tags_no_update BEFORE UPDATE ON cqrs_event_tags
BEGIN
    SELECT RAISE(ABORT, 'cqrs_event_tags is append-only: UPDATE is not allowed');
END;

CREATE TRIGGER cqrs_event_tags_no_delete BEFORE DELETE ON cqrs_event_tags
BEGIN
    SELECT RAISE(ABORT, 'cqrs_event_tags is append-only: DELETE is not allowed');
END;
