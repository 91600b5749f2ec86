"""The ``<state>/pki`` folder made and kept current, the CRL file on disk, and the
two facts about the broker that the certificate authority acts on.

:func:`ensure_pki` (run by ``certgen init`` and ``stack up``) creates whatever is
missing of the CA, the CRL, the broker's and certgen's server certificates and
the service certificates, and renews what is due; :func:`write_crl` rewrites the
CRL without ever dropping an entry. The certificate primitives are in
:mod:`f2pipe.pki.ca`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from f2pipe.errors import CertError
from f2pipe.pki.ca import (
    RENEW_BEFORE,
    SERVICE_NAMES,
    CertificateAuthority,
    Issued,
    PkiPaths,
    ca_passphrase,
    cert_pem,
    check_service_name,
    general_name,
    key_pem,
    load_cert,
    pki_paths,
    utc_now,
    write_private,
    write_public,
)
from f2pipe.settings import Settings

__all__ = [
    "PkiReport",
    "broker_pid_path",
    "connector_identities",
    "crl_entries",
    "ensure_pki",
    "issue_service_files",
    "read_crl",
    "server_names",
    "write_crl",
]


def server_names(settings: Settings) -> list[str]:
    """SANs for the broker and certgen: localhost, 127.0.0.1, ::1 and ``broker_names``."""
    return list(dict.fromkeys(["localhost", "127.0.0.1", "::1", *settings.extra_server_names()]))


def read_crl(path: Path) -> x509.CertificateRevocationList | None:
    """The CRL at ``path``, or None if there is none yet."""
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CertError(f"cannot read CRL {path}: {exc}") from None


def crl_entries(crl: x509.CertificateRevocationList | None) -> dict[int, dt.datetime]:
    if crl is None:
        return {}
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


def write_crl(
    ca: CertificateAuthority,
    paths: PkiPaths,
    revoked: Iterable[tuple[int, dt.datetime]],
    days: int,
) -> x509.CertificateRevocationList:
    """Write a new CRL: every serial already in ``crl.pem`` plus ``revoked``.

    The existing file's entries are kept so that no revocation is ever lost,
    even if the database that records them is.
    """
    entries = crl_entries(read_crl(paths.crl))
    for serial, when in revoked:
        entries.setdefault(serial, when)
    crl = ca.build_crl(entries.items(), days)
    write_public(paths.crl, crl.public_bytes(serialization.Encoding.PEM))
    return crl


def _needs_server_cert(
    ca: CertificateAuthority, cert_path: Path, key_path: Path, names: list[str]
) -> bool:
    if not (cert_path.is_file() and key_path.is_file()):
        return True
    cert = load_cert(cert_path)
    if not ca.issued_by_me(cert) or cert.not_valid_after_utc - utc_now() < RENEW_BEFORE:
        return True
    try:
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    wanted = {general_name(name) for name in names}
    return not wanted <= set(have)


def _needs_client_cert(ca: CertificateAuthority, cert_path: Path, key_path: Path) -> bool:
    if not (cert_path.is_file() and key_path.is_file()):
        return True
    cert = load_cert(cert_path)
    return not ca.issued_by_me(cert) or cert.not_valid_after_utc - utc_now() < RENEW_BEFORE


@dataclass
class PkiReport:
    """What :func:`ensure_pki` created (empty lists: everything was in place)."""

    ca: CertificateAuthority
    created: list[str]
    issued: list[Issued]


def ensure_pki(settings: Settings, services: Iterable[str] = SERVICE_NAMES) -> PkiReport:
    """Create whatever is missing of the CA, CRL, broker/certgen and service certificates.

    Idempotent: existing valid files are kept. A server or service certificate is
    re-issued when missing, not signed by the current CA, within 30 days of
    expiry, or (servers) missing one of the configured names. The CRL is renewed
    once half of its validity has passed. Raises CertError on unreadable files
    or a wrong passphrase.
    """
    paths = pki_paths(settings)
    passphrase = ca_passphrase(settings)
    created: list[str] = []
    issued: list[Issued] = []
    paths.root.mkdir(parents=True, exist_ok=True)
    if paths.ca_cert.exists() or paths.ca_key.exists():
        ca = CertificateAuthority.load(paths, passphrase)
    else:
        ca = CertificateAuthority.create(settings.ca_days)
        ca.save(paths, passphrase)
        created.append(str(paths.ca_cert))

    crl = read_crl(paths.crl)
    half_life = dt.timedelta(days=settings.crl_days / 2)
    if (
        crl is None
        or not crl.is_signature_valid(ca.key.public_key())
        or crl.next_update_utc is None
        or crl.next_update_utc - utc_now() < half_life
    ):
        # Entries of a CRL signed by another CA mean nothing to this one.
        if crl is not None and not crl.is_signature_valid(ca.key.public_key()):
            paths.crl.unlink()
        write_crl(ca, paths, [], settings.crl_days)
        created.append(str(paths.crl))

    names = server_names(settings)
    for cn, cert_path, key_path in (
        ("f2pipe broker", paths.broker_cert, paths.broker_key),
        ("f2pipe certgen", paths.certgen_cert, paths.certgen_key),
    ):
        if _needs_server_cert(ca, cert_path, key_path, names):
            server = ca.issue_server(cn, names, settings.service_cert_days)
            assert server.private_key is not None
            write_private(key_path, key_pem(server.private_key))
            write_public(cert_path, cert_pem(server.certificate))
            created.append(str(cert_path))
            issued.append(server)

    for name in services:
        cert_path, key_path = paths.service_cert(name), paths.service_key(name)
        if _needs_client_cert(ca, cert_path, key_path):
            issued.append(issue_service_files(ca, paths, name, settings.service_cert_days))
            created.append(str(cert_path))
    return PkiReport(ca, created, issued)


def issue_service_files(
    ca: CertificateAuthority, paths: PkiPaths, name: str, days: float
) -> Issued:
    """Issue ``svc-<name>`` and write ``services/<name>.pem`` and ``.key`` (0600)."""
    check_service_name(name)
    result = ca.issue_client(name, days)
    assert result.private_key is not None
    paths.services.mkdir(parents=True, exist_ok=True)
    write_private(paths.service_key(name), key_pem(result.private_key))
    write_public(paths.service_cert(name), cert_pem(result.certificate))
    return result


def broker_pid_path(settings: Settings) -> Path:
    """Where the broker writes its pid (certgen sends SIGHUP there after a revocation)."""
    return settings.mosquitto_dir / "mosquitto.pid"


def connector_identities(settings: Settings) -> list[str]:
    """Connector identities with a certificate in ``<state>/pki/services`` (svc-connector*)."""
    services = pki_paths(settings).services
    if not services.is_dir():
        return []
    return sorted(
        path.stem
        for path in services.glob("svc-connector*.pem")
        if path.with_suffix(".key").is_file()
    )
