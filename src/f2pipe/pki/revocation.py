"""Revocation: record it, rewrite the CRL, have the broker load it, close the live session.

Facts about Mosquitto 2.0.11 this module works around (each verified against
the real broker in the tests):

- The CRL is checked only while a client connects; ``crlfile`` is re-read on
  SIGHUP, so no restart is needed, but a client that is already connected
  stays connected. The revoked identity's session is therefore taken over:
  the client id is the certificate CN (``use_identity_as_username`` +
  ``use_username_as_clientid``), so a connection under the same CN makes the
  broker drop the old one. The identity used for that is a certificate minted
  for the purpose, valid for ten minutes, whose key exists only in this
  process (and briefly in a 0700 temporary directory), recorded in the
  register and revoked right after. The takeover resumes the session rather
  than clearing it and acknowledges nothing, so a rotated service certificate
  loses no queued message.
- certgen need not be able to signal the broker. Where it can (the local
  stack: the pid in ``<state>/mosquitto/mosquitto.pid``, same machine, same
  user) it sends SIGHUP at once; elsewhere the broker's own start script
  (``deploy/mosquitto/broker.sh``, rendered by :mod:`f2pipe.operations.deploy`)
  sends it SIGHUP within seconds of the CRL file changing. Either way certgen
  learns that the broker has loaded the new CRL from the broker itself: every
  CRL written for a reload also lists a *probe*, a certificate minted and
  revoked in the same write, and once the broker refuses the probe's handshake
  it has loaded that CRL (:func:`await_reload`).
- Until then the revoked device could simply reconnect, so the takeover
  connection is held (and taken over again each time the device comes back)
  until the reload is seen, then made once more: from then on the device's
  handshake is refused. All of it within :data:`RELOAD_WITHIN` seconds.
- With several brokers every local one is signalled, and the session is closed
  on the identity's own broker (a device's metadata, a connector's name).
- A reload drops the ``user`` ACL entries of every *offline* persistent
  session until that client reconnects; meanwhile messages routed to it are
  silently discarded. With one broker device rules are patterns, unaffected;
  with several, an offline device misses commands until it reconnects. The
  connector's session is exactly such a session.
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

import datetime as dt
import logging
import os
import signal
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from f2pipe.errors import ConfigError
from f2pipe.pki.ca import (
    CertificateAuthority,
    Issued,
    ca_passphrase,
    key_pem,
    pki_paths,
    utc_now,
    write_private,
)
from f2pipe.pki.state import broker_pid_path, connector_identities, crl_entries, read_crl, write_crl
from f2pipe.pki.store import CertificateStore
from f2pipe.runtime.mqttbrokers import broker_named, broker_names, connector_broker
from f2pipe.runtime.tls import client_context
from f2pipe.settings import Settings

__all__ = [
    "PROBE_IDENTITY",
    "RELOAD_WITHIN",
    "RevokeResult",
    "await_reload",
    "close_session",
    "refresh_crl",
    "refresh_service_sessions",
    "reload_and_refresh",
    "reload_broker",
    "revoke",
]

log = logging.getLogger(__name__)

# Revocations rewrite one CRL file and signal one broker: one at a time.
_LOCK = threading.Lock()
_TAKEOVER_DAYS = 10 / (24 * 60)  # ten minutes
_CONNECT_TIMEOUT = 10.0
# How long the broker keeps the session the takeover leaves behind; the rightful
# owner's next connect sets its own expiry again.
_KEEP_SESSION_SECONDS = 7 * 24 * 3600
#: Seconds certgen waits for the broker to load a new CRL (SPEC: a live session of
#: a revoked identity is closed within 60 s; the broker script reloads within 2).
RELOAD_WITHIN = 45.0
#: The identity of the reload probes: no ACL rule names it, so it can do nothing.
PROBE_IDENTITY = "svc-crl-probe"
_POLL = 0.5


@dataclass(frozen=True)
class RevokeResult:
    """What a revocation did; ``None`` from :func:`revoke` means the serial is unknown."""

    serial: str
    common_name: str
    revoked_at: str
    broker_reloaded: bool
    session_closed: bool


def reload_broker(settings: Settings) -> bool:
    """SIGHUP every broker named in ``<state>/mosquitto/mosquitto.pid`` (and
    ``<state>/mosquitto-<n>/`` for the others); True if the first was signalled.

    An optimisation where certgen and the brokers share a machine and a user:
    a broker elsewhere reloads on its own when the CRL file changes (see the
    module docstring), so a missing or foreign pid is not an error.
    """
    sent = []
    for number in range(1, settings.mqtt_brokers + 1):
        path = broker_pid_path(settings, number)
        try:
            pid = int(path.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            log.info(
                "broker not signalled; its CRL watcher reloads it",
                extra={"pid_file": str(path), "error": type(exc).__name__},
            )
            sent.append(False)
            continue
        sent.append(True)
    return sent[0]


def reload_and_refresh(settings: Settings) -> bool:
    """Have the broker load the CRL on disk, then restore the ACL of offline service sessions.

    SIGHUP by pid where possible; otherwise the CRL is rewritten with a probe and
    this waits (up to :data:`RELOAD_WITHIN` s) for the broker's own reload. True
    if the broker reloaded. Raises CertError if the CA cannot be loaded then.
    """
    if reload_broker(settings):
        refresh_service_sessions(settings)
        return True
    ca = CertificateAuthority.load(pki_paths(settings), ca_passphrase(settings))
    with _LOCK:
        return _reload_with_probe(settings, ca, None, [], signal=False)


def refresh_service_sessions(settings: Settings, brokers: list[str] | None = None) -> None:
    """Connect once as each connector identity to its own broker (of ``brokers``, default
    all) so that broker re-reads the identity's ACL (see the module docstring)."""
    paths = pki_paths(settings)
    for name in connector_identities(settings):
        broker = connector_broker(name)
        if broker not in broker_names(settings) or (brokers is not None and broker not in brokers):
            continue
        try:
            context = client_context(
                paths.ca_cert, paths.service_cert(name), paths.service_key(name)
            )
        except (ConfigError, OSError, ValueError) as exc:
            log.warning(
                "cannot refresh service session", extra={"identity": name, "error": str(exc)}
            )
            continue
        if not _take_over(broker_named(settings, broker).settings(settings), context, name):
            log.warning("service session not refreshed", extra={"identity": name})


