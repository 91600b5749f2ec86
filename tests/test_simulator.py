"""The simulator's frames and messages: valid per SPEC sections 1 and 2, faults as labelled."""

from __future__ import annotations

import asyncio
import io
import json
import random
import struct
import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from conftest import VECTORS
from f2pipe.connector.stage import topic_mac
from f2pipe.core.frames import crc16_modbus
from f2pipe.core.models import Datapoint
from f2pipe.runtime.mqttwire import decode_length, encode_length
from f2pipe.settings import load_settings
from f2pipe.tools.simulator import (
    FAULTS,
    Live,
    Load,
    demo_fleet,
    generated_fleet,
    make_message,
    modbus_frame,
)
from f2pipe.tools.simulator.values import encode_value, value_range


def test_crc_of_the_reference_frame() -> None:
    # The frame of the first shared vector (SPEC section 1's illustration, with a valid CRC).
    frame = bytes.fromhex("01 03 06 09 F8 11 A0 01 9F C4 DE")
    assert crc16_modbus(frame[:-2]) == struct.unpack("<H", frame[-2:])[0]
    assert modbus_frame(frame[3:-2]) == frame


def _simple_vectors() -> list[dict[str, Any]]:
    """Vectors with readings whose template the simulator can encode (big-endian, Modbus CRC)."""
    chosen = []
    for line in VECTORS.read_text().splitlines():
        vector = json.loads(line)
        template = vector["template"]
        points = template["datapoints"]
        if not vector["expect"].get("readings") or template.get("frame_check") != "modbus_crc":
            continue
        if any(p.get("byte_order", "ABCD") != "ABCD" or p.get("json_field") for p in points):
            continue
        # bool is read-only; 64-bit integers exceed what the float random walk encodes exactly.
        if any(p["data_encoding"].lower() in ("bool", "int64", "uint64") for p in points):
            continue
        chosen.append(vector)
    return chosen


def test_frames_match_the_shared_vectors() -> None:
    matched = 0
    for vector in _simple_vectors():
        frame = bytes.fromhex(json.loads(vector["payload"])["data"].replace(" ", ""))
        points = [
            Datapoint(
                label=p["label"],
                data_encoding=p["data_encoding"],
                byte_offset=p["byte_offset"],
                byte_length=p["byte_length"],
                decimals=p.get("decimals", 0),
            )
            for p in vector["template"]["datapoints"]
        ]
        if frame[:2] != b"\x01\x03" or frame[2] != max(
            p.byte_offset + p.byte_length for p in points
        ):
            continue
        data = bytearray(frame[2])
        values = {r["label"]: r["value"] for r in vector["expect"]["readings"]}
        for point in points:
            raw, decoded = encode_value(point, values[point.label])
            assert decoded == pytest.approx(values[point.label], rel=1e-9)
            data[point.byte_offset : point.byte_offset + len(raw)] = raw
        assert modbus_frame(bytes(data)) == frame, vector["name"]
        matched += 1
    assert matched >= 5, matched


def _decode(frame: bytes, sensor_points: tuple[Datapoint, ...]) -> list[float]:
    fmt = {"int16": ">h", "uint16": ">H"}
    data = frame[3:-2]
    return [
        struct.unpack_from(fmt[p.data_encoding], data, p.byte_offset)[0] / 10**p.decimals
        for p in sensor_points
    ]


def test_messages_are_valid_f2_telemetry_and_walk_within_range() -> None:
    rng = random.Random(7)
    for sensor in demo_fleet():
        previous = None
        for _ in range(300):
            message = make_message(sensor, rng, None)
            assert topic_mac(message.topic) == sensor.mac.encode()
            body = json.loads(message.payload)
            assert set(body) == {"timestamp", "data"}
            stamp = datetime.strptime(body["timestamp"], "%Y-%m-%d %H:%M:%S.%f")
            assert previous is None or stamp > previous
            previous = stamp
            frame = bytes.fromhex(body["data"])
            assert frame[2] == len(frame) - 5
            assert crc16_modbus(frame[:-2]) == struct.unpack("<H", frame[-2:])[0]
            points = sensor.template.datapoints
            decoded = _decode(frame, points)
            assert decoded == pytest.approx([r["value"] for r in message.readings])
            for value, point in zip(decoded, points, strict=True):
                lo, hi = value_range(point)
                assert lo - 1e-9 <= value <= hi + 1e-9


