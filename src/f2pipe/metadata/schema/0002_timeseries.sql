-- The time series (SPEC section 5). Plain PostgreSQL here; where the
-- TimescaleDB extension is present, f2pipe.db turns it into a hypertable with
-- compression, retention and an hourly continuous aggregate after migrating.
CREATE TABLE decoded_data (
    timestamp    timestamptz      NOT NULL,
    device_id    integer          NOT NULL,
    datapoint_id integer          NOT NULL,
    value        double precision,
    PRIMARY KEY (timestamp, device_id, datapoint_id)
);
