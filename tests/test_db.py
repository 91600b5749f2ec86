"""Migrations and the demo fleet against the real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from f2pipe.metadata.database import migrate, seed_demo
from f2pipe.metadata.fleet.demo import demo_fleet

pytestmark = pytest.mark.servers


def test_migrate_is_idempotent(fresh_db: str) -> None:
    assert migrate(fresh_db) == []
    with psycopg.connect(fresh_db) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY 1")]
    assert names[:2] == ["0001_metadata.sql", "0002_timeseries.sql"]


def test_seed_demo_loads_the_fleet_of_the_spec_once(fresh_db: str, tmp_path: Path) -> None:
    codes = tmp_path / "claiming-codes.json"
    codes.write_text("{}")
    codes.chmod(0o644)  # left readable by an older version: the seed closes it
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
    assert sorted(wiring) == [
        ("Bedroom Env Sensor", "Environmental Sensor", "aabbccddee03", 4, 3),
        ("Kitchen Power Monitor", "Power Monitor", "aabbccddee02", 2, 2),
        ("Living Room Env Sensor", "Environmental Sensor", "aabbccddee01", 1, 1),
        ("Office Env Sensor", "Environmental Sensor", "aabbccddee04", 1, 1),
    ]
    assert datapoints == [
        ("Environmental Sensor", "Temperature", "int16", 0, 2, "°C"),
        ("Environmental Sensor", "Humidity", "uint16", 2, 2, "%"),
        ("Environmental Sensor", "CO2", "uint16", 4, 0, "ppm"),
        ("Power Monitor", "Voltage", "uint16", 0, 1, "V"),
        ("Power Monitor", "Current", "uint16", 2, 3, "A"),
    ]


def test_seeding_numbers_the_rows_as_the_readme_shows(fresh_db: str, tmp_path: Path) -> None:
    seed_demo(fresh_db, tmp_path)
    with psycopg.connect(fresh_db) as conn:
        devices = conn.execute("SELECT device_id, name FROM devices ORDER BY 1").fetchall()
        templates = conn.execute(
            "SELECT device_template_id, name FROM device_templates ORDER BY 1"
        ).fetchall()
        first = conn.execute("SELECT label FROM datapoints WHERE datapoint_id = 1").fetchone()
    assert [name for _, name in devices] == [
        *(f"F2 Controller aabbccddee0{n}" for n in range(1, 5)),
        *(s.name for s in demo_fleet().sensors),
    ]
    assert devices[4] == (5, "Living Room Env Sensor")
    assert [name for _, name in templates] == [
        "F2 Controller",
        "Environmental Sensor",
        "Power Monitor",
    ]
    assert first == ("Temperature",)


def test_a_stored_claiming_code_survives_a_lost_state_folder(fresh_db: str, tmp_path: Path) -> None:
    first = seed_demo(fresh_db, tmp_path / "a")
    again = seed_demo(fresh_db, tmp_path / "b")  # new codes for the file, none in the database
    assert set(again) == set(first)
    assert all(again[mac] != first[mac] for mac in first)
    with psycopg.connect(fresh_db) as conn:
        stored = dict(
            conn.execute(
                "SELECT mac_address, claiming_code FROM devices WHERE mac_address IS NOT NULL"
            )
        )
        conn.execute("UPDATE devices SET claiming_code = NULL WHERE mac_address = 'aabbccddee02'")
    assert stored == first
    third = seed_demo(fresh_db, tmp_path / "b")
    assert third == again
    with psycopg.connect(fresh_db) as conn:
        row = conn.execute(
            "SELECT claiming_code FROM devices WHERE mac_address = 'aabbccddee02'"
        ).fetchone()
    assert row == (again["aabbccddee02"],)  # a missing code is filled from the state folder


def test_seeding_again_leaves_a_present_controller_as_the_operator_left_it(
    fresh_db: str, tmp_path: Path
) -> None:
    seed_demo(fresh_db, tmp_path)
    with psycopg.connect(fresh_db) as conn:
        conn.execute(
            "UPDATE devices SET timezone = 'Europe/Madrid' WHERE mac_address = 'aabbccddee01'"
        )
        conn.execute("DELETE FROM devices WHERE mac_address = 'aabbccddee04'")
    seed_demo(fresh_db, tmp_path)  # what `f2pipe up` does every time
    with psycopg.connect(fresh_db) as conn:
        zones = dict(
            conn.execute("SELECT mac_address, timezone FROM devices WHERE mac_address IS NOT NULL")
        )
        office = conn.execute(
            "SELECT d.name FROM pins p JOIN connectors c USING (connector_id)"
            " JOIN devices ctl ON ctl.device_id = c.controller_id"
            " JOIN devices d ON d.device_id = p.device_id"
            " WHERE ctl.mac_address = 'aabbccddee04'"
        ).fetchall()
    assert zones["aabbccddee01"] == "Europe/Madrid"  # kept, not reset to the document
    assert zones["aabbccddee04"] == "UTC"  # a missing demo controller comes back
    assert office == [("Office Env Sensor",)]


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
