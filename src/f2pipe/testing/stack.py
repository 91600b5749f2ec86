"""A private local stack for tests and benchmarks: its own state folder and free ports.

:func:`private_state` makes the state folder (outside pytest's 0700 temporary
folder, so that PostgreSQL's account can reach its data) and removes it
afterwards; :func:`private_settings` points every server of ``f2pipe stack``
(and, with ``stages=True``, every stage's ops port) at free loopback ports in
it. Starting and stopping the servers stays with the caller.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from f2pipe.operations.stack.supervise import port_in_use
from f2pipe.settings import Settings, load_settings

__all__ = ["free_ports", "private_settings", "private_state"]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_run(taken: set[int], length: int = 3) -> int:
    """A free port p, not in ``taken``, with p + 2, p + 4... (``length`` ports in all)
    free and not taken either."""
    while True:
        (port,) = free_ports(1)
        run = {port + 2 * n for n in range(length)}
        if max(run) < 65536 and not run & taken and not any(map(port_in_use, run - {port})):
            return port


@contextmanager
def private_state(prefix: str) -> Iterator[Path]:
    """A fresh state folder others may traverse (0711); removed on exit."""
    state = Path(tempfile.mkdtemp(prefix=prefix))
    state.chmod(0o711)
    try:
        yield state
    finally:
        shutil.rmtree(state, ignore_errors=True)


def private_settings(state: Path, *, stages: bool = False, **overrides: Any) -> Settings:
    """Settings for a stack in ``state`` on free ports: PostgreSQL (metadata and time
    series in one database), Redis, Kafka and its controller, the MQTT broker; with
    ``stages`` also the connector's, processor's, sink's and certgen's ops ports. With
    ``kafka_brokers=3`` the bootstrap names three free ports and the controller port is
    one whose + 2 and + 4 are free too (the cluster's other controllers); with
    ``mqtt_brokers=N`` the MQTT port is one whose + 2... + 2 (N - 1) are free too."""
    pg, redis, kafka, controller, mqtt, *ops = free_ports(9 if stages else 5)
    bootstrap = f"127.0.0.1:{kafka}"
    if overrides.get("kafka_brokers", 1) > 1:
        taken = {pg, redis, kafka, controller, mqtt, *ops}
        others = [port for port in free_ports(len(taken) + 2) if port not in taken][:2]
        bootstrap = ",".join(f"127.0.0.1:{port}" for port in (kafka, *others))
        controller = _port_run(taken | set(others))
    if overrides.get("mqtt_brokers", 1) > 1:
        used = {pg, redis, controller, controller + 2, controller + 4, *ops}
        used |= {int(address.rpartition(":")[2]) for address in bootstrap.split(",")}
        mqtt = _port_run(used, overrides["mqtt_brokers"])
    if stages:
        connector, processor, sink, certgen = ops
        overrides = dict(
            connector_port=connector,
            processor_port=processor,
            sink_port=sink,
            certgen_port=certgen,
            **overrides,
        )
    return load_settings(
        state_dir=state,
        metadata_dsn=f"postgresql://postgres@127.0.0.1:{pg}/f2pipe",
        timeseries_dsn=f"postgresql://postgres@127.0.0.1:{pg}/f2pipe",
        redis_url=f"redis://127.0.0.1:{redis}/0",
        kafka_bootstrap=bootstrap,
        kafka_controller_port=controller,
        mqtt_port=mqtt,
        **overrides,
    )
