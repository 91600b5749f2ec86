"""The local stack's Kafka as a three-broker KRaft cluster (``F2PIPE_KAFKA_BROKERS=3``).

Each node is broker and controller at once (combined mode): three processes,
a controller quorum of three voters, so any one node may die and the other
two still elect a controller and serve every partition. Node 1 is the
``kafka`` server of the one-broker stack (its folder, ports, pid and log);
nodes 2 and 3 are ``kafka-2`` and ``kafka-3`` with their own. The topics get
three replicas and ``min.insync.replicas=2``: with ``acks=all`` a write is
acknowledged once two brokers hold it, so a broker killed at any moment
loses no acknowledged record, and writes go on while one is down.

Ports: the bootstrap names each broker's client port (one address given, the
others are its port + 2 and + 4, see :func:`f2pipe._settings_values.every_broker`);
node n's controller listens on ``F2PIPE_KAFKA_CONTROLLER_PORT`` + 2 (n - 1).

A state folder holds one kind of Kafka: ``<state>/kafka/cluster.id`` marks a
cluster's (every node is formatted with that id); a state formatted for one
broker is refused for three and the other way round, with the fix, rather
than silently starting an empty Kafka next to the old records.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from f2pipe.errors import ConfigError, StackError
from f2pipe.operations.stack.server import Server
from f2pipe.operations.stack.supervise import LOOPBACK, Paths
from f2pipe.settings import Settings

__all__ = [
    "CLUSTER",
    "MIN_INSYNC",
    "REPLICAS",
    "bracketed",
    "cluster_id",
    "node_host",
    "node_ports",
    "quorum_voters",
    "replication",
    "stop_nodes",
    "voters",
]

#: Replicas of each topic on a cluster, and how many must hold a write before it is acknowledged.
REPLICAS = 3
MIN_INSYNC = 2

#: Broker properties of the three-node cluster: Kafka's internal topics (consumer offsets,
#: transactions) are as durable as the data topics.
CLUSTER: dict[str, str] = {
    "offsets.topic.replication.factor": str(REPLICAS),
    "transaction.state.log.replication.factor": str(REPLICAS),
    "transaction.state.log.min.isr": str(MIN_INSYNC),
    "share.coordinator.state.topic.replication.factor": str(REPLICAS),
    "share.coordinator.state.topic.min.isr": str(MIN_INSYNC),
    "default.replication.factor": str(REPLICAS),
    "min.insync.replicas": str(MIN_INSYNC),
    # Never elect a replica that missed acknowledged writes.
    "unclean.leader.election.enable": "false",
    # A group starts at once instead of waiting 3 s for more members to join.
    "group.initial.rebalance.delay.ms": "0",
}

#: How long nodes may take to exit once fewer than a majority of the cluster's nodes run.
#: A node granted its controlled shutdown exits within about 6 s (its controller gives up
#: handing the quorum over after 5 s); one still waiting for the grant would wait Kafka's
#: 5 minutes for a quorum that is gone.
QUORUMLESS_GRACE = 15.0

_FORMAT_LOCK = threading.Lock()  # the nodes are prepared side by side (stack up)


def replication(settings: Settings) -> tuple[int, int]:
    """(replicas, min.insync.replicas) of the topics the stack creates."""
    return (REPLICAS, MIN_INSYNC) if settings.kafka_brokers > 1 else (1, 1)


def node_ports(settings: Settings) -> list[tuple[int, int]]:
    """(client port, controller port) of nodes 1..n; ConfigError if the bootstrap disagrees."""
    addresses = settings.kafka_bootstrap.split(",")
    if len(addresses) != settings.kafka_brokers and settings.kafka_brokers > 1:
        raise ConfigError(
            f"F2PIPE_KAFKA_BOOTSTRAP names {len(addresses)} brokers but F2PIPE_KAFKA_BROKERS="
            f"{settings.kafka_brokers}; name one (the others follow it) or all of them"
        )
    if settings.kafka_brokers == 1:
        return [(settings.kafka_port(), settings.kafka_controller_port)]
    return [
        (int(address.rpartition(":")[2]), settings.kafka_controller_port + 2 * index)
        for index, address in enumerate(addresses)
    ]


def node_host(settings: Settings, node: int) -> str:
    """The host node ``node`` (from 1) serves on: its address in the bootstrap."""
    addresses = settings.kafka_bootstrap.split(",")
    host = addresses[min(node, len(addresses)) - 1].strip().rpartition(":")[0]
    return host.strip("[]") or LOOPBACK


def bracketed(host: str) -> str:
    """``host`` as a listener or an address list names it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def voters(settings: Settings) -> str:
    """``controller.quorum.voters``: every node's id at its host and controller port."""
    ports = node_ports(settings)
    return quorum_voters(
        [(node_host(settings, n), controller) for n, (_, controller) in enumerate(ports, 1)]
    )


