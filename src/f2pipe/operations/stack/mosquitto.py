"""Mosquitto 2, the MQTT broker: the server, its configuration and its ACL (SPEC section 6).

:func:`ensure_config` creates the PKI if it is missing and writes
``<state>/mosquitto/mosquitto.conf`` and ``acl``; the stack starts
``mosquitto -c <that file>``. There is exactly one listener: TLS 1.2+ with a
client certificate required, the certificate's CN as the MQTT username and
client id, the CA's CRL checked at every connect. No anonymous or plaintext
listener exists. :class:`Mosquitto` also writes the broker's pid to
``<state>/mosquitto/mosquitto.pid`` (:func:`f2pipe.pki.state.broker_pid_path`),
where the certificate authority sends SIGHUP to reload the CRL after a
revocation.

The same renderers serve a broker elsewhere (``f2pipe deploy render``): a
:class:`BrokerSite` says where its files are and how it runs, and
:func:`render_start_script` is the start command of a broker that certgen
cannot signal, which reloads the CRL by itself when the file changes.

Sizing (all overridable through settings):

- ``max_queued_bytes`` (``F2PIPE_BROKER_MAX_QUEUED_BYTES``, default 1/32 of
  the machine's memory) bounds the payload bytes queued per session, and
  ``max_queued_messages`` is as large, so the byte bound is the one that
  holds. While Kafka or every connector is down the broker queues for the
  connectors' persistent sessions up to that bound; past it, it drops what it
  already acknowledged to devices. The drops are counted in ``$SYS``, which
  :mod:`f2pipe.runtime.brokerstats` reads as ``svc-monitor``. The bound
  counts payload bytes only: measured with Mosquitto 2.0.11, a queued sensor
  message (87-byte payload) costs the broker 448 bytes of memory, 5.2 times
  its payload, so the default keeps the queue within about a sixth of memory.
- ``max_inflight_messages`` 2,000: the connector sends PUBACK only once Kafka
  acknowledged the record, so each message stays in flight for the Kafka round
  trip; 2,000 covers 100 ms of acknowledgement latency at 20,000 msg/s (the
  Mosquitto default of 20 would cap the connector at 20 / latency msg/s).
- ``max_connections`` 10,000 on the listener; the broker needs one file
  descriptor per connection, so the stack raises ``RLIMIT_NOFILE`` before
  starting it (:func:`raise_fd_limit`).
- ``autosave_interval`` 60 s: queued messages live in memory and reach disk at
  this interval (and on a graceful shutdown), so a SIGKILL of the broker can
  lose at most this window; a graceful restart loses nothing.
- ``max_packet_size`` 256 KiB: larger packets are refused and the sender
  disconnected (payloads between ``F2PIPE_MAX_PAYLOAD_BYTES`` and this reach
  the pipeline and are dead-lettered as ``payload_too_large``).
- No client may publish a retained message: the plugin of
  :mod:`f2pipe.operations.stack.retainguard` refuses them, so no device can
  hoard broker memory one retained topic at a time. Mosquitto 2.0's own
  switch, ``retain_available false``, would also stop the broker retaining
  its ``$SYS`` counters, and a counter it publishes only on change (the drop
  count) would then be unknown to every reader that connected after the change.
"""

from __future__ import annotations

import getpass
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from f2pipe.operations.stack import retainguard
from f2pipe.operations.stack.install import Program
from f2pipe.operations.stack.security import PKI_LOCK
from f2pipe.operations.stack.server import Server
from f2pipe.operations.stack.supervise import Paths, port_accepts
from f2pipe.pki.ca import PkiPaths, pki_paths
from f2pipe.pki.state import broker_pid_path, connector_identities, ensure_pki
from f2pipe.runtime.mqttbrokers import PORT_STEP, brokers
from f2pipe.settings import Settings

MAX_PACKET_BYTES = 256 * 1024
# Descriptors the broker needs beyond one per connection (persistence, logs, listeners).
_FD_HEADROOM = 1024

#: Service identities and the topics they may use; devices get the %u patterns.
SERVICE_ACL: dict[str, tuple[str, ...]] = {
    "svc-connector": ("topic read stat/#", "topic read tele/#"),
    "svc-commander": ("topic write cmnd/#",),
    "svc-monitor": ("topic read $SYS/#",),
}


def max_queued_bytes(settings: Settings) -> int:
    """The per-session queue bound in payload bytes: the setting, else 1/32 of the memory."""
    if settings.broker_max_queued_bytes is not None:
        return settings.broker_max_queued_bytes
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 32


def max_queued_messages(settings: Settings) -> int:
    """The per-session count limit: the setting, else one that the byte bound always beats.

    A queue of as many messages as the byte bound has payload bytes is never reached
    before that bound by real messages. (Mosquitto 2.0.11 mishandles an explicit 0,
    "no count limit": it then drops clients whose publishes the ACL refuses.)
    """
    if settings.mqtt_max_queued_messages:
        return settings.mqtt_max_queued_messages
    return min(max_queued_bytes(settings), 2**31 - 1)


