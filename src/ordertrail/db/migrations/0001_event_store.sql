-- The event store: one append-only table of everything Locally said.
--
-- Global read order is (transaction_id, position). Positions come from an
-- identity sequence, and sequences hand out numbers in call order, not commit
-- order, so a reader tailing by position alone could pass over an event whose
-- transaction commits late. Readers therefore read only rows whose
-- transaction_id is below the snapshot horizon (pg_snapshot_xmin), ordered by
-- (transaction_id, position): every transaction below the horizon has ended,
-- and any transaction that commits later has a larger id.

CREATE TABLE events (
    position        bigint GENERATED ALWAYS AS IDENTITY,
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    mode            text        NOT NULL CHECK (mode IN ('live', 'test')),
    order_id        text        NOT NULL,
    upc             text        NOT NULL,
    version         integer     NOT NULL CHECK (version >= 1),
    event_type      text        NOT NULL,
    schema_version  smallint    NOT NULL DEFAULT 1,
    raw_status      text        NOT NULL,
    raw_body        bytea       NOT NULL,
    body_sha256     bytea       NOT NULL,
    received_at     timestamptz NOT NULL,
    request_id      text        NOT NULL,
    client_address  text,
    token_id        text        NOT NULL,
    idempotency_key text,
    redelivery_of   bigint,
    previous_hash   bytea       NOT NULL,
    hash            bytea       NOT NULL,
    -- Every unique key includes order_id so the table can be distributed on it.
    PRIMARY KEY (order_id, position),
    UNIQUE (mode, order_id, upc, version)
);

CREATE INDEX events_read_order ON events (transaction_id, position);
CREATE INDEX events_position ON events (position);
CREATE INDEX events_received_at ON events USING brin (received_at);

COMMENT ON TABLE events IS
    'Append-only log of Locally webhook deliveries; UPDATE, DELETE and TRUNCATE are refused.';

CREATE FUNCTION refuse_event_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_event_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_change();

-- Authenticated deliveries that could not be read as a Locally payload. They
-- are kept whole so an operator can feed them back once the code understands
-- them; nothing that passed authentication is dropped.
CREATE TABLE quarantine (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at     timestamptz NOT NULL,
    mode            text        NOT NULL CHECK (mode IN ('live', 'test')),
    request_id      text        NOT NULL,
    client_address  text,
    token_id        text        NOT NULL,
    content_type    text,
    idempotency_key text,
    raw_body        bytea       NOT NULL,
    body_length     bigint      NOT NULL,
    truncated       boolean     NOT NULL DEFAULT false,
    reason          text        NOT NULL,
    released_at     timestamptz,
    released_position bigint
);

CREATE INDEX quarantine_open ON quarantine (id) WHERE released_at IS NULL;

-- Webhook tokens and API keys. Only a SHA-256 digest of each secret is kept;
-- the secrets are long random strings, so a fast digest is enough.
CREATE TABLE credentials (
    id            text        PRIMARY KEY,
    kind          text        NOT NULL CHECK (kind IN ('webhook_token', 'api_key')),
    mode          text        CHECK (mode IN ('live', 'test')),
    role          text        CHECK (role IN ('reader', 'auditor', 'admin')),
    label         text        NOT NULL DEFAULT '',
    secret_sha256 bytea       NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz,
    CHECK ((kind = 'webhook_token') = (mode IS NOT NULL)),
    CHECK ((kind = 'api_key') = (role IS NOT NULL))
);

-- Running services cache the active credentials; this tells them to reload.
CREATE FUNCTION announce_credentials_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ordertrail_credentials', TG_OP);
    RETURN NULL;
END;
$$;

CREATE TRIGGER credentials_changed
    AFTER INSERT OR UPDATE OF expires_at, revoked_at OR DELETE ON credentials
    FOR EACH STATEMENT EXECUTE FUNCTION announce_credentials_change();
