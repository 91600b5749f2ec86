"""Certificate operations on the local state directory, without the HTTP service.

For the CLI (``f2pipe certgen init | issue-service | issue-device | revoke``),
the stack and the simulator, which run where the CA key is.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from f2pipe.core.topics import normalize_mac
from f2pipe.errors import CertError
from f2pipe.pki.ca import (
    SERVICE_NAMES,
    CertificateAuthority,
    Issued,
    ca_passphrase,
    cert_pem,
    device_common_name,
    key_pem,
    load_cert,
    pki_paths,
    write_private,
    write_public,
)
from f2pipe.pki.state import read_crl
from f2pipe.pki.store import CertificateStore
from f2pipe.settings import Settings

log = logging.getLogger(__name__)


def load_ca(settings: Settings) -> CertificateAuthority:
    """The CA of ``settings.state_dir``; raises CertError if it was never initialised."""
    return CertificateAuthority.load(pki_paths(settings), ca_passphrase(settings))


def record_local_certificates(settings: Settings, store: CertificateStore) -> int:
    """Record the broker, certgen and service certificates found on disk; return how many.

    ``ensure_pki`` may run before the database is up (``stack up``), so these are
    entered into the register afterwards; known serials are left alone.
    """
    paths = pki_paths(settings)
    files = [paths.broker_cert, paths.certgen_cert]
    if paths.services.is_dir():
        files.extend(sorted(paths.services.glob("svc-*.pem")))
    count = 0
    for path in files:
        if path.is_file():
            store.record_existing(Issued(load_cert(path), None), "init")
            count += 1
    return count


def crl_due(settings: Settings) -> bool:
    """True once half of the CRL's validity has passed (or there is none)."""
    crl = read_crl(pki_paths(settings).crl)
    if crl is None or crl.next_update_utc is None:
        return True
    left = crl.next_update_utc - dt.datetime.now(dt.UTC)
    return left < dt.timedelta(days=settings.crl_days / 2)


def issue_device_files(
    settings: Settings,
    mac: str,
    directory: Path,
    *,
    ca: CertificateAuthority | None = None,
    store: CertificateStore | None = None,
) -> tuple[Path, Path]:
    """Issue ``f2-<mac>`` with a fresh key; write ``<directory>/f2-<mac>.pem`` and ``.key``.

    The certificate is recorded in the register when ``store`` is given (the
    simulator may pass one store for many devices). Returns (cert, key) paths.
    Raises ValueError for a bad MAC, CertError if the CA cannot be loaded.
    """
    mac = normalize_mac(mac)
    authority = ca or load_ca(settings)
    issued = authority.issue_device(mac, None, settings.device_cert_days)
    assert issued.private_key is not None
    if store is not None:
        store.record(issued, mac, "cli")
    name = device_common_name(mac)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    write_private(key_path, key_pem(issued.private_key))
    write_public(cert_path, cert_pem(issued.certificate))
    return cert_path, key_path


def open_store(settings: Settings, required: bool) -> CertificateStore | None:
    """A connected register, or None (logged) when not ``required`` and it is unreachable."""
    store = CertificateStore(settings.metadata_dsn)
    try:
        store.open(timeout=5.0)
        store.ping()
    except Exception as exc:  # pool timeouts are not psycopg.Error
        store.close()
        if required:
            raise CertError(f"certificate register unreachable: {exc}") from None
        log.warning("certificate register unreachable", extra={"error": str(exc)})
        return None
    return store


__all__ = [
    "SERVICE_NAMES",
    "crl_due",
    "issue_device_files",
    "load_ca",
    "open_store",
    "record_local_certificates",
]