def broker_dir(settings: Settings, number: int = 1) -> Path:
    """Broker ``mqtt-<number>``'s folder: ``<state>/mosquitto``, ``<state>/mosquitto-2``..."""
    return settings.state_dir / ("mosquitto" if number == 1 else f"mosquitto-{number}")


def conf_path(settings: Settings, number: int = 1) -> Path:
    return broker_dir(settings, number) / "mosquitto.conf"


def acl_path(settings: Settings, number: int = 1) -> Path:
    return broker_dir(settings, number) / "acl"


#: The rules of one device ``f2-<mac>`` where devices are listed one by one.
DEVICE_RULES = ("topic write stat/{u}/+/+/+", "topic write tele/{u}/+/+/+", "topic read cmnd/{u}/#")


def render_acl(connectors: list[str] | None = None, devices: list[str] | None = None) -> str:
    """The ACL file: devices reach only their own topics, services only theirs.

    ``devices`` None (one broker): pattern rules apply to every user; ``%u``
    is the certificate CN, so a device ``f2-<mac>`` may write exactly the
    topics of the grammar's depth (``stat/f2-<mac>/<mode>/<connector>/<component>``,
    the same under ``tele/``) and read ``cmnd/f2-<mac>/#``. A service identity
    matches the same patterns only for topics named after itself
    (``tele/svc-connector/...``), which no device reads and the pipeline treats
    as an invalid topic.

    ``devices`` a list of MACs (several brokers): no pattern at all, a ``user``
    block of those same rules for each listed device, so a device with a valid
    certificate may connect to another broker but publishes and subscribes
    nothing there. Mosquitto finds a client's own block once, at connect, so a
    publish costs the device's three rules, not a scan of the fleet.

    ``connectors`` adds identities with the connector's rights
    (``svc-connector-2``...): several connectors sharing the load need one
    identity each, since the identity is the client id.
    """
    lines = ["# Written by f2pipe (f2pipe.operations.stack.mosquitto); changes are overwritten."]
    if devices is None:
        lines += [
            "# Devices: the certificate CN f2-<mac> is the username (%u).",
            "pattern write stat/%u/+/+/+",
            "pattern write tele/%u/+/+/+",
            "pattern read cmnd/%u/#",
            "",
        ]
    else:
        lines += [f"# Devices of this broker: {len(devices)} (from the fleet metadata).", ""]
        for mac in devices:
            lines.append(f"user f2-{mac}")
            lines.extend(rule.format(u=f"f2-{mac}") for rule in DEVICE_RULES)
            lines.append("")
    users = dict(SERVICE_ACL)
    for name in connectors or []:
        users.setdefault(name, SERVICE_ACL["svc-connector"])
    for user, rules in users.items():
        lines.append(f"user {user}")
        lines.extend(rules)
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class BrokerSite:
    """Where and how one broker runs: what differs between the local stack and a container.

    ``user`` and ``pid_file`` are left out of the configuration when None (a
    container starts the broker as its own non-root user, and nothing signals
    it by pid); ``listen_host`` None listens on every interface; ``plugin`` is
    the built retain guard (None only for a test broker that does without it).
    """

    acl_file: Path
    persistence: Path
    max_queued_bytes: int
    max_queued_messages: int
    plugin: Path | None = None
    user: str | None = None
    pid_file: Path | None = None
    listen_host: str | None = None


def local_site(settings: Settings, number: int = 1) -> BrokerSite:
    """The local stack's broker ``mqtt-<number>``: under its :func:`broker_dir`, as this
    user, on ``mqtt_host``."""
    return BrokerSite(
        acl_file=acl_path(settings, number),
        persistence=broker_dir(settings, number) / "data",
        max_queued_bytes=max_queued_bytes(settings),
        max_queued_messages=max_queued_messages(settings),
        plugin=retainguard.plugin_path(settings.mosquitto_dir),
        # The broker must keep reading the 0600 keys and the CRL after dropping
        # privileges (the CRL is re-read on SIGHUP), so it runs as their owner.
        user=getpass.getuser(),
        pid_file=broker_pid_path(settings, number),
        listen_host=settings.mqtt_host,
    )


