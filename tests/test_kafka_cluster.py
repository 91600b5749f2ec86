"""Kafka as a three-broker KRaft cluster (SPEC section 10, ``F2PIPE_KAFKA_BROKERS=3``).

- ``test_cluster_loses_a_broker_without_losing_a_reading``: the whole pipeline on
  a private secured stack whose Kafka is three combined broker-controller nodes,
  its topics with three replicas and ``min.insync.replicas=2``. Under a steady
  QoS 1 load, broker 2 is killed with SIGKILL: rows keep landing while it is
  down, before and after the controllers fence it; ``status`` shows it down; a
  topic needing three replicas is refused meanwhile. It comes back and rejoins
  every in-sync replica set; then broker 1, the bootstrap's first, goes the same
  way. The table equals the ledger exactly. Then ``stack up`` refuses a topic
  with one replica, and one acknowledged by one replica, with one line and
  nothing created; and the cluster stops without waiting out a stop timeout.
- ``test_a_node_left_without_a_controller_quorum_is_killed_in_seconds``: with two
  nodes dead, the third cannot be granted its controlled shutdown; ``stack down``
  kills it after a short grace, says why, and the cluster comes back with every
  acknowledged record.
- The bad inputs without servers: a replication factor the cluster's brokers
  cannot meet, and a state folder that holds the other kind of Kafka.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from conftest import unique, wait_until
from f2pipe.errors import StackError
from f2pipe.operations import pipeline, stack, status
from f2pipe.operations.stack import Paths, security
from f2pipe.operations.stack.kafka import check_replicas
from f2pipe.operations.stack.kafka_cluster import QUORUMLESS_GRACE, cluster_id
from f2pipe.runtime.kafka import admin_config, consumer_config, producer_config
from f2pipe.settings import Settings, load_settings
from f2pipe.testing.stack import private_settings, private_state
from test_pipeline import (
    Publisher,
    _kill,
    drained,
    expected_rows,
    failure_logs,
    own_stack,
    read_ledger,
    row_count,
    stored_rows,
)

pytestmark = pytest.mark.servers


def _admin(settings: Settings) -> Any:
    return AdminClient(admin_config(settings, log_level=2))


def _node(settings: Settings, number: int) -> stack.Kafka:
    cls = stack.kafka_nodes(settings)[number - 1]
    return cls(settings, Paths(settings.state_dir))


def _in_sync(settings: Settings) -> bool:
    """Every partition of every topic (Kafka's own included) has all three replicas in sync."""
    metadata = _admin(settings).list_topics(timeout=5)
    return len(metadata.brokers) == 3 and all(
        len(partition.isrs) == 3
        for topic in metadata.topics.values()
        for partition in topic.partitions.values()
    )


def _topic_configs(settings: Settings, names: list[str]) -> dict[str, tuple[int, str]]:
    """Topic -> (replicas of its first partition, its min.insync.replicas)."""
    admin = _admin(settings)
    metadata = admin.list_topics(timeout=5)
    resources = [ConfigResource("topic", name) for name in names]
    found = {}
    for resource, future in admin.describe_configs(resources).items():
        entries = future.result(timeout=15)
        replicas = len(metadata.topics[resource.name].partitions[0].replicas)
        found[resource.name] = (replicas, entries["min.insync.replicas"].value)
    return found


def _weak_topics_are_refused(settings: Settings) -> None:
    """``stack up`` with a topic of one replica, or one acknowledged by one replica: one
    line naming it and the fix, nothing created, nothing stopped."""
    admin = _admin(settings)
    thin, loose, fresh = unique("thin"), unique("loose"), unique("fresh")
    deadline = time.monotonic() + 30
    stack.create_topics(admin, {thin: (1, stack.DAY_MS)}, deadline)
    stack.create_topics(admin, {loose: (1, stack.DAY_MS)}, deadline, replicas=3, min_insync=1)
    refusals = {
        thin: f"topic {thin} has 1 replica(s) where 3 are needed; raise its replication factor "
        "with kafka-reassign-partitions, or delete it to have it created again (its records "
        "with it)",
        loose: f"topic {loose} has min.insync.replicas=1 where 2 are needed; set it with "
        f"kafka-configs --alter --entity-type topics --entity-name {loose} --add-config "
        "min.insync.replicas=2",
    }
    for weak, refusal in refusals.items():
        asking = settings.model_copy(update={"topic_raw": fresh, "topic_processed": weak})
        with pytest.raises(StackError) as caught:
            stack.up(asking, ["kafka"])
        assert str(caught.value) == refusal
        assert fresh not in admin.list_topics(timeout=5).topics  # nothing half-written
    assert all(_node(settings, n).pid() is not None for n in (1, 2, 3))  # nothing stopped


@pytest.mark.slow
def test_cluster_loses_a_broker_without_losing_a_reading(tmp_path: Path) -> None:
    started = time.monotonic()
    with own_stack(kafka_brokers=3) as settings:
        dsn = settings.timeseries_dsn
        assert len(settings.kafka_bootstrap.split(",")) == 3
        assert settings.kafka_security_protocol == "SASL_SSL"  # secured as one broker is
        names = [settings.topic_raw, settings.topic_processed, settings.topic_dead_letter]
        assert _topic_configs(settings, names) == dict.fromkeys(names, (3, "2"))

        publisher = Publisher(settings, tmp_path, minimum=2000, rate=40.0)
        publisher.start()

        publisher.rows_flow("at the start", more=40)
        phases: list[str] = []
        for number in (2, 1):
            node = _node(settings, number)
            _kill(node)
            killed = time.monotonic()
            publisher.rows_flow(f"while broker {number} is down", more=40)
            # The controllers fence the dead broker: a topic needing three replicas is
            # refused then, before anything is created.
            wait_until(
                lambda: len(_admin(settings).list_topics(timeout=5).brokers) == 2,
                timeout=60,
                what=f"the controllers to fence broker {number}",
            )
            plan = {unique("fresh"): (1, stack.DAY_MS)}
            with pytest.raises(StackError, match=r"needs 3 replicas but the cluster has 2 broker"):
                stack.create_topics(
                    _admin(settings), plan, time.monotonic() + 5, replicas=3, min_insync=2
                )
            assert not set(plan) & set(_admin(settings).list_topics(timeout=5).topics)
            fenced = time.monotonic()
            publisher.rows_flow(f"while broker {number} is fenced", more=40)
            # `f2pipe status` shows every broker, this one down.
            brokers = {
                h.name: h.up for h in status.Observer(settings).health() if "kafka" in h.name
            }
            names = {n: _node(settings, n).name for n in (1, 2, 3)}
            assert brokers == {name: n != number for n, name in names.items()}
            node.prepare()
            node.start()
            node.wait_healthy()
            back = time.monotonic()
            wait_until(lambda: _in_sync(settings), timeout=120, what="every replica in sync")
            publisher.rows_flow(f"after broker {number} came back", more=40)
            phases.append(
                f"broker {number}: fenced in {fenced - killed:.1f} s, down {back - killed:.1f} s,"
                f" in sync {time.monotonic() - back:.1f} s later"
            )

        publisher.stop.set()
        publisher.join(timeout=300)
        assert publisher.failure is None, publisher.failure
        expected = expected_rows(read_ledger(*publisher.ledgers), dsn)
        wait_until(lambda: drained(settings, expected), timeout=120, interval=1.0, what="the drain")
        stored = stored_rows(dsn)
        missing, extra = expected - stored, stored - expected
        assert not missing, f"{len(missing)} readings lost\n{failure_logs(settings)}"
        assert not extra, f"{len(extra)} rows not in the ledger"
        assert row_count(dsn) == len(stored)  # each reading once
        print(f"{publisher.published} messages, {len(stored)} readings;", "; ".join(phases))
        # Last: `stack up` with other topic names resets the services' ACLs to those.
        _weak_topics_are_refused(settings)
        # The nodes stop side by side: one by one, the last would wait out its stop
        # timeout (60 s) for a controller quorum already gone.
        stopping = time.monotonic()
        pipeline.down(settings, quiet=True)
        assert time.monotonic() - stopping < 40
    print(f"cluster test: {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_a_node_left_without_a_controller_quorum_is_killed_in_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with private_state("f2pipe-kafka-quorum-") as state:
        settings = private_settings(state, kafka_brokers=3, kafka_heap="512m")
        try:
            stack.up(settings, ["kafka"])
            admin = security.admin_settings(settings)
            topic = unique("quorum")
            plan = {topic: (1, stack.DAY_MS)}
            stack.create_topics(
                _admin(admin), plan, time.monotonic() + 30, replicas=3, min_insync=2
            )
            producer = Producer(producer_config(admin))
            for n in range(100):
                producer.produce(topic, b"%d" % n)
            assert producer.flush(30) == 0  # each acknowledged by at least two nodes
            del producer  # no reconnecting to the nodes about to die
            _kill(_node(settings, 2))
            _kill(_node(settings, 3))
            capsys.readouterr()
            stopping = time.monotonic()
            stack.down(settings, ["kafka"])
            took, said = time.monotonic() - stopping, capsys.readouterr().out
            # Kafka alone would wait 5 minutes for a grant no quorum can give.
            assert took < QUORUMLESS_GRACE + 10, said
            assert said.splitlines()[-1] == (
                "kafka       killed: fewer than 2 of the 3 controllers were left to grant its "
                "controlled shutdown; it checks its log at its next start"
            )
            assert _node(settings, 1).pid() is None

            stack.up(settings, ["kafka"])
            consumer = Consumer(consumer_config(admin, unique("quorum")))
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            back: set[bytes | None] = set()

            def all_back() -> bool:
                back.update(m.value() for m in consumer.consume(100, 1.0) if not m.error())
                return len(back) >= 100

            try:
                wait_until(all_back, timeout=60, what="every acknowledged record after the kill")
            finally:
                consumer.close()
            assert back == {b"%d" % n for n in range(100)}
        finally:
            stack.down(settings, ["kafka"])


def test_replication_the_cluster_cannot_meet_is_one_line() -> None:
    one_broker = SimpleNamespace(brokers={1: object()}, topics={})
    with pytest.raises(StackError) as caught:
        check_replicas(one_broker, {"raw-iot-data": (6, 1)}, replicas=3)
    assert str(caught.value) == (
        "topic raw-iot-data needs 3 replicas but the cluster has 1 broker(s); "
        "start all 3 brokers (F2PIPE_KAFKA_BROKERS=3)"
    )
    check_replicas(one_broker, {"raw-iot-data": (6, 1)}, replicas=1)


def test_a_state_holds_one_kind_of_kafka() -> None:
    with private_state("f2pipe-kafka-kind-") as state:
        (state / "kafka" / "data").mkdir(parents=True)
        (state / "kafka" / "data" / "meta.properties").write_text("node.id=1\n")
        cluster = private_settings(state, kafka_brokers=3, stack_install=False)
        with pytest.raises(StackError, match=r"holds a one-broker Kafka; unset F2PIPE_KAFKA_BRO"):
            stack.up(cluster, ["kafka"])
        assert not any((state / "run").glob("kafka*.pid"))  # nothing started
        assert not (state / "kafka-2").exists()

    with private_state("f2pipe-kafka-kind-") as state:
        paths = Paths(state)
        assert cluster_id(paths, private_settings(state, kafka_brokers=3), "abc") == "abc"
        assert cluster_id(paths, private_settings(state, kafka_brokers=3), "xyz") == "abc"
        with pytest.raises(StackError, match=r"holds a three-broker Kafka cluster; set F2PIPE"):
            cluster_id(paths, private_settings(state), "xyz")


def test_three_brokers_take_their_ports_from_the_first() -> None:
    settings = load_settings(
        kafka_brokers="3", kafka_bootstrap="127.0.0.1:9092", kafka_controller_port=9093
    )
    assert settings.kafka_bootstrap == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    assert [_node(settings, n).ports() for n in (1, 2, 3)] == [
        {port: "F2PIPE_KAFKA_BOOTSTRAP", port + 1: "F2PIPE_KAFKA_CONTROLLER_PORT"}
        for port in (9092, 9094, 9096)
    ]


def test_a_broker_that_gives_up_is_explained_by_its_last_error(tmp_path: Path) -> None:
    settings = private_settings(tmp_path, kafka_brokers=3)
    node = _node(settings, 2)
    node.paths.log.mkdir(parents=True)
    log = node.paths.log / "kafka-2.log"
    log.write_text("[t0] ERROR from an earlier run (c)\n")
    node._log_start = log.stat().st_size  # as start() records it
    with log.open("a") as out:
        out.write("[t1] INFO starting (c)\n[t2] ERROR Exiting Kafka: port in use (c)\n")
        out.write("[t3] INFO App info kafka.server for 2 unregistered (c)\n")
    assert node.failure_hint().startswith(": [t2] ERROR Exiting Kafka: port in use (c) (logs: ")
