"""Micro-benchmark of the decoding core: µs per message, and what each step costs.

Run: ``.venv/bin/python bench/decode_bench.py``. Single-threaded, a few seconds;
each figure is the best of 200 short repeats (200 calls each), so it is the cost
without interference from other processes on a shared machine.
"""

from __future__ import annotations

import contextlib
import timeit
from collections.abc import Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import orjson

from f2pipe.core.decode import (
    DatapointSpec,
    DecodeError,
    TemplateSpec,
    compile_template,
    parse_timestamp,
)
from f2pipe.core.frames import crc16_modbus, crc16_modbus_reference, encode_modbus_response
from f2pipe.core.topics import parse_topic

NOW = datetime(2030, 1, 1, tzinfo=UTC)
UTC_ZONE = ZoneInfo("UTC")
MADRID = ZoneInfo("Europe/Madrid")

ENV = compile_template(
    TemplateSpec(
        "modbus_crc",
        (
            DatapointSpec(1, "Temperature", "int16", 0, 2, decimals=2, unit="°C"),
            DatapointSpec(2, "Humidity", "uint16", 2, 2, decimals=2, unit="%"),
            DatapointSpec(3, "CO2", "uint16", 4, 2, unit="ppm"),
        ),
    )
)
ENV_PAYLOAD = (
    b'{"timestamp": "2024-07-15 14:30:25.123456", "data": "01 03 06 09 F8 11 A0 01 9F C4 DE"}'
)
ENV_COMPACT = b'{"timestamp": "2024-07-15 14:30:25", "data": "01030609F811A0019FC4DE"}'
ENV_OFFSET = (
    b'{"timestamp": "2024-07-15T14:30:25.5+02:00", "data": "01 03 06 09 F8 11 A0 01 9F C4 DE"}'
)

MIXED = compile_template(
    TemplateSpec(
        "modbus_crc",
        (
            DatapointSpec(1, "Energy", "uint32", 0, 4, "CDAB", decimals=1),
            DatapointSpec(2, "Power", "float32", 4, 4, "BADC"),
            DatapointSpec(3, "Counter", "int64", 8, 8, "DCBA"),
        ),
    )
)
MIXED_FRAME = encode_modbus_response(1, 3, bytes.fromhex("2800EE6B AC410000 FFFFFFFFFFFFDFFF"))
MIXED_PAYLOAD = orjson.dumps(
    {"timestamp": "2024-07-15 14:30:25.123456", "data": MIXED_FRAME.hex(" ").upper()}
)

DOORS = compile_template(
    TemplateSpec(
        "none",
        (
            DatapointSpec(1, "Door 1", "bool", 0, 1, json_field="door-sensor-1"),
            DatapointSpec(2, "Door 2", "bool", 0, 1, json_field="door-sensor-2"),
        ),
    )
)
DOORS_PAYLOAD = (
    b'{"timestamp": "2024-07-15 14:30:25.123456", "door-sensor-1": false, "door-sensor-2": true}'
)
CRC_BAD = b'{"timestamp": "2024-07-15 14:30:25.123456", "data": "01 03 06 00 01 00 01 00 01 8D B4"}'


def per_call(fn: Callable[[], object], number: int = 200, repeat: int = 200) -> float:
    """Best-of-`repeat` µs per call: the minimum filters out other processes on the machine."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def dead_letter() -> None:
    with contextlib.suppress(DecodeError):
        ENV.decode("sensor", CRC_BAD, UTC_ZONE, NOW)


def main() -> None:
    frame = bytes.fromhex("01 03 06 09 F8 11 A0 01 9F C4 DE")
    MIXED.decode("sensor", MIXED_PAYLOAD, UTC_ZONE, NOW)  # a bad benchmark frame fails loudly
    stamp, with_offset = "2024-07-15 14:30:25.123456", "2024-07-15 14:30:25.5+02:00"
    topic = "tele/f2-aabbccddee01/sensor-mode/J1/sensor-1"
    uncached_parse = parse_topic.__wrapped__
    env, mixed, doors = ENV.decode, MIXED.decode, DOORS.decode
    rows: list[tuple[str, Callable[[], object]]] = [
        ("decode: env sensor, 3 datapoints, UTC",
         lambda: env("sensor", ENV_PAYLOAD, UTC_ZONE, NOW)),
        ("decode: env sensor, Europe/Madrid", lambda: env("sensor", ENV_PAYLOAD, MADRID, NOW)),
        ("decode: env sensor, compact hex, no fraction",
         lambda: env("sensor", ENV_COMPACT, UTC_ZONE, NOW)),
        ("decode: env sensor, T and +02:00 (regex path)",
         lambda: env("sensor", ENV_OFFSET, UTC_ZONE, NOW)),
        ("decode: CDAB uint32 + BADC float32 + DCBA int64",
         lambda: mixed("sensor", MIXED_PAYLOAD, UTC_ZONE, NOW)),
        ("decode: door sensors status, 2 fields",
         lambda: doors("door-sensors", DOORS_PAYLOAD, UTC_ZONE, NOW)),
        ("decode: dead letter (crc_mismatch)", dead_letter),
        ("  orjson.loads", lambda: orjson.loads(ENV_PAYLOAD)),
        ("  bytes.fromhex", lambda: bytes.fromhex("01 03 06 09 F8 11 A0 01 9F C4 DE")),
        ("  crc16_modbus (fastcrc), 11 bytes", lambda: crc16_modbus(frame)),
        ("  crc16_modbus_reference (pure Python), 11 bytes",
         lambda: crc16_modbus_reference(frame)),
        ("  parse_timestamp, UTC", lambda: parse_timestamp(stamp, UTC_ZONE, NOW)),
        ("  parse_timestamp, Europe/Madrid", lambda: parse_timestamp(stamp, MADRID, NOW)),
        ("  parse_timestamp, +02:00 (regex path)",
         lambda: parse_timestamp(with_offset, UTC_ZONE, NOW)),
        ("  parse_topic (cached)", lambda: parse_topic(topic)),
        ("  parse_topic (uncached)", lambda: uncached_parse(topic)),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, fn in rows:
        print(f"{name:<{width}}  {per_call(fn):6.2f} µs")


if __name__ == "__main__":
    main()