@pytest.mark.parametrize("fault", FAULTS)
def test_faults_are_what_they_say(fault: str) -> None:
    rng = random.Random(1)
    sensor = generated_fleet(1)[0]
    message = make_message(sensor, rng, fault)
    assert message.fault == fault
    if fault == "duplicate":
        assert message.readings  # the copy must not add readings, the original still counts
        return
    assert message.readings == []
    if fault == "bad_json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(message.payload)
        return
    body = json.loads(message.payload)
    frame = bytes.fromhex(body["data"])
    if fault == "bad_crc":
        assert crc16_modbus(frame[:-2]) != struct.unpack("<H", frame[-2:])[0]
    elif fault == "unknown_mac":
        assert message.topic.startswith("tele/f2-ffffff")
    elif fault == "clock_skew":
        stamp = datetime.strptime(body["timestamp"], "%Y-%m-%d %H:%M:%S.%f")
        assert (stamp - datetime.now(UTC).replace(tzinfo=None)).total_seconds() > 24 * 3600


def test_generated_fleet_has_distinct_valid_macs() -> None:
    fleet = generated_fleet(3000)
    macs = {s.mac for s in fleet}
    assert len(macs) == 3000
    assert all(topic_mac(s.topic) == s.mac.encode() for s in fleet)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455])
def test_mqtt_remaining_length_round_trips(n: int) -> None:
    encoded = encode_length(n)
    assert len(encoded) == 1 + (n > 127) + (n > 16_383) + (n > 2_097_151)
    assert decode_length(encoded + b"tail", 0, len(encoded) + 4) == (n, len(encoded))
    assert decode_length(encoded, 0, len(encoded) - 1)[0] == -1  # cut: wait for more


def test_mqtt_remaining_length_refuses_five_bytes() -> None:
    with pytest.raises(ValueError, match="malformed"):
        decode_length(b"\xff\xff\xff\xff\x01", 0, 5)


def test_load_keeps_its_loop_state_where_a_test_can_reach_it() -> None:
    sensors = generated_fleet(3)
    ledger = io.StringIO()
    load = Load(load_settings(), sensors, 10, window=100, fault_fraction=1.0, ledger=ledger)
    assert (load.window.limit, load.batch, load.summary.published) == (100, 50, 0)
    # The schedule goes round the sensors, each message with a fault at fraction 1.
    drawn = [next(load.schedule) for _ in range(6)]
    assert [sensor.mac for sensor, _fault in drawn] == [s.mac for s in sensors] * 2
    assert all(fault in FAULTS for _sensor, fault in drawn)
    messages = [make_message(sensors[0], random.Random(2), None) for _ in range(2)]
    load.on_acks(messages)
    assert load.summary.acknowledged == 2
    assert [json.loads(line)["topic"] for line in ledger.getvalue().splitlines()] == [
        sensors[0].topic
    ] * 2


def test_live_stops_when_asked_before_and_while_it_runs() -> None:
    live = Live(load_settings(), demo_fleet(), 30.0, asyncio.Event(), status_interval=0)
    live.request_stop()  # not running yet: the event is set directly
    assert live.stop.is_set()

    async def wait_for_stop() -> None:
        live.stop.clear()
        live._loop = asyncio.get_running_loop()
        threading.Timer(0.05, live.request_stop).start()  # as a signal handler would, unawaited
        await asyncio.wait_for(live.stop.wait(), 5)

    asyncio.run(wait_for_stop())
    assert live.stop.is_set()
