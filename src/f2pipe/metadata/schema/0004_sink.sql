-- What the sink keeps besides decoded_data (SPEC sections 4 and 5).

-- The last value per datapoint, for dashboards. The sink updates it in the
-- same transaction as the batch it writes, from the rows stored in
-- decoded_data (so it agrees with the first write of a reading), and never
-- moves it backwards in time: an older reading arriving late leaves it alone.
CREATE TABLE latest_readings (
    device_id    integer          NOT NULL,
    datapoint_id integer          NOT NULL,
    timestamp    timestamptz      NOT NULL,
    value        double precision,
    updated_at   timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, datapoint_id)
) WITH (fillfactor = 50);  -- every batch updates its keys: leave room for HOT updates

-- Readings for humans: names, labels and units from the metadata. Outer joins,
-- because a deployment may keep the metadata in another database (the tables
-- then exist here but are empty) and because a device may be removed while
-- its history stays.
CREATE VIEW readings AS
SELECT d.timestamp,
       d.device_id,
       dev.name  AS device_name,
       d.datapoint_id,
       dp.label  AS datapoint_label,
       d.value,
       dp.unit
  FROM decoded_data d
  LEFT JOIN devices dev ON dev.device_id = d.device_id
  LEFT JOIN datapoints dp ON dp.datapoint_id = d.datapoint_id;

CREATE VIEW latest_readings_named AS
SELECT l.device_id,
       dev.name  AS device_name,
       l.datapoint_id,
       dp.label  AS datapoint_label,
       l.timestamp,
       l.value,
       dp.unit,
       l.updated_at
  FROM latest_readings l
  LEFT JOIN devices dev ON dev.device_id = l.device_id
  LEFT JOIN datapoints dp ON dp.datapoint_id = l.datapoint_id;
