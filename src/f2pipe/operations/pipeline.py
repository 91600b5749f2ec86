"""The whole pipeline on this machine: ``f2pipe up``, ``f2pipe down`` and ``f2pipe run``.

``up`` brings up the local stack (:mod:`f2pipe.operations.stack`), migrates the database,
seeds the demo fleet, initialises the certificate authority (with a device
certificate per demo controller), then starts certgen, the connector, the
processor and the sink as background processes (:mod:`f2pipe.operations.services`;
each stage as many replicas as ``F2PIPE_<STAGE>_REPLICAS`` asks),
each waited on until its ``/healthz`` answers, and finally the simulator with
the demo fleet in live mode. ``down`` stops what ``up`` started, services first,
then servers. ``run`` is ``up`` in the foreground with the live view of
:mod:`f2pipe.operations.status`; Ctrl-C stops what that ``run`` started.

Contracts:

- Idempotent: a second ``up`` starts only what is not running (so it revives a
  killed service); the servers an ``up`` started are added to
  ``<state>/run/up.servers`` and only those are stopped by ``down``. A stack
  started earlier by ``f2pipe stack up`` (or by someone else) is left running.
- A failed ``up`` stops the services it started and raises
  :class:`~f2pipe.errors.StackError`; servers it started stay recorded for
  ``down``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from f2pipe.errors import StackError
from f2pipe.operations import stack
from f2pipe.operations.services import (
    NAMES,
    Service,
    check_connector_count,
    ensure_connector_identities,
    services,
)
from f2pipe.operations.stack import Paths, rights, security
from f2pipe.settings import Settings, load_settings

RECORD = "up.servers"


@dataclass
class Started:
    """What one ``up`` started (and so what the matching ``run`` stops)."""

    servers: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)


def prepare_data(settings: Settings) -> None:
    """Schema, demo fleet, CA, admin token and demo device certificates; all idempotent."""
    from f2pipe.metadata.database import migrate, seed_demo
    from f2pipe.metadata.fleet.demo import demo_fleet
    from f2pipe.pki.auth import admin_token
    from f2pipe.pki.local import (
        issue_device_files,
        load_ca,
        open_store,
        record_local_certificates,
    )
    from f2pipe.pki.state import ensure_pki

    paths = Paths(settings.state_dir)
    # The operator's credentials when this state folder runs PostgreSQL or Redis secured.
    settings = security.admin_settings(settings)
    for dsn in dict.fromkeys([settings.metadata_dsn, settings.timeseries_dsn]):
        migrate(dsn, settings)
        if security.is_secured(paths, "postgres"):
            rights.grant(settings, dsn)
    seed_demo(settings.metadata_dsn, settings.state_dir)
    ensure_pki(settings)
    admin_token(settings)
    devices = settings.pki_dir / "devices"
    devices.mkdir(parents=True, exist_ok=True)
    store = open_store(settings, required=True)
    assert store is not None
    try:
        record_local_certificates(settings, store)
        ca = load_ca(settings)
        for mac in (controller.mac for controller in demo_fleet().controllers):
            if not (devices / f"f2-{mac}.pem").is_file():
                issue_device_files(settings, mac, devices, ca=ca, store=store)
    finally:
        store.close()
    if settings.mqtt_brokers > 1:  # each broker lets in the controllers assigned to it
        from f2pipe.operations.stack.mqtt_shards import sync_acls

        sync_acls(settings)
    security.write_admin_env(settings, paths)


def _admit_connectors(settings: Settings) -> None:
    """The running brokers re-read their ACLs, which now name the connector replicas'
    identities."""
    from f2pipe.operations.stack.mosquitto import ensure_config
    from f2pipe.pki.revocation import reload_and_refresh

    for number in range(1, settings.mqtt_brokers + 1):
        ensure_config(settings, number)
    reload_and_refresh(settings)


def _record(paths: Paths) -> Path:
    return paths.run / RECORD


def _remember(paths: Paths, names: Sequence[str]) -> None:
    path = _record(paths)
    known = path.read_text().split() if path.is_file() else []
    path.write_text("".join(f"{n}\n" for n in dict.fromkeys([*known, *names])))


def up(
    settings: Settings,
    names: Sequence[str] = (),
    quiet: bool = False,
    started: Started | None = None,
    servers: Sequence[str] | None = None,
) -> Started:
    """Start the stack and every chosen service that is not running; wait until healthy.

    Returns what this call started (also filled into ``started`` as it goes, so
    a caller interrupted mid-way knows which servers to stop). Raises
    StackError (or ConfigError) naming the cause; services this call started
    are stopped again on failure. ``servers``: the stack servers to ensure
    (default all; tests that share some servers pass only the others).
    """
    paths = Paths(settings.state_dir)
    started = Started() if started is None else started
    with stack.locked(paths, "services"):
        if not names or "connector" in names:
            check_connector_count(settings)
        # Before the broker starts, so that it reads them into its ACL at once.
        identities = ensure_connector_identities(settings)
        if servers is None or servers:
            started.servers.extend(stack.up(settings, servers or ()))
        _remember(paths, started.servers)
        if identities and not any(name.startswith("mosquitto") for name in started.servers):
            _admit_connectors(settings)
        prepare_data(settings)
        chosen = services(settings, names)
        launched: list[Service] = []
        try:
            for service in chosen:
                if service.pid() is None:
                    service.pidfile.remove()
                    service.check_ports()
                    service.start()
                    launched.append(service)
                service.wait_healthy()
        except BaseException:
            for service in reversed(launched):
                service.stop()
            raise
        started.services = [s.label for s in launched]
        if not quiet:
            width = max((len(s.label) for s in chosen), default=0)
            for service in chosen:
                verb = "started" if service in launched else "running"
                print(f"{service.label:<{width}} {verb:<8} {service.describe()}")
    return started


def down(settings: Settings, only: Started | None = None, quiet: bool = False) -> list[str]:
    """Stop the services (simulator first), then the servers ``up`` started.

    ``only``: stop just what one ``up`` started (``run`` uses it). Returns the
    names stopped.
    """
    paths = Paths(settings.state_dir)
    stopped: list[str] = []
    with stack.locked(paths, "services"):
        wanted = None if only is None else set(only.services)
        for service in reversed(services(settings, past_count=True)):
            if wanted is not None and service.label not in wanted:
                continue
            if service.stop():
                stopped.append(service.label)
                if not quiet:
                    print(f"{service.label:<10} stopped")
        record = _record(paths)
        recorded = record.read_text().split() if record.is_file() else []
        servers = recorded if only is None else [n for n in recorded if n in only.servers]
        if servers:
            stopped.extend(stack.down(settings, servers))
        left = [n for n in recorded if n not in servers]
        if left:
            record.write_text("".join(f"{n}\n" for n in left))
        else:
            record.unlink(missing_ok=True)
    return stopped


def _names(values: Sequence[str]) -> list[str]:
    for value in values:
        if value not in NAMES:
            raise StackError(f"unknown service {value!r}; choose from {', '.join(NAMES)}")
    return list(values)


def _run_up(args: argparse.Namespace) -> int:
    up(load_settings(), _names(args.services))
    return 0


def _run_down(args: argparse.Namespace) -> int:
    if not down(load_settings()):
        print("nothing to stop")
    return 0


def _say(text: str) -> None:
    """Print, unless the terminal is gone (closed window): stopping must go on regardless."""
    with contextlib.suppress(OSError):
        print(text, flush=True)


def _run_foreground(args: argparse.Namespace) -> int:
    """``up``, a live view until Ctrl-C (or SIGTERM, SIGHUP), then stop what this call started."""
    from f2pipe.operations.statusview import live

    settings = load_settings()

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)  # the terminal was closed
    started = Started()
    try:
        up(settings, started=started)
        # The view reads every server as the operator (secured stack: admin.env's rights).
        live(security.admin_settings(settings), refresh=args.refresh)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C, or the terminal closing, would leave processes behind: finish.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        _say("\nstopping what this run started ...")
        began = time.monotonic()
        stopped = down(settings, only=started, quiet=True)
        _say(f"stopped {', '.join(stopped) or 'nothing'} in {time.monotonic() - began:.1f} s")
    return 0


def configure_up(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "services", nargs="*", metavar="SERVICE",
        help=f"services to start (default: all of {', '.join(NAMES)})",
    )  # fmt: skip
    parser.set_defaults(func=_run_up)


def configure_down(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=_run_down)


def configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--refresh", type=float, default=2.0, help="seconds between live-view updates"
    )
    parser.set_defaults(func=_run_foreground)
