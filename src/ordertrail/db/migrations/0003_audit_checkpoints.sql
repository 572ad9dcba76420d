-- Signed audit checkpoints: evidence of every stream's head at a position.
--
-- A checkpoint signs a digest over the head (last version and its hash) of
-- every stream with an event at or below its position; the encoding is
-- specified in src/ordertrail/audit/digest.py. The heads themselves are kept
-- so that a later verification can say which stream lost events, not only
-- that something changed. Each checkpoint stores only the heads that moved
-- since the one before: a checkpoint's full set is, per stream, the row of
-- the highest checkpoint id at or below its own.

CREATE TABLE audit_checkpoints (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    position     bigint      NOT NULL CHECK (position >= 0),
    stream_count bigint      NOT NULL CHECK (stream_count >= 0),
    digest       bytea       NOT NULL,
    key_id       text        NOT NULL,
    signature    bytea       NOT NULL,
    created_at   timestamptz NOT NULL
);

CREATE TABLE audit_checkpoint_heads (
    checkpoint_id bigint  NOT NULL REFERENCES audit_checkpoints (id),
    mode          text    NOT NULL,
    order_id      text    NOT NULL,
    upc           text    NOT NULL,
    version       integer NOT NULL CHECK (version >= 1),
    hash          bytea   NOT NULL,
    -- Like the events table, every unique key includes order_id.
    PRIMARY KEY (order_id, mode, upc, checkpoint_id)
);

-- Digests hash the heads in byte order of their stream keys, whatever the
-- database's collation; this index hands them over in that order.
CREATE INDEX audit_checkpoint_heads_digest_order ON audit_checkpoint_heads (
    mode COLLATE "C", order_id COLLATE "C", upc COLLATE "C", checkpoint_id
);

COMMENT ON TABLE audit_checkpoints IS
    'Signed digests of every stream head; UPDATE, DELETE and TRUNCATE are refused.';

CREATE FUNCTION refuse_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit checkpoints are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_checkpoints_append_only
    BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION refuse_audit_change();

CREATE TRIGGER audit_checkpoints_no_truncate
    BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_audit_change();

CREATE TRIGGER audit_checkpoint_heads_append_only
    BEFORE UPDATE OR DELETE ON audit_checkpoint_heads
    FOR EACH ROW EXECUTE FUNCTION refuse_audit_change();

CREATE TRIGGER audit_checkpoint_heads_no_truncate
    BEFORE TRUNCATE ON audit_checkpoint_heads
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_audit_change();
