"""``f2pipe decode``: decode one F2 message by hand and show what the pipeline would do.

Prints the readings (label, value, unit, UTC and local time) and exits 0, or
the dead-letter reason and its detail and exits 1. Messages that are neither
(commands, reader telemetry) are said to be skipped, exit 0. The template is
one of the demo fleet's (SPEC section 3) or a JSON file shaped like a decoding
vector's ``template``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from f2pipe.core.decode import (
    DatapointSpec,
    DecodeError,
    TemplateSpec,
    compile_template,
    template_from_mapping,
)
from f2pipe.core.reasons import Reason
from f2pipe.core.topics import parse_topic
from f2pipe.errors import ConfigError

__all__ = ["BUILTIN_TEMPLATES", "configure", "run"]

# The demo fleet's sensor templates (SPEC section 3), by name.
BUILTIN_TEMPLATES: dict[str, TemplateSpec] = {
    "Environmental Sensor": TemplateSpec(
        "modbus_crc",
        (
            DatapointSpec(1, "Temperature", "int16", 0, 2, decimals=2, unit="°C"),
            DatapointSpec(2, "Humidity", "uint16", 2, 2, decimals=2, unit="%"),
            DatapointSpec(3, "CO2", "uint16", 4, 2, unit="ppm"),
        ),
    ),
    "Power Monitor": TemplateSpec(
        "modbus_crc",
        (
            DatapointSpec(1, "Voltage", "uint16", 0, 2, decimals=1, unit="V"),
            DatapointSpec(2, "Current", "uint16", 2, 2, decimals=3, unit="A"),
        ),
    ),
}
_DEFAULT_TEMPLATE = "Environmental Sensor"
_INTEGER_ENCODINGS = frozenset(
    {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``decode`` arguments to ``parser``."""
    parser.add_argument(
        "--topic", required=True, help="MQTT topic, e.g. tele/f2-<mac>/sensor-mode/J1/sensor-1"
    )
    parser.add_argument(
        "--payload",
        required=True,
        help="the MQTT payload text; '-' reads it from standard input",
    )
    parser.add_argument(
        "--template",
        default=_DEFAULT_TEMPLATE,
        metavar="NAME|FILE.json",
        help=f"built-in template ({', '.join(repr(n) for n in BUILTIN_TEMPLATES)}; "
        f"default {_DEFAULT_TEMPLATE!r}) or a JSON file "
        '{"frame_check": ..., "datapoints": [...]}',
    )
    parser.add_argument(
        "--timezone",
        default="UTC",
        metavar="TZ",
        help="the controller's IANA time zone (default UTC)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.set_defaults(func=run)


def _load_template(choice: str) -> tuple[str, TemplateSpec]:
    for name, spec in BUILTIN_TEMPLATES.items():
        if choice.casefold() == name.casefold():
            return name, spec
    path = Path(choice)
    if not path.is_file():
        names = ", ".join(repr(n) for n in BUILTIN_TEMPLATES)
        raise ConfigError(
            f"--template {choice!r} is neither a built-in template ({names}) nor a file"
        )
    try:
        return path.name, template_from_mapping(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"--template {choice}: {exc}") from None


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"--timezone {name!r} is not an IANA time zone (e.g. UTC, Europe/Madrid)"
        ) from None


def _show_value(value: float, dp: DatapointSpec) -> str:
    # Integer encodings are exact at their decimals; floats show every digit they have.
    if dp.data_encoding.lower() in _INTEGER_ENCODINGS:
        return f"{value:.{max(dp.decimals, 0)}f}"
    return repr(value)


def _emit(as_json: bool, document: dict[str, Any], lines: list[str]) -> None:
    if as_json:
        print(json.dumps(document, ensure_ascii=False))
    else:
        print("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    """Decode ``args.payload`` on ``args.topic``; 0 for readings or a skip, 1 for a dead letter."""
    payload_text = sys.stdin.read() if args.payload == "-" else args.payload
    payload = payload_text.encode("utf-8", "surrogateescape")
    template_name, spec = _load_template(args.template)
    zone = _zone(args.timezone)
    topic = parse_topic(args.topic)

    def dead_letter(reason: Reason, detail: str) -> int:
        _emit(
            args.json,
            {"dead_letter": {"reason": str(reason), "detail": detail}},
            [f"dead letter: {reason}", f"  {detail}"],
        )
        return 1

    def skipped(why: str) -> int:
        _emit(args.json, {"skipped": why}, [f"skipped: {why}"])
        return 0

    if topic is None:
        return dead_letter(Reason.INVALID_TOPIC, f"{args.topic!r} is not an F2 topic")
    if topic.type == "cmnd":
        return skipped("commands go to devices; they are not pipeline input")
    if topic.kind == "reader":
        return skipped("reader telemetry is counted and dropped, not decoded")
    try:
        readings = compile_template(spec).decode(topic.kind, payload, zone, datetime.now(UTC))
    except DecodeError as exc:
        return dead_letter(exc.reason, exc.detail)

    points = {dp.datapoint_id: dp for dp in spec.datapoints}
    rows: list[dict[str, Any]] = []
    table: list[tuple[str, str, str, str, str]] = []
    for dp_id, stamp, value in readings:
        dp = points[dp_id]
        utc, local = stamp.isoformat(), stamp.astimezone(zone).isoformat()
        unit = dp.unit or ""
        rows.append(
            {
                "datapoint_id": dp_id,
                "label": dp.label,
                "value": value,
                "unit": dp.unit,
                "ts": utc,
                "local_ts": local,
            }
        )
        table.append((dp.label, _show_value(value, dp), unit, utc, local))
    lines = [
        f"controller {topic.mac}  connector J{topic.connector}  {topic.kind} {topic.index}"
        f"  template {template_name}  zone {zone.key}"
    ]
    widths = [max((len(row[i]) for row in table), default=0) for i in range(3)]
    for label, shown, unit, utc, local in table:
        lines.append(
            f"  {label:<{widths[0]}}  {shown:>{widths[1]}} {unit:<{widths[2]}}"
            f"  {utc}  (local {local})"
        )
    _emit(args.json, {"topic": args.topic, "template": template_name, "readings": rows}, lines)
    return 0
