"""Migrations and the demo fleet against the real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from f2pipe.metadata.database import DEMO_WIRING, migrate, seed_demo

pytestmark = pytest.mark.servers


def test_migrate_is_idempotent(fresh_db: str) -> None:
    assert migrate(fresh_db) == []
    with psycopg.connect(fresh_db) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY 1")]
    assert names[:2] == ["0001_metadata.sql", "0002_timeseries.sql"]


def test_seed_demo_loads_the_fleet_of_the_spec_once(fresh_db: str, tmp_path: Path) -> None:
    first = seed_demo(fresh_db, tmp_path)
    second = seed_demo(fresh_db, tmp_path)
    assert first == second
    assert sorted(first) == [f"aabbccddee0{n}" for n in range(1, 5)]
    assert (tmp_path / "claiming-codes.json").stat().st_mode & 0o777 == 0o600
    with psycopg.connect(fresh_db) as conn:
        wiring = conn.execute(
            "SELECT d.name, t.name, ctl.mac_address, c.connector_number, p.position"
            " FROM pins p JOIN connectors c USING (connector_id)"
            " JOIN devices ctl ON ctl.device_id = c.controller_id"
            " JOIN devices d ON d.device_id = p.device_id"
            " JOIN device_templates t ON t.device_template_id = d.device_template_id"
            " ORDER BY ctl.mac_address"
        ).fetchall()
        datapoints = conn.execute(
            "SELECT t.name, dp.label, dp.data_encoding, dp.byte_offset, dp.decimals, dp.unit"
            " FROM datapoints dp JOIN device_templates t USING (device_template_id)"
            " ORDER BY t.name, dp.byte_offset"
        ).fetchall()
    assert sorted(wiring) == sorted(DEMO_WIRING)
    assert datapoints == [
        ("Environmental Sensor", "Temperature", "int16", 0, 2, "°C"),
        ("Environmental Sensor", "Humidity", "uint16", 2, 2, "%"),
        ("Environmental Sensor", "CO2", "uint16", 4, 0, "ppm"),
        ("Power Monitor", "Voltage", "uint16", 0, 1, "V"),
        ("Power Monitor", "Current", "uint16", 2, 3, "A"),
    ]


def test_metadata_changes_bump_the_version_and_notify(fresh_db: str, tmp_path: Path) -> None:
    with psycopg.connect(fresh_db, autocommit=True) as listener:
        listener.execute("LISTEN f2pipe_metadata")
        before = listener.execute("SELECT version FROM metadata_version").fetchone()
        seed_demo(fresh_db, tmp_path)
        note = next(listener.notifies(timeout=5, stop_after=1))
    assert before is not None
    assert int(note.payload) > before[0]


@pytest.mark.parametrize(
    ("column", "value"),
    [("timezone", "Mars/Olympus"), ("mac_address", "AABBCCDDEE01"), ("mac_address", "aabb")],
)
def test_constraints_refuse_bad_devices(
    fresh_db: str, tmp_path: Path, column: str, value: str
) -> None:
    seed_demo(fresh_db, tmp_path)
    with psycopg.connect(fresh_db) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            f"INSERT INTO devices (name, device_template_id, {column})"  # noqa: S608 - fixed names
            " SELECT 'x', device_template_id, %s FROM device_templates LIMIT 1",
            (value,),
        )
