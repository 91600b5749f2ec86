"""Fleet files: validation by line (pure) and import/export against the real PostgreSQL."""

from __future__ import annotations

import copy
import io
import json
import math
import secrets
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import psycopg
import pytest
import yaml
from psycopg import sql

from f2pipe import cli
from f2pipe.core.topics import normalize_mac
from f2pipe.errors import FleetError
from f2pipe.metadata.database import seed_demo
from f2pipe.metadata.fleet.cli import ProgressLine
from f2pipe.metadata.fleet.demo import demo_fleet
from f2pipe.metadata.fleet.document import code_strength, weak_code
from f2pipe.metadata.fleet.exporter import export_fleet
from f2pipe.metadata.fleet.importer import apply_fleet, import_fleet
from f2pipe.metadata.fleet.yamlload import parse_fleet
from f2pipe.settings import get_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "fleet.example.yaml"

SMALL = """\
version: 1
device_types:
  - {name: Controller, is_controller: true}
  - {name: Sensor, is_sensor: true}
templates:
  - name: Ctl
    device_type: Controller
    datapoints: []
  - name: Thermo
    device_type: Sensor
    model: TH-1
    datapoints:
      - {label: Temperature, data_encoding: int16, byte_offset: 0, byte_length: 2, decimals: 1}
      - {label: Door, data_encoding: bool, byte_offset: 2, byte_length: 1, json_field: door}
controllers:
  - name: Hall
    mac: "AA:BB:CC:00:00:01"
    template: Ctl
    timezone: Europe/Berlin
    serial_number: 0012345
  - {name: Attic, mac: 001122334455, template: Ctl}
sensors:
  - {name: Hall Thermo, template: Thermo, serial_number: T-1}
  - {name: Attic Thermo, template: Thermo}
wiring:
  - {controller: aa-bb-cc-00-00-01, connector: 1, pin: 1, sensor: Hall Thermo}
  - {controller: "001122334455", connector: 4, pin: 6, sensor: Attic Thermo}
"""


def line_with(text: str, marker: str) -> int:
    """1-based number of the only line of ``text`` containing ``marker``."""
    found = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(found) == 1, (marker, found)
    return found[0]


def problem_of(text: str) -> str:
    with pytest.raises(FleetError) as info:
        parse_fleet(text, "fleet.yaml")
    return str(info.value)


# --- pure validation ----------------------------------------------------------------------


def test_the_example_and_the_small_fleet_are_valid() -> None:
    example = parse_fleet(EXAMPLE.read_text(encoding="utf-8"))
    assert [c.mac for c in example.controllers] == [f"aabbccddee0{n}" for n in range(1, 5)]
    small = parse_fleet(SMALL)
    # Text fields stay text: YAML 1.1 would read these as octal numbers.
    assert [c.mac for c in small.controllers] == ["aabbcc000001", "001122334455"]
    assert small.controllers[0].serial_number == "0012345"
    assert small.wiring[0].controller == "aabbcc000001"


@pytest.mark.parametrize(
    "text", ["aabbccddee01", "AA:BB:CC:DD:EE:01", "aa-bb-cc-dd-ee-01", " aabbccddee01 "]
)
def test_mac_forms(text: str) -> None:
    assert normalize_mac(text) == "aabbccddee01"


@pytest.mark.parametrize("text", ["aabbccddee0", "aa:bb:cc:dd:ee-01", "gg:bb:cc:dd:ee:01", ""])
def test_bad_macs(text: str) -> None:
    with pytest.raises(ValueError, match="not a MAC address"):
        normalize_mac(text)