def refresh_crl(
    settings: Settings,
    ca: CertificateAuthority,
    store: CertificateStore | None,
    force: bool = False,
) -> bool:
    """Rewrite the CRL from the register (plus what it already lists); True if reloaded.

    Without a register (``None``) the CRL is renewed from its own entries. The
    broker is made to reload only when the list of revoked serials changed, or
    with ``force`` (a renewed CRL must reach the broker before the old
    expires); the CRL then lists a new probe, and this waits (up to
    :data:`RELOAD_WITHIN` s) until the broker refuses it.
    """
    paths = pki_paths(settings)
    with _LOCK:
        current = read_crl(paths.crl)
        revoked = store.revoked() if store is not None else []
        if not force and {serial for serial, _ in revoked} <= set(crl_entries(current)):
            # Nothing new to list: an existing CRL stays as it is, since a rewrite would
            # make a broker that reloads on change (containers) reload for nothing.
            if current is None:
                write_crl(ca, paths, revoked, settings.crl_days)
            return False
        return _reload_with_probe(settings, ca, store, revoked, signal=True)


def _reload_with_probe(
    settings: Settings,
    ca: CertificateAuthority,
    store: CertificateStore | None,
    revoked: list[tuple[int, dt.datetime]],
    signal: bool,
) -> bool:
    """Write the CRL listing ``revoked`` and a new probe, SIGHUP the broker if ``signal``,
    wait (up to :data:`RELOAD_WITHIN` s) until it refuses the probe, then restore the
    service sessions' ACL; True if the broker reloaded. Caller holds ``_LOCK``.

    An unreachable broker counts as reloaded when it was signalled: it loads the
    CRL when it starts.
    """
    probe = _probe(settings, ca, store)
    write_crl(ca, pki_paths(settings), [*revoked, probe.entry], settings.crl_days)
    signalled = signal and reload_broker(settings)
    seen = await_reload(settings, probe.context, time.monotonic() + RELOAD_WITHIN)
    reloaded = signalled if seen is None else seen
    if reloaded:
        refresh_service_sessions(settings)
    return reloaded


