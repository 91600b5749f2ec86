"""``f2pipe cmnd`` validates before sending; a simulated device answers through the pipeline."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest

from conftest import unique, wait_until
from f2pipe import cli
from f2pipe.settings import Settings, load_settings
from f2pipe.testing.servers import ConnectorProcess, create_topics, read_topic
from f2pipe.tools.cmnd import CommandError, build_command, expected_answers
from f2pipe.tools.simulator import command_response, demo_fleet, run_live
from pki_fixtures import (
    Broker,
    broker,
    device_identity,
    register_database,
    register_dsn,
    settings,
)

DEV_KAFKA = load_settings().kafka_bootstrap  # the stack's Kafka (unique topics per test)

__all__ = ["broker", "register_database", "register_dsn", "settings"]  # fixtures used by name


def test_build_command_topic_and_payload() -> None:
    topic, payload = build_command("AA:BB:CC:DD:EE:02", "J2", "strike-1", '{"power-flag": 2}')
    assert topic == "cmnd/f2-aabbccddee02/access-control-mode/J2/strike-1"
    assert json.loads(payload) == {"power-flag": 2}
    topic, _ = build_command("aabbccddee02", "4", "siren-6", '{"power-flag": 0}')
    assert topic == "cmnd/f2-aabbccddee02/alarm-mode/J4/siren-6"
    topic, _ = build_command("aabbccddee02", "J1", "reader-1/success", "{}")
    assert topic == "cmnd/f2-aabbccddee02/access-control-mode/J1/reader-1/success"


@pytest.mark.parametrize(
    ("mac", "connector", "component", "payload"),
    [
        ("aabbccddee0", "J1", "strike-1", '{"power-flag": 1}'),  # MAC too short
        ("aabbccddee02", "J5", "strike-1", '{"power-flag": 1}'),  # no connector J5
        ("aabbccddee02", "J1", "strike-7", '{"power-flag": 1}'),  # index over 6
        ("aabbccddee02", "J1", "strike-1", '{"power-flag": 3}'),
        ("aabbccddee02", "J1", "strike-1", '{"power-flag": true}'),
        ("aabbccddee02", "J1", "siren-1", '{"power-flag": 2, "period": -1}'),
        ("aabbccddee02", "J1", "strike-1", "[1]"),
        ("aabbccddee02", "J1", "strike-1", "not json"),
        ("aabbccddee02", "J1", "lamp-1", "{}"),
    ],
)
def test_invalid_commands_are_refused(
    mac: str, connector: str, component: str, payload: str
) -> None:
    with pytest.raises(CommandError):
        build_command(mac, connector, component, payload)


def test_command_response_names_the_commanded_connector() -> None:
    topic = "cmnd/f2-aabbccddee02/access-control-mode/J2/strike-1"
    assert command_response(topic, b'{"power-flag": 1}') == [
        (0.0, "access-control-mode", 2, "strike-1", True)
    ]
    assert command_response(topic, b'{"power-flag": 2, "period": 5}') == [
        (0.0, "access-control-mode", 2, "strike-1", True),
        (5.0, "access-control-mode", 2, "strike-1", False),
    ]
    siren = "cmnd/f2-aabbccddee02/alarm-mode/J4/siren-6"
    assert command_response(siren, b'{"power-flag": 0}') == [
        (0.0, "alarm-mode", 4, "siren-6", False)
    ]
    assert command_response(topic, b"garbage") == []
    assert command_response(topic.replace("strike", "reader"), b'{"power-flag": 1}') == []


def test_wait_is_refused_for_a_command_nobody_answers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["cmnd", "aabbccddee02", "J1", "reader-1/success", "{}", "--wait", "5"]
    assert cli.main(args) == 1
    assert "only strikes and sirens answer" in capsys.readouterr().err
    with pytest.raises(CommandError):
        expected_answers("cmnd/f2-aabbccddee02/access-control-mode/J1/door-sensors", b"{}")
    topic = "cmnd/f2-aabbccddee02/access-control-mode/J2/strike-1"
    assert expected_answers(topic, b'{"power-flag":2}') == (
        "stat/f2-aabbccddee02/access-control-mode/J2/strike-1",
        [True, False],
    )


def _stamp(line: str) -> datetime:
    payload = json.loads(line.split(" ", 2)[2])
    return datetime.fromisoformat(payload["timestamp"])


@pytest.mark.servers
def test_cmnd_waits_for_the_answer_through_the_pipeline(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    """A pulse on J2 is answered on J2, "on" then "off" `period` s later by the
    controller's own clock, and ``cmnd --wait`` prints both from the raw Kafka topic."""
    fleet = demo_fleet()
    for mac in {s.mac for s in fleet}:
        device_identity(settings, mac, settings.pki_dir / "devices")
    raw, dead = unique("raw"), unique("dlq")
    create_topics(DEV_KAFKA, raw, dead)
    env = {
        **os.environ,
        "F2PIPE_STATE_DIR": str(settings.state_dir),
        "F2PIPE_MQTT_PORT": str(settings.mqtt_port),
        "F2PIPE_KAFKA_BOOTSTRAP": DEV_KAFKA,
        "F2PIPE_TOPIC_RAW": raw,
        "F2PIPE_TOPIC_DEAD_LETTER": dead,
    }
    connector = ConnectorProcess(env, log=tmp_path / "connector.log")
    connector.start()  # as svc-connector, through the product's ACL
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    live = run_live(settings, fleet, 0.5, stop, status_interval=0)
    thread = threading.Thread(target=loop.run_until_complete, args=(live,), daemon=True)
    thread.start()
    try:
        # A device subscribes to its commands before it publishes anything, and the broker
        # takes a connection's packets in order: its telemetry in Kafka means it listens.
        wait_until(lambda: _has_key(raw, b"aabbccddee02"), 30, 0.2, what="device online")

        def cmnd(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "f2pipe.cli", "cmnd", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        pulse = '{"power-flag": 2, "period": 2}'
        done = cmnd("aabbccddee02", "J2", "strike-1", pulse, "--wait", "15")
        assert done.returncode == 0, done.stderr
        answers = [line for line in done.stdout.splitlines() if line.startswith("answer ")]
        topic = "stat/f2-aabbccddee02/access-control-mode/J2/strike-1"
        assert [line.split(" ")[1] for line in answers] == [topic, topic]
        states = [json.loads(line.split(" ", 2)[2])["status"] for line in answers]
        assert states == [True, False]
        gap = (_stamp(answers[1]) - _stamp(answers[0])).total_seconds()
        assert 1.9 <= gap <= 4.0, gap

        # No controller f2-aabbccddee09 is online: nothing answers, and cmnd says so.
        done = cmnd("aabbccddee09", "J1", "siren-1", '{"power-flag": 1}', "--wait", "2")
        assert done.returncode == 1
        assert "no answer on stat/f2-aabbccddee09/alarm-mode/J1/siren-1 within 2 s" in done.stderr
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
        assert connector.terminate() == 0


def _has_key(topic: str, key: bytes) -> bool:
    return any(record.key() == key for record in read_topic(DEV_KAFKA, topic, 1, timeout=1))
