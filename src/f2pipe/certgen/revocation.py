"""Revocation: record it, rewrite the CRL, make the broker reload it, close the live session.

Mosquitto checks the CRL only while a client connects, and re-reads
``crlfile`` on SIGHUP (verified with 2.0.11). A revoked client that is already
connected would stay connected, so :func:`close_session` takes its session
over: with ``use_identity_as_username`` and ``use_username_as_clientid`` the
client id is the certificate CN, so a connection under the same CN makes the
broker drop the old one ("session taken over"). The identity used for that is
a certificate minted for the purpose, valid for ten minutes, whose key exists
only in this process and a temporary 0700 directory, recorded in the register
and revoked right after use. The revoked client's reconnect then fails the CRL
check.

Everything here blocks (files, signals, an MQTT connection); the HTTP service
runs it in a worker thread.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from f2pipe.broker import client_ssl_context, pid_path
from f2pipe.certgen.ca import CertificateAuthority, key_pem, pki_paths, write_crl, write_private
from f2pipe.certgen.store import CertificateStore
from f2pipe.settings import Settings

log = logging.getLogger(__name__)

# Revocations rewrite one CRL file and signal one broker: one at a time.
_LOCK = threading.Lock()
_TAKEOVER_DAYS = 10 / (24 * 60)  # ten minutes
_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class RevokeResult:
    """What a revocation did; ``None`` from :func:`revoke` means the serial is unknown."""

    serial: str
    common_name: str
    revoked_at: str
    broker_reloaded: bool
    session_closed: bool


def reload_broker(settings: Settings) -> bool:
    """Send SIGHUP to the broker named in ``<state>/mosquitto/mosquitto.pid``; True if sent."""
    path = pid_path(settings)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except FileNotFoundError:
        log.warning("broker not reloaded: no pid file", extra={"pid_file": str(path)})
        return False
    except (ValueError, ProcessLookupError, PermissionError) as exc:
        log.warning(
            "broker not reloaded", extra={"pid_file": str(path), "error": type(exc).__name__}
        )
        return False
    return True


def refresh_crl(settings: Settings, ca: CertificateAuthority, store: CertificateStore) -> None:
    """Rewrite the CRL from the register (plus what it already lists) and reload the broker."""
    with _LOCK:
        write_crl(ca, pki_paths(settings), store.revoked(), settings.crl_days)
        reload_broker(settings)


def revoke(
    settings: Settings,
    ca: CertificateAuthority,
    store: CertificateStore,
    serial: str,
    reason: str,
) -> RevokeResult | None:
    """Revoke ``serial`` (lowercase hex); None if the register does not know it.

    Revoking twice is harmless: the CRL is rewritten and the session closed
    again. Raises psycopg.Error if the register is unreachable (nothing changed
    then) and CertError if the CRL cannot be written.
    """
    record = store.revoke(serial, reason)
    if record is None:
        return None
    with _LOCK:
        write_crl(ca, pki_paths(settings), store.revoked(), settings.crl_days)
        reloaded = reload_broker(settings)
        closed = False
        if reloaded:
            closed = close_session(settings, ca, store, record.common_name)
    log.info(
        "certificate revoked",
        extra={
            "serial": serial,
            "common_name": record.common_name,
            "broker_reloaded": reloaded,
            "session_closed": closed,
        },
    )
    return RevokeResult(serial, record.common_name, record.revoked_at.isoformat(), reloaded, closed)


def close_session(
    settings: Settings, ca: CertificateAuthority, store: CertificateStore, common_name: str
) -> bool:
    """Drop any live MQTT session of ``common_name`` by taking it over; True on success.

    Caller holds ``_LOCK`` (the takeover identity is revoked through the CRL
    afterwards). Never raises for broker trouble: a broker that cannot be
    reached has no session to close, and the failure is logged.
    """
    issued = ca.issue_client(common_name, _TAKEOVER_DAYS)
    assert issued.private_key is not None
    mac = common_name[3:] if common_name.startswith("f2-") else None
    store.record(issued, mac, "revocation")
    paths = pki_paths(settings)
    try:
        with tempfile.TemporaryDirectory(prefix="f2pipe-takeover-") as tmp:
            cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            write_private(key_file, key_pem(issued.private_key))
            write_private(cert_file, issued.certificate_pem().encode())
            context = client_ssl_context(paths.ca_cert, cert_file, key_file)
        return _take_over(settings, context, common_name)
    finally:
        store.revoke(issued.serial, "session closed after revocation")
        write_crl(ca, paths, store.revoked(), settings.crl_days)
        reload_broker(settings)


def _take_over(settings: Settings, context: object, common_name: str) -> bool:
    connected = threading.Event()
    outcome: list[str] = []

    def on_connect(
        client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        outcome.append(str(reason))
        connected.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=common_name,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
    )
    client.tls_set_context(context)  # type: ignore[arg-type]
    client.on_connect = on_connect
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0  # leave no session behind
    try:
        client.connect(
            settings.mqtt_host,
            settings.mqtt_port,
            keepalive=30,
            clean_start=True,
            properties=properties,
        )
    except OSError as exc:
        log.warning(
            "could not close the revoked session: broker unreachable",
            extra={"common_name": common_name, "error": str(exc)},
        )
        return False
    client.loop_start()
    try:
        ok = connected.wait(_CONNECT_TIMEOUT) and outcome == ["Success"]
        if not ok:
            log.warning(
                "could not close the revoked session: takeover refused",
                extra={"common_name": common_name, "reason": outcome[:1]},
            )
        return ok
    finally:
        client.disconnect()
        client.loop_stop()