def render_conf(settings: Settings, pki: PkiPaths, site: BrokerSite | None = None) -> str:
    """The broker configuration for ``settings`` at ``site`` (the local stack's by default).

    Pure but for the local site's defaults (this user, this machine's memory);
    see the module docstring for the values.
    """
    site = site or local_site(settings)
    listener = f"listener {settings.mqtt_port}"
    if site.listen_host is not None:
        listener += f" {site.listen_host}"
    return "\n".join(
        [
            "# Written by f2pipe (f2pipe.operations.stack.mosquitto); changes are overwritten.",
            *([f"user {site.user}"] if site.user is not None else []),
            *([f"pid_file {site.pid_file}"] if site.pid_file is not None else []),
            "per_listener_settings false",
            "allow_anonymous false",
            # Before the ACL file: the broker asks the plugin first (see retainguard).
            *([f"plugin {site.plugin}"] if site.plugin is not None else []),
            f"acl_file {site.acl_file}",
            "persistence true",
            f"persistence_location {site.persistence}/",
            f"autosave_interval {settings.mqtt_autosave_interval_s}",
            f"max_queued_messages {site.max_queued_messages}",
            f"max_queued_bytes {site.max_queued_bytes}",
            f"max_inflight_messages {settings.mqtt_max_inflight_messages}",
            f"max_packet_size {MAX_PACKET_BYTES}",
            # The monitor identity reads the queue and drop counters from $SYS.
            "sys_interval 5",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "",
            listener,
            f"max_connections {settings.mqtt_max_connections}",
            f"cafile {pki.ca_cert}",
            f"certfile {pki.broker_cert}",
            f"keyfile {pki.broker_key}",
            f"crlfile {pki.crl}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
            # The certificate identity is the client id, so no client can take over
            # another's session by choosing its client id. A listener option: before
            # the first `listener` line it would create a default plaintext listener.
            "use_username_as_clientid true",
            "",
        ]
    )


#: Seconds between two looks of the start script at the CRL file.
CRL_WATCH_SECONDS = 2


def render_start_script(watch_acl: bool = False) -> str:
    """``broker.sh CONF``: run Mosquitto, SIGHUP it when its CRL file changes, pass stops on.

    For a broker that certgen cannot signal by pid (another container, host or
    user): Mosquitto re-reads ``crlfile`` only on SIGHUP, so this POSIX shell
    script (busybox is enough) looks at the file's checksum every
    :data:`CRL_WATCH_SECONDS` seconds and signals its own child when it
    changed. TERM and INT reach the broker, which then saves its queued
    messages; the script exits with the broker's status.

    ``watch_acl`` (several brokers, whose ACLs another service writes from the
    fleet metadata, :mod:`f2pipe.operations.aclsync`): the conf's ``acl_file``
    is watched the same way (Mosquitto re-reads it on the same SIGHUP), and
    until that file exists the script waits for it, saying so once, rather than
    letting Mosquitto fail to start on a missing ACL again and again.
    """
    what = "CRL file (the conf's crlfile)"
    acl_usage = ""
    acl_lines = ""
    if watch_acl:
        what = "CRL or ACL file (the conf's crlfile, acl_file)"
        acl_usage = (
            "# The ACL is written by another service (broker-acls): until it exists the broker\n"
            "# is not started, so it never runs without one.\n"
        )
        acl_lines = f"""acl=$(sed -n 's/^acl_file //p' "$conf")
trap 'exit 143' TERM INT
while [ ! -f "$acl" ]; do
    [ -n "${{said:-}}" ] || echo "broker.sh: waiting for $acl (written by broker-acls)" >&2
    said=1
    sleep {CRL_WATCH_SECONDS} &
    wait $!
done
"""
    look = 'cksum < "$crl" 2>/dev/null'
    if watch_acl:
        look = '{ cksum < "$crl"; cksum < "$acl"; } 2>/dev/null'
    return f"""#!/bin/sh
# Written by f2pipe (f2pipe.operations.stack.mosquitto); changes are overwritten.
# Usage: broker.sh MOSQUITTO_CONF. Starts Mosquitto with that configuration and
# sends it SIGHUP within {CRL_WATCH_SECONDS} s of its {what} changing:
# Mosquitto re-reads the CRL only then, and certgen, which rewrites the file when
# it revokes a certificate, need not be able to signal this process.
{acl_usage}set -u
conf=${{1:?usage: broker.sh MOSQUITTO_CONF}}
crl=$(sed -n 's/^crlfile //p' "$conf")
{acl_lines}${{MOSQUITTO:-mosquitto}} -c "$conf" &
broker=$!
trap 'kill -TERM "$broker" 2>/dev/null; wait "$broker"; exit $?' TERM INT
seen=$({look})
while kill -0 "$broker" 2>/dev/null; do
    sleep {CRL_WATCH_SECONDS} &
    wait $!
    now=$({look})
    if [ "$now" != "$seen" ]; then
        seen=$now
        kill -HUP "$broker"
    fi
done
wait "$broker"
"""


