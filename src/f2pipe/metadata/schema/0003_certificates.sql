-- Every certificate the CA issued (SPEC section 6): who it names, how long it is
-- valid, who asked for it, and whether it was revoked. The PEM is kept so an
-- operator can audit or re-publish it; private keys are never stored.
CREATE TABLE IF NOT EXISTS certificates (
    serial text PRIMARY KEY CHECK (serial ~ '^[0-9a-f]{1,40}$'),
    common_name text NOT NULL,
    -- Device certificates name their controller; NULL for services and servers.
    -- No foreign key: the record must outlive a device removed from the metadata.
    mac char(12) NULL CHECK (mac ~ '^[0-9a-f]{12}$'),
    not_before timestamptz NOT NULL,
    not_after timestamptz NOT NULL CHECK (not_after > not_before),
    -- 'admin', 'claiming_code', 'cli', 'init', or 'revocation' (the short-lived
    -- identity used to close a revoked client's live session).
    issued_by text NOT NULL,
    issued_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz NULL,
    revoked_reason text NULL,
    certificate text NOT NULL,
    CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL))
);

CREATE INDEX IF NOT EXISTS certificates_common_name ON certificates (common_name);
CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates (revoked_at)
    WHERE revoked_at IS NOT NULL;

-- A claiming code works once: the first certificate issued with it records the
-- code's SHA-256 here, afterwards only the admin token re-issues. A separate
-- table rather than a devices column: claiming is not a metadata change (no
-- processor cache needs clearing), and an operator who sets a new code for a
-- device makes it claimable again without resetting anything.
CREATE TABLE IF NOT EXISTS device_claims (
    device_id integer NOT NULL REFERENCES devices ON DELETE CASCADE,
    code_sha256 bytea NOT NULL CHECK (length(code_sha256) = 32),
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, code_sha256)
);
