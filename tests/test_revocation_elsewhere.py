"""Revocation closes a live session of a broker certgen cannot signal.

The broker here runs as it does in a container: from the rendered start script
(``broker.sh``), in a session and process group of its own (``setsid``), with a
configuration that writes no pid file, reading its certificates, key and CRL
from its share (``<state>/shares/broker``) rather than from the CA's folder.
certgen knows no pid of it; it only rewrites the CRL, and the share follows.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import wait_until
from f2pipe.operations.stack.mosquitto import (
    BrokerSite,
    render_acl,
    render_conf,
    render_start_script,
)
from f2pipe.operations.stack.supervise import port_accepts
from f2pipe.pki.ca import PkiPaths
from f2pipe.pki.state import SHARES, broker_pid_path, ensure_pki
from f2pipe.settings import Settings
from pki_fixtures import (
    ADMIN_TOKEN,
    Certgen,
    Identity,
    add_device,
    certgen,
    connects,
    make_client,
    register_database,
    register_dsn,
    settings,
)

__all__ = ["certgen", "register_database", "register_dsn", "settings"]

pytestmark = pytest.mark.servers

MAC = "aabbccddee07"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def detached_broker(settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Mosquitto under the start script in its own session, no pid file, PKI from its share."""
    share = settings.state_dir / SHARES / "broker"
    share.mkdir(parents=True)
    ensure_pki(settings)
    home = tmp_path / "broker"
    (home / "data").mkdir(parents=True)
    (home / "acl").write_text(render_acl())
    site = BrokerSite(
        acl_file=home / "acl",
        persistence=home / "data",
        max_queued_bytes=1 << 20,
        max_queued_messages=1 << 20,
        # Run by root, Mosquitto would drop to the user "mosquitto", who cannot read the key.
        user=getpass.getuser(),
        listen_host="127.0.0.1",
    )
    (home / "mosquitto.conf").write_text(render_conf(settings, PkiPaths(share), site))
    (home / "broker.sh").write_text(render_start_script())
    log = (home / "broker.log").open("wb")
    process = subprocess.Popen(
        ["setsid", "sh", str(home / "broker.sh"), str(home / "mosquitto.conf")],
        stdout=log,
        stderr=log,
        env={**os.environ, "MOSQUITTO": "/usr/sbin/mosquitto"},
    )
    try:
        wait_until(lambda: port_accepts(settings.mqtt_port), timeout=15, what="the broker")
        yield process
    finally:
        # The script's own group: the script and the broker under it.
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
        log.close()


def test_a_revoked_live_session_closes_without_the_brokers_pid(
    settings: Settings,
    detached_broker: subprocess.Popen[bytes],
    certgen: Certgen,
    tmp_path: Path,
) -> None:
    assert not broker_pid_path(settings).exists()
    # Not this process's child either: another session owns it.
    assert os.getsid(detached_broker.pid) != os.getsid(0)
    add_device(settings.metadata_dsn, MAC, None)
    with httpx.Client(base_url=certgen.url, timeout=90) as http:
        issued = http.post(f"/v1/devices/{MAC}/certificate", json={}, headers=ADMIN)
        assert issued.status_code == 201, issued.text
        body = issued.json()
        folder = tmp_path / "device"
        folder.mkdir()
        (folder / "cert.pem").write_text(body["certificate"])
        (folder / "key.pem").write_text(body["private_key"])
        (folder / "key.pem").chmod(0o600)
        identity = Identity(folder / "cert.pem", folder / "key.pem", settings.pki_dir / "ca.pem")
        # The device reconnects on its own, every second or two, as a controller would.
        device = make_client(settings, identity, reconnect=True)
        try:
            wait_until(device.connected, timeout=10, what="the device to connect")
            revoke = f"/v1/certificates/{body['serial']}/revoke"
            revoked = http.post(revoke, json={"reason": "stolen"}, headers=ADMIN)
            assert revoked.status_code == 200, revoked.text
            assert revoked.json()["broker_reloaded"] is True
            assert revoked.json()["session_closed"] is True
            wait_until(lambda: device.disconnects, timeout=60, what="the live session to close")
            # Its own reconnects, and a fresh connection with the revoked certificate, fail.
            assert not connects(settings, identity)
            assert not device.connected()
        finally:
            device.close()
    assert detached_broker.poll() is None  # reloaded, never restarted


def test_a_renewed_crl_reaches_the_broker_without_its_pid(
    settings: Settings, detached_broker: subprocess.Popen[bytes]
) -> None:
    """The two other reloads certgen asks for: a renewal, and a CRL renewed before it served."""
    from f2pipe.pki.local import load_ca
    from f2pipe.pki.revocation import refresh_crl, reload_and_refresh

    assert not broker_pid_path(settings).exists()
    share_crl = settings.state_dir / SHARES / "broker" / "crl.pem"
    before = share_crl.read_bytes()
    assert refresh_crl(settings, load_ca(settings), None, force=True) is True
    assert share_crl.read_bytes() != before
    assert reload_and_refresh(settings) is True
    assert detached_broker.poll() is None
