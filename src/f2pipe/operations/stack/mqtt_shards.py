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
"""

from __future__ import annotations

import functools
import logging
import os
import signal

import psycopg

from f2pipe.errors import StackError
from f2pipe.operations.stack.mosquitto import (
    Mosquitto,
    acl_path,
    ensure_config,
    listed_devices,
    write_if_changed,
)
from f2pipe.pki.state import broker_pid_path
from f2pipe.runtime.mqttbrokers import (
    DEFAULT_BROKER,
    broker_named,
    broker_names,
    device_broker_file,
)
from f2pipe.settings import Settings

__all__ = ["assignments", "mosquitto_nodes", "sync_acls"]

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
    changed = {
        name: number
        for number, name in enumerate(wanted, 1)
        if not acl_path(settings, number).is_file()
        or listed_devices(acl_path(settings, number)) != wanted[name]
    }
    for name, number in changed.items():
        ensure_config(settings, number, wanted[name])
    _local_devices_follow(settings, wanted)
    reloaded = [name for name, number in changed.items() if _reload(settings, number)]
    if reloaded:
        from f2pipe.pki.revocation import refresh_service_sessions

        refresh_service_sessions(settings, reloaded)
    log.info("broker ACLs written", extra={"changed": list(changed), "reloaded": reloaded})
    return list(changed)


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
