"""``f2pipe fleet sync-acls``: every broker's ACL file, kept in step with the fleet metadata.

With several brokers (``F2PIPE_MQTT_BROKERS`` > 1) each broker admits, by name,
only the controllers the metadata assigns to it
(:mod:`f2pipe.operations.stack.mqtt_shards`). Where the brokers run apart from
the metadata (the compose render's ``broker-acls`` service), this command
writes those ACLs into ``OUT/<broker>/acl`` (``OUT/mqtt-1/acl``,
``OUT/mqtt-2/acl``...); each broker mounts its own folder read-only and its
start script reloads it when the file changes
(:func:`f2pipe.operations.stack.mosquitto.render_start_script`).

Guarantees:

- the metadata is read with ``SELECT mac_address, broker FROM devices`` only
  (the ``aclsync`` principal's one grant, :mod:`f2pipe.operations.principals`);
- every ACL is computed before any is written, so a controller assigned to a
  broker the settings do not run (StackError) writes nothing;
- a file is replaced atomically, and only when its text changes;
- with ``--every``, a broker whose file does not exist yet first gets an ACL
  that lists no controller (deny by default: its services may connect, no
  device may publish or subscribe), so it can start before the metadata is
  readable; afterwards a failed read or a refusal is logged and the files are
  kept as they are until the next round.
"""

from __future__ import annotations

import argparse
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from f2pipe.errors import ConfigError, StackError
from f2pipe.operations.stack.mqtt_shards import (
    assignments,
    broker_acls,
    connector_group,
    write_acls,
)
from f2pipe.runtime.mqttbrokers import broker_names
from f2pipe.settings import Settings

__all__ = ["ACL_FILE", "AclSync", "acl_files", "configure"]

log = logging.getLogger(__name__)

#: The name of each broker's ACL file in its folder ``OUT/<broker>/``.
ACL_FILE = "acl"


def acl_files(out: Path, brokers: list[str]) -> dict[str, Path]:
    """Broker name -> its ACL file under ``out``: ``out/mqtt-1/acl``..."""
    return {name: out / name / ACL_FILE for name in brokers}


@dataclass
class AclSync:
    """The ACL files of ``settings``' brokers under ``out``, each broker's connector group
    ``connectors`` identities strong (``svc-connector``, ``svc-connector-2``... on mqtt-1)."""

    settings: Settings
    out: Path
    connectors: int = 1
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.settings.mqtt_brokers < 2:
            raise ConfigError(
                "F2PIPE_MQTT_BROKERS=1: the one broker's ACL is patterns and needs no sync;"
                " set F2PIPE_MQTT_BROKERS to the brokers' count"
            )
        if self.connectors < 1:
            raise ConfigError("--connectors must be 1 or more")
        self.names = broker_names(self.settings)
        self.files = acl_files(self.out, self.names)
        identity = self.settings.connector_identity
        self.groups = {b: connector_group(b, self.connectors, identity) for b in self.names}

    def deny_missing(self) -> list[str]:
        """Write an ACL listing no controller for each broker that has no file yet;
        return their names. Raises OSError."""
        empty = broker_acls({name: [] for name in self.names}, self.groups)
        return write_acls(self.files, empty, missing_only=True)

    def sync(self) -> list[str]:
        """Write each broker's ACL from the metadata; return the brokers whose file changed.

        Raises StackError for a controller of a broker these settings do not run,
        psycopg.Error when the metadata cannot be read (nothing written in
        either case), OSError when a file cannot be written.
        """
        changed = write_acls(self.files, broker_acls(assignments(self.settings), self.groups))
        if changed:
            log.info("broker ACLs written", extra={"changed": changed})
        return changed

    def run(self, every: float) -> None:
        """:meth:`deny_missing`, then :meth:`sync` every ``every`` seconds until
        :meth:`stop`; a failed round is logged and retried at the next."""
        if denied := self.deny_missing():
            log.info("broker ACLs admit no device until the first sync", extra={"brokers": denied})
        while not self.stopping.is_set():
            try:
                self.sync()
            except (StackError, psycopg.Error) as exc:
                log.error("broker ACLs kept as they are", extra={"error": _one_line(exc)})
            self.stopping.wait(every)

    def stop(self) -> None:
        self.stopping.set()


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def configure(parser: argparse.ArgumentParser) -> None:
    """The options of ``f2pipe fleet sync-acls`` on its own parser."""
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="write each broker's ACL to DIR/<broker>/acl (mqtt-1, mqtt-2...)",
    )
    parser.add_argument(
        "--every",
        type=float,
        metavar="SECONDS",
        help="keep running, syncing every SECONDS (default: sync once and exit)",
    )
    parser.add_argument(
        "--connectors",
        type=int,
        default=1,
        help="connector identities each broker admits from its own group (default 1)",
    )
    parser.set_defaults(func=_cmd_sync_acls)


def _cmd_sync_acls(args: argparse.Namespace) -> int:
    from f2pipe.errors import DatabaseUnavailable
    from f2pipe.runtime.logs import setup_logging
    from f2pipe.runtime.shutdown import stop_on_signals
    from f2pipe.settings import get_settings

    job = AclSync(get_settings(), args.out, args.connectors)
    if args.every is None:
        try:
            changed = job.sync()
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"the metadata cannot be read: {_one_line(exc)}") from None
        print(f"broker ACLs rewritten: {', '.join(changed)}" if changed else "broker ACLs current")
        return 0
    if args.every <= 0:
        raise ConfigError("--every must be more than 0 seconds")
    setup_logging("broker-acls")
    stop_on_signals(job.stop)
    job.run(args.every)
    return 0
