-- What the projection runtime needs: each version remembers the vocabulary
-- it was built with (the log and that text fully determine its rows), the
-- event it stopped on if its code failed, and rebuild progress. Operators'
-- decisions to skip an event are kept, never forgotten.

ALTER TABLE projections
    ADD COLUMN vocabulary       text,
    ADD COLUMN target_position  bigint,
    ADD COLUMN events_applied   bigint      NOT NULL DEFAULT 0,
    ADD COLUMN started_at       timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN swapped_at       timestamptz,
    ADD COLUMN retired_at       timestamptz,
    ADD COLUMN failed_at        timestamptz,
    ADD COLUMN error            text,
    ADD COLUMN error_position   bigint;

CREATE TABLE projection_skips (
    name       text        NOT NULL,
    version    integer     NOT NULL,
    position   bigint      NOT NULL,
    reason     text        NOT NULL DEFAULT '',
    skipped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version, position),
    FOREIGN KEY (name, version) REFERENCES projections (name, version)
);

-- Running services follow the served version (its table and vocabulary)
-- and pick up skips and retries at once.
CREATE FUNCTION announce_projection_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ordertrail_projections', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER projections_changed
    AFTER INSERT OR UPDATE OF state, error, failed_at, vocabulary OR DELETE
    ON projections
    FOR EACH STATEMENT EXECUTE FUNCTION announce_projection_change();

CREATE TRIGGER projection_skips_changed
    AFTER INSERT OR DELETE ON projection_skips
    FOR EACH STATEMENT EXECUTE FUNCTION announce_projection_change();

-- Every append that updates a projection inline first takes the shared side
-- of that projection's swap lock and learns which version is served; a swap
-- takes the exclusive side, so it waits for appends in flight and holds new
-- ones back for the moment it takes. A function, so the read that follows
-- the lock sees a swap that committed while this transaction waited.
CREATE FUNCTION enter_projection(projection text) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    served integer;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('ordertrail.swap'), hashtext(projection));
    SELECT version INTO served FROM projections
    WHERE name = projection AND state = 'serving';
    RETURN served;
END;
$$;
