"""Provisioning a simulated fleet: its metadata and its device certificates.

:func:`provision_fleet` registers the controllers and their wired sensors the
way ``f2pipe fleet import`` does; :func:`provision_certificates` gives each
device a key (generated here, never sent) and a certificate from certgen, and
:func:`device_ssl_context` is the mutual-TLS context a device connects with.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from f2pipe.runtime import tls
from f2pipe.settings import Settings
from f2pipe.tools.simulator.fleet import Sensor

__all__ = [
    "broker_addresses",
    "device_cert_paths",
    "device_ssl_context",
    "provision_certificates",
    "provision_fleet",
]

log = logging.getLogger(__name__)


def provision_fleet(settings: Settings, sensors: Sequence[Sensor]) -> None:
    """Register the simulated controllers and their wired sensors in the metadata.

    Goes through the fleet importer (one transaction, idempotent), so a re-run
    changes nothing and the processor sees the fleet at once (metadata
    notifications). The device types and templates are the demo fleet's.
    Raises FleetError when the database refuses an entry; then nothing is written.
    """
    from f2pipe.metadata.fleet.demo import demo_fleet
    from f2pipe.metadata.fleet.document import ControllerEntry, Fleet, SensorEntry, WiringEntry
    from f2pipe.metadata.fleet.importer import apply_fleet

    # The types and templates are the demo document's: the simulated sensors encode
    # exactly those templates (tools.simulator.values reads them from it too).
    demo = demo_fleet()
    used = {sensor.template.name for sensor in sensors}
    controller_template = demo.controllers[0].template

    def sensor_name(s: Sensor) -> str:
        return f"Simulated {s.template.name} {s.mac} J{s.connector}/{s.pin}"

    fleet = Fleet(
        device_types=demo.device_types,
        templates=[t for t in demo.templates if t.name in used or t.name == controller_template],
        controllers=[
            ControllerEntry(name=f"Simulated F2 {mac}", mac=mac, template=controller_template)
            for mac in dict.fromkeys(sensor.mac for sensor in sensors)
        ],
        sensors=[SensorEntry(name=sensor_name(s), template=s.template.name) for s in sensors],
        wiring=[
            WiringEntry(controller=s.mac, connector=s.connector, pin=s.pin, sensor=sensor_name(s))
            for s in sensors
        ],
    )
    apply_fleet(settings.metadata_dsn, fleet)


def device_cert_paths(settings: Settings, mac: str) -> tuple[Path, Path]:
    """Where a simulated device keeps its identity: ``<state>/pki/devices/f2-<mac>.pem/.key``."""
    devices = settings.pki_dir / "devices"
    return devices / f"f2-{mac}.pem", devices / f"f2-{mac}.key"


def provision_certificates(
    settings: Settings, macs: Iterable[str], claiming_codes: dict[str, str] | None = None
) -> int:
    """Give every device in ``macs`` a certificate from certgen; return how many were issued.

    The private key is generated here and never leaves (0600); certgen gets a
    CSR for ``f2-<mac>`` with the device's claiming code when one is given, else
    the operator's admin token. A device whose certificate and key already
    exist is left alone, so a second run reuses them. The CA certificate from
    the answer is written to ``<state>/pki/ca.pem`` if that file is missing.
    Raises CertError naming the device and certgen's answer on a refusal.
    """
    import httpx
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from f2pipe.errors import CertError
    from f2pipe.pki.auth import admin_token
    from f2pipe.pki.ca import generate_key, key_pem, write_private, write_public
    from f2pipe.runtime.mqttbrokers import device_broker_file

    codes = claiming_codes or {}
    missing = [m for m in macs if not all(p.is_file() for p in device_cert_paths(settings, m))]
    if not missing:
        return 0
    token = None if codes and all(m in codes for m in missing) else admin_token(settings, False)
    ca_file = settings.pki_dir / "ca.pem"
    verify: bool | ssl.SSLContext = (
        ssl.create_default_context(cafile=str(ca_file)) if ca_file.is_file() else True
    )
    issued = 0
    with httpx.Client(base_url=settings.certgen_url, verify=verify, timeout=30) as http:
        for mac in missing:
            key = generate_key()
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"f2-{mac}")]))
                .sign(key, hashes.SHA256())
            )
            body: dict[str, str] = {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
            headers = {}
            if mac in codes:
                body["claiming_code"] = codes[mac]
            elif token is not None:
                headers["Authorization"] = f"Bearer {token.get_secret_value()}"
            try:
                answer = http.post(f"/v1/devices/{mac}/certificate", json=body, headers=headers)
            except httpx.HTTPError as exc:
                raise CertError(f"certgen at {settings.certgen_url} unreachable: {exc}") from None
            if answer.status_code != 201:
                detail = answer.json().get("detail") if answer.content else ""
                raise CertError(f"certgen refused f2-{mac}: {answer.status_code} {detail}")
            issued_cert = answer.json()
            cert_path, key_path = device_cert_paths(settings, mac)
            write_private(key_path, key_pem(key))
            write_public(cert_path, issued_cert["certificate"].encode())
            if not ca_file.is_file():
                write_public(ca_file, issued_cert["ca_certificate"].encode())
            if issued_cert.get("broker_url"):
                url = issued_cert["broker_url"].encode()
                write_public(device_broker_file(settings, mac), url)
            issued += 1
    log.info("device certificates issued", extra={"issued": issued})
    return issued


def broker_addresses(settings: Settings, macs: Iterable[str]) -> dict[str, tuple[str, int]]:
    """(host, port) of each device's broker: the URL certgen named for it
    (:func:`~f2pipe.runtime.mqttbrokers.device_broker_file`), else its broker in the
    metadata, else the default one.

    Empty with one broker (every device connects to the settings' broker). Raises
    ConfigError naming a device whose broker these settings do not know, and the fix.
    """
    from f2pipe.errors import ConfigError
    from f2pipe.runtime.mqttbrokers import broker_named, device_broker_file

    if settings.mqtt_brokers == 1:
        return {}
    found: dict[str, tuple[str, int]] = {}
    unknown: list[str] = []
    for mac in macs:
        try:
            url = urlsplit(device_broker_file(settings, mac).read_text().strip())
        except FileNotFoundError:
            unknown.append(mac)
            continue
        if url.hostname is None or url.port is None:
            raise ConfigError(f"{device_broker_file(settings, mac)}: not an mqtts://host:port URL")
        found[mac] = (url.hostname, url.port)
    assigned = _assigned_brokers(settings, unknown) if unknown else {}
    for mac in unknown:
        try:
            broker = broker_named(settings, assigned.get(mac))
        except ConfigError as exc:
            raise ConfigError(f"controller {mac}: {exc}") from None
        found[mac] = (broker.host, broker.port)
    return found


def _assigned_brokers(settings: Settings, macs: list[str]) -> dict[str, str]:
    """The brokers the metadata assigns to ``macs`` (none when it cannot be read)."""
    import psycopg

    try:
        with psycopg.connect(settings.metadata_dsn, connect_timeout=10) as conn:
            rows = conn.execute(
                "SELECT mac_address, broker FROM devices"
                " WHERE mac_address = ANY(%s) AND broker IS NOT NULL",
                (macs,),
            ).fetchall()
    except psycopg.Error as exc:
        log.warning("device brokers unknown: the default broker for all", extra={"error": str(exc)})
        return {}
    return {mac: broker for mac, broker in rows}


def device_ssl_context(settings: Settings, mac: str) -> ssl.SSLContext | None:
    """A device's mTLS context from ``<state>/pki/devices/f2-<mac>.pem``/``.key``."""
    if not settings.mqtt_tls:
        return None
    cert, key = device_cert_paths(settings, mac)
    return tls.client_context(settings.pki_dir / "ca.pem", cert, key)
