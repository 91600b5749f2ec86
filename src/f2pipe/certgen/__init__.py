"""certgen: the f2pipe certificate authority and its HTTP service (SPEC section 6).

- :mod:`f2pipe.certgen.ca`: keys, certificates, CRL, the ``<state>/pki`` layout.
- :mod:`f2pipe.certgen.api`: the FastAPI app (``create_app``).
- :mod:`f2pipe.certgen.store`: the certificate register in PostgreSQL.
- :mod:`f2pipe.certgen.revocation`: CRL reload and closing revoked sessions.
- :mod:`f2pipe.certgen.local`: operations on the CA host without HTTP.
- :mod:`f2pipe.certgen.cli`: ``f2pipe certgen init | serve | issue-service |
  issue-device | revoke``.

Only the certificate primitives are imported here (``f2pipe.broker`` builds on
them); the HTTP app, revocation and the CA-host helpers are imported from their
modules, so a tool that needs a certificate does not load FastAPI or paho.
"""

from f2pipe.certgen.auth import admin_token
from f2pipe.certgen.ca import (
    SERVICE_NAMES,
    CertificateAuthority,
    Issued,
    PkiPaths,
    device_common_name,
    ensure_pki,
    pki_paths,
)
from f2pipe.certgen.store import CertificateStore
from f2pipe.topics import normalize_mac

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
