"""``f2pipe decode``: what a person sees, and the exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from f2pipe.cli import main

TOPIC = "tele/f2-aabbccddee01/sensor-mode/J1/sensor-1"
PAYLOAD = '{"timestamp": "2024-07-15 14:30:25.123456", "data": "01 03 06 09 F8 11 A0 01 9F C4 DE"}'


def test_readings_with_units_and_both_times(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["decode", "--topic", TOPIC, "--payload", PAYLOAD, "--timezone", "Europe/Madrid"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert "aabbccddee01" in lines[0]
    assert "Environmental Sensor" in lines[0]
    assert lines[1].split()[:3] == ["Temperature", "25.52", "°C"]
    assert lines[2].split()[:3] == ["Humidity", "45.12", "%"]
    assert lines[3].split()[:3] == ["CO2", "415", "ppm"]
    # The payload's wall clock is Madrid summer time (UTC+2).
    assert "2024-07-15T12:30:25.123456+00:00" in lines[1]
    assert "local 2024-07-15T14:30:25.123456+02:00" in lines[1]


def test_power_monitor_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["decode", "--topic", TOPIC, "--payload", PAYLOAD, "--template", "power monitor", "--json"]
    )
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    assert document["template"] == "Power Monitor"
    assert [(r["label"], r["value"], r["unit"]) for r in document["readings"]] == [
        ("Voltage", 255.2, "V"),
        ("Current", 4.512, "A"),
    ]
    assert document["readings"][0]["ts"] == "2024-07-15T14:30:25.123456+00:00"


def test_dead_letter_exits_one_with_reason_and_detail(capsys: pytest.CaptureFixture[str]) -> None:
    payload = PAYLOAD.replace("C4 DE", "C4 DF")
    code = main(["decode", "--topic", TOPIC, "--payload", payload])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[0] == "dead letter: crc_mismatch"
    assert "0xDFC4" in out


def test_dead_letter_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    payload = '{"timestamp": "2024-07-15 14:30:25", "data": "01 83 02 C0 F1"}'
    code = main(["decode", "--topic", TOPIC, "--payload", payload, "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 1
    assert document["dead_letter"]["reason"] == "modbus_exception"
    assert "exception code 2" in document["dead_letter"]["detail"]


def test_invalid_topic_is_a_dead_letter(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["decode", "--topic", "tele/f2-AABBCCDDEE01/sensor-mode/J1/sensor-1",
                 "--payload", PAYLOAD])  # fmt: skip
    assert code == 1
    assert capsys.readouterr().out.startswith("dead letter: invalid_topic")


@pytest.mark.parametrize(
    "topic",
    [
        "tele/f2-aabbccddee01/access-control-mode/J2/reader-1",
        "cmnd/f2-aabbccddee01/access-control-mode/J2/reader-1/success",
    ],
)
def test_readers_and_commands_are_skipped(topic: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["decode", "--topic", topic, "--payload", '{"data": "card 1234"}'])
    assert code == 0
    assert capsys.readouterr().out.startswith("skipped: ")


def test_status_message_with_a_template_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = tmp_path / "doors.json"
    template.write_text(
        json.dumps(
            {
                "frame_check": "modbus_crc",
                "datapoints": [
                    {"label": "Door 1", "data_encoding": "bool", "byte_offset": 0,
                     "byte_length": 1, "json_field": "door-sensor-1"},
                    {"label": "Door 2", "data_encoding": "bool", "byte_offset": 0,
                     "byte_length": 1, "json_field": "door-sensor-2"},
                ],
            }
        )
    )  # fmt: skip
    payload = '{"timestamp": "2024-07-15 14:30:25Z", "door-sensor-1": false, "door-sensor-2": true}'
    code = main(
        ["decode", "--topic", "stat/f2-aabbccddee01/access-control-mode/J2/door-sensors",
         "--payload", payload, "--template", str(template), "--json"]
    )  # fmt: skip
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    assert document["template"] == "doors.json"
    assert [(r["label"], r["value"]) for r in document["readings"]] == [
        ("Door 1", 0.0),
        ("Door 2", 1.0),
    ]


def test_payload_from_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(PAYLOAD + "\n"))
    assert main(["decode", "--topic", TOPIC, "--payload", "-"]) == 0
    assert "Temperature" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timezone", "Mars/Olympus"], "--timezone 'Mars/Olympus' is not an IANA time zone"),
        (["--template", "Thermostat"], "--template 'Thermostat' is neither a built-in"),
    ],
)
def test_bad_options_are_one_line_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["decode", "--topic", TOPIC, "--payload", PAYLOAD, *args])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert message in err


def test_a_bad_template_file_names_the_datapoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = tmp_path / "bad.json"
    template.write_text('{"datapoints": [{"label": "A"}]}')
    code = main(["decode", "--topic", TOPIC, "--payload", PAYLOAD, "--template", str(template)])
    assert code == 1
    assert "datapoint 1" in capsys.readouterr().err


def test_builtin_templates_are_the_seeded_demo_fleet() -> None:
    # The CLI keeps its own copy so that it does not import the database stack.
    from f2pipe.metadata.fleet.demo import demo_fleet
    from f2pipe.tools.decode import BUILTIN_TEMPLATES

    seeded = {t.name: t for t in demo_fleet().templates if t.datapoints}
    assert set(BUILTIN_TEMPLATES) == set(seeded)
    for name, spec in BUILTIN_TEMPLATES.items():
        assert spec.frame_check == seeded[name].frame_check
        assert spec.datapoints == tuple(
            d.spec(builtin.datapoint_id)
            for d, builtin in zip(seeded[name].datapoints, spec.datapoints, strict=True)
        )


def test_bench_passes_its_options_through(monkeypatch: pytest.MonkeyPatch) -> None:
    from f2pipe import cli
    from f2pipe.tools import bench as benchmark

    seen: list[list[str]] = []
    monkeypatch.setattr(benchmark, "_run", lambda args: seen.append(args.rest) or 0)
    assert cli.main(["bench", "--rate", "12000", "--tries", "4"]) == 0
    assert seen == [["--rate", "12000", "--tries", "4"]]
    with pytest.raises(SystemExit):
        cli.main(["status", "--no-such-option"])
