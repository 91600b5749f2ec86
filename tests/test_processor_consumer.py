"""The processor's consumer against a private Kafka: a metadata outage with rebalances,
and committed offsets that fell out of retention (for the sink too, which reports
them through the same ConsumerWatch).

The Kafka here is started for this module alone (it has its records deleted
under it); PostgreSQL for the outage is a dedicated server that the test stops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from conftest import unique, wait_until
from f2pipe.metadata.database import migrate
from f2pipe.testing.servers import KafkaServer, create_topics, read_topic, running_kafka
from pipeline_helpers import (
    VENV_BIN,
    ProcessorProcess,
    Topics,
    env_payload,
    free_port,
    processor_env,
    wire_env_fleet,
)
from test_processor_resilience import PostgresServer

pytestmark = [pytest.mark.servers, pytest.mark.slow]

BATCH = 200  # processor_batch_size: the bound on records held in memory


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    with running_kafka(tmp_path_factory.mktemp("kafka")) as server:
        yield server


def _new_topics(bootstrap: str, raw_partitions: int = 4) -> Topics:
    names = Topics(unique("raw"), unique("processed"), unique("dead"), unique("grp"))

    def created() -> bool:
        try:
            create_topics(bootstrap, names.raw, partitions=raw_partitions)
            create_topics(bootstrap, names.processed, names.dead, partitions=1)
        except KafkaException:
            return False  # the broker is still starting
        return True

    wait_until(created, 60, 0.5, what="topics on the private Kafka")
    return names


def _metric(port: int, name: str, text: str | None = None) -> float:
    """A sample of ``name`` (with its labels, if any) from the processor's /metrics
    (-1: not served)."""
    if text is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return -1.0
    match = re.search(rf"^{re.escape(name)} ([-0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else -1.0


def _publish(bootstrap: str, topic: str, macs: list[str], first: int, count: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for seq in range(first, first + count):
        mac = macs[seq % len(macs)]
        mqtt_topic = f"tele/f2-{mac}/sensor-mode/J1/sensor-1"
        headers = [("mqtt.topic", mqtt_topic.encode()), ("mqtt.qos", b"1"), ("mqtt.retain", b"0")]
        producer.produce(topic, env_payload(seq), mac.encode(), headers=headers)
        producer.poll(0)
    assert producer.flush(30) == 0


class BufferWatch:
    """The largest f2pipe_processor_buffered_records seen on each processor."""

    def __init__(self) -> None:
        self.most = 0.0

    def sample(self, *procs: ProcessorProcess) -> None:
        for proc in procs:
            self.most = max(self.most, _metric(proc.port, "f2pipe_processor_buffered_records"))


def _assigned(proc: ProcessorProcess) -> float:
    return _metric(proc.port, "f2pipe_processor_assigned_partitions")


def _paused(proc: ProcessorProcess) -> float:
    return _metric(proc.port, "f2pipe_processor_paused")


def _lag_s(proc: ProcessorProcess) -> float:
    return _metric(proc.port, 'f2pipe_consumer_lag_seconds{stage="processor"}')


def _consumed(*procs: ProcessorProcess) -> float:
    """Raw records consumed and committed by ``procs`` (a stopped one counts 0)."""
    return sum(max(_metric(p.port, "f2pipe_processor_consumed_total"), 0.0) for p in procs)


def test_metadata_outage_with_rebalances_holds_one_batch_and_processes_each_record_once(
    kafka: KafkaServer, tmp_path: Path
) -> None:
    topics = _new_topics(kafka.bootstrap)
    macs = [f"0a7a9e0000{i:02x}" for i in range(8)]
    pg = PostgresServer()
    procs: list[ProcessorProcess] = []
    watch = BufferWatch()

    def start(name: str) -> ProcessorProcess:
        env = processor_env(
            pg.dsn,
            topics,
            F2PIPE_KAFKA_BOOTSTRAP=kafka.bootstrap,
            F2PIPE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # no Redis: PostgreSQL only
            F2PIPE_PROCESSOR_BATCH_SIZE=str(BATCH),
        )
        proc = ProcessorProcess(env, tmp_path / f"{name}.log")
        procs.append(proc)
        return proc

    def watch_until(what: str, done: object, timeout: float = 60) -> None:
        def probe() -> bool:
            watch.sample(*(p for p in procs if p.proc and p.proc.poll() is None))
            return bool(done() if callable(done) else done)

        wait_until(probe, timeout, 0.1, what=what)

    def observe(seconds: float) -> None:
        end = time.monotonic() + seconds
        watch_until(f"{seconds} s of observation", lambda: time.monotonic() > end, seconds + 10)

    try:
        migrate(pg.dsn)
        wire_env_fleet(pg.dsn, macs)
        first, second = start("first"), start("second")
        watch_until(
            "both processors own 2 partitions",
            lambda: (_assigned(first), _assigned(second)) == (2.0, 2.0),
        )
        _publish(kafka.bootstrap, topics.raw, macs, 1, 40)
        wait_until(lambda: _consumed(first, second) >= 40, 60, what="the first records processed")
        # Metadata goes away; plenty of records arrive meanwhile (15 batches).
        pg.stop()
        total = 3000
        _publish(kafka.bootstrap, topics.raw, macs, 41, total - 40)
        watch_until("both paused", lambda: _paused(first) == _paused(second) == 1)
        # The records waiting meanwhile grow older: the lag, as an age, shows it.
        watch_until("the lag grows during the outage", lambda: _lag_s(first) >= 4, 30)
        # One replica leaves: the paused one is assigned partitions it never owned, with
        # about 700 records waiting in each; watch through a few of its polls.
        second.stop()
        watch_until("the first processor owns 4 partitions", lambda: _assigned(first) == 4)
        observe(8.0)
        # Another joins: partitions are revoked from the paused replica, held batch and all.
        third = start("third")
        watch_until(
            "the partitions split again",
            lambda: (_assigned(first), _assigned(third)) == (2.0, 2.0),
        )
        watch_until("the third processor paused", lambda: _paused(third) == 1)
        assert watch.most <= BATCH, f"{watch.most} records held, more than one batch"
        assert watch.most > 0  # the gauge does show a held batch
        pg.start()
        assert len(read_topic(kafka.bootstrap, topics.processed, 3 * total, 120, 1)) >= 3 * total
        # After the outage, the partitions the paused replica gave away come back to it:
        # they must be fetched again, not stay paused.
        third.stop()
        watch_until("the first processor owns 4 partitions again", lambda: _assigned(first) == 4)
        _publish(kafka.bootstrap, topics.raw, macs, total + 1, 400)
        total += 400
        readings = read_topic(kafka.bootstrap, topics.processed, 3 * total, 120, partitions=1)
        assert len(readings) >= 3 * total
        wait_until(lambda: _lag_s(first) == 0, 30, what="no lag once caught up")
    finally:
        for proc in procs:
            proc.stop()
        pg.remove()
    readings = read_topic(kafka.bootstrap, topics.processed, 3 * total, 30, partitions=1)
    keys = [(r.key(), r.value()) for r in readings]
    assert len(set(keys)) == 3 * total  # every record decoded
    assert len(keys) == 3 * total  # and none twice: revoked records were dropped, not produced
    assert read_topic(kafka.bootstrap, topics.dead, 0, 2, partitions=1) == []


def _wait_all_committed(bootstrap: str, group_id: str, topic: str, partitions: int) -> None:
    """Wait until ``group_id`` committed every partition of ``topic`` up to its end."""
    group = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id})
    tps = [TopicPartition(topic, p) for p in range(partitions)]

    def uncommitted() -> int:
        committed = group.committed(tps, timeout=10)
        ends = [group.get_watermark_offsets(tp, timeout=10)[1] for tp in tps]
        return sum(end - max(tp.offset, 0) for tp, end in zip(committed, ends, strict=True))

    try:
        wait_until(lambda: uncommitted() == 0, 30, 0.5, what=f"{group_id} committed everything")
    finally:
        group.close()


def _until_provoked(attempt: Callable[[int], bool], tries: int = 3) -> None:
    """Run ``attempt(n)`` (which asserts the outcome, and answers whether a commit was
    refused by the rebalance) until one was: the window between the two rounds of a
    rebalance lasts about 2.5 s, and a busy machine may store everything outside it."""
    for n in range(tries):
        if attempt(n):
            return
    pytest.fail(f"no commit refused by a rebalance in {tries} tries")


def test_offsets_whose_commit_failed_in_a_rebalance_are_committed_again(
    kafka: KafkaServer, fresh_db: str, tmp_path: Path
) -> None:
    """A replica joining makes the group rebalance twice: the first round takes
    partitions from the first processor, the second hands them over. Commits the
    first makes between the two fail (the generation moved on). Records that all
    arrive in that window are processed but their offsets are not committed, and
    without a retry their lag never returns to 0 (nothing more arrives)."""
    macs = [f"0a7a9d0000{i:02x}" for i in range(8)]
    wire_env_fleet(fresh_db, macs)

    def attempt(n: int) -> bool:
        topics = _new_topics(kafka.bootstrap)
        env = processor_env(
            fresh_db,
            topics,
            F2PIPE_KAFKA_BOOTSTRAP=kafka.bootstrap,
            F2PIPE_PROCESSOR_BATCH_SIZE="20",
        )
        log = tmp_path / f"first-{n}.log"
        first = ProcessorProcess(env, log)
        second: ProcessorProcess | None = None
        try:
            wait_until(lambda: _assigned(first) == 4, 60, what="the first processor owns 4")
            second = ProcessorProcess(
                {**env, "F2PIPE_PROCESSOR_PORT": str(free_port())}, tmp_path / f"second-{n}.log"
            )
            wait_until(lambda: _assigned(first) == 2, 60, 0.01, what="the first round")
            _publish(kafka.bootstrap, topics.raw, macs, 1, 400)
            wait_until(lambda: _assigned(second) == 2, 60, what="the second round")
            wait_until(lambda: _consumed(first, second) >= 400, 60, what="every record processed")
            _wait_all_committed(kafka.bootstrap, topics.group, topics.raw, 4)
        finally:
            for proc in (first, second):
                if proc is not None:
                    proc.stop()
        return "offset commit failed" in log.read_text()

    _until_provoked(attempt)


def test_an_offset_out_of_retention_is_counted_and_logged_as_an_error(
    kafka: KafkaServer, fresh_db: str, tmp_path: Path
) -> None:
    topics = _new_topics(kafka.bootstrap, raw_partitions=1)
    macs = [f"0a7a9f0000{i:02x}" for i in range(4)]
    wire_env_fleet(fresh_db, macs)
    env = processor_env(fresh_db, topics, F2PIPE_KAFKA_BOOTSTRAP=kafka.bootstrap)
    log_path = tmp_path / "processor.log"
    proc = ProcessorProcess(env, log_path)
    resets = 'f2pipe_offset_resets_total{stage="processor"}'
    try:
        _publish(kafka.bootstrap, topics.raw, macs, 1, 100)
        wait_until(
            lambda: _metric(proc.port, "f2pipe_processor_consumed_total") >= 100,
            60,
            what="the first 100 records processed",
        )
        assert proc.stop() == 0  # offset 100 committed
        # While it is away, 100 more arrive and retention deletes up to offset 150.
        _publish(kafka.bootstrap, topics.raw, macs, 101, 100)
        admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
        deleted = admin.delete_records([TopicPartition(topics.raw, 0, 150)])
        for future in deleted.values():
            future.result(30)
        proc.start()
        wait_until(lambda: _metric(proc.port, resets) == 1, 60, what="the reset counted")
        wait_until(
            lambda: _metric(proc.port, "f2pipe_processor_consumed_total") >= 50,
            60,
            what="the records still kept processed",
        )
        assert _metric(proc.port, resets) == 1  # once, not again when the client resets
    finally:
        proc.stop()
    errors = [
        json.loads(line)
        for line in log_path.read_text().splitlines()
        if line.startswith("{") and "out of range" in line
    ]
    assert len(errors) == 1, errors
    assert errors[0]["level"] == "error"
    assert (errors[0]["offset"], errors[0]["low"]) == (100, 150)
    readings = read_topic(kafka.bootstrap, topics.processed, 3 * 150, 30, partitions=1)
    assert len(readings) == 3 * 150  # 100 before, the 50 retention kept after


def _sink_env(bootstrap: str, dsn: str, topics: Topics, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("F2PIPE_")}
    env.update(
        F2PIPE_KAFKA_BOOTSTRAP=bootstrap,
        F2PIPE_TIMESERIES_DSN=dsn,
        F2PIPE_METADATA_DSN=dsn,
        F2PIPE_TOPIC_PROCESSED=topics.processed,
        F2PIPE_TOPIC_DEAD_LETTER=topics.dead,
        F2PIPE_SINK_GROUP=topics.group,
        F2PIPE_SINK_PORT=str(port),
    )
    return env


def _send_readings(bootstrap: str, topic: str, first: int, count: int) -> None:
    """``count`` processed records, one reading each, keyed over 60 devices."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(first, first + count):
        value = {"v": 1, "ts": f"2024-07-15T00:00:{i // 60 % 60:02d}.{i % 60:06d}+00:00"}
        value.update(device_id=1 + i % 60, datapoint_id=1, value=float(i))
        producer.produce(topic, json.dumps(value).encode(), f"{1 + i % 60}:1".encode())
    assert producer.flush(30) == 0


