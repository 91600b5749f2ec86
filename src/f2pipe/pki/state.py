"""The ``<state>/pki`` folder made and kept current, the CRL file on disk, the
shares handed to the broker and the services, and the two facts about the
broker that the certificate authority acts on.

:func:`ensure_pki` (run by ``certgen init``, ``certgen serve`` and ``stack up``)
creates whatever is missing of the CA, the CRL, the broker's and certgen's
server certificates and the service certificates, and renews what is due;
:func:`write_crl` rewrites the CRL without ever dropping an entry. The
certificate primitives are in :mod:`f2pipe.pki.ca`.

Shares: where the broker and the services run apart from the CA (containers,
hosts), each gets a folder of its own under ``<state>/shares/<party>/`` laid
out like ``<state>/pki`` but holding only ``ca.pem``, ``crl.pem`` and that
party's certificate and key: ``broker.pem``/``.key`` for ``broker`` (and for
``broker-<n>``, a further broker of several, which share one certificate),
``services/<name>.pem``/``.key`` for a service identity ``svc-<name>``, nothing
more for any other party (a scraper, a simulator). The party mounts its folder,
read-only, as its own ``<state>/pki``; the CA key never leaves ``<state>/pki``.
:func:`sync_shares` keeps every existing share folder current; it runs after
:func:`ensure_pki`, every CRL written and every service certificate issued, so
a revocation reaches the broker's share at once. Share keys are mode 0640: the
parties run as their own users in the group of the CA's owner, and only their
own share is mounted in their container. Without a ``shares`` folder (the
local stack) nothing happens.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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
    write_file,
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
    "needs_server_cert",
    "read_crl",
    "server_names",
    "sync_shares",
    "write_crl",
]

#: The folder beside ``pki`` that holds one partial PKI folder per party.
SHARES = "shares"
_SHARED_KEY_MODE = 0o640
_PUBLIC_MODE = 0o644
_SHARE_DIR_MODE = 0o750


def server_names(settings: Settings, *hosts: str | None) -> list[str]:
    """SANs for a server: localhost, 127.0.0.1, ::1, ``broker_names`` and the ``hosts`` its
    clients name it by (an unspecified address such as 0.0.0.0 names nothing)."""
    named = [host.strip("[]") for host in hosts if host and host not in ("0.0.0.0", "::")]  # noqa: S104
    extra = [*settings.extra_server_names(), *named]
    return list(dict.fromkeys(["localhost", "127.0.0.1", "::1", *extra]))


def needs_server_cert(
    ca: CertificateAuthority, cert_path: Path, key_path: Path, names: list[str]
) -> bool:
    """True when the server certificate at ``cert_path`` must be issued again: missing, of
    another CA, near its end, or without one of ``names``."""
    return _needs_server_cert(ca, cert_path, key_path, names)


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
    sync_shares(paths)
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

    for cn, cert_path, key_path, names in (
        ("f2pipe broker", paths.broker_cert, paths.broker_key,
         server_names(settings, settings.mqtt_host)),
        ("f2pipe certgen", paths.certgen_cert, paths.certgen_key,
         server_names(settings, settings.certgen_host, urlsplit(settings.certgen_url).hostname)),
    ):  # fmt: skip
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
    created.extend(str(path) for path in sync_shares(paths))
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
    sync_shares(paths)
    return result


def sync_shares(paths: PkiPaths) -> list[Path]:
    """Bring every folder under ``<state>/shares`` up to date; return the files written.

    See the module docstring for what a share holds. Files are replaced
    atomically and only when their content changed (the broker's start script
    reloads the broker when its CRL file changes). Keys issued straight into a
    share's ``devices/`` folder (a simulator's) are made readable to the group.
    Raises OSError when a share cannot be written.
    """
    root = paths.root.parent / SHARES
    if not root.is_dir():
        return []
    written: list[Path] = []
    for share in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        _tighten(share, _SHARE_DIR_MODE)
        wanted = {
            share / "ca.pem": (paths.ca_cert, _PUBLIC_MODE),
            share / "crl.pem": (paths.crl, _PUBLIC_MODE),
        }
        if share.name == "broker" or re.fullmatch(r"broker-[0-9]+", share.name):
            wanted[share / "broker.pem"] = (paths.broker_cert, _PUBLIC_MODE)
            wanted[share / "broker.key"] = (paths.broker_key, _SHARED_KEY_MODE)
        elif share.name.startswith("svc-"):
            own = share / "services"
            wanted[own / f"{share.name}.pem"] = (paths.service_cert(share.name), _PUBLIC_MODE)
            wanted[own / f"{share.name}.key"] = (paths.service_key(share.name), _SHARED_KEY_MODE)
        for target, (source, mode) in wanted.items():
            if source.is_file() and _copy_if_changed(source, target, mode):
                written.append(target)
        for key in share.glob("devices/*.key"):
            _tighten(key, _SHARED_KEY_MODE)
    return written


def _tighten(path: Path, mode: int) -> None:
    """Set ``mode`` on what this user owns; a folder an operator made for us is left as is."""
    info = path.stat()
    if stat.S_IMODE(info.st_mode) != mode and info.st_uid == os.getuid():
        path.chmod(mode)


def _copy_if_changed(source: Path, target: Path, mode: int) -> bool:
    data = source.read_bytes()
    try:
        if target.read_bytes() == data and stat.S_IMODE(target.stat().st_mode) == mode:
            return False
    except FileNotFoundError:
        pass
    target.parent.mkdir(mode=_SHARE_DIR_MODE, exist_ok=True)
    write_file(target, data, mode)
    return True


def broker_pid_path(settings: Settings, number: int = 1) -> Path:
    """Where broker ``mqtt-<number>`` writes its pid (certgen sends SIGHUP there after a
    revocation): ``<state>/mosquitto/mosquitto.pid``, ``<state>/mosquitto-2/...``."""
    folder = settings.mosquitto_dir
    return (folder if number == 1 else folder.with_name(f"mosquitto-{number}")) / "mosquitto.pid"


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
