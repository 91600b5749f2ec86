-- The check on devices.timezone read the whole time-zone database (pg_timezone_names,
-- which PostgreSQL builds from the zone files on every call) once per row written:
-- about 40 ms a device, half an hour for 50,000. The same rule now reads a copy of
-- the names, taken here and refreshed by every migrate run (a PostgreSQL upgrade may
-- add zones). Zone names are public knowledge: every role may read them.
CREATE TABLE timezone_names (name text PRIMARY KEY);
INSERT INTO timezone_names SELECT DISTINCT name FROM pg_timezone_names;
GRANT SELECT ON timezone_names TO PUBLIC;

CREATE OR REPLACE FUNCTION f2pipe_is_timezone(name text) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$ SELECT EXISTS (SELECT 1 FROM timezone_names t WHERE t.name = $1) $$;