def revoke(
    settings: Settings,
    ca: CertificateAuthority,
    store: CertificateStore,
    serial: str,
    reason: str,
) -> RevokeResult | None:
    """Revoke ``serial`` (lowercase hex); None if the register does not know it.

    Blocks until the broker has loaded the new CRL and any live session of the
    identity is closed, at most about :data:`RELOAD_WITHIN` s (a broker that
    cannot be reached returns at once: it has no session to close and loads
    the CRL when it starts). Revoking twice is harmless: the CRL is rewritten
    and the session closed again. Raises psycopg.Error if the register is
    unreachable (nothing changed then) and CertError if the CRL cannot be written.
    """
    record = store.revoke(serial, reason)
    if record is None:
        return None
    with _LOCK:
        probe = _probe(settings, ca, store)
        write_crl(ca, pki_paths(settings), [*store.revoked(), probe.entry], settings.crl_days)
        reload_broker(settings)
        home = _home_broker(settings, store, record.common_name)
        reloaded, closed = close_session(home, ca, store, record.common_name, probe.context)
        if reloaded:
            refresh_service_sessions(settings)
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


def _home_broker(settings: Settings, store: CertificateStore, common_name: str) -> Settings:
    """``settings`` pointed at the broker ``common_name`` connects to: a connector's by
    its identity, a device's by its metadata (mqtt-1 when unknown or unassigned)."""
    if settings.mqtt_brokers == 1:
        return settings
    name: str | None = connector_broker(common_name)
    if common_name.startswith("f2-"):
        device = store.device(common_name.removeprefix("f2-"))
        name = None if device is None else device.broker
    try:
        return broker_named(settings, name).settings(settings)
    except ConfigError:
        return settings


def close_session(
    settings: Settings,
    ca: CertificateAuthority,
    store: CertificateStore,
    common_name: str,
    probe: ssl.SSLContext,
) -> tuple[bool, bool]:
    """Close any live session of ``common_name`` for good; (broker reloaded, session closed).

    The CRL on disk already revokes the identity and lists ``probe`` (a context
    with a revoked certificate). The identity's client id is taken over and
    held, and taken over again whenever the device reconnects, until the broker
    refuses the probe; then it is taken over once more and released. Caller
    holds ``_LOCK`` (the takeover identity is revoked in the CRL file
    afterwards). Never raises for broker trouble: the failure is logged.
    """
    issued = ca.issue_client(common_name, _TAKEOVER_DAYS)
    mac = common_name[3:] if common_name.startswith("f2-") else None
    store.record(issued, mac, "revocation")
    paths = pki_paths(settings)
    try:
        context = _context_of(settings, issued)
        deadline = time.monotonic() + RELOAD_WITHIN
        holder = _Holder(settings, context, common_name)
        try:
            reloaded = None
            while reloaded is None and time.monotonic() < deadline:
                if not holder.held():
                    holder.take_over()
                seen = accepts(settings, probe)
                if seen is False:
                    reloaded = True
                elif seen is None and not holder.reached:
                    break  # nothing answers: no session to close, the CRL loads at start
                else:
                    holder.dropped.wait(_POLL)
        finally:
            holder.release()
        if not reloaded:
            log.warning(
                "the broker did not load the new CRL in time; the revoked identity can "
                "still connect until it does (is deploy/mosquitto/broker.sh its start command?)",
                extra={"common_name": common_name, "waited_s": RELOAD_WITHIN},
            )
            return False, False
        # The device may have come back between the last takeover and the reload: once
        # more, now that its handshake is refused from here on.
        closed = _take_over(settings, context, common_name)
        if not closed:
            log.warning("could not close the revoked session", extra={"common_name": common_name})
        return True, closed
    finally:
        # Listed in the CRL file now; the broker picks it up at the next reload. No
        # reload just for it: its key is gone with this process, it expires in ten
        # minutes, and every reload has a cost (see the module docstring).
        store.revoke(issued.serial, "session closed after revocation")
        write_crl(ca, paths, store.revoked(), settings.crl_days)


def await_reload(settings: Settings, probe: ssl.SSLContext, deadline: float) -> bool | None:
    """Wait until the broker refuses ``probe``: True, False at ``deadline``, None if unreachable."""
    while True:
        seen = accepts(settings, probe)
        if seen is None:
            return None
        if not seen:
            return True
        if time.monotonic() >= deadline:
            return False
        threading.Event().wait(_POLL)


