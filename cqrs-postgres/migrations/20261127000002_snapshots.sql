-- Aggregate snapshots: a cache of one state per stream (the newest wins). Deleting rows here
-- changes nothing but load time.
CREATE TABLE cqrs_snapshots (
    stream_id text PRIMARY KEY,
    version bigint NOT NULL CHECK (version >= 0),
    schema_version integer NOT NULL CHECK (schema_version >= 0),
    state jsonb NOT NULL,
    saved_at timestamptz NOT NULL DEFAULT now()
);
