"""The connector against real servers: a private Mosquitto, the dev Kafka (or a private one).

Ground truth is the simulator's ledger: every message the broker acknowledged
to the publisher. Each must appear in Kafka with the right key, headers and
byte-identical payload, whatever is killed or restarted in between.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import generate_latest

from conftest import unique, wait_until
from f2pipe.connector.runner import Connector
from f2pipe.connector.stage import classify, topic_mac
from f2pipe.core.reasons import Reason
from f2pipe.runtime import tls
from f2pipe.runtime.mqttwire import pubacks
from f2pipe.settings import load_settings
from f2pipe.testing.servers import (
    ConnectorProcess,
    KafkaServer,
    Mosquitto,
    TestPki,
    assert_all_delivered,
    create_topics,
    ledger_entries,
    read_topic,
    running_kafka,
)
from f2pipe.testing.servers import connector_env as shared_connector_env
from f2pipe.tools.simulator import Summary, demo_fleet, generated_fleet, run_load

DEV_KAFKA = load_settings().kafka_bootstrap  # the stack's Kafka
FLEET = 20  # generated controllers with device certificates
broker_pki: dict[int, TestPki] = {}  # broker port -> the PKI its clients use


# --- the pure part ---


@pytest.mark.parametrize(
    ("topic", "mac"),
    [
        ("tele/f2-e4fd45f654be/sensor-mode/J1/sensor-1", "e4fd45f654be"),
        ("stat/f2-e4fd45f654be/access-control-mode/J4/door-sensors", "e4fd45f654be"),
        ("stat/f2-e4fd45f654be/alarm-mode/J2/motion-sensor-6", "e4fd45f654be"),
        ("stat/f2-e4fd45f654be/access-control-mode/J3/exit-buttons", "e4fd45f654be"),
        ("tele/f2-E4FD45F654BE/sensor-mode/J1/sensor-1", None),
        ("tele/f2-e4fd45f654b/sensor-mode/J1/sensor-1", None),
        ("tele/f2-e4fd45f654be/sensor-mode/J5/sensor-1", None),
        ("tele/f2-e4fd45f654be/sensor-mode/J1/sensor-7", None),
        ("tele/f2-e4fd45f654be/sensor-mode/J1/sensor-0", None),
        ("tele/f2-e4fd45f654be/other-mode/J1/sensor-1", None),
        ("tele/e4fd45f654be/sensor-mode/J1/sensor-1", None),
        ("cmnd/f2-e4fd45f654be/sensor-mode/J1/sensor-1", None),
        ("tele/f2-e4fd45f654be/sensor-mode/J1/sensor-1/x", None),
    ],
)
def test_topic_mac(topic: str, mac: str | None) -> None:
    expected = mac.encode() if mac else None
    assert topic_mac(topic) == expected
    assert topic_mac(topic.encode()) == expected


def test_classify_precedence() -> None:
    good = "tele/f2-aabbccddee01/sensor-mode/J1/sensor-1"
    assert classify(good, 10, 64) == (b"aabbccddee01", None)
    assert classify(good, 65, 64) == (b"aabbccddee01", Reason.PAYLOAD_TOO_LARGE)
    assert classify("tele/x/y/z/w", 65, 64) == (None, Reason.INVALID_TOPIC)


def test_pubacks_are_built_in_order() -> None:
    assert pubacks([1, 0x1234, 65535]) == bytes.fromhex("40020001 40021234 4002ffff")
    assert pubacks([]) == b""


def test_metrics_of_the_latest_connector_are_exported() -> None:
    settings = load_settings(mqtt_tls=False)
    Connector(settings, None)
    second = Connector(settings, None)  # a second one in a process replaces the first
    second.stats.received = 7
    text = generate_latest().decode()
    assert "f2pipe_connector_received_total 7.0" in text
    # Dead letters in the family every stage shares, exported at 0 for alerting.
    assert 'f2pipe_dead_letters_total{reason="invalid_topic",stage="connector"} 0.0' in text
    assert 'f2pipe_dead_letters_total{reason="payload_too_large",stage="connector"} 0.0' in text
    assert "f2pipe_connector_dead_letters" not in text


# --- fixtures ---


@pytest.fixture(scope="module")
def pki() -> Iterator[TestPki]:
    # Not under pytest's 0700 temp root: mosquitto drops to its own user and must reach it.
    workdir = Path(tempfile.mkdtemp(prefix="f2pipe-connector-"))
    workdir.chmod(0o755)
    authority = TestPki(workdir / "state")
    for sensor in [*demo_fleet(), *generated_fleet(FLEET)]:
        authority.device(sensor.mac)
    yield authority
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(pki: TestPki) -> Iterator[Mosquitto]:
    workdir = pki.root.parent / "mosquitto"
    server = Mosquitto(workdir, tls=pki.mosquitto_tls())
    server.start()
    broker_pki[server.port] = pki
    yield server
    server.stop()


@pytest.fixture
def topics() -> tuple[str, str]:
    raw, dlq = unique("raw"), unique("dlq")
    create_topics(DEV_KAFKA, raw, dlq)
    return raw, dlq


def connector_env(
    broker: Mosquitto, raw: str, dlq: str, bootstrap: str = DEV_KAFKA, **extra: str
) -> dict[str, str]:
    """Environment of one connector: its own service certificate, the test topics."""
    env = shared_connector_env(
        broker_pki[broker.port], broker.port, unique("svc-connector"), bootstrap
    )
    return {**env, "F2PIPE_TOPIC_RAW": raw, "F2PIPE_TOPIC_DEAD_LETTER": dlq, **extra}


@pytest.fixture
def connectors(tmp_path: Path) -> Iterator[list[ConnectorProcess]]:
    started: list[ConnectorProcess] = []
    yield started
    for proc in started:
        if proc.proc is not None:
            proc.kill()


def start_connector(
    started: list[ConnectorProcess], env: dict[str, str], log: Path
) -> ConnectorProcess:
    proc = ConnectorProcess(env, log=log)
    started.append(proc)
    proc.start()
    return proc


def publish(broker: Mosquitto, count: int, **kwargs: Any) -> tuple[Summary, list[dict[str, Any]]]:
    """Publish ``count`` QoS 1 messages with the simulator; return its summary and ledger."""
    settings = load_settings(
        mqtt_tls=True, mqtt_port=broker.port, state_dir=broker_pki[broker.port].root
    )
    ledger = io.StringIO()
    sensors = kwargs.pop("sensors", None) or demo_fleet()
    summary = asyncio.run(run_load(settings, sensors, count, ledger=ledger, **kwargs))
    return summary, ledger_entries(ledger.getvalue().splitlines())


class Publisher(threading.Thread):
    """``publish`` in a background thread, for tests that act while the stream runs."""

    def __init__(self, broker: Mosquitto, count: int, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.args = (broker, count)
        self.kwargs = kwargs
        self.result: tuple[Summary, list[dict[str, Any]]] | None = None

    def run(self) -> None:
        self.result = publish(*self.args, **self.kwargs)


# --- the runner against the real servers ---


@pytest.mark.servers
def test_every_acknowledged_message_reaches_kafka(
    broker: Mosquitto, topics: tuple[str, str], connectors: list[ConnectorProcess], tmp_path: Path
) -> None:
    raw, dlq = topics
    conn = start_connector(connectors, connector_env(broker, raw, dlq), tmp_path / "c.log")
    summary, ledger = publish(broker, 3000)
    assert summary.acknowledged == 3000 == len(ledger)
    records = read_topic(DEV_KAFKA, raw, 3000)
    duplicates = assert_all_delivered(ledger, records)
    assert duplicates == 0
    wait_until(lambda: conn.metric("f2pipe_connector_acked_total") >= 3000, what="all acked")
    assert conn.metric("f2pipe_connector_in_flight") >= 0
    assert conn.terminate() == 0


@pytest.mark.servers
def test_invalid_topic_and_oversized_payload_become_dead_letters(
    broker: Mosquitto, topics: tuple[str, str], connectors: list[ConnectorProcess], tmp_path: Path
) -> None:
    raw, dlq = topics
    conn = start_connector(
        connectors,
        connector_env(broker, raw, dlq, F2PIPE_MAX_PAYLOAD_BYTES="1000"),
        tmp_path / "c.log",
    )
    good = "tele/f2-aabbccddee01/sensor-mode/J1/sensor-1"
    bad_topic = "tele/f2-AABBCCDDEE01/sensor-mode/J9/sensor-1"
    big = b"x" * 1001
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="f2-aabbccddee01")
    pki = broker_pki[broker.port]
    devices = pki.pki / "devices"
    client.tls_set_context(
        tls.client_context(pki.ca, devices / "f2-aabbccddee01.pem", devices / "f2-aabbccddee01.key")
    )
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        infos = [
            client.publish(bad_topic, b'{"timestamp": 1}', qos=1),
            client.publish(good, big, qos=1),
            client.publish(good, b"fits", qos=1),
        ]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()
    dead = read_topic(DEV_KAFKA, dlq, 2)
    by_reason = {dict(r.headers())["dlq.reason"].decode(): r for r in dead}
    assert set(by_reason) == {"invalid_topic", "payload_too_large"}
    invalid = by_reason["invalid_topic"]
    headers = dict(invalid.headers())
    assert invalid.value() == b'{"timestamp": 1}'
    assert headers["dlq.stage"] == b"connector"
    assert headers["dlq.source"] == f"mqtt/{bad_topic}".encode()
    assert headers["mqtt.topic"] == bad_topic.encode()
    assert int(headers["dlq.ts"]) > 0
    assert headers["dlq.detail"]
    large = by_reason["payload_too_large"]
    assert large.value() == big
    assert large.key() == b"aabbccddee01"
    assert b"1001" in dict(large.headers())["dlq.detail"]
    raws = read_topic(DEV_KAFKA, raw, 1)
    assert [r.value() for r in raws] == [b"fits"]
    wait_until(lambda: conn.metric("f2pipe_connector_acked_total") >= 3, what="acks")
    assert conn.metric("f2pipe_dead_letters_total") == 2
    assert conn.metric("f2pipe_dead_letters_total", stage="connector", reason="invalid_topic") == 1


@pytest.mark.servers
@pytest.mark.slow
def test_kill9_mid_stream_loses_nothing(
    broker: Mosquitto, topics: tuple[str, str], connectors: list[ConnectorProcess], tmp_path: Path
) -> None:
    raw, dlq = topics
    env = connector_env(broker, raw, dlq)
    conn = start_connector(connectors, env, tmp_path / "c1.log")
    count = 20000
    publisher = Publisher(broker, count, sensors=generated_fleet(FLEET))
    publisher.start()
    wait_until(
        lambda: conn.metric("f2pipe_connector_acked_total") >= 3000, 60, what="stream under way"
    )
    conn.kill()  # SIGKILL: whatever the connector held in memory is gone
    assert publisher.is_alive(), "the stream should still be running when the connector dies"
    again = start_connector(connectors, env, tmp_path / "c2.log")
    publisher.join(120)
    assert publisher.result is not None
    summary, ledger = publisher.result
    assert summary.acknowledged == count == len(ledger)
    records = read_topic(DEV_KAFKA, raw, count, timeout=120)
    duplicates = assert_all_delivered(ledger, records)
    print(f"kill -9: {len(records)} records for {count} messages, {duplicates} duplicates")
    assert again.terminate() == 0


@pytest.mark.servers
def test_shared_subscription_splits_the_load(
    broker: Mosquitto, topics: tuple[str, str], connectors: list[ConnectorProcess], tmp_path: Path
) -> None:
    raw, dlq = topics
    group = unique("share")
    first = start_connector(
        connectors,
        connector_env(broker, raw, dlq, F2PIPE_CONNECTOR_SHARE_GROUP=group),
        tmp_path / "a.log",
    )
    second = start_connector(
        connectors,
        connector_env(broker, raw, dlq, F2PIPE_CONNECTOR_SHARE_GROUP=group),
        tmp_path / "b.log",
    )
    summary, ledger = publish(broker, 4000, sensors=generated_fleet(8))
    assert summary.acknowledged == 4000
    records = read_topic(DEV_KAFKA, raw, 4000)
    assert_all_delivered(ledger, records)
    a = first.metric("f2pipe_connector_produced_total")
    b = second.metric("f2pipe_connector_produced_total")
    assert a > 0
    assert b > 0
    assert a + b >= 4000


@pytest.fixture(scope="module")
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    with running_kafka(tmp_path_factory.mktemp("kafka")) as server:
        yield server


@pytest.mark.servers
@pytest.mark.slow
def test_kafka_restart_loses_nothing(
    broker: Mosquitto,
    private_kafka: KafkaServer,
    connectors: list[ConnectorProcess],
    tmp_path: Path,
) -> None:
    raw, dlq = unique("raw"), unique("dlq")
    window = 500
    wait_until(lambda: _try_create(private_kafka.bootstrap, raw, dlq), 60, 0.5, what="topics")
    conn = start_connector(
        connectors,
        connector_env(
            broker,
            raw,
            dlq,
            bootstrap=private_kafka.bootstrap,
            F2PIPE_CONNECTOR_RECEIVE_MAXIMUM=str(window),
        ),
        tmp_path / "c.log",
    )
    count = 6000
    publisher = Publisher(broker, count, rate=1000.0, sensors=generated_fleet(FLEET // 2))
    publisher.start()
    wait_until(lambda: conn.metric("f2pipe_connector_acked_total") >= 1000, 60, what="flowing")
    private_kafka.stop()
    acked_while_down = conn.metric("f2pipe_connector_acked_total")
    # Kafka is down: the connector holds at most its Receive Maximum, the broker the rest.
    wait_until(lambda: conn.metric("f2pipe_connector_in_flight") >= window, 30, what="window full")
    assert conn.metric("f2pipe_connector_received_total") - acked_while_down <= window
    private_kafka.start()
    publisher.join(120)
    assert publisher.result is not None
    summary, ledger = publisher.result
    assert summary.acknowledged == count
    records = read_topic(private_kafka.bootstrap, raw, count, timeout=120)
    duplicates = assert_all_delivered(ledger, records)
    print(f"kafka restart: acked {acked_while_down:.0f} before, {duplicates} duplicates")
    assert conn.terminate() == 0


def _try_create(bootstrap: str, *names: str) -> bool:
    try:
        create_topics(bootstrap, *names)
    except Exception:
        return False
    return True


@pytest.mark.servers
def test_reconnects_and_resubscribes_after_broker_restart(
    broker: Mosquitto, topics: tuple[str, str], connectors: list[ConnectorProcess], tmp_path: Path
) -> None:
    raw, dlq = topics
    conn = start_connector(connectors, connector_env(broker, raw, dlq), tmp_path / "c.log")
    _summary, before = publish(broker, 500)
    wait_until(lambda: conn.metric("f2pipe_connector_acked_total") >= 500, what="first half")
    broker.stop()  # graceful: the broker saves the persistent sessions
    wait_until(lambda: not conn.ready(), 10, what="connector notices the loss")
    broker.start()
    wait_until(conn.ready, 60, 0.1, what="connector reconnected and subscribed")
    _summary, after = publish(broker, 500)
    records = read_topic(DEV_KAFKA, raw, 1000)
    assert_all_delivered(before + after, records)
    assert conn.metric("f2pipe_connector_reconnects_total") >= 1


@pytest.mark.servers
def test_simulate_command_publishes_exactly_count_with_faults(
    broker: Mosquitto, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    env = {
        **os.environ,
        "F2PIPE_MQTT_TLS": "true",
        "F2PIPE_STATE_DIR": str(broker_pki[broker.port].root),
        "F2PIPE_MQTT_PORT": str(broker.port),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "f2pipe.cli",
            "simulate",
            "--count",
            "3000",
            "--devices",
            "20",
            "--faults",
            "0.2",
            "--seed",
            "5",
            "--ledger",
            str(ledger),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["published"] == summary["acknowledged"] == 3000
    entries = ledger_entries(ledger.read_text().splitlines())
    assert len(entries) == 3000
    faults = collections.Counter(e["fault"] for e in entries)
    assert set(faults) == {None, "bad_crc", "bad_json", "unknown_mac", "duplicate", "clock_skew"}
    assert all(e["readings"] for e in entries if e["fault"] in (None, "duplicate"))


@pytest.mark.servers
@pytest.mark.slow
def test_one_simulator_process_holds_2000_mtls_connections(broker: Mosquitto) -> None:
    devices = 2000
    pki = broker_pki[broker.port]
    for sensor in generated_fleet(devices)[FLEET:]:
        pki.device(sensor.mac)
    cert, key = pki.service("svc-monitor")
    connected: list[int] = []
    monitor = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("svc-monitor"))
    monitor.tls_set_context(tls.client_context(pki.ca, cert, key))
    monitor.on_message = lambda _c, _u, msg: connected.append(int(msg.payload))
    monitor.connect("127.0.0.1", broker.port)
    monitor.subscribe("$SYS/broker/clients/connected")
    monitor.loop_start()
    env = {
        **os.environ,
        "F2PIPE_MQTT_TLS": "true",
        "F2PIPE_STATE_DIR": str(pki.root),
        "F2PIPE_MQTT_PORT": str(broker.port),
    }
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "f2pipe.cli",
            "simulate",
            "--devices",
            str(devices),
            "--interval",
            "30",
        ],
        env=env,
    )
    try:
        # The monitor itself is one of the connected clients.
        wait_until(lambda: connected and connected[-1] >= devices + 1, 180, 0.2, what="all up")
        assert simulator.poll() is None
    finally:
        simulator.terminate()
        code = simulator.wait(60)
        monitor.loop_stop()
        monitor.disconnect()
    assert code == 0
