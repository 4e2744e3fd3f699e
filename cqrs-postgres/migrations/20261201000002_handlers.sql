-- What handlers keep beside their checkpoints: claims (one active consumer per handler across
-- processes), parked events, process manager state and scheduled commands.

-- One row per claimed name. A claim is held while expires_at is in the future (by this
-- server's clock); token grows whenever it changes hands, and fenced writes check it.
CREATE TABLE cqrs_claims (
    name text PRIMARY KEY,
    owner text NOT NULL,
    token bigint NOT NULL CHECK (token >= 1),
    expires_at timestamptz NOT NULL
);

CREATE TABLE cqrs_parked (
    handler text NOT NULL,
    position bigint NOT NULL,
    event_id uuid NOT NULL,
    stream_id text NOT NULL,
    event_type text NOT NULL,
    sequence text NOT NULL,
    error text NOT NULL,
    attempts integer NOT NULL CHECK (attempts >= 0),
    parked_at timestamptz NOT NULL,
    status text NOT NULL CHECK (status IN ('parked', 'retry')),
    PRIMARY KEY (handler, position)
);

CREATE TABLE cqrs_processes (
    process text NOT NULL,
    key text NOT NULL,
    state jsonb NOT NULL,
    position bigint NOT NULL CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (process, key)
);

CREATE TABLE cqrs_scheduled (
    owner text NOT NULL,
    key text NOT NULL,
    name text NOT NULL,
    due timestamptz NOT NULL,
    command jsonb NOT NULL,
    command_id uuid NOT NULL,
    PRIMARY KEY (owner, key, name)
);
CREATE INDEX cqrs_scheduled_due ON cqrs_scheduled (owner, due);
