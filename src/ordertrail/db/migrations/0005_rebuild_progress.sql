-- A rebuild first folds the log stream by stream up to a horizon fixed when
-- it began (one write per item), then follows the log from that horizon.
-- The horizon and the last stream written let it resume after a crash.

ALTER TABLE projections
    ADD COLUMN bulk_horizon_xid      xid8,
    ADD COLUMN bulk_horizon_position bigint,
    ADD COLUMN bulk_after            text[],
    ADD COLUMN bulk_done             boolean NOT NULL DEFAULT true,
    -- Set when a build was completed and compared: if it is not swapped in
    -- then, the next rebuild starts afresh (the code may have changed since).
    ADD COLUMN prepared_at           timestamptz;

-- Versions created from now on by a rebuild start with the bulk phase to do.
ALTER TABLE projections ALTER COLUMN bulk_done SET DEFAULT false;
