-- Device metadata (SPEC section 3): what each controller is, how its sensors are
-- wired, and how each sensor's frames decode. Owned by f2pipe migrations.

CREATE FUNCTION f2pipe_is_timezone(name text) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$ SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE pg_timezone_names.name = $1) $$;

CREATE TABLE device_types (
    device_type_id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text    NOT NULL UNIQUE,
    is_controller  boolean NOT NULL DEFAULT false,
    is_sensor      boolean NOT NULL DEFAULT false
);

CREATE TABLE device_templates (
    device_template_id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Unique so fleet files can refer to a template by name and re-imports match it.
    name               text    NOT NULL UNIQUE,
    model              text,
    description        text,
    device_type_id     integer NOT NULL REFERENCES device_types,
    frame_check        text    NOT NULL DEFAULT 'modbus_crc'
                       CHECK (frame_check IN ('modbus_crc', 'none'))
);

CREATE TABLE devices (
    device_id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name               text     NOT NULL,
    device_template_id integer  NOT NULL REFERENCES device_templates,
    mac_address        char(12) UNIQUE CHECK (mac_address ~ '^[0-9a-f]{12}$'),
    claiming_code      text,
    serial_number      text,
    timezone           text     NOT NULL DEFAULT 'UTC' CHECK (f2pipe_is_timezone(timezone))
);

CREATE TABLE connectors (
    connector_id     integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    controller_id    integer  NOT NULL REFERENCES devices ON DELETE CASCADE,
    connector_number smallint NOT NULL CHECK (connector_number BETWEEN 1 AND 4),
    UNIQUE (controller_id, connector_number)
);

CREATE TABLE pins (
    pin_id       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    connector_id integer  NOT NULL REFERENCES connectors ON DELETE CASCADE,
    position     smallint NOT NULL CHECK (position BETWEEN 1 AND 6),
    device_id    integer  NOT NULL REFERENCES devices ON DELETE CASCADE,
    UNIQUE (connector_id, position)
);

CREATE TABLE datapoints (
    datapoint_id       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_template_id integer  NOT NULL REFERENCES device_templates ON DELETE CASCADE,
    label              text     NOT NULL,
    data_encoding      text     NOT NULL CHECK (lower(data_encoding) IN (
        'int8', 'uint8', 'int16', 'uint16', 'int32', 'uint32',
        'int64', 'uint64', 'float32', 'float64', 'bool')),
    byte_offset        integer  NOT NULL CHECK (byte_offset >= 0),
    byte_length        integer  NOT NULL CHECK (byte_length > 0),
    byte_order         text     NOT NULL DEFAULT 'ABCD'
                       CHECK (byte_order IN ('ABCD', 'DCBA', 'BADC', 'CDAB')),
    decimals           smallint NOT NULL DEFAULT 0 CHECK (decimals BETWEEN 0 AND 12),
    unit               text,
    json_field         text,
    UNIQUE (device_template_id, label)
);

CREATE INDEX ON connectors (controller_id);
CREATE INDEX ON pins (device_id);
CREATE INDEX ON datapoints (device_template_id);

-- Change notification (SPEC sections 3 and 7). Every statement that changes the
-- metadata bumps one version number in the same transaction and notifies
-- channel 'f2pipe_metadata' with it. Processors clear their in-process caches on
-- the notification, key their shared Redis entries by version, and re-read the
-- version before each batch, so a mapping committed before a message was
-- published is the one used for it.
CREATE TABLE metadata_version (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    bigint      NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO metadata_version (version) VALUES (1);

CREATE FUNCTION f2pipe_metadata_changed() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    new_version bigint;
BEGIN
    UPDATE metadata_version SET version = version + 1, changed_at = now()
        RETURNING version INTO new_version;
    PERFORM pg_notify('f2pipe_metadata', new_version::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER device_types_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON device_types
    FOR EACH STATEMENT EXECUTE FUNCTION f2pipe_metadata_changed();
CREATE TRIGGER device_templates_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON device_templates
    FOR EACH STATEMENT EXECUTE FUNCTION f2pipe_metadata_changed();
CREATE TRIGGER devices_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON devices
    FOR EACH STATEMENT EXECUTE FUNCTION f2pipe_metadata_changed();
CREATE TRIGGER connectors_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON connectors
    FOR EACH STATEMENT EXECUTE FUNCTION f2pipe_metadata_changed();
CREATE TRIGGER pins_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pins
    FOR EACH STATEMENT EXECUTE FUNCTION f2pipe_metadata_changed();
CREATE TRIGGER datapoints_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON datapoints
    FOR EACH STATEMENT EXECUTE FUNCTION f2pipe_metadata_changed();
