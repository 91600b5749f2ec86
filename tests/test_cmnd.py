"""``f2pipe cmnd`` validates before sending; a simulated device answers over the product broker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import wait_until
from f2pipe.settings import Settings
from f2pipe.tools.cmnd import CommandError, build_command
from f2pipe.tools.simulator import command_response, demo_fleet, run_live
from pki_fixtures import (
    Broker,
    broker,
    device_identity,
    make_client,
    register_database,
    register_dsn,
    service_identity,
    settings,
)

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


def test_command_response() -> None:
    topic = "cmnd/f2-aabbccddee02/access-control-mode/J3/strike-1"
    assert command_response(topic, b'{"power-flag": 1}') == [
        (0.0, "access-control-mode", "strike-1", True)
    ]
    assert command_response(topic, b'{"power-flag": 2, "period": 5}') == [
        (0.0, "access-control-mode", "strike-1", True),
        (5.0, "access-control-mode", "strike-1", False),
    ]
    assert command_response(topic, b"garbage") == []
    assert command_response(topic.replace("strike", "reader"), b'{"power-flag": 1}') == []


@pytest.mark.servers
def test_simulated_device_answers_a_command(settings: Settings, broker: Broker) -> None:
    fleet = demo_fleet()
    for mac in {s.mac for s in fleet}:
        device_identity(settings, mac, settings.pki_dir / "devices")
    monitor = make_client(settings, service_identity(settings, "svc-connector"), "svc-connector")
    wait_until(monitor.connected, 10, what="monitor connected")
    monitor.mqtt.subscribe("stat/f2-aabbccddee02/#", qos=1)
    wait_until(lambda: monitor.subacks, 10, what="monitor subscribed")

    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(
        target=loop.run_until_complete,
        args=(run_live(settings, fleet, 3600.0, stop, status_interval=0),),
        daemon=True,
    )
    thread.start()
    try:
        env = {
            **os.environ,
            "F2PIPE_STATE_DIR": str(settings.state_dir),
            "F2PIPE_MQTT_PORT": str(settings.mqtt_port),
        }
        command = [sys.executable, "-m", "f2pipe.cli", "cmnd", "aabbccddee02", "J3", "strike-1"]

        def answered() -> list[bool]:
            done = subprocess.run(
                [*command, '{"power-flag": 2, "period": 1}'],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            return wait_until(lambda: _states(monitor), 5, what="status answer")

        # The device may not have subscribed yet when the first command goes out.
        wait_until(answered, 30, 0.5, what="device answering")
        wait_until(lambda: _states(monitor)[-1:] == [False], 10, what="strike off after period")
        assert True in _states(monitor)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
        monitor.close()


def _states(monitor: object) -> list[bool]:
    with monitor.lock:  # type: ignore[attr-defined]
        return [
            json.loads(m.payload)["status"]
            for m in monitor.received  # type: ignore[attr-defined]
            if m.topic == "stat/f2-aabbccddee02/access-control-mode/J3/strike-1"
        ]
