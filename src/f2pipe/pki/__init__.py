"""certgen: the f2pipe certificate authority and its HTTP service (SPEC section 6).

- :mod:`f2pipe.pki.ca`: keys, certificates, CRL, the ``<state>/pki`` layout.
- :mod:`f2pipe.pki.api`: the FastAPI app (``create_app``).
- :mod:`f2pipe.pki.store`: the certificate register in PostgreSQL.
- :mod:`f2pipe.pki.revocation`: CRL reload and closing revoked sessions.
- :mod:`f2pipe.pki.local`: operations on the CA host without HTTP.
- :mod:`f2pipe.pki.cli`: ``f2pipe certgen init | serve | issue-service |
  issue-device | revoke``.

Only the certificate primitives are imported here (the broker configuration in
``f2pipe.operations.stack.mosquitto`` builds on them); the HTTP app, revocation
and the CA-host helpers are imported from their modules, so a tool that needs a
certificate does not load FastAPI or paho.
"""

from f2pipe.core.topics import normalize_mac
from f2pipe.pki.auth import admin_token
from f2pipe.pki.ca import (
    SERVICE_NAMES,
    CertificateAuthority,
    Issued,
    PkiPaths,
    device_common_name,
    pki_paths,
)
from f2pipe.pki.state import ensure_pki
from f2pipe.pki.store import CertificateStore

__all__ = [
    "SERVICE_NAMES",
    "CertificateAuthority",
    "CertificateStore",
    "Issued",
    "PkiPaths",
    "admin_token",
    "device_common_name",
    "ensure_pki",
    "normalize_mac",
    "pki_paths",
]
