"""The simulator's load mode against a dedicated broker: paced publishing and reconnects.

Ground truth is a persistent-session subscriber on the same Mosquitto (mutual
TLS, persistence): it must hold every message of the simulator's ledger, and
it notes when each arrived.

- At a fixed rate each message is stamped when it is written, so it reaches
  the subscriber moments after its timestamp, never after waiting in a queue.
- The broker is frozen mid-stream, so the devices' last messages stay
  unacknowledged, then stopped gracefully and started again: the devices
  reconnect, publish those messages again, and the summary and ledger count
  each message once, only once the broker acknowledged it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import unique, wait_until
from f2pipe.runtime import tls
from f2pipe.settings import load_settings
from f2pipe.testing.servers import Mosquitto, TestPki, ledger_entries
from f2pipe.tools.simulator import Summary, generated_fleet, run_load

DEVICES = 4


@pytest.fixture
def broker() -> Iterator[tuple[Mosquitto, TestPki]]:
    # Not under pytest's 0700 temp root: mosquitto drops to its own user and must reach it.
    workdir = Path(tempfile.mkdtemp(prefix="f2pipe-sim-reconnect-"))
    workdir.chmod(0o755)
    pki = TestPki(workdir / "state")
    for sensor in generated_fleet(DEVICES):
        pki.device(sensor.mac)
    server = Mosquitto(workdir / "mosquitto", tls=pki.mosquitto_tls())
    server.start()
    yield server, pki
    if server.proc is not None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


class Subscriber:
    """A persistent-session QoS 1 subscriber to ``tele/#`` that reconnects on its own."""

    def __init__(self, broker: Mosquitto, pki: TestPki) -> None:
        name = unique("svc-monitor")
        cert, key = pki.service(name)
        self.received: list[tuple[str, bytes]] = []
        self.arrived: list[float] = []  # wall clock of each arrival, as time.time()
        self.subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, clean_session=False)
        client.tls_set_context(tls.client_context(pki.ca, cert, key))
        client.reconnect_delay_set(0.1, 1)
        client.on_connect = lambda c, _u, _f, _r, _p: c.subscribe("tele/#", qos=1)
        client.on_subscribe = lambda _c, _u, _m, _r, _p: self.subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        self.client = client

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.arrived.append(time.time())
        self.received.append((msg.topic, msg.payload))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def stamp_epoch(payload: bytes) -> float:
    stamp = json.loads(payload)["timestamp"]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


@pytest.mark.servers
def test_a_fixed_rate_stamps_each_message_when_it_is_written(
    broker: tuple[Mosquitto, TestPki],
) -> None:
    server, pki = broker
    subscriber = Subscriber(server, pki)
    wait_until(subscriber.subscribed.is_set, 10, what="subscriber subscribed")
    settings = load_settings(mqtt_tls=True, mqtt_port=server.port, state_dir=pki.root)
    count, rate = 600, 200.0
    ledger = io.StringIO()
    try:
        summary = asyncio.run(
            run_load(settings, generated_fleet(DEVICES), count, rate=rate, ledger=ledger)
        )
        assert summary.acknowledged == count
        wait_until(lambda: len(subscriber.received) >= count, 30, what="every message arrived")
    finally:
        subscriber.close()
    stamps = sorted(
        stamp_epoch(e["payload"].encode()) for e in ledger_entries(ledger.getvalue().splitlines())
    )
    # Spread over the run as the rate says, not written in bursts.
    assert stamps[-1] - stamps[0] == pytest.approx((count - 1) / rate, rel=0.1)
    delays = sorted(
        arrived - stamp_epoch(payload)
        for arrived, (_topic, payload) in zip(subscriber.arrived, subscriber.received, strict=True)
    )
    # A message held in a local queue arrives long after its stamp (a batch of 256 at
    # 200/s waits up to 1.3 s); one written when stamped arrives within milliseconds.
    assert delays[-1] < 0.4, f"median {delays[len(delays) // 2]:.3f} s, max {delays[-1]:.3f} s"


@pytest.mark.servers
def test_devices_reconnect_and_republish_across_a_broker_restart(
    broker: tuple[Mosquitto, TestPki],
) -> None:
    server, pki = broker
    assert server.proc is not None
    subscriber = Subscriber(server, pki)
    wait_until(subscriber.subscribed.is_set, 10, what="subscriber subscribed")
    settings = load_settings(mqtt_tls=True, mqtt_port=server.port, state_dir=pki.root)
    count = 8000
    ledger = io.StringIO()
    progress: list[Summary] = []
    result: dict[str, Any] = {}

    def publish() -> None:
        try:
            result["summary"] = asyncio.run(
                run_load(
                    settings,
                    generated_fleet(DEVICES),
                    count,
                    rate=2000.0,
                    ledger=ledger,
                    progress=progress.append,
                    give_up=60.0,
                )
            )
        except BaseException as exc:  # reported by the test, not lost in the thread
            result["error"] = exc

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        wait_until(lambda: len(subscriber.received) >= 1000, 30, what="stream under way")
        # Frozen, the broker reads and acknowledges nothing while the devices keep writing.
        os.kill(server.proc.pid, signal.SIGSTOP)
        wait_until(
            lambda: progress and progress[-1].published - progress[-1].acknowledged >= 300,
            30,
            what="messages waiting for their PUBACK",
        )
        unacked_at_stop = progress[-1].published - progress[-1].acknowledged
        server.proc.terminate()  # graceful: the broker saves its sessions on the way out
        os.kill(server.proc.pid, signal.SIGCONT)
        server.proc.wait(30)
        server.proc = None
        server.start()
        publisher.join(120)
        assert not publisher.is_alive(), "the simulator did not finish after the restart"
        assert "error" not in result, result.get("error")
        summary: Summary = result["summary"]
        assert summary.published == summary.acknowledged == count
        assert summary.reconnects >= DEVICES
        assert summary.republished > 0, f"{unacked_at_stop} unacked when stopped, none resent"
        print(f"restart: {unacked_at_stop} unacked, {summary.as_dict()}")
        entries = ledger_entries(ledger.getvalue().splitlines())
        published = {(e["topic"], e["payload"].encode()) for e in entries}
        assert len(entries) == len(published) == count  # each message acknowledged once
        wait_until(
            lambda: published <= set(subscriber.received),
            60,
            what="every acknowledged message at the subscriber",
        )
    finally:
        subscriber.close()
