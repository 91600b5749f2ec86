-- Written by `f2pipe deploy render`; changes are overwritten.
-- The timeseries database's service roles (SPEC section 10), from
-- f2pipe.operations.principals.
-- Run after `f2pipe db migrate`, as the owner, with psql -v <service>_password=...
\set ON_ERROR_STOP on

-- sink
SELECT format('CREATE ROLE %I LOGIN', 'f2pipe_sink')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'f2pipe_sink')\gexec
ALTER ROLE "f2pipe_sink" LOGIN PASSWORD :'sink_password';
GRANT USAGE ON SCHEMA public TO "f2pipe_sink";
REVOKE ALL ON "decoded_data" FROM "f2pipe_sink";
GRANT SELECT, INSERT ON "decoded_data" TO "f2pipe_sink";
REVOKE ALL ON "latest_readings" FROM "f2pipe_sink";
GRANT SELECT, INSERT, UPDATE ON "latest_readings" TO "f2pipe_sink";
