"""``f2pipe stack`` refuses bad input with one line and starts nothing.

Each case runs the real command in an isolated state folder on unusual ports,
so it never touches a running stack; the checks fail before any server starts,
which keeps these tests cheap.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from f2pipe.operations.stack import Paths, PidFile, down, port_in_use
from f2pipe.operations.stack.server import LAUNCH_PREFIX
from f2pipe.settings import load_settings
from f2pipe.testing.stack import free_ports


@pytest.fixture
def isolated(tmp_path: Path) -> dict[str, str]:
    """Environment for a stack of its own: a fresh state folder and free ports."""
    pg, redis, kafka, controller, mqtt = free_ports(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("F2PIPE_")}
    env.update(
        F2PIPE_STATE_DIR=str(tmp_path / "state"),
        F2PIPE_METADATA_DSN=f"postgresql://postgres@127.0.0.1:{pg}/f2pipe",
        F2PIPE_REDIS_URL=f"redis://127.0.0.1:{redis}/0",
        F2PIPE_KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka}",
        F2PIPE_KAFKA_CONTROLLER_PORT=str(controller),
        F2PIPE_MQTT_PORT=str(mqtt),
        # Never let a test apt-get install anything.
        F2PIPE_STACK_INSTALL="false",
    )
    return env


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port held by a listening socket that is not ours."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _stack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "f2pipe.cli", "stack", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _ports(env: dict[str, str]) -> list[int]:
    return [
        int(env["F2PIPE_METADATA_DSN"].rsplit(":", 1)[1].split("/")[0]),
        int(env["F2PIPE_REDIS_URL"].rsplit(":", 1)[1].split("/")[0]),
        int(env["F2PIPE_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1]),
        int(env["F2PIPE_KAFKA_CONTROLLER_PORT"]),
        int(env["F2PIPE_MQTT_PORT"]),
    ]


def _assert_nothing_started(env: dict[str, str], ports: list[int]) -> None:
    assert list((Path(env["F2PIPE_STATE_DIR"]) / "run").glob("*.pid")) == []
    assert [port for port in ports if port_in_use(port)] == []


@pytest.mark.parametrize(
    "variable", ["F2PIPE_KAFKA_BOOTSTRAP", "F2PIPE_MQTT_PORT", "F2PIPE_KAFKA_CONTROLLER_PORT"]
)
def test_port_held_by_another_process_is_refused(
    isolated: dict[str, str], held_port: int, variable: str
) -> None:
    ports = _ports(isolated)
    isolated[variable] = (
        f"127.0.0.1:{held_port}" if variable == "F2PIPE_KAFKA_BOOTSTRAP" else str(held_port)
    )

    result = _stack(isolated, "up")

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {held_port}" in lines[0]
    assert variable in lines[0]  # the fix: which variable moves it elsewhere
    _assert_nothing_started(isolated, ports)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("F2PIPE_MQTT_PORT", "eighty"),
        ("F2PIPE_REDIS_URL", "http://127.0.0.1:6379"),
        ("F2PIPE_KAFKA_HEAP", "lots"),
        ("F2PIPE_METADATA_DSN", "postgresql://postgres@db.example.com:5432/f2pipe"),
        # TEST-NET-3: an address that is not this machine's.
        ("F2PIPE_REDIS_URL", "rediss://203.0.113.1:6379/0"),
        ("F2PIPE_MQTT_HOST", "203.0.113.1"),
    ],
)
def test_bad_variable_is_one_line_naming_it(
    isolated: dict[str, str], variable: str, value: str
) -> None:
    ports = _ports(isolated)
    isolated[variable] = value

    result = _stack(isolated, "up")

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    _assert_nothing_started(isolated, ports)


def test_a_server_off_loopback_must_be_secured_and_redis_then_speaks_tls(
    isolated: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from f2pipe.errors import ConfigError
    from f2pipe.operations.stack import commands

    # Launched elsewhere (as the separate-hosts test does), 203.0.113.1 is that host's.
    monkeypatch.setitem(LAUNCH_PREFIX, "redis", ["ip", "netns", "exec", "elsewhere"])
    env = {key.removeprefix("F2PIPE_").lower(): value for key, value in isolated.items()
           if key.startswith("F2PIPE_")}  # fmt: skip
    remote = load_settings(**{**env, "redis_url": "redis://203.0.113.1:6379/0"})
    with pytest.raises(ConfigError, match=r"F2PIPE_REDIS_URL must start with rediss://"):
        commands._check_settings(remote)
    commands._check_settings(remote.model_copy(update={"redis_url": "rediss://203.0.113.1:6379/0"}))
    plain = remote.model_copy(update={"stack_secured": False})
    with pytest.raises(ConfigError, match=r"F2PIPE_REDIS_URL .* F2PIPE_STACK_SECURED=false"):
        commands._check_settings(plain)


def test_two_servers_on_one_port_is_refused(isolated: dict[str, str]) -> None:
    isolated["F2PIPE_KAFKA_CONTROLLER_PORT"] = isolated["F2PIPE_MQTT_PORT"]

    result = _stack(isolated, "up")

    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "F2PIPE_KAFKA_CONTROLLER_PORT" in result.stderr


def test_missing_program_names_the_package(isolated: dict[str, str], tmp_path: Path) -> None:
    # A PATH without java, mvn or redis-server: the error says what to install.
    empty = tmp_path / "bin"
    empty.mkdir()
    isolated["PATH"] = str(empty)
    ports = _ports(isolated)

    result = _stack(isolated, "up", "redis", "kafka")

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "java" in lines[0]
    assert "default-jre-headless" in lines[0]
    _assert_nothing_started(isolated, ports)


def test_status_of_a_stack_that_is_not_running(isolated: dict[str, str]) -> None:
    result = _stack(isolated, "status")

    assert result.returncode != 0
    lines = result.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["postgres", "down"],
        ["redis", "down"],
        ["kafka", "down"],
        ["mosquitto", "down"],
    ]


def test_down_without_a_stack_stops_nothing(isolated: dict[str, str]) -> None:
    result = _stack(isolated, "down")

    assert result.returncode == 0
    assert "was not running" in result.stdout


def test_down_never_signals_a_process_it_did_not_start(tmp_path: Path) -> None:
    # A pid file whose pid now belongs to another process (the start time differs),
    # as after a reboot or pid reuse: down must leave that process alone.
    settings = load_settings(state_dir=tmp_path)
    paths = Paths(tmp_path)
    paths.make()
    with subprocess.Popen(["sleep", "60"]) as foreign:
        try:
            (paths.run / "redis.pid").write_text(f"{foreign.pid} 1\n")

            assert down(settings, ["redis"]) == []

            assert foreign.poll() is None
            assert not (paths.run / "redis.pid").exists()
        finally:
            foreign.kill()


def test_pid_file_names_only_the_process_it_recorded(tmp_path: Path) -> None:
    pidfile = PidFile(tmp_path / "x.pid")
    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            pidfile.write(child.pid)
            assert pidfile.live_pid() == child.pid
        finally:
            child.kill()
            child.wait()
    assert pidfile.live_pid() is None


@pytest.mark.servers
def test_down_record_stops_only_what_that_up_started(
    isolated: dict[str, str], tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    redis_port = _ports(isolated)[1]
    try:
        assert _stack(isolated, "up", "redis", "--record", str(first)).returncode == 0
        assert first.read_text().split() == ["redis"]
        assert port_in_use(redis_port)

        # Already running: a second up starts nothing, so its record is empty ...
        assert _stack(isolated, "up", "redis", "--record", str(second)).returncode == 0
        assert second.read_text().split() == []
        # ... and stopping what it started leaves the server running.
        assert _stack(isolated, "down", "--record", str(second)).returncode == 0
        assert port_in_use(redis_port)
        assert _stack(isolated, "status", "redis").returncode == 0

        assert _stack(isolated, "down", "--record", str(first)).returncode == 0
        assert not port_in_use(redis_port)
        assert _stack(isolated, "status", "redis").returncode != 0
    finally:
        _stack(isolated, "down")


@pytest.mark.servers
def test_mosquitto_pid_file_is_where_the_ca_sends_sighup(isolated: dict[str, str]) -> None:
    state = Path(isolated["F2PIPE_STATE_DIR"])
    try:
        assert _stack(isolated, "up", "mosquitto").returncode == 0
        pid = int((state / "mosquitto" / "mosquitto.pid").read_text())

        os.kill(pid, signal.SIGHUP)  # a reload, as after a revocation

        assert _stack(isolated, "status", "mosquitto").returncode == 0
    finally:
        _stack(isolated, "down")
    assert not (state / "mosquitto" / "mosquitto.pid").exists()
