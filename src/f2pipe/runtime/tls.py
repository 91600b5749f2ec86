"""TLS contexts for MQTT clients (devices, services), built by the caller and passed in.

Every MQTT client of the product authenticates with a client certificate
(SPEC section 6); the file layout is ``<state>/pki/ca.pem`` plus
``<state>/pki/services/svc-<name>.pem``/``.key`` for services.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from f2pipe.errors import ConfigError


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting only ``ca`` and presenting ``cert``/``key``.

    Raises ConfigError naming the file when one is missing or unreadable.
    """
    for path in (ca, cert, key):
        if not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist (issue it with certgen first)")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load client certificate {cert} / {key}: {exc}") from None
    return context


def service_context(pki_dir: Path, service: str) -> ssl.SSLContext:
    """The mTLS context of service identity ``svc-<service>`` from the PKI folder."""
    name = service if service.startswith("svc-") else f"svc-{service}"
    services = pki_dir / "services"
    return client_context(pki_dir / "ca.pem", services / f"{name}.pem", services / f"{name}.key")
