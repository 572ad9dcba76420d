-- Read models. Each projection version owns its own table; readers go through
-- a view that names the served version, so a rebuilt version can be swapped in
-- by replacing the view in one transaction.

CREATE TABLE projections (
    name                text        NOT NULL,
    version             integer     NOT NULL,
    table_name          text        NOT NULL UNIQUE,
    state               text        NOT NULL
        CHECK (state IN ('serving', 'building', 'retired')),
    checkpoint_xid      xid8        NOT NULL DEFAULT '0',
    checkpoint_position bigint      NOT NULL DEFAULT 0,
    vocabulary_digest   text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

CREATE UNIQUE INDEX projections_one_serving ON projections (name)
    WHERE state = 'serving';

CREATE TABLE item_view_v1 (
    mode                  text        NOT NULL,
    order_id              text        NOT NULL,
    upc                   text        NOT NULL,
    state                 text        NOT NULL,
    fulfilment            text        NOT NULL,
    refund                text        NOT NULL,
    message_count         integer     NOT NULL,
    redelivery_count      integer     NOT NULL,
    event_count           integer     NOT NULL,
    order_url             text,
    last_status           text        NOT NULL,
    last_transition       text,
    first_event_at        timestamptz NOT NULL,
    last_event_at         timestamptz NOT NULL,
    version               integer     NOT NULL,
    position              bigint      NOT NULL,
    unrecognized_statuses jsonb       NOT NULL,
    anomalies             jsonb       NOT NULL,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    -- The transaction that last changed the row: the change feed reads rows
    -- in (change_xid, position) order below the snapshot horizon, as the
    -- event log is read, so a poller never passes a change that commits late.
    change_xid            xid8        NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (mode, order_id, upc)
);

CREATE INDEX item_view_v1_state ON item_view_v1 (mode, state);
CREATE INDEX item_view_v1_changes ON item_view_v1 (mode, change_xid, position);

INSERT INTO projections (name, version, table_name, state)
VALUES ('items', 1, 'item_view_v1', 'serving');

CREATE VIEW item_view AS SELECT * FROM item_view_v1;