# (old text, new text, marker of the line the error must name, words the message must hold)
BAD_ENTRIES = [
    ('mac: "AA:BB:CC:00:00:01"', "mac: aa:bb:cc:zz", "aa:bb:cc:zz", ["controllers[0].mac", "MAC"]),
    (
        "byte_offset: 0, byte_length: 2, decimals: 1",
        "byte_offset: 0, byte_length: 4, decimals: 1",
        "byte_length: 4",
        ["templates[1].datapoints[0].byte_length", "int16 is 2 byte"],
    ),
    (
        "data_encoding: int16",
        "data_encoding: int24",
        "int24",
        ["templates[1].datapoints[0].data_encoding", "int24"],
    ),
    (
        "    model: TH-1",
        "    model: TH-1\n    colour: red",
        "colour",
        ["templates[1].colour", "unknown"],
    ),
    (
        "connector: 4, pin: 6",
        "connector: 4, pin: 7",
        "pin: 7",
        ["wiring[1].pin", "less than or equal"],
    ),
    ("decimals: 1}", "decimals: one}", "decimals: one", ["datapoints[0].decimals", "integer"]),
    (
        "sensor: Attic Thermo}",
        "sensor: Cellar Thermo}",
        "Cellar",
        ["wiring[1].sensor", "no sensor"],
    ),
    (
        "{name: Attic Thermo, template: Thermo}",
        "{name: Hall Thermo, template: Thermo}",
        "{name: Hall Thermo, template: Thermo}",
        ["sensors[1]", "duplicate sensor name"],
    ),
    (
        "{name: Attic, mac: 001122334455, template: Ctl}",
        "{name: Attic, mac: 001122334455, template: Thermo}",
        "mac: 001122334455, template: Thermo}",
        ["controllers[1].template", "not a controller"],
    ),
    (
        "    device_type: Sensor",
        "    device_type: Sensors",
        "device_type: Sensors",
        ["templates[1].device_type", "unknown device type"],
    ),
    (
        "  - {name: Attic, mac: 001122334455, template: Ctl}",
        "  - {mac: 001122334455, template: Ctl}",
        "{mac: 001122334455",
        ["controllers[1].name", "required"],
    ),
    (
        "connector: 1, pin: 1, sensor: Hall Thermo}",
        "connector: 1, pin: 1, sensor: Hall Thermo, pin: 2}",
        "pin: 2}",
        ["duplicate key 'pin'"],
    ),
]


@pytest.mark.parametrize(("old", "new", "marker", "words"), BAD_ENTRIES)
def test_a_bad_entry_names_its_line_and_field(
    old: str, new: str, marker: str, words: list[str]
) -> None:
    assert old in SMALL
    text = SMALL.replace(old, new, 1)
    message = problem_of(text)
    assert f"fleet.yaml:{line_with(text, marker)}:" in message
    for word in words:
        assert word in message


def test_every_problem_is_reported_at_once() -> None:
    text = SMALL.replace("pin: 6", "pin: 9").replace("int16", "int17")
    message = problem_of(text)
    assert message.startswith("2 problems, nothing written")
    assert f"fleet.yaml:{line_with(text, 'pin: 9')}:" in message
    assert f"fleet.yaml:{line_with(text, 'int17')}:" in message


def test_merge_keys_may_be_overridden() -> None:
    text = SMALL.replace(
        "  - {name: Hall Thermo, template: Thermo, serial_number: T-1}",
        "  - &thermo {name: Hall Thermo, template: Thermo, serial_number: T-1}",
    ).replace(
        "  - {name: Attic Thermo, template: Thermo}",
        "  - {<<: *thermo, name: Attic Thermo, serial_number: T-2}",
    )
    sensors = parse_fleet(text).sensors
    assert [(s.name, s.template, s.serial_number) for s in sensors] == [
        ("Hall Thermo", "Thermo", "T-1"),
        ("Attic Thermo", "Thermo", "T-2"),
    ]


def test_broken_yaml_names_its_line() -> None:
    text = SMALL.replace("  - {name: Attic Thermo, template: Thermo}", "  - {name: [Attic")
    assert "not valid YAML" in problem_of(text)
    assert problem_of("- just\n- a list\n").startswith("fleet.yaml:1: a fleet file is a mapping")


# --- against the real PostgreSQL ----------------------------------------------------------


@pytest.fixture
def other_db(new_db: Callable[[], str]) -> str:
    """A second fresh, migrated database (for round trips)."""
    return new_db()


