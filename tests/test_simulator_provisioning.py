"""The simulator obtains its device certificates from certgen (CSR) and reuses them."""

from __future__ import annotations

import asyncio
import stat

import psycopg
import pytest

from f2pipe.errors import CertError
from f2pipe.settings import Settings, load_settings
from f2pipe.tools.simulator import (
    demo_fleet,
    device_cert_paths,
    generated_fleet,
    provision_certificates,
    provision_fleet,
    run_load,
)
from pki_fixtures import (
    Broker,
    Certgen,
    add_device,
    broker,
    certgen,
    register_database,
    register_dsn,
    settings,
)

__all__ = ["broker", "certgen", "register_database", "register_dsn", "settings"]  # fixtures

pytestmark = pytest.mark.servers


def test_provisioned_devices_publish_and_reuse_their_keys(
    settings: Settings, register_dsn: str, certgen: Certgen, broker: Broker
) -> None:
    settings = settings.model_copy(update={"certgen_url": certgen.url})
    sensors = demo_fleet()
    macs = [s.mac for s in sensors]
    for mac in macs:
        add_device(register_dsn, mac, None)
    assert provision_certificates(settings, macs) == len(macs)
    for mac in macs:
        cert, key = device_cert_paths(settings, mac)
        assert cert.is_file()
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first_key = device_cert_paths(settings, macs[0])[1].read_bytes()
    assert provision_certificates(settings, macs) == 0  # reused, nothing requested
    assert device_cert_paths(settings, macs[0])[1].read_bytes() == first_key
    summary = asyncio.run(run_load(settings, sensors, 200))
    assert summary.acknowledged == 200


def test_unknown_device_is_refused_with_the_reason(settings: Settings, certgen: Certgen) -> None:
    settings = settings.model_copy(update={"certgen_url": certgen.url})
    with pytest.raises(CertError, match="404"):
        provision_certificates(settings, ["0000000000ff"])


@pytest.mark.servers
def test_provision_registers_the_generated_fleet_once(fresh_db: str) -> None:
    settings = load_settings(metadata_dsn=fresh_db)
    sensors = generated_fleet(3)
    provision_fleet(settings, sensors)
    with psycopg.connect(fresh_db) as conn:
        version = conn.execute("SELECT version FROM metadata_version").fetchone()
    provision_fleet(settings, sensors)  # a re-run changes nothing

    with psycopg.connect(fresh_db) as conn:
        wiring = conn.execute(
            "SELECT ctl.mac_address, c.connector_number, p.position, t.name"
            " FROM pins p JOIN connectors c USING (connector_id)"
            " JOIN devices ctl ON ctl.device_id = c.controller_id"
            " JOIN devices d ON d.device_id = p.device_id"
            " JOIN device_templates t ON t.device_template_id = d.device_template_id"
            " ORDER BY 1"
        ).fetchall()
        assert conn.execute("SELECT version FROM metadata_version").fetchone() == version
    assert wiring == [(s.mac, 1, 1, "Environmental Sensor") for s in sensors]