def quorum_voters(controllers: list[tuple[str, int]]) -> str:
    """``controller.quorum.voters`` of nodes 1..n at ``(host, controller port)``: the local
    stack's and a deployment's (whose nodes are containers, each with its own host name)."""
    return ",".join(
        f"{n}@{bracketed(host)}:{port}" for n, (host, port) in enumerate(controllers, 1)
    )


def cluster_id(paths: Paths, settings: Settings, new_id: str) -> str | None:
    """The id every node of this state's cluster is formatted with (None: one broker).

    The first node to ask records ``new_id``. Raises StackError when the state
    folder holds the other kind of Kafka, naming the fix.
    """
    marker = paths.state / "kafka" / "cluster.id"
    single = paths.state / "kafka" / "data" / "meta.properties"
    with _FORMAT_LOCK:
        if settings.kafka_brokers == 1:
            if marker.is_file():
                raise StackError(
                    f"{paths.state} holds a three-broker Kafka cluster; set "
                    "F2PIPE_KAFKA_BROKERS=3, or stop it and use another F2PIPE_STATE_DIR"
                )
            return None
        if marker.is_file():
            return marker.read_text().strip()
        if single.is_file():
            raise StackError(
                f"{paths.state / 'kafka'} holds a one-broker Kafka; unset F2PIPE_KAFKA_BROKERS, "
                "or stop it and use another F2PIPE_STATE_DIR for the cluster"
            )
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(new_id + "\n")
        return new_id


def stop_nodes(nodes: Sequence[Server], cluster: Sequence[Server]) -> list[bool]:
    """Stop ``nodes`` of ``cluster`` (every node) side by side; True for each that ran.

    A node's broker exits once the controller quorum grants its controlled
    shutdown, and its controller leaves with it. One by one, the last nodes would
    find no quorum left; signalled together, all are granted within a second,
    unless one lags behind the metadata (just started, or starved of CPU) and the
    others' controllers are gone first. Once fewer than a majority of the
    cluster's nodes run, those still running get ``QUORUMLESS_GRACE`` and are then
    killed: the records they wrote are on disk, and each checks its log at its
    next start.
    """
    pids = [node.begin_stop() for node in nodes]
    stopping = [(node, pid) for node, pid in zip(nodes, pids, strict=True) if pid is not None]
    majority = len(cluster) // 2 + 1
    deadline = time.monotonic() + max((node.stop_timeout for node in nodes), default=0.0)
    quorumless = False
    waiting = {node.name for node, _ in stopping}
    while time.monotonic() < deadline:
        running = {node.name for node in cluster if node.pid() is not None}
        if not running & waiting:
            break
        if not quorumless and len(running) < majority:
            quorumless = True
            deadline = min(deadline, time.monotonic() + QUORUMLESS_GRACE)
        time.sleep(0.1)
    why = (
        f"fewer than {majority} of the {len(cluster)} controllers were left to grant its "
        "controlled shutdown; it checks its log at its next start"
        if quorumless
        else ""
    )
    for node, pid in stopping:
        node.end_stop(pid, deadline, why)
    return [pid is not None for pid in pids]
