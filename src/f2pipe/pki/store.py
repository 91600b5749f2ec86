"""The certificate register in PostgreSQL (table ``certificates``, migration 0003).

Synchronous psycopg behind a small pool; the HTTP service calls it from worker
threads. Every method is one transaction. Database errors surface as
``psycopg.Error``; the callers decide what the user sees.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from psycopg import Connection
from psycopg_pool import ConnectionPool

from f2pipe.errors import CertError
from f2pipe.pki.ca import Issued, common_name, serial_text


@dataclass(frozen=True)
class DeviceRow:
    """The metadata certgen needs about a controller."""

    device_id: int
    claiming_code: str | None
    claimed_at: dt.datetime | None
    broker: str | None = None  # the MQTT broker it belongs to; None: the default one


@dataclass(frozen=True)
class Revocation:
    """A certificate's revocation as recorded (``newly`` False: it was already revoked)."""

    serial: str
    common_name: str
    revoked_at: dt.datetime
    newly: bool


class ClaimAlreadyUsed(CertError):
    """The claiming code was consumed by a concurrent request first."""


class CertificateStore:
    """Reads devices and records certificates; thread-safe (one pool)."""

    def __init__(self, dsn: str, max_size: int = 4) -> None:
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            dsn, min_size=1, max_size=max_size, open=False, name="certgen"
        )

    def open(self, timeout: float = 10.0) -> None:
        self._pool.open(wait=True, timeout=timeout)

    def close(self) -> None:
        self._pool.close()

    def ping(self) -> bool:
        with self._pool.connection(timeout=2.0) as conn:
            conn.execute("SELECT 1")
        return True

    def device(self, mac: str) -> DeviceRow | None:
        """The controller with this MAC and whether its current claiming code was used."""
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT d.device_id, d.claiming_code, c.claimed_at, d.broker FROM devices d "
                "LEFT JOIN device_claims c ON c.device_id = d.device_id "
                "AND c.code_sha256 = sha256(convert_to(d.claiming_code, 'UTF8')) "
                "WHERE d.mac_address = %s",
                (mac,),
            ).fetchone()
        return None if row is None else DeviceRow(int(row[0]), row[1], row[2], row[3])

    def record(
        self,
        issued: Issued,
        mac: str | None,
        issued_by: str,
        claim: tuple[int, str] | None = None,
    ) -> None:
        """Record ``issued``; with ``claim`` = (device_id, code), consume that code too.

        Both happen in one transaction: if the code was consumed meanwhile,
        nothing is recorded and ClaimAlreadyUsed is raised (the certificate,
        never returned, is then useless to anyone).
        """
        cert = issued.certificate
        with self._pool.connection() as conn, conn.transaction():
            if claim is not None:
                device_id, code = claim
                claimed = conn.execute(
                    "INSERT INTO device_claims (device_id, code_sha256) VALUES (%s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (device_id, hashlib.sha256(code.encode()).digest()),
                )
                if claimed.rowcount != 1:
                    raise ClaimAlreadyUsed
            conn.execute(
                "INSERT INTO certificates (serial, common_name, mac, not_before, not_after, "
                "issued_by, certificate) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    issued.serial,
                    issued.common_name,
                    mac,
                    cert.not_valid_before_utc,
                    cert.not_valid_after_utc,
                    issued_by,
                    issued.certificate_pem(),
                ),
            )

    def record_existing(self, issued: Issued, issued_by: str) -> None:
        """Record a certificate issued earlier (files from ``init``); no-op if known."""
        cert = issued.certificate
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO certificates (serial, common_name, mac, not_before, not_after, "
                "issued_by, certificate) VALUES (%s, %s, NULL, %s, %s, %s, %s) "
                "ON CONFLICT (serial) DO NOTHING",
                (
                    serial_text(cert.serial_number),
                    common_name(cert),
                    cert.not_valid_before_utc,
                    cert.not_valid_after_utc,
                    issued_by,
                    issued.certificate_pem(),
                ),
            )

    def revoke(self, serial: str, reason: str) -> Revocation | None:
        """Mark ``serial`` revoked (once; a second call returns the first record), or None."""
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "UPDATE certificates SET revoked_at = now(), revoked_reason = %s "
                "WHERE serial = %s AND revoked_at IS NULL RETURNING common_name, revoked_at",
                (reason, serial),
            ).fetchone()
            if row is not None:
                return Revocation(serial, row[0], row[1], newly=True)
            row = conn.execute(
                "SELECT common_name, revoked_at FROM certificates WHERE serial = %s", (serial,)
            ).fetchone()
        if row is None:
            return None
        return Revocation(serial, row[0], row[1], newly=False)

    def revoked(self) -> list[tuple[int, dt.datetime]]:
        """Every revoked serial with its revocation time."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL"
            ).fetchall()
        return [(int(serial, 16), when) for serial, when in rows]
