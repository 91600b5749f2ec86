"""Several MQTT brokers on the local stack (``F2PIPE_MQTT_BROKERS``), and their device ACLs.

Broker ``mqtt-1`` is the stack's ``mosquitto`` server (``<state>/mosquitto``);
``mqtt-n`` for n > 1 is the server ``mosquitto-<n>`` with its own folder
``<state>/mosquitto-<n>`` (configuration, ACL, persistence, pid file), log
and port (:mod:`f2pipe.runtime.mqttbrokers`).

With several brokers each broker's ACL names, one by one, the controllers the
metadata assigns to it (``devices.broker``; none: ``mqtt-1``), so a device
whose valid certificate lets it connect to another broker can neither publish
nor subscribe there. :func:`sync_acls` rewrites the ACL files from the
metadata and has every local broker whose file changed re-read it (SIGHUP
through its pid file, then the connectors' offline sessions are looked up
again, see :mod:`f2pipe.pki.revocation`); the device identities this machine
keeps (the simulator's) follow, their broker files naming the new URL. The
stack runs it once every broker is up, ``f2pipe up`` once the demo fleet and
its certificates exist, and ``fleet import`` after each write.

The same ACLs, written where brokers run elsewhere (the compose render's
``broker-acls`` service, :mod:`f2pipe.operations.aclsync`), come from the two
parts :func:`sync_acls` is made of: :func:`broker_acls` (pure: each broker's
ACL text) and :func:`write_acls` (each file replaced atomically, only when its
text changed).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from pathlib import Path

import psycopg

from f2pipe.errors import StackError
from f2pipe.operations.stack.mosquitto import (
    Mosquitto,
    acl_path,
    render_acl,
    write_if_changed,
)
from f2pipe.pki.state import broker_pid_path, connector_identities
from f2pipe.runtime.mqttbrokers import (
    DEFAULT_BROKER,
    broker_named,
    broker_names,
    device_broker_file,
)
from f2pipe.settings import Settings

__all__ = [
    "assignments",
    "broker_acls",
    "connector_group",
    "mosquitto_nodes",
    "sync_acls",
    "write_acls",
]

log = logging.getLogger(__name__)


@functools.cache
def _node(number: int) -> type[Mosquitto]:
    return type(
        f"Mosquitto{number}",
        (Mosquitto,),
        {"name": f"mosquitto-{number}", "number": number, "__doc__": f"Broker mqtt-{number}."},
    )


def mosquitto_nodes(settings: Settings) -> tuple[type[Mosquitto], ...]:
    """The stack's brokers: ``mosquitto`` (mqtt-1), then ``mosquitto-2``... up to N."""
    return (Mosquitto, *(_node(n) for n in range(2, settings.mqtt_brokers + 1)))


def assignments(settings: Settings) -> dict[str, list[str]]:
    """Broker name -> the MACs of the controllers it serves, from the metadata.

    Raises StackError naming a controller assigned to a broker these settings
    do not run (and the fix), and psycopg.Error when the metadata cannot be read.
    """
    names = broker_names(settings)
    found: dict[str, list[str]] = {name: [] for name in names}
    with psycopg.connect(settings.metadata_dsn, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT mac_address, broker FROM devices WHERE mac_address IS NOT NULL"
            " ORDER BY mac_address"
        ).fetchall()
    for mac, broker in rows:
        if (broker or DEFAULT_BROKER) not in found:
            raise StackError(
                f"controller {mac} is assigned to broker {broker!r}, which"
                f" F2PIPE_MQTT_BROKERS={settings.mqtt_brokers} does not run ({', '.join(names)}):"
                " raise F2PIPE_MQTT_BROKERS, or assign it another with `f2pipe fleet import`"
            )
        found[broker or DEFAULT_BROKER].append(mac)
    return found


def connector_group(broker: str, replicas: int = 1, identity: str = "svc-connector") -> list[str]:
    """The identities of ``broker``'s connector group: ``svc-connector``, ``svc-connector-2``...
    on mqtt-1, ``svc-connector-mqtt-<n>``, ``svc-connector-mqtt-<n>-2``... on mqtt-<n>."""
    first = identity if broker == DEFAULT_BROKER else f"{identity}-{broker}"
    return [first, *(f"{first}-{n}" for n in range(2, replicas + 1))]


def broker_acls(wanted: dict[str, list[str]], connectors: dict[str, list[str]]) -> dict[str, str]:
    """Broker name -> its ACL file's text: the controllers ``wanted`` lists for it one by one
    (none: no device may publish or subscribe there), the connector identities
    ``connectors`` gives it (beside the fixed service identities). Pure."""
    return {name: render_acl(connectors.get(name, []), macs) for name, macs in wanted.items()}


def write_acls(
    files: dict[str, Path], acls: dict[str, str], missing_only: bool = False
) -> list[str]:
    """Write each broker's ACL text of ``acls`` to its path in ``files``; return the names
    of the brokers whose file changed.

    A file is replaced atomically (written beside it, then renamed), and only when
    its text changed, so a broker watching it reloads only for a real change.
    ``missing_only`` writes only the files that do not exist yet. Raises OSError.
    """
    changed = []
    for name, text in acls.items():
        path = files[name]
        if missing_only and path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if write_if_changed(path, text):
            changed.append(name)
    return changed


def sync_acls(settings: Settings) -> list[str]:
    """Rewrite each broker's ACL from the metadata; have the running local brokers whose
    ACL changed re-read it. Returns the names of those brokers.

    Nothing to do with one broker (its ACL is patterns) or where this machine holds
    no broker folder. Every ACL is computed before any is written, so a refusal
    (StackError, see :func:`assignments`) writes nothing.
    """
    if settings.mqtt_brokers == 1 or not acl_path(settings).parent.is_dir():
        return []
    wanted = assignments(settings)
    numbers = {name: number for number, name in enumerate(wanted, 1)}
    identities = connector_identities(settings)
    changed = write_acls(
        {name: acl_path(settings, number) for name, number in numbers.items()},
        broker_acls(wanted, {name: identities for name in wanted}),
    )
    _local_devices_follow(settings, wanted)
    reloaded = [name for name in changed if _reload(settings, numbers[name])]
    if reloaded:
        from f2pipe.pki.revocation import refresh_service_sessions

        refresh_service_sessions(settings, reloaded)
    log.info("broker ACLs written", extra={"changed": changed, "reloaded": reloaded})
    return changed


def _local_devices_follow(settings: Settings, wanted: dict[str, list[str]]) -> None:
    """Point each device identity kept on this machine (``<state>/pki/devices``, the
    simulator's) at its broker: its broker file names that broker's URL."""
    for name, macs in wanted.items():
        url = broker_named(settings, name).url
        for mac in macs:
            path = device_broker_file(settings, mac)
            if path.with_suffix(".pem").is_file():
                write_if_changed(path, url)


def _reload(settings: Settings, number: int) -> bool:
    """SIGHUP broker ``mqtt-<number>`` through its pid file; False when none runs here."""
    try:
        pid = int(broker_pid_path(settings, number).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True