def _rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM decoded_data").fetchone()
    return int(row[0]) if row else 0


def _start_sink(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen([str(VENV_BIN / "f2pipe"), "sink"], env=env, stderr=log)


def test_sink_offsets_whose_commit_a_rebalance_refused_are_committed_again(
    kafka: KafkaServer, fresh_db: str, tmp_path: Path
) -> None:
    """The sink's counterpart of the processor's test above: readings stored between
    the two rounds of a rebalance, on partitions the first sink keeps."""
    assigned = "f2pipe_sink_assigned_partitions"

    def attempt(n: int) -> bool:
        topics = dataclasses.replace(_new_topics(kafka.bootstrap), processed=unique("processed"))
        create_topics(kafka.bootstrap, topics.processed, partitions=4)
        port = free_port()
        env = _sink_env(kafka.bootstrap, fresh_db, topics, port)
        log = tmp_path / f"first-{n}.log"
        sinks = [_start_sink(env, log)]
        try:
            wait_until(lambda: _metric(port, assigned) == 4, 60, what="the first sink owns 4")
            second_env = {**env, "F2PIPE_SINK_PORT": str(free_port())}
            sinks.append(_start_sink(second_env, tmp_path / f"second-{n}.log"))
            wait_until(lambda: _metric(port, assigned) == 2, 60, 0.01, what="the first round")
            _send_readings(kafka.bootstrap, topics.processed, 400 * n, 400)
            wait_until(lambda: _rows(fresh_db) == 400 * (n + 1), 60, what="every reading stored")
            _wait_all_committed(kafka.bootstrap, topics.group, topics.processed, 4)
        finally:
            for sink in sinks:
                if sink.poll() is None:
                    sink.send_signal(signal.SIGTERM)
                    sink.wait(60)
        return "deferred by a rebalance" in log.read_text()

    _until_provoked(attempt)


def test_the_sink_counts_an_offset_out_of_retention_with_the_same_watch(
    kafka: KafkaServer, fresh_db: str, tmp_path: Path
) -> None:
    """The sink reports through the processor's ConsumerWatch: its reset is counted too."""
    topics = _new_topics(kafka.bootstrap, raw_partitions=1)  # processed: one partition
    port = free_port()
    env = _sink_env(kafka.bootstrap, fresh_db, topics, port)

    def send(first: int, count: int) -> None:
        _send_readings(kafka.bootstrap, topics.processed, first, count)

    def rows() -> int:
        return _rows(fresh_db)

    resets = 'f2pipe_offset_resets_total{stage="sink"}'
    log_path = tmp_path / "sink.log"
    sink: subprocess.Popen[bytes] | None = None

    def start() -> subprocess.Popen[bytes]:
        return _start_sink(env, log_path)

    try:
        sink = start()
        send(0, 100)
        wait_until(lambda: rows() == 100, 60, what="the first 100 readings stored")
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(60) == 0  # offset 100 committed
        send(100, 100)
        admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
        for future in admin.delete_records([TopicPartition(topics.processed, 0, 150)]).values():
            future.result(30)
        sink = start()
        wait_until(lambda: _metric(port, resets) == 1, 60, what="the sink's reset counted")
        wait_until(lambda: rows() == 150, 60, what="the readings retention kept stored")
    finally:
        if sink is not None and sink.poll() is None:
            sink.send_signal(signal.SIGTERM)
            sink.wait(60)
    assert "committed offset out of range" in log_path.read_text()