def accepts(settings: Settings, context: ssl.SSLContext) -> bool | None:
    """Does the broker let this certificate in? None when the broker cannot be reached.

    True on a successful CONNACK; False when the broker ends the connection
    during or right after the TLS handshake (a revoked certificate; with TLS 1.3
    the refusal arrives after the client's side of the handshake is done). The
    connection is clean and closed at once, so it leaves no session behind.
    """
    answered = threading.Event()
    outcome: list[bool] = []

    def on_connect(
        client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        outcome.append(not getattr(reason, "is_failure", True))
        answered.set()

    def on_disconnect(*args: object) -> None:
        outcome.append(False)
        answered.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=PROBE_IDENTITY,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
    )
    client.tls_set_context(context)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(settings.mqtt_host, settings.mqtt_port, keepalive=30, clean_start=True)
    except ssl.SSLCertVerificationError as exc:
        log.warning("the broker's certificate is refused", extra={"error": str(exc)})
        return None
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        # TLS 1.2: its alert ends the handshake; 1.3: its close may meet our CONNECT.
        return False
    except OSError:
        return None
    client.loop_start()
    try:
        if not answered.wait(_CONNECT_TIMEOUT):
            return None
        return outcome[0]
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass(frozen=True)
class _Probe:
    entry: tuple[int, dt.datetime]
    context: ssl.SSLContext


def _probe(settings: Settings, ca: CertificateAuthority, store: CertificateStore | None) -> _Probe:
    """A certificate minted to be revoked in the next CRL: its refusal proves the reload."""
    issued = ca.issue_client(PROBE_IDENTITY, _TAKEOVER_DAYS)
    if store is not None:
        store.record(issued, None, "revocation")
        store.revoke(issued.serial, "CRL reload probe")
    return _Probe((issued.certificate.serial_number, utc_now()), _context_of(settings, issued))


def _context_of(settings: Settings, issued: Issued) -> ssl.SSLContext:
    """A client TLS context for a freshly minted identity; its key never stays on disk."""
    assert issued.private_key is not None
    with tempfile.TemporaryDirectory(prefix="f2pipe-takeover-") as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        write_private(key_file, key_pem(issued.private_key))
        write_private(cert_file, issued.certificate_pem().encode())
        return client_context(pki_paths(settings).ca_cert, cert_file, key_file)


class _Holder:
    """Holds a client id on the broker with a live connection, until released.

    ``dropped`` is set when the broker ends the connection (the rightful owner
    came back and took the client id over); :meth:`take_over` takes it back.
    """

    def __init__(self, settings: Settings, context: ssl.SSLContext, common_name: str) -> None:
        self.settings = settings
        self.context = context
        self.common_name = common_name
        self.dropped = threading.Event()
        self.reached = False
        self._client: mqtt.Client | None = None
        self._up = threading.Event()

    def held(self) -> bool:
        return self._client is not None and self._up.is_set() and not self.dropped.is_set()

    def take_over(self) -> bool:
        self.release()
        self.dropped.clear()
        self._up.clear()
        client = _session_client(self.common_name, self.context)

        def on_connect(
            client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
        ) -> None:
            if getattr(reason, "is_failure", True):
                self.dropped.set()
            else:
                self._up.set()

        def on_disconnect(*args: object) -> None:
            self.dropped.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        if not _connect_resuming(self.settings, client, self.common_name):
            return False
        self.reached = True
        self._client = client
        client.loop_start()
        return self._up.wait(_CONNECT_TIMEOUT)

    def release(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None


def _session_client(common_name: str, context: ssl.SSLContext) -> mqtt.Client:
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
    client.tls_set_context(context)
    return client


def _connect_resuming(settings: Settings, client: mqtt.Client, common_name: str) -> bool:
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
            "could not take the session over: broker unreachable",
            extra={"common_name": common_name, "error": str(exc)},
        )
        return False
    return True


def _take_over(settings: Settings, context: ssl.SSLContext, common_name: str) -> bool:
    """Connect once as ``common_name`` (dropping its live connection) and leave; True if done."""
    connected = threading.Event()
    outcome: list[str] = []

    def on_connect(
        client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        outcome.append(str(reason))
        connected.set()

    client = _session_client(common_name, context)
    client.on_connect = on_connect
    if not _connect_resuming(settings, client, common_name):
        return False
    client.loop_start()
    try:
        ok = connected.wait(_CONNECT_TIMEOUT) and outcome == ["Success"]
        if not ok:
            log.warning(
                "could not take the session over: refused",
                extra={"common_name": common_name, "reason": outcome[:1]},
            )
        return ok
    finally:
        client.disconnect()
        client.loop_stop()
