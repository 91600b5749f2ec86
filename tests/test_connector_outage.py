"""The connector through a long Kafka outage: its MQTT connection stays up, nothing is lost.

While Kafka does not answer, no record is acknowledged, so no PUBACK goes out
and the connector's window of unacknowledged messages fills and stays full. The
broker (MQTT 5 Receive Maximum) sends no more QoS 1 messages than the window,
but the connection still needs its keepalive: the connector must go on reading
PINGRESPs (and, after a reconnect, the CONNACK) with its window full, or the
connection drops every couple of keepalive periods and the broker redelivers
the window each time.

``CONNECTOR_OUTAGE_SECONDS`` sets how long Kafka stays stopped (default 20, four
keepalive periods; 90 for the full-size run of the issue) and
``CONNECTOR_OUTAGE_RATE`` the publisher's messages per second (default 100).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import unique, wait_until
from f2pipe.settings import load_settings
from f2pipe.testing.servers import (
    ConnectorProcess,
    KafkaServer,
    Mosquitto,
    TestPki,
    assert_all_delivered,
    connector_env,
    create_topics,
    ledger_entries,
    read_topic,
    running_kafka,
)
from f2pipe.tools.simulator import Summary, generated_fleet, run_load

OUTAGE_S = float(os.environ.get("CONNECTOR_OUTAGE_SECONDS", "20"))
RATE = float(os.environ.get("CONNECTOR_OUTAGE_RATE", "100"))
KEEPALIVE = 5  # seconds: the shortest the settings allow, so the outage spans several
WINDOW = 200  # the connector's Receive Maximum: far below what the outage accumulates
FLEET = generated_fleet(8)


@pytest.fixture(scope="module")
def pki() -> Iterator[TestPki]:
    # Not under pytest's 0700 temp root: mosquitto drops to its own user and must reach it.
    workdir = Path(tempfile.mkdtemp(prefix="f2pipe-outage-"))
    workdir.chmod(0o755)
    authority = TestPki(workdir / "state")
    for sensor in FLEET:
        authority.device(sensor.mac)
    yield authority
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(pki: TestPki) -> Iterator[Mosquitto]:
    server = Mosquitto(pki.root.parent / "mosquitto", tls=pki.mosquitto_tls())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    with running_kafka(tmp_path_factory.mktemp("kafka")) as server:
        yield server


@pytest.fixture
def connectors() -> Iterator[list[ConnectorProcess]]:
    started: list[ConnectorProcess] = []
    yield started
    for proc in started:
        if proc.proc is not None:
            proc.kill()


def _try_create(bootstrap: str, *names: str) -> bool:
    try:
        create_topics(bootstrap, *names)
    except Exception:
        return False
    return True


class Publisher(threading.Thread):
    """The simulator's load mode at a fixed rate, in the background; keeps its ledger."""

    def __init__(self, pki: TestPki, broker: Mosquitto, count: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.settings = load_settings(mqtt_tls=True, mqtt_port=broker.port, state_dir=pki.root)
        self.count, self.rate = count, rate
        self.result: tuple[Summary, list[dict[str, Any]]] | None = None

    def run(self) -> None:
        ledger = io.StringIO()
        summary = asyncio.run(
            run_load(self.settings, FLEET, self.count, rate=self.rate, ledger=ledger)
        )
        self.result = summary, ledger_entries(ledger.getvalue().splitlines())


def start_connector(
    pki: TestPki,
    broker: Mosquitto,
    kafka: KafkaServer,
    connectors: list[ConnectorProcess],
    tmp_path: Path,
) -> tuple[str, str, ConnectorProcess]:
    """A connector with a small window and a short keepalive on new topics: the raw
    topic, its client id, the process."""
    raw, dlq = unique("raw"), unique("dlq")
    wait_until(lambda: _try_create(kafka.bootstrap, raw, dlq), 60, 0.5, what="topics")
    client_id = unique("svc-connector")
    env = {
        **connector_env(pki, broker.port, client_id, kafka.bootstrap),
        "F2PIPE_TOPIC_RAW": raw,
        "F2PIPE_TOPIC_DEAD_LETTER": dlq,
        "F2PIPE_CONNECTOR_RECEIVE_MAXIMUM": str(WINDOW),
        "F2PIPE_MQTT_KEEPALIVE_S": str(KEEPALIVE),
    }
    conn = ConnectorProcess(env, log=tmp_path / "connector.log")
    connectors.append(conn)
    conn.start()
    return raw, client_id, conn


def broker_connects(broker: Mosquitto, client_id: str) -> int:
    """How many times the broker accepted a connection from ``client_id`` (its own log)."""
    log = (broker.workdir / "mosquitto.log").read_text(errors="replace")
    return sum(1 for line in log.splitlines() if f" as {client_id} (" in line)


@pytest.mark.servers
@pytest.mark.slow
def test_kafka_outage_keeps_the_mqtt_connection(
    pki: TestPki,
    broker: Mosquitto,
    kafka: KafkaServer,
    connectors: list[ConnectorProcess],
    tmp_path: Path,
) -> None:
    raw, client_id, conn = start_connector(pki, broker, kafka, connectors, tmp_path)
    assert broker_connects(broker, client_id) == 1
    # The stream outlasts the outage, so the broker queues for the connector throughout.
    count = int(RATE * (OUTAGE_S + 15))
    publisher = Publisher(pki, broker, count, RATE)
    publisher.start()
    wait_until(lambda: conn.metric("f2pipe_connector_acked_total") >= RATE, 60, what="flowing")

    assert kafka.proc is not None
    kafka.proc.send_signal(signal.SIGSTOP)
    try:
        resume_at = time.monotonic() + OUTAGE_S
        wait_until(
            lambda: conn.metric("f2pipe_connector_in_flight") >= WINDOW, 30, what="window full"
        )
        acked = conn.metric("f2pipe_connector_acked_total")
        # Hold Kafka down for the whole outage, watching the connection all along.
        wait_until(
            lambda: time.monotonic() >= resume_at or broker_connects(broker, client_id) > 1,
            OUTAGE_S + 5,
            0.5,
            what="the end of the outage",
        )
        assert broker_connects(broker, client_id) == 1, (
            "the connector reconnected during the outage"
        )
        assert conn.metric("f2pipe_connector_reconnects_total") == 0
        # Nothing was acknowledged to the broker that Kafka had not acknowledged.
        assert conn.metric("f2pipe_connector_acked_total") == acked
        assert conn.metric("f2pipe_connector_in_flight") <= WINDOW
    finally:
        kafka.proc.send_signal(signal.SIGCONT)

    publisher.join(OUTAGE_S + 120)
    assert publisher.result is not None
    summary, ledger = publisher.result
    assert summary.acknowledged == count == len(ledger)
    records = read_topic(kafka.bootstrap, raw, count, timeout=120)
    duplicates = assert_all_delivered(ledger, records)
    wait_until(
        lambda: conn.metric("f2pipe_connector_acked_total") >= count, 60, what="all acknowledged"
    )
    # Every duplicate in Kafka is a redelivery the connector counted.
    assert duplicates <= conn.metric("f2pipe_connector_redelivered_total")
    assert broker_connects(broker, client_id) == 1
    print(
        f"kafka stopped {OUTAGE_S:.0f}s: {len(records)} records for {count} messages,"
        f" {duplicates} duplicates"
    )
    assert conn.terminate() == 0


@pytest.mark.servers
@pytest.mark.slow
def test_reconnection_with_a_full_window(
    pki: TestPki,
    broker: Mosquitto,
    kafka: KafkaServer,
    connectors: list[ConnectorProcess],
    tmp_path: Path,
) -> None:
    """The broker restarts while Kafka is down: the connector reads the CONNACK although
    the old connection's records still wait for Kafka, and keeps the new connection; the
    window the broker sends again lands twice in Kafka, and is counted."""
    raw, client_id, conn = start_connector(pki, broker, kafka, connectors, tmp_path)
    count = 5 * WINDOW
    settings = load_settings(mqtt_tls=True, mqtt_port=broker.port, state_dir=pki.root)
    ledger_text = io.StringIO()
    assert kafka.proc is not None
    kafka.proc.send_signal(signal.SIGSTOP)
    try:
        # The broker acknowledges every message and queues what the connector cannot take.
        summary = asyncio.run(run_load(settings, FLEET, count, ledger=ledger_text))
        assert summary.acknowledged == count
        wait_until(
            lambda: conn.metric("f2pipe_connector_in_flight") >= WINDOW, 30, what="window full"
        )
        broker.stop()  # graceful: the broker saves the session and its queue
        broker.start()
        wait_until(lambda: broker_connects(broker, client_id) == 2, 30, 0.2, what="reconnected")
        hold_until = time.monotonic() + 3 * KEEPALIVE
        wait_until(
            lambda: time.monotonic() >= hold_until or broker_connects(broker, client_id) > 2,
            4 * KEEPALIVE,
            0.5,
            what="three keepalive periods",
        )
        assert broker_connects(broker, client_id) == 2, "the new connection did not last"
        assert conn.metric("f2pipe_connector_reconnects_total") == 1
        # The old records and the window sent again, nothing more (Receive Maximum).
        assert WINDOW < conn.metric("f2pipe_connector_in_flight") <= 2 * WINDOW
        assert conn.metric("f2pipe_connector_acked_total") == 0
    finally:
        kafka.proc.send_signal(signal.SIGCONT)

    ledger = ledger_entries(ledger_text.getvalue().splitlines())
    records = read_topic(kafka.bootstrap, raw, count, timeout=120)
    duplicates = assert_all_delivered(ledger, records)
    wait_until(
        lambda: conn.metric("f2pipe_connector_acked_total") >= count, 60, what="all acknowledged"
    )
    assert 0 < duplicates <= conn.metric("f2pipe_connector_redelivered_total")
    print(f"broker restart with Kafka down: {len(records)} records, {duplicates} duplicates")
    assert conn.terminate() == 0
