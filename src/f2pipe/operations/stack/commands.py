"""``f2pipe stack up|down|status``: the four servers together, all or nothing.

See the package docstring for the contracts; each server is described in its
own module and supervised through :mod:`.supervise`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from f2pipe.errors import ConfigError, StackError
from f2pipe.operations.stack import security
from f2pipe.operations.stack.install import ensure_programs
from f2pipe.operations.stack.kafka import Kafka, KafkaNode2, KafkaNode3, kafka_nodes
from f2pipe.operations.stack.kafka_cluster import node_host, node_ports, stop_nodes
from f2pipe.operations.stack.mosquitto import Mosquitto
from f2pipe.operations.stack.mqtt_shards import mosquitto_nodes, sync_acls
from f2pipe.operations.stack.postgres import Postgres
from f2pipe.operations.stack.redis import Redis
from f2pipe.operations.stack.server import LAUNCH_PREFIX, Server
from f2pipe.operations.stack.supervise import LOOPBACK, Paths, is_local, is_loopback, locked
from f2pipe.runtime.mqttbrokers import brokers
from f2pipe.settings import Settings, load_settings

SERVERS: tuple[type[Server], ...] = (Postgres, Redis, Kafka, Mosquitto)
NAMES = tuple(cls.name for cls in SERVERS)


def _node_name(value: str) -> bool:
    """A cluster's Kafka nodes 2 and 3 follow `kafka`, brokers mosquitto-2... follow
    `mosquitto`; they may be named too (and are, in `--record` files)."""
    number = value.removeprefix("mosquitto-")
    return value in (KafkaNode2.name, KafkaNode3.name) or (number.isdigit() and int(number) > 1)


def _check_settings(settings: Settings) -> None:
    """Each server on loopback or another address of this machine (or of the host it is
    launched on, see ``LAUNCH_PREFIX``), on distinct ports; say which variable is wrong."""
    hosts = {
        "F2PIPE_METADATA_DSN": (Postgres.name, urlsplit(settings.metadata_dsn).hostname),
        "F2PIPE_REDIS_URL": (Redis.name, urlsplit(settings.redis_url).hostname),
        "F2PIPE_KAFKA_BOOTSTRAP": (Kafka.name, node_host(settings, 1)),
        "F2PIPE_MQTT_HOST": (Mosquitto.name, settings.mqtt_host),
    }
    for variable, (server, host) in hosts.items():
        host = (host or LOOPBACK).strip("[]")
        if is_loopback(host):
            continue
        if not settings.stack_secured:
            raise ConfigError(
                f"{variable} points at {host}, but F2PIPE_STACK_SECURED=false serves loopback "
                f"only; use {LOOPBACK}, or leave the stack secured"
            )
        if server not in LAUNCH_PREFIX and not is_local(host):
            raise ConfigError(
                f"{variable} points at {host}, which is not an address of this machine; "
                f"`f2pipe stack` runs its servers here: use {LOOPBACK} or this machine's address"
            )
    scheme = urlsplit(settings.redis_url).scheme
    wanted = "redis" if is_loopback(urlsplit(settings.redis_url).hostname or LOOPBACK) else "rediss"
    if scheme != wanted:
        raise ConfigError(
            f"F2PIPE_REDIS_URL must start with {wanted}:// for the local stack: plain on "
            "loopback, TLS (rediss://) on any other address"
        )
    ports = {
        "F2PIPE_METADATA_DSN": settings.pg_port(),
        "F2PIPE_REDIS_URL": settings.redis_port(),
        "F2PIPE_KAFKA_BOOTSTRAP": settings.kafka_port(),
        "F2PIPE_KAFKA_CONTROLLER_PORT": settings.kafka_controller_port,
        "F2PIPE_MQTT_PORT": settings.mqtt_port,
    }
    for node, (client, controller) in enumerate(node_ports(settings)[1:], 2):
        ports |= {
            f"F2PIPE_KAFKA_BOOTSTRAP (broker {node})": client,
            f"F2PIPE_KAFKA_CONTROLLER_PORT (+{2 * (node - 1)}, broker {node})": controller,
        }
    for broker in brokers(settings)[1:]:
        offset = broker.port - settings.mqtt_port
        ports[f"F2PIPE_MQTT_PORT (+{offset}, broker {broker.name})"] = broker.port
    seen: dict[int, str] = {}
    for variable, port in ports.items():
        if port in seen:
            raise ConfigError(f"{variable} and {seen[port]} both use port {port}; change one")
        seen[port] = variable


def _servers(settings: Settings, names: Sequence[str]) -> list[Server]:
    """The chosen servers in start order; ``kafka`` stands for every node of a cluster."""
    paths = Paths(settings.state_dir)
    chosen = set(names) or set(NAMES)
    nodes = {Kafka: kafka_nodes(settings), Mosquitto: mosquitto_nodes(settings)}
    classes = [node for cls in SERVERS for node in nodes.get(cls, (cls,))]
    return [
        cls(settings, paths)
        for cls in classes
        if cls.name in chosen
        or (issubclass(cls, Kafka) and Kafka.name in chosen)
        or (issubclass(cls, Mosquitto) and Mosquitto.name in chosen)
    ]


def servers(settings: Settings) -> list[Server]:
    """Every server of the stack in start order, each node of a Kafka cluster included."""
    return _servers(settings, ())


def up(settings: Settings, names: Sequence[str] = (), record: Path | None = None) -> list[str]:
    """Start every chosen server that is not running and wait until all are healthy.

    Returns the names this call started (also written to ``record``, one per
    line). On any failure, stops those it started and raises.
    """
    _check_settings(settings)
    servers = _servers(settings, names)
    paths = Paths(settings.state_dir)
    with locked(paths):
        todo = [server for server in servers if server.pid() is None]
        for server in todo:
            server.check_ports()
        ensure_programs([p for s in todo for p in s.programs()], paths, settings.stack_install)
        started: list[Server] = []
        try:
            started = _launch(todo)
            for server in servers:
                server.wait_healthy()
                server.after_healthy()
            security.write_admin_env(settings, paths)
            if settings.mqtt_brokers > 1 and any(isinstance(s, Mosquitto) for s in servers):
                _device_acls(settings)
        except BaseException:
            _stop(started[::-1])
            raise
        if record is not None:
            record.write_text("".join(f"{s.name}\n" for s in started))
        for server in servers:
            verb = "started" if server in started else "running"
            print(f"{server.name:<11} {verb:<8} {server.describe()}")
        return [server.name for server in started]


def _device_acls(settings: Settings) -> None:
    """Several brokers: each one's ACL from the metadata, once the database is up.

    A database not migrated yet (a new stack) holds no controllers: the ACLs are
    written when ``f2pipe up`` seeds the fleet or ``fleet import`` writes one.
    """
    import psycopg

    with contextlib.suppress(psycopg.Error):
        sync_acls(security.admin_settings(settings))


def _launch(servers: list[Server]) -> list[Server]:
    """Prepare and start ``servers`` side by side; all of them, or none left running.

    initdb and Kafka's storage format each take seconds, so they overlap. If any
    fails, the others are allowed to finish and then stopped, and the first
    error is raised.
    """

    def launch(server: Server) -> Server:
        server.pidfile.remove()  # stale: its process is gone
        server.prepare()
        server.start()
        return server

    pool = ThreadPoolExecutor(max_workers=max(1, len(servers)))
    futures = [pool.submit(launch, server) for server in servers]
    try:
        pool.shutdown(wait=True)
        failure = next((f.exception() for f in futures if f.exception() is not None), None)
    except BaseException as interrupted:  # Ctrl-C: let each launch end, then undo them all
        pool.shutdown(wait=True)
        failure = interrupted
    started = [f.result() for f in futures if f.exception() is None]
    if failure is not None:
        _stop(started[::-1])
        raise failure
    return started


def down(settings: Settings, names: Sequence[str] = ()) -> list[str]:
    """Stop the chosen servers we started (reverse order); returns the names stopped."""
    servers = _servers(settings, names)
    stopped = []
    with locked(Paths(settings.state_dir)):
        for server, was_running in zip(servers[::-1], _stop(servers[::-1]), strict=True):
            if was_running:
                stopped.append(server.name)
                print(
                    f"{server.name:<11} "
                    + (f"killed: {server.killed}" if server.killed else "stopped")
                )
            else:
                print(f"{server.name:<11} was not running")
    return stopped


def _stop(servers: list[Server]) -> list[bool]:
    """Stop ``servers`` in this order, each True if it was running; a cluster's Kafka
    nodes side by side (see :func:`.kafka_cluster.stop_nodes`)."""
    groups: list[list[Server]] = []
    for server in servers:
        if groups and isinstance(server, Kafka) and isinstance(groups[-1][0], Kafka):
            groups[-1].append(server)
        else:
            groups.append([server])
    results: list[bool] = []
    for group in groups:
        if isinstance(group[0], Kafka) and group[0].settings.kafka_brokers > 1:
            settings = group[0].settings
            cluster = [cls(settings, group[0].paths) for cls in kafka_nodes(settings)]
            results.extend(stop_nodes(group, cluster))
        else:
            results.extend(server.stop() for server in group)
    return results


def status(settings: Settings, names: Sequence[str] = ()) -> bool:
    """Print each server up or down; True when all are up (ours and healthy)."""
    all_up = True
    for server in _servers(settings, names):
        pid = server.pid()
        if pid is not None and server.healthy():
            line = f"up       {server.describe()} (pid {pid})"
        elif pid is not None:
            line = f"down     pid {pid} runs but is not healthy: {server.last_error}"
        else:
            port = server.foreign_port()
            held = f" (port {port} is held by another process)" if port is not None else ""
            line = f"down{held}"
        all_up = all_up and line.startswith("up")
        print(f"{server.name:<11} {line}")
    return all_up


def _names(values: Sequence[str]) -> list[str]:
    for value in values:
        if value not in NAMES and not _node_name(value):
            raise StackError(f"unknown server {value!r}; choose from {', '.join(NAMES)}")
    return list(values)


def _run_up(args: argparse.Namespace) -> int:
    up(load_settings(), _names(args.servers), args.record)
    return 0


def _run_down(args: argparse.Namespace) -> int:
    names = _names(args.servers)
    if args.record is not None:
        try:
            names = _names(args.record.read_text().split())
        except FileNotFoundError:
            names = []
        if not names:
            print("nothing to stop: the record lists no server")
            return 0
    down(load_settings(), names)
    return 0


def _run_status(args: argparse.Namespace) -> int:
    return 0 if status(load_settings(), _names(args.servers)) else 1


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``up``, ``down`` and ``status`` to the ``f2pipe stack`` parser."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    server_help = f"servers to act on (default: all of {', '.join(NAMES)})"

    start = actions.add_parser("up", help="start what is not running and wait until healthy")
    start.add_argument("servers", nargs="*", metavar="SERVER", help=server_help)
    start.add_argument(
        "--record", type=Path, metavar="FILE",
        help="write the names of the servers this call started to FILE, for `down --record`",
    )  # fmt: skip
    start.set_defaults(func=_run_up)

    stop = actions.add_parser("down", help="stop the servers `up` started")
    stop.add_argument("servers", nargs="*", metavar="SERVER", help=server_help)
    stop.add_argument(
        "--record", type=Path, metavar="FILE",
        help="stop only the servers listed in FILE (written by `up --record`)",
    )  # fmt: skip
    stop.set_defaults(func=_run_down)

    show = actions.add_parser("status", help="print each server up or down; exit 1 if any is down")
    show.add_argument("servers", nargs="*", metavar="SERVER", help=server_help)
    show.set_defaults(func=_run_status)
