"""``f2pipe certgen`` as an operator runs it, and certgen over HTTPS."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from cryptography import x509

from conftest import wait_until
from f2pipe.pki import api
from f2pipe.pki.ca import pki_paths
from f2pipe.pki.state import ensure_pki
from f2pipe.settings import Settings
from pki_fixtures import (
    add_device,
    free_port,
    register_database,
    register_dsn,
    settings,
)

__all__ = ["register_database", "register_dsn", "settings"]

pytestmark = pytest.mark.servers


def f2pipe(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "F2PIPE_STATE_DIR": str(settings.state_dir),
        "F2PIPE_METADATA_DSN": settings.metadata_dsn,
        "F2PIPE_MQTT_PORT": str(settings.mqtt_port),
    }
    env.pop("F2PIPE_ADMIN_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "f2pipe.cli", "certgen", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_init_issue_and_revoke_from_the_command_line(settings: Settings, tmp_path: Path) -> None:
    first = f2pipe(settings, "init")
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    token = settings.state_dir / "admin-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    again = f2pipe(settings, "init")
    assert "nothing to do" in again.stdout
    with psycopg.connect(settings.metadata_dsn) as conn:
        names = {r[0] for r in conn.execute("SELECT common_name FROM certificates")}
    assert names == {
        "f2pipe broker",
        "f2pipe certgen",
        "svc-connector",
        "svc-commander",
        "svc-monitor",
    }

    extra = f2pipe(settings, "issue-service", "svc-dashboard")
    assert extra.returncode == 0, extra.stderr
    assert pki_paths(settings).service_cert("svc-dashboard").is_file()
    assert f2pipe(settings, "issue-service", "dashboard").returncode == 1

    add_device(settings.metadata_dsn, "aabbccddee03", None)
    out = tmp_path / "device"
    issued = f2pipe(settings, "issue-device", "AA:BB:CC:DD:EE:03", "--out", str(out))
    assert issued.returncode == 0, issued.stderr
    cert = x509.load_pem_x509_certificate((out / "f2-aabbccddee03.pem").read_bytes())
    assert stat.S_IMODE((out / "f2-aabbccddee03.key").stat().st_mode) == 0o600

    serial = format(cert.serial_number, "X")  # as openssl prints it
    revoked = f2pipe(settings, "revoke", serial, "--reason", "decommissioned")
    assert revoked.returncode == 0, revoked.stderr
    result = json.loads(revoked.stdout)
    assert result["common_name"] == "f2-aabbccddee03"
    assert result["broker_reloaded"] is False  # no broker running in this test
    crl = x509.load_pem_x509_crl(pki_paths(settings).crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    unknown = f2pipe(settings, "revoke", "abcdef")
    assert unknown.returncode == 1
    assert "no certificate with serial abcdef" in unknown.stderr


def test_certgen_serves_https_with_a_certificate_from_its_own_ca(settings: Settings) -> None:
    ensure_pki(settings)
    paths = pki_paths(settings)
    app = api.create_app()
    app.dependency_overrides[api.get_settings] = lambda: settings
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            ssl_certfile=str(paths.certgen_cert),
            ssl_keyfile=str(paths.certgen_key),
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=10, what="certgen to start")
        trust = ssl.create_default_context(cafile=str(paths.ca_cert))
        for host in ("localhost", "127.0.0.1"):
            with httpx.Client(verify=trust) as http:
                assert http.get(f"https://{host}:{port}/healthz").json() == {"status": "ok"}
        with httpx.Client() as http, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY"):
            http.get(f"https://localhost:{port}/healthz")  # system trust store: not this CA
    finally:
        server.should_exit = True
        thread.join(timeout=10)
