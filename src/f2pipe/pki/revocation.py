"""Revocation: record it, rewrite the CRL, make the broker reload it, close the live session.

Facts about Mosquitto 2.0.11 this module works around (each verified against
the real broker in the tests):

- The CRL is checked only while a client connects; ``crlfile`` is re-read on
  SIGHUP, so no restart is needed, but a client that is already connected
  stays connected. :func:`close_session` therefore takes the revoked
  identity's session over: the client id is the certificate CN
  (``use_identity_as_username`` + ``use_username_as_clientid``), so a
  connection under the same CN makes the broker drop the old one. The
  identity used for that is a certificate minted for the purpose, valid for
  ten minutes, whose key exists only in this process (and briefly in a 0700
  temporary directory), recorded in the register and revoked right after. The
  takeover resumes the session rather than clearing it and acknowledges
  nothing, so a rotated service certificate loses no queued message.
- A reload drops the ``user`` ACL entries of every *offline* persistent
  session until that client reconnects; meanwhile messages routed to it are
  silently discarded. Device sessions are unaffected (their rules are
  ``pattern`` rules), but the connector's session is exactly such a session.
  After each reload, :func:`refresh_service_sessions` therefore connects once
  under each connector identity found in ``<state>/pki/services`` (resuming
  its session, acknowledging nothing), which makes the broker look the ACL up
  again. A live connector is briefly taken over and reconnects on its own; its
  unacknowledged messages are redelivered, never lost. What remains is the
  few milliseconds between the reload and the refresh.

Everything here blocks (files, signals, MQTT connections); the HTTP service
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

from f2pipe.errors import ConfigError
from f2pipe.pki.ca import CertificateAuthority, key_pem, pki_paths, write_private
from f2pipe.pki.state import broker_pid_path, connector_identities, crl_entries, read_crl, write_crl
from f2pipe.pki.store import CertificateStore
from f2pipe.runtime.tls import client_context
from f2pipe.settings import Settings

log = logging.getLogger(__name__)

# Revocations rewrite one CRL file and signal one broker: one at a time.
_LOCK = threading.Lock()
_TAKEOVER_DAYS = 10 / (24 * 60)  # ten minutes
_CONNECT_TIMEOUT = 10.0
# How long the broker keeps the session the takeover leaves behind; the rightful
# owner's next connect sets its own expiry again.
_KEEP_SESSION_SECONDS = 7 * 24 * 3600


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
    path = broker_pid_path(settings)
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


def reload_and_refresh(settings: Settings) -> bool:
    """SIGHUP the broker, then restore the ACL of offline service sessions; True if reloaded."""
    if not reload_broker(settings):
        return False
    refresh_service_sessions(settings)
    return True


def refresh_service_sessions(settings: Settings) -> None:
    """Connect once as each connector identity so the broker re-reads its ACL (see module doc)."""
    paths = pki_paths(settings)
    for name in connector_identities(settings):
        try:
            context = client_context(
                paths.ca_cert, paths.service_cert(name), paths.service_key(name)
            )
        except (ConfigError, OSError, ValueError) as exc:
            log.warning(
                "cannot refresh service session", extra={"identity": name, "error": str(exc)}
            )
            continue
        if not _take_over(settings, context, name):
            log.warning("service session not refreshed", extra={"identity": name})


def refresh_crl(
    settings: Settings,
    ca: CertificateAuthority,
    store: CertificateStore | None,
    force: bool = False,
) -> bool:
    """Rewrite the CRL from the register (plus what it already lists); True if reloaded.

    Without a register (``None``) the CRL is renewed from its own entries. The
    broker is reloaded only when the list of revoked serials changed, or with
    ``force`` (a renewed CRL must reach the broker before the old expires).
    """
    paths = pki_paths(settings)
    with _LOCK:
        before = set(crl_entries(read_crl(paths.crl)))
        revoked = store.revoked() if store is not None else []
        crl = write_crl(ca, paths, revoked, settings.crl_days)
        if force or set(crl_entries(crl)) != before:
            return reload_and_refresh(settings)
    return False


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
        reloaded = reload_and_refresh(settings)
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

    Caller holds ``_LOCK`` (the takeover identity is revoked in the CRL file
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
            context = client_context(paths.ca_cert, cert_file, key_file)
        return _take_over(settings, context, common_name)
    finally:
        # Listed in the CRL file now; the broker picks it up at the next reload. No
        # reload just for it: its key is gone with this process, it expires in ten
        # minutes, and every reload has a cost (see the module docstring).
        store.revoke(issued.serial, "session closed after revocation")
        write_crl(ca, paths, store.revoked(), settings.crl_days)


def _take_over(settings: Settings, context: object, common_name: str) -> bool:
    connected = threading.Event()
    outcome: list[str] = []

    def on_connect(
        client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        outcome.append(str(reason))
        connected.set()

    # The session is resumed, not cleared, and nothing delivered meanwhile is
    # acknowledged: if the identity is a service whose certificate is being
    # rotated (revoke the old one after issuing the new), its persistent session
    # and queued messages must survive for the successor (SPEC section 7).
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=common_name,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
        manual_ack=True,
    )
    client.tls_set_context(context)  # type: ignore[arg-type]
    client.on_connect = on_connect
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = _KEEP_SESSION_SECONDS
    try:
        client.connect(
            settings.mqtt_host,
            settings.mqtt_port,
            keepalive=30,
            clean_start=False,
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