def ensure_config(settings: Settings, number: int = 1, devices: list[str] | None = None) -> Path:
    """Create the PKI if missing and write broker ``mqtt-<number>``'s config and ACL;
    return the conf path.

    With one broker the ACL's device rules are patterns. With several, each
    broker's ACL lists its ``devices`` (MACs); None keeps the list its ACL
    file already holds (none at first), which the stack brings up to date
    from the metadata once the database is up (:mod:`.mqtt_shards`).
    Idempotent: existing keys and certificates are kept (see
    :func:`f2pipe.pki.state.ensure_pki`); the two files are rewritten only when
    their content changes, and the retain guard plugin is built once per
    version. Raises CertError if the PKI cannot be read, StackError if the
    plugin cannot be built.
    """
    with PKI_LOCK:  # the other servers' certificates are made side by side
        ensure_pki(settings)
    pki = pki_paths(settings)
    (broker_dir(settings, number) / "data").mkdir(parents=True, exist_ok=True)
    retainguard.build(settings.mosquitto_dir)  # one plugin for every broker
    acl = acl_path(settings, number)
    if settings.mqtt_brokers > 1 and devices is None:
        devices = listed_devices(acl)
    listed = None if settings.mqtt_brokers == 1 else devices
    write_if_changed(acl, render_acl(connector_identities(settings), listed))
    conf = conf_path(settings, number)
    broker = brokers(settings)[number - 1].settings(settings)
    write_if_changed(conf, render_conf(broker, pki, local_site(settings, number)))
    return conf


def listed_devices(acl: Path) -> list[str]:
    """The MACs an ACL file lists one by one (none for a missing file or one of patterns)."""
    try:
        text = acl.read_text()
    except FileNotFoundError:
        return []
    return [line[len("user f2-") :] for line in text.splitlines() if line.startswith("user f2-")]


def write_if_changed(path: Path, text: str) -> bool:
    """Replace ``path`` atomically with ``text`` unless it holds it; True if written."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def fd_limit_needed(settings: Settings) -> int:
    """File descriptors the broker needs for ``mqtt_max_connections`` clients."""
    return settings.mqtt_max_connections + _FD_HEADROOM


def raise_fd_limit(settings: Settings) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` (children inherit it); return the new value.

    Call before starting the broker. The soft limit goes up to what the
    broker needs, capped by the hard limit (only root can raise that: on a host
    set ``LimitNOFILE=`` or ``ulimit -Hn``; in compose, ``ulimits: nofile``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = fd_limit_needed(settings)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class Mosquitto(Server):
    """Mosquitto 2 from the Debian package, with the configuration f2pipe writes.

    Broker ``mqtt-1``; the others of ``F2PIPE_MQTT_BROKERS`` are subclasses with
    their own ``number`` (:func:`f2pipe.operations.stack.mqtt_shards.mosquitto_nodes`).
    """

    name = "mosquitto"
    number: ClassVar[int] = 1
    start_timeout = 30.0

    def __init__(self, settings: Settings, paths: Paths) -> None:
        super().__init__(settings, paths)
        self.home = broker_dir(settings, self.number)
        self.port = settings.mqtt_port + PORT_STEP * (self.number - 1)
        # The contract with the certificate authority, which sends SIGHUP to reload the CRL.
        self.broker_pidfile = broker_pid_path(settings, self.number)
        self.config: Path | None = None

    def host(self) -> str:
        return self.settings.mqtt_host

    def ports(self) -> dict[int, str]:
        offset = f" + {PORT_STEP * (self.number - 1)}" if self.number > 1 else ""
        return {self.port: f"F2PIPE_MQTT_PORT{offset}"}

    def describe(self) -> str:
        brokers = self.settings.mqtt_brokers
        of = f" mqtt-{self.number} of {brokers}" if brokers > 1 else ""
        return f"{self.settings.mqtt_host}:{self.port}{of}"

    def programs(self) -> list[Program]:
        return [
            Program("mosquitto", "mosquitto"),
            Program("mosquitto_pub", "mosquitto-clients"),
            *retainguard.programs(),
        ]

    def prepare(self) -> None:
        self.home.mkdir(exist_ok=True)
        self.config = ensure_config(self.settings, self.number)
        # Children inherit the limit: thousands of device connections need descriptors.
        raise_fd_limit(self.settings)

    def command(self) -> list[str]:
        assert self.config is not None, "prepare() writes the configuration first"
        mosquitto = Program("mosquitto", "mosquitto").find() or "mosquitto"
        return [mosquitto, "-c", str(self.config)]

    def on_started(self, pid: int) -> None:
        self.broker_pidfile.write_text(f"{pid}\n")

    def on_stopped(self) -> None:
        self.broker_pidfile.unlink(missing_ok=True)

    def healthy(self) -> bool:
        # A TCP accept proves the listener is bound; an MQTT handshake would need a client
        # certificate, and any identity's CONNECT would take over that identity's session.
        if port_accepts(self.port, host=self.host()):
            return True
        self.last_error = f"port {self.port} does not accept connections"
        return False
