"""The ``f2pipe`` command as a person meets it: version, grouped help, log levels, config."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from f2pipe.cli import COMMANDS, GROUPS, main
from f2pipe.operations.config import REFERENCE_COMMAND, reference
from f2pipe.settings import get_settings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
SECRET = "s3cr3t-pa55"


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> object:
    for name in list(os.environ):
        if name.startswith("F2PIPE_LOG_LEVEL") or name == "F2PIPE_CONFIG_FILE":
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _f2pipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "f2pipe.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_version_comes_from_the_package_metadata() -> None:
    done = _f2pipe("--version")
    assert done.returncode == 0
    assert done.stdout.startswith(f"f2pipe {version('f2pipe')} (Python 3.")


def test_help_groups_every_command_by_what_a_person_does() -> None:
    text = _f2pipe("--help").stdout
    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(COMMANDS)  # each command in exactly one group
    for group, names in GROUPS.items():
        assert f"\n{group}:\n" in text
        for name in names:
            assert f"\n  {name} " in text
    assert "F2PIPE_CONFIG_FILE" in text
    assert "f2pipe config show" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["connector", "--log-level", "loud"],
        ["processor", "--log-level", "loud"],
        ["sink", "--log-level", "loud"],
        ["certgen", "serve", "--log-level", "loud"],
    ],
)
def test_a_bad_log_level_is_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        f"f2pipe {argv[0]}: error: --log-level 'loud' is invalid: "
        "expected one of debug, info, warning, error, critical\n"
    )


def test_a_bad_log_level_variable_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("F2PIPE_LOG_LEVEL", "loud")
    assert main(["sink"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("f2pipe sink: error: F2PIPE_LOG_LEVEL='LOUD' is invalid")
    assert err.count("\n") == 1


def test_config_check_reports_each_unreadable_file_and_fails(tmp_path: Path) -> None:
    done = _f2pipe(
        "config",
        "check",
        env={
            "F2PIPE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "F2PIPE_KAFKA_SASL_USERNAME": "svc",
            "F2PIPE_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "password"),
            "F2PIPE_KAFKA_SSL_CA_LOCATION": str(tmp_path / "ca.pem"),
        },
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"f2pipe config: error: F2PIPE_KAFKA_SASL_PASSWORD_FILE: cannot read "
        f"{tmp_path / 'password'}: No such file or directory",
        f"f2pipe config: error: F2PIPE_KAFKA_SSL_CA_LOCATION: cannot read "
        f"{tmp_path / 'ca.pem'}: No such file or directory",
    ]


def test_config_check_passes_a_valid_file_and_names_a_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "f2pipe.toml"
    path.write_text('kafka_bootstrap = "k1:9093"\nlog_level = "warning"\n')
    done = _f2pipe("config", "check", env={"F2PIPE_CONFIG_FILE": str(path)})
    assert done.returncode == 0, done.stderr
    assert f"2 from file {path}" in done.stdout
    path.write_text('kafka_bootstrap = "k1"\n')
    done = _f2pipe("config", "check", env={"F2PIPE_CONFIG_FILE": str(path)})
    assert done.returncode == 1
    assert done.stderr == (
        f"f2pipe config: error: kafka_bootstrap = 'k1' in {path} is invalid: "
        "expected host:port[,host:port...]\n"
    )


def test_config_show_prints_sources_and_masks_secrets() -> None:
    done = _f2pipe(
        "config",
        "show",
        env={
            "F2PIPE_METADATA_DSN": f"postgresql://app:{SECRET}@db/f2pipe?sslmode=verify-full",
            "F2PIPE_KAFKA_SASL_PASSWORD": SECRET,
        },
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout
    lines = done.stdout.splitlines()
    assert "F2PIPE_KAFKA_SASL_PASSWORD=****  # environment" in lines
    assert (
        "F2PIPE_METADATA_DSN=postgresql://app:****@db/f2pipe?sslmode=verify-full  # environment"
        in lines
    )


def test_the_settings_reference_is_up_to_date() -> None:
    assert DOCS.read_text(encoding="utf-8") == reference(), (
        f"docs/settings.md is stale: run `{REFERENCE_COMMAND}`"
    )


def test_build_info_is_on_every_stage_metrics_endpoint() -> None:
    import platform

    from f2pipe.runtime import metrics  # noqa: F401  (registers build_info, as the stages do)
    from f2pipe.runtime.opsserver import OpsServer

    ops = OpsServer("127.0.0.1", 0, lambda: True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops.port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    finally:
        ops.close()
    line = (
        f'f2pipe_build_info{{python="{platform.python_version()}",'
        f'version="{version("f2pipe")}"}} 1.0'
    )
    assert line in body.splitlines()


@pytest.fixture
def plain_server() -> Iterator[int]:
    """A port answering PostgreSQL's encryption requests with "N", as a server without TLS
    does (the stack's own PostgreSQL speaks TLS when it is secured)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while len(conn.recv(8)) == 8:  # SSLRequest or GSSENCRequest: refuse each
                    conn.sendall(b"N")

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.servers
@pytest.mark.parametrize(
    ("argv", "prefix"), [(["fleet", "export"], "fleet"), (["db", "migrate"], "db")]
)
def test_a_dsn_requiring_tls_against_a_plain_server_is_one_line(
    argv: list[str], prefix: str, plain_server: int
) -> None:
    dsn = f"postgresql://postgres:{SECRET}@127.0.0.1:{plain_server}/f2pipe?sslmode=require"
    done = _f2pipe(*argv, env={"F2PIPE_METADATA_DSN": dsn})
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"f2pipe {prefix}: error: ")
    assert "SSL" in done.stderr
    assert SECRET not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    import subprocess
    import sys

    # `f2pipe config reference | head -0`: the reader has gone before the first write.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "f2pipe.cli", "config", "reference"],
            stdout=writer, stderr=subprocess.PIPE, text=True, check=False, timeout=60,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert out.stderr == ""
    assert out.returncode == 141