def snapshot(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    """Every metadata row, ids included, and the change version: equal means nothing changed."""
    tables = ["device_types", "device_templates", "devices", "connectors", "pins", "datapoints"]
    with psycopg.connect(dsn) as conn:
        rows = {
            t: conn.execute(
                sql.SQL("SELECT * FROM {} ORDER BY 1").format(sql.Identifier(t))
            ).fetchall()
            for t in tables
        }
        rows["version"] = conn.execute("SELECT version FROM metadata_version").fetchall()
    return rows


def wiring(dsn: str) -> list[tuple[str, int, int, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(  # type: ignore[return-value]
            "SELECT ctl.mac_address, c.connector_number, p.position, d.name"
            " FROM pins p JOIN connectors c USING (connector_id)"
            " JOIN devices ctl ON ctl.device_id = c.controller_id"
            " JOIN devices d ON d.device_id = p.device_id ORDER BY 1, 2, 3"
        ).fetchall()


def write(tmp_path: Path, text: str, name: str = "fleet.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.servers
def test_import_registers_the_fleet_and_reimport_changes_nothing(
    fresh_db: str, tmp_path: Path
) -> None:
    path = write(tmp_path, SMALL)
    first = import_fleet(fresh_db, path)
    assert first.counts["controllers"] == {"created": 2}
    assert first.counts["wiring"] == {"created": 2}
    assert wiring(fresh_db) == [
        ("001122334455", 4, 6, "Attic Thermo"),
        ("aabbcc000001", 1, 1, "Hall Thermo"),
    ]
    with psycopg.connect(fresh_db) as conn:
        hall = conn.execute(
            "SELECT timezone, serial_number FROM devices WHERE mac_address = 'aabbcc000001'"
        ).fetchone()
        door = conn.execute(
            "SELECT data_encoding, byte_length, json_field FROM datapoints WHERE label = 'Door'"
        ).fetchone()
    assert hall == ("Europe/Berlin", "0012345")
    assert door == ("bool", 1, "door")

    before = snapshot(fresh_db)
    dry = import_fleet(
        fresh_db, write(tmp_path, SMALL.replace("pin: 6", "pin: 5"), "dry.yaml"), dry_run=True
    )
    assert dry.counts == {"wiring": {"removed": 1, "created": 1}}
    assert snapshot(fresh_db) == before  # a dry run counts and writes nothing
    again = import_fleet(fresh_db, path)
    assert again.total == 0
    assert snapshot(fresh_db) == before  # not one row, not even the change version


@pytest.mark.servers
def test_a_parsed_fleet_applies_like_its_file(fresh_db: str, tmp_path: Path) -> None:
    fleet = parse_fleet(SMALL)
    dry = apply_fleet(fresh_db, fleet, dry_run=True)
    assert snapshot(fresh_db)["devices"] == []
    assert apply_fleet(fresh_db, fleet).counts == dry.counts
    before = snapshot(fresh_db)
    assert apply_fleet(fresh_db, fleet).total == 0
    assert import_fleet(fresh_db, write(tmp_path, SMALL)).total == 0
    assert snapshot(fresh_db) == before

    dangling = fleet.model_copy(update={"sensors": fleet.sensors[:1]})
    with pytest.raises(FleetError, match=r"<fleet>: wiring\[1\]\.sensor: no sensor"):
        apply_fleet(fresh_db, dangling)
    bad_zone = fleet.model_copy(
        update={"controllers": [fleet.controllers[0].model_copy(update={"timezone": "Mars/X"})]}
    )
    with pytest.raises(FleetError, match=r"<fleet>: controllers\[0\]: database refused it"):
        apply_fleet(fresh_db, bad_zone.model_copy(update={"wiring": fleet.wiring[:1]}))
    assert snapshot(fresh_db) == before


@pytest.mark.servers
def test_a_changed_wiring_entry_rewires(fresh_db: str, tmp_path: Path) -> None:
    import_fleet(fresh_db, write(tmp_path, SMALL))
    swapped = SMALL.replace("pin: 1, sensor: Hall Thermo", "pin: 1, sensor: Attic Thermo").replace(
        "pin: 6, sensor: Attic Thermo", "pin: 6, sensor: Hall Thermo"
    )
    # Swap the two sensors, then move one to another pin of the same connector.
    changes = import_fleet(fresh_db, write(tmp_path, swapped))
    assert changes.counts == {"wiring": {"rewired": 2}}
    assert wiring(fresh_db) == [
        ("001122334455", 4, 6, "Hall Thermo"),
        ("aabbcc000001", 1, 1, "Attic Thermo"),
    ]
    moved = swapped.replace("connector: 4, pin: 6", "connector: 4, pin: 2")
    changes = import_fleet(fresh_db, write(tmp_path, moved))
    assert changes.counts == {"wiring": {"removed": 1, "created": 1}}
    assert wiring(fresh_db) == [
        ("001122334455", 4, 2, "Hall Thermo"),
        ("aabbcc000001", 1, 1, "Attic Thermo"),
    ]


@pytest.mark.servers
def test_a_template_lists_all_its_datapoints(fresh_db: str, tmp_path: Path) -> None:
    import_fleet(fresh_db, write(tmp_path, SMALL))
    door = next(line for line in SMALL.splitlines(keepends=True) if "label: Door" in line)
    fewer = SMALL.replace(door, "").replace("decimals: 1}", "decimals: 2}")
    changes = import_fleet(fresh_db, write(tmp_path, fewer))
    assert changes.counts == {"datapoints": {"updated": 1, "deleted": 1}}
    with psycopg.connect(fresh_db) as conn:
        rows = conn.execute("SELECT label, decimals FROM datapoints ORDER BY 1").fetchall()
    assert rows == [("Temperature", 2)]


@pytest.mark.servers
def test_round_trip_export_import_export(fresh_db: str, other_db: str, tmp_path: Path) -> None:
    seed_demo(fresh_db, tmp_path)
    import_fleet(fresh_db, write(tmp_path, SMALL))
    exported = export_fleet(fresh_db)
    import_fleet(other_db, write(tmp_path, exported, "exported.yaml"))
    assert export_fleet(other_db) == exported
    assert len(yaml.safe_load(exported)["wiring"]) == 6


def test_the_example_is_the_shipped_demo_fleet() -> None:
    shipped = resources.files("f2pipe.metadata") / "demo-fleet.yaml"
    assert EXAMPLE.read_bytes() == shipped.read_bytes()
    assert demo_fleet() == parse_fleet(EXAMPLE.read_text("utf-8"))


def in_export_order(document: dict[str, Any]) -> dict[str, Any]:
    """A parsed fleet file with each list in the order export writes (names, MACs)."""
    keys = {"wiring": lambda e: (e["controller"], e["connector"], e["pin"])}
    return {
        key: sorted(value, key=keys.get(key, lambda e: e.get("mac", e.get("name"))))
        if isinstance(value, list)
        else value
        for key, value in document.items()
    }


@pytest.mark.servers
def test_the_example_is_the_demo_fleet(fresh_db: str, tmp_path: Path) -> None:
    seed_demo(fresh_db, tmp_path)
    example = yaml.safe_load(EXAMPLE.read_text("utf-8"))
    assert yaml.safe_load(export_fleet(fresh_db)) == in_export_order(example)
    assert import_fleet(fresh_db, EXAMPLE).total == 0


@pytest.mark.servers
def test_claiming_codes_are_kept_set_and_exported_only_on_request(
    fresh_db: str, tmp_path: Path
) -> None:
    codes = seed_demo(fresh_db, tmp_path)
    assert import_fleet(fresh_db, EXAMPLE).total == 0  # omitted: the stored codes stay
    assert "claiming_code" not in export_fleet(fresh_db)
    with_codes = yaml.safe_load(export_fleet(fresh_db, with_claiming_codes=True))
    assert {c["mac"]: c["claiming_code"] for c in with_codes["controllers"]} == codes
    # The codes the product generates pass the strength rule: their export imports again.
    exported = write(tmp_path, export_fleet(fresh_db, with_claiming_codes=True), "codes.yaml")
    assert import_fleet(fresh_db, exported).total == 0
    text = EXAMPLE.read_text("utf-8").replace(
        "mac: aabbccddee01, template", f"mac: aabbccddee01, claiming_code: {STRONG}, template"
    )
    assert import_fleet(fresh_db, write(tmp_path, text)).counts == {"controllers": {"updated": 1}}
    with psycopg.connect(fresh_db) as conn:
        row = conn.execute(
            "SELECT claiming_code FROM devices WHERE mac_address = 'aabbccddee01'"
        ).fetchone()
    assert row == (STRONG,)
    before = snapshot(fresh_db)
    weak = text.replace(STRONG, "new-code")
    with pytest.raises(FleetError, match="claiming code too weak"):
        import_fleet(fresh_db, write(tmp_path, weak, "weak.yaml"))
    assert snapshot(fresh_db) == before


STRONG = "Zq3vN8rT2kLw9XbP"  # 16 of 62 symbols: about 95 bits


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("Q", ["1 character of upper-case letters", "about 5 bits"]),
        ("new-code", ["8 characters of base64url", "about 48 bits"]),
        ("1234567890123456789", ["19 characters of digits", "about 63 bits"]),
        ("pass word with spaces", ["outside printable ASCII"]),
    ],
)
def test_a_weak_claiming_code_is_refused_without_quoting_it(code: str, words: list[str]) -> None:
    serial = "    serial_number: 0012345"
    text = SMALL.replace(serial, f"{serial}\n    claiming_code: {code}")
    message = problem_of(text)
    where = f"fleet.yaml:{line_with(text, 'claiming_code')}: controllers[0].claiming_code:"
    assert where in message
    assert "controller aabbcc000001 ('Hall')" in message
    for word in words:
        assert word in message
    assert code not in message


@pytest.mark.parametrize(
    ("code", "bits"),
    [
        ("0123456789abcdef", 64.0),  # hex: 16 x 4
        ("ABCDEFGHIJKLMNOP", 16 * math.log2(26)),
        ("MFRGGZDFMZTWQ2LK", 16 * math.log2(32)),  # base32
        ("Ab1-_Ab1-_Ab1", 13 * 6.0),  # base64url
        ("a!", 2 * math.log2(94)),
        ("hunter2hunter2", 14 * 5.0),  # lower-case base32: 70 bits, strong by this estimate
    ],
)
def test_code_strength_uses_the_smallest_alphabet(code: str, bits: float) -> None:
    strength = code_strength(code)
    assert strength is not None
    assert strength[2] == pytest.approx(bits)


def test_generated_codes_are_strong() -> None:
    # seed-demo's codes: secrets.token_urlsafe(12), 16 characters of base64url.
    assert all(weak_code(secrets.token_urlsafe(12)) is None for _ in range(200))


@pytest.mark.servers
def test_a_database_refusal_names_the_line_and_writes_nothing(
    fresh_db: str, tmp_path: Path
) -> None:
    seed_demo(fresh_db, tmp_path)
    before = snapshot(fresh_db)
    # Valid templates and a new controller come first; the bad time zone is last.
    text = SMALL.replace(
        "{name: Attic, mac: 001122334455, template: Ctl}",
        "{name: Attic, mac: 001122334455, template: Ctl, timezone: Mars/Olympus}",
    )
    with pytest.raises(FleetError) as info:
        import_fleet(fresh_db, write(tmp_path, text))
    message = str(info.value)
    assert f"fleet.yaml:{line_with(text, 'Mars/Olympus')}: controllers[1]:" in message
    assert "database refused it" in message
    assert "timezone" in message
    assert snapshot(fresh_db) == before


@pytest.mark.servers
def test_an_ambiguous_sensor_name_in_the_database_is_refused(fresh_db: str, tmp_path: Path) -> None:
    import_fleet(fresh_db, write(tmp_path, SMALL))
    with psycopg.connect(fresh_db) as conn:
        conn.execute(
            "INSERT INTO devices (name, device_template_id)"
            " SELECT name, device_template_id FROM devices WHERE name = 'Attic Thermo'"
        )
    before = snapshot(fresh_db)
    text = SMALL.replace("decimals: 1}", "decimals: 3}")  # a real change before the refusal
    with pytest.raises(FleetError) as info:
        import_fleet(fresh_db, write(tmp_path, text))
    assert f"fleet.yaml:{line_with(text, '{name: Attic Thermo')}: sensors[1].name:" in str(
        info.value
    )
    assert snapshot(fresh_db) == before
    with pytest.raises(FleetError, match="both named 'Attic Thermo'"):
        export_fleet(fresh_db)


@pytest.mark.servers
def test_the_cli_exits_non_zero_with_the_line(
    fresh_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("F2PIPE_METADATA_DSN", fresh_db)
    get_settings.cache_clear()
    try:
        bad = write(tmp_path, SMALL.replace("pin: 6", "pin: 0"), "bad.yaml")
        assert cli.main(["fleet", "import", str(bad)]) == 1
        err = capsys.readouterr().err
        assert f"bad.yaml:{line_with(bad.read_text(), 'pin: 0')}: wiring[1].pin" in err
        assert snapshot(fresh_db)["devices"] == []

        assert cli.main(["fleet", "import", str(EXAMPLE)]) == 0
        assert "controllers: 4 created" in capsys.readouterr().out
        out = tmp_path / "out.yaml"
        out.write_text("")
        out.chmod(0o644)  # an existing file: the codes must not stay readable to others
        assert cli.main(["fleet", "export", str(out), "--with-claiming-codes"]) == 0
        assert out.stat().st_mode & 0o777 == 0o600
        assert cli.main(["fleet", "import", "--dry-run", str(out)]) == 0
        assert "no changes" in capsys.readouterr().out
    finally:
        get_settings.cache_clear()


# --- large fleets -------------------------------------------------------------------------


def generated_fleet_text(controllers: int, sensors_each: int = 4) -> str:
    """A fleet file of ``controllers`` controllers, each with ``sensors_each`` sensors on J1."""
    out = [
        "version: 1",
        "device_types:",
        "  - {name: Controller, is_controller: true}",
        "  - {name: Sensor, is_sensor: true}",
        "templates:",
        "  - {name: Ctl, device_type: Controller}",
        "  - name: Thermo",
        "    device_type: Sensor",
        "    datapoints:",
        "      - {label: T, data_encoding: int16, byte_offset: 0, byte_length: 2, decimals: 1}",
        "controllers:",
    ]
    macs = [f"{0xA0_00_00_00_00_00 + i:012x}" for i in range(controllers)]
    out += [
        f"  - {{name: Controller {i}, mac: '{mac}', template: Ctl, timezone: Europe/Berlin,"
        f" claiming_code: {secrets.token_urlsafe(12)}}}"
        for i, mac in enumerate(macs)
    ]
    out.append("sensors:")
    out += [
        f"  - {{name: Sensor {i}-{k}, template: Thermo, serial_number: S{i}-{k}}}"
        for i in range(controllers)
        for k in range(1, sensors_each + 1)
    ]
    out.append("wiring:")
    out += [
        f"  - {{controller: '{mac}', connector: 1, pin: {k}, sensor: Sensor {i}-{k}}}"
        for i, mac in enumerate(macs)
        for k in range(1, sensors_each + 1)
    ]
    return "\n".join(out) + "\n"


def counts(dsn: str) -> tuple[object, ...]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM devices WHERE mac_address IS NOT NULL),"
            " (SELECT count(*) FROM devices WHERE mac_address IS NULL),"
            " (SELECT count(*) FROM connectors), (SELECT count(*) FROM pins)"
        ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.servers
@pytest.mark.slow
def test_ten_thousand_controllers_import_in_bulk(fresh_db: str, tmp_path: Path) -> None:
    path = write(tmp_path, generated_fleet_text(10_000))
    seen: list[tuple[int, int]] = []
    changes = import_fleet(fresh_db, path, progress=lambda done, total: seen.append((done, total)))
    assert changes.counts["controllers"] == {"created": 10_000}
    assert changes.counts["sensors"] == {"created": 40_000}
    assert changes.counts["wiring"] == {"created": 40_000}
    assert counts(fresh_db) == (10_000, 40_000, 10_000, 40_000)
    assert seen[-1] == (90_004, 90_004)  # entries of the file, all done
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    before = snapshot(fresh_db)
    assert import_fleet(fresh_db, path).total == 0
    assert snapshot(fresh_db) == before


@pytest.mark.servers
def test_a_refusal_in_a_bulk_statement_names_its_entry(fresh_db: str, tmp_path: Path) -> None:
    text = generated_fleet_text(1_000, sensors_each=1)
    bad = "{name: Controller 637, mac: 'a0000000027d', template: Ctl, timezone: Europe/Berlin"
    assert bad in text
    text = text.replace(bad, bad.replace("Europe/Berlin", "Mars/Olympus"))
    with pytest.raises(FleetError) as info:
        import_fleet(fresh_db, write(tmp_path, text))
    message = str(info.value)
    assert message.startswith("1 problem, nothing written")
    assert f"fleet.yaml:{line_with(text, 'Mars/Olympus')}: controllers[637]:" in message
    assert "database refused it" in message
    assert counts(fresh_db) == (0, 0, 0, 0)


# --- the JSON Schema and the progress line ------------------------------------------------


def test_the_schema_accepts_the_demo_fleet_and_refuses_a_bad_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["fleet", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    shipped = resources.files("f2pipe.metadata") / "demo-fleet.yaml"
    demo = yaml.safe_load(shipped.read_text(encoding="utf-8"))
    assert list(validator.iter_errors(demo)) == []
    small = yaml.safe_load(SMALL.replace("mac: 001122334455", "mac: '001122334455'"))
    small["controllers"][0]["serial_number"] = "0012345"
    assert list(validator.iter_errors(small)) == []

    bad = copy.deepcopy(demo)
    bad["wiring"][0]["pin"] = 7
    bad["controllers"][1]["mac"] = "aa:bb:cc:dd:ee"
    bad["controllers"][2]["claiming_code"] = "short"
    bad["templates"][1]["datapoints"][0]["data_encoding"] = "int24"
    bad["templates"][1]["colour"] = "red"
    errors = {tuple(e.absolute_path) for e in validator.iter_errors(bad)}
    assert errors == {
        ("wiring", 0, "pin"),
        ("controllers", 1, "mac"),
        ("controllers", 2, "claiming_code"),
        ("templates", 1, "datapoints", 0, "data_encoding"),
        ("templates", 1),
    }
    # Case-insensitive, as the importer reads them.
    demo["templates"][1]["datapoints"][0].update(data_encoding="INT16", byte_order="dcba")
    assert list(validator.iter_errors(demo)) == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_only_on_a_terminal() -> None:
    piped = io.StringIO()
    line = ProgressLine(piped)
    line.note("reading")
    line(5, 10)
    line(10, 10)
    line.close()
    assert piped.getvalue() == ""

    terminal = _Terminal()
    line = ProgressLine(terminal, interval=3600)
    line(1, 10)  # within the interval: not shown
    line(10, 10)  # the last is always shown
    line.close()
    shown = terminal.getvalue()
    assert "fleet import: 10 of 10 entries" in shown
    assert "1 of 10" not in shown
    assert shown.endswith(" s)\n")


# --- brokers (SPEC section 10) ------------------------------------------------------------

TWO_BROKERS = ["mqtt-1", "mqtt-2"]


@pytest.mark.servers
def test_a_controller_names_its_broker_and_export_keeps_it(fresh_db: str, tmp_path: Path) -> None:
    text = SMALL.replace(
        "{name: Attic, mac: 001122334455, template: Ctl}",
        "{name: Attic, mac: 001122334455, template: Ctl, broker: mqtt-2}",
    )
    assert import_fleet(fresh_db, write(tmp_path, text), brokers=TWO_BROKERS).total
    with psycopg.connect(fresh_db) as conn:
        rows = conn.execute(
            "SELECT mac_address, broker FROM devices WHERE mac_address IS NOT NULL ORDER BY 1"
        ).fetchall()
    assert rows == [("001122334455", "mqtt-2"), ("aabbcc000001", None)]
    exported = yaml.safe_load(export_fleet(fresh_db))
    brokers = {c["mac"]: c.get("broker") for c in exported["controllers"]}
    assert brokers == {"001122334455": "mqtt-2", "aabbcc000001": None}
    before = snapshot(fresh_db)
    assert import_fleet(fresh_db, write(tmp_path, text), brokers=TWO_BROKERS).total == 0
    assert snapshot(fresh_db) == before
    # Taking the assignment out moves the controller back to the default broker.
    assert import_fleet(fresh_db, write(tmp_path, SMALL)).counts == {"controllers": {"updated": 1}}


@pytest.mark.servers
def test_an_unknown_broker_is_refused_by_name_and_nothing_is_written(
    fresh_db: str, tmp_path: Path
) -> None:
    text = SMALL.replace(
        "{name: Attic, mac: 001122334455, template: Ctl}",
        "{name: Attic, mac: 001122334455, template: Ctl, broker: mqtt-3}",
    )
    before = snapshot(fresh_db)
    with pytest.raises(FleetError) as info:
        import_fleet(fresh_db, write(tmp_path, text), brokers=TWO_BROKERS)
    problem = str(info.value).splitlines()[1].strip()
    assert problem.startswith(f"{tmp_path / 'fleet.yaml'}:{line_with(text, 'mqtt-3')}:")
    for word in ("001122334455", "'Attic'", "'mqtt-3'", "known: mqtt-1, mqtt-2"):
        assert word in problem
    assert "F2PIPE_MQTT_BROKERS" in problem
    assert snapshot(fresh_db) == before
    with pytest.raises(FleetError, match=r"controllers\[1\]\.broker: .*'mqtt-3'"):
        apply_fleet(fresh_db, parse_fleet(text), brokers=TWO_BROKERS)
    assert snapshot(fresh_db) == before
    assert "pattern" in problem_of(text.replace("broker: mqtt-3", "broker: eu-west"))
