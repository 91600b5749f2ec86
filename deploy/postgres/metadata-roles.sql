-- Written by `f2pipe deploy render`; changes are overwritten.
-- The metadata database's service roles (SPEC section 10), from
-- f2pipe.operations.principals.
-- Run after `f2pipe db migrate`, as the owner, with psql -v <service>_password=...
\set ON_ERROR_STOP on

-- certgen
SELECT format('CREATE ROLE %I LOGIN', 'f2pipe_certgen')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'f2pipe_certgen')\gexec
ALTER ROLE "f2pipe_certgen" LOGIN PASSWORD :'certgen_password';
GRANT USAGE ON SCHEMA public TO "f2pipe_certgen";
REVOKE ALL ON "devices" FROM "f2pipe_certgen";
GRANT SELECT ON "devices" TO "f2pipe_certgen";
REVOKE ALL ON "device_claims" FROM "f2pipe_certgen";
GRANT SELECT, INSERT ON "device_claims" TO "f2pipe_certgen";
REVOKE ALL ON "certificates" FROM "f2pipe_certgen";
GRANT SELECT, INSERT, UPDATE ON "certificates" TO "f2pipe_certgen";

-- processor
SELECT format('CREATE ROLE %I LOGIN', 'f2pipe_processor')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'f2pipe_processor')\gexec
ALTER ROLE "f2pipe_processor" LOGIN PASSWORD :'processor_password';
GRANT USAGE ON SCHEMA public TO "f2pipe_processor";
REVOKE ALL ON "device_types", "device_templates", "devices", "connectors", "pins", "datapoints", "metadata_version" FROM "f2pipe_processor";
GRANT SELECT ON "device_types", "device_templates", "devices", "connectors", "pins", "datapoints", "metadata_version" TO "f2pipe_processor";
