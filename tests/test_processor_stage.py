"""The processor's pure parts: the stage, the output format, the alarm, dead-letter headers."""

from __future__ import annotations

import math
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from f2pipe.core.deadletter import Rejected
from f2pipe.core.decode import DatapointSpec, TemplateSpec, compile_template
from f2pipe.core.reasons import Reason
from f2pipe.core.records import ReadingEncoder, reading_key, reading_value
from f2pipe.metadata.lookup import SKIPPED, Resolution, Resolved
from f2pipe.metadata.resolver import controller_document
from f2pipe.processor.alarm import DeadLetterAlarm
from f2pipe.processor.stage import Decoded, Skipped, Stage
from f2pipe.tools.dlq import DeadLetter, DeadLetterError, parse_since

NOW = datetime(2030, 1, 1, tzinfo=UTC)
ENV = compile_template(
    TemplateSpec(
        "modbus_crc",
        (
            DatapointSpec(11, "Temperature", "int16", 0, 2, decimals=2),
            DatapointSpec(12, "Humidity", "uint16", 2, 2, decimals=2),
            DatapointSpec(13, "CO2", "uint16", 4, 2),
        ),
    )
)
PAYLOAD = b'{"timestamp": "2024-07-15 14:30:25.5", "data": "01 03 06 09 F8 11 A0 01 9F C4 DE"}'
MAC = "aabbccddee01"


class FakeLookup:
    def __init__(self, table: dict[tuple[str, int, str, int], Resolution]) -> None:
        self.table = table
        self.calls = 0

    def __call__(self, mac: str, connector: int, kind: str, index: int) -> Resolution:
        self.calls += 1
        return self.table.get((mac, connector, kind, index), Reason.UNKNOWN_DEVICE)


def _stage() -> tuple[Stage, FakeLookup]:
    lookup = FakeLookup(
        {
            (MAC, 1, "sensor", 1): Resolved(5, ZoneInfo("Europe/Madrid"), ENV),
            (MAC, 2, "sensor", 1): Reason.UNMAPPED_SENSOR,
            (MAC, 3, "siren", 2): SKIPPED,
        }
    )
    return Stage(lookup), lookup


def test_a_wired_sensor_yields_every_datapoint_in_the_controller_time_zone() -> None:
    stage, _ = _stage()
    outcome = stage.handle(f"tele/f2-{MAC}/sensor-mode/J1/sensor-1".encode(), PAYLOAD, NOW)
    assert isinstance(outcome, Decoded)
    assert outcome.device_id == 5
    ts = datetime(2024, 7, 15, 12, 30, 25, 500000, tzinfo=UTC)  # Madrid is UTC+2 in July
    assert outcome.readings == [(11, ts, 25.52), (12, ts, 45.12), (13, ts, 415.0)]


def test_the_ingest_header_places_the_second_pass_of_a_repeated_hour() -> None:
    stage, _ = _stage()
    topic = f"tele/f2-{MAC}/sensor-mode/J1/sensor-1".encode()
    repeated = PAYLOAD.replace(b"2024-07-15 14:30:25.5", b"2024-10-27 02:30:00")
    first, second = (datetime(2024, 10, 27, h, 30, tzinfo=UTC) for h in (0, 1))
    ms = {at: b"%d" % (at.timestamp() * 1000 + 900) for at in (first, second)}
    outcomes = [
        stage.handle(topic, repeated, NOW, ms[first]),
        stage.handle(topic, repeated, NOW, ms[second]),
        stage.handle(topic, repeated, NOW),  # no ingest time: the first pass
        stage.handle(topic, repeated, NOW, b"not a number"),
    ]
    assert [o.readings[0][1] for o in outcomes if isinstance(o, Decoded)] == [
        first, second, first, first
    ]  # fmt: skip
    assert stage.ambiguous_readings == 4 * 3
    stage.handle(topic, PAYLOAD, NOW, ms[first])
    assert stage.ambiguous_readings == 4 * 3  # July is not ambiguous


def test_the_time_range_is_judged_by_the_ingest_time_not_the_decoding_clock() -> None:
    stage, _ = _stage()
    topic = f"tele/f2-{MAC}/sensor-mode/J1/sensor-1".encode()
    arrived = datetime(2024, 7, 13, 12, 30, tzinfo=UTC)  # the device clock ran 48 h ahead
    ingest = b"%d" % (arrived.timestamp() * 1000)
    replayed = arrived + timedelta(days=3)  # by now the device time is in the past
    outcome = stage.handle(topic, PAYLOAD, replayed, ingest)
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.TIMESTAMP_OUT_OF_RANGE
    # Live, the same record got the same verdict; within 24 h of arrival it decodes.
    assert stage.handle(topic, PAYLOAD, arrived, ingest) == outcome
    within = b"%d" % ((arrived + timedelta(hours=25)).timestamp() * 1000)
    assert isinstance(stage.handle(topic, PAYLOAD, replayed, within), Decoded)
    # No ingest time, or an unreadable one: the decoding clock decides.
    assert isinstance(stage.handle(topic, PAYLOAD, replayed), Decoded)
    assert isinstance(stage.handle(topic, PAYLOAD, replayed, b"soon"), Decoded)
    # An ingest time ahead of the decoding clock (skewed hosts) never widens the range.
    ahead = b"%d" % ((arrived + timedelta(days=9)).timestamp() * 1000)
    assert isinstance(stage.handle(topic, PAYLOAD, arrived, ahead), Rejected)


def test_the_stage_remembers_a_wired_route_until_told_to_forget() -> None:
    stage, lookup = _stage()
    topic = f"tele/f2-{MAC}/sensor-mode/J1/sensor-1".encode()
    assert isinstance(stage.handle(topic, PAYLOAD, NOW), Decoded)
    assert isinstance(stage.handle(topic, PAYLOAD, NOW), Decoded)
    assert (lookup.calls, stage.route_hits) == (1, 1)
    lookup.table[(MAC, 1, "sensor", 1)] = Reason.UNMAPPED_SENSOR  # rewired elsewhere
    stage.forget_routes()  # what the runner does when the metadata version moves
    outcome = stage.handle(topic, PAYLOAD, NOW)
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.UNMAPPED_SENSOR
    assert stage.handle(topic, PAYLOAD, NOW) == outcome  # verdicts are never remembered
    assert lookup.calls == 3


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (None, Rejected),
        (b"\xff\xfe", Rejected),
        (b"tele/f2-AABBCCDDEE01/sensor-mode/J1/sensor-1", Rejected),
        (b"tele/f2-aabbccddee01/sensor-mode/J5/sensor-1", Rejected),
    ],
)
def test_an_invalid_topic_wins_before_any_lookup(topic: bytes | None, expected: type) -> None:
    stage, lookup = _stage()
    outcome = stage.handle(topic, b"not json", NOW)
    assert isinstance(outcome, expected)
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.INVALID_TOPIC
    assert lookup.calls == 0


def test_lookup_verdicts_come_before_payload_checks() -> None:
    stage, _ = _stage()
    unknown = stage.handle(b"tele/f2-ffffffffffff/sensor-mode/J1/sensor-1", b"[", NOW)
    unmapped = stage.handle(f"tele/f2-{MAC}/sensor-mode/J2/sensor-1".encode(), b"[", NOW)
    assert unknown == Rejected(Reason.UNKNOWN_DEVICE, "no device with MAC ffffffffffff")
    assert isinstance(unmapped, Rejected)
    assert unmapped.reason is Reason.UNMAPPED_SENSOR


def test_status_without_device_readers_and_commands_are_skipped_not_dead_lettered() -> None:
    stage, lookup = _stage()
    assert stage.handle(f"stat/f2-{MAC}/alarm-mode/J3/siren-2".encode(), b"{}", NOW) == Skipped(
        "siren"
    )
    reader = f"tele/f2-{MAC}/access-control-mode/J1/reader-1".encode()
    assert stage.handle(reader, b'{"data": "x"}', NOW) == Skipped("reader")
    command = f"cmnd/f2-{MAC}/access-control-mode/J1/reader-1/success".encode()
    assert stage.handle(command, b"", NOW) == Skipped("command")
    assert lookup.calls == 1  # readers and commands need no metadata


def test_decode_failures_carry_the_decoder_reason() -> None:
    stage, _ = _stage()
    topic = f"tele/f2-{MAC}/sensor-mode/J1/sensor-1".encode()
    bad_crc = PAYLOAD.replace(b"C4 DE", b"C4 DF")
    outcome = stage.handle(topic, bad_crc, NOW)
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.CRC_MISMATCH
    empty = stage.handle(topic, None, NOW)
    assert isinstance(empty, Rejected)
    assert empty.reason is Reason.INVALID_JSON


@given(
    st.integers(1, 2**31 - 1),
    st.integers(1, 2**31 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)
def test_processed_values_are_spec_json_and_round_trip_exactly(
    device: int, datapoint: int, value: float, ts: datetime
) -> None:
    raw = reading_value(device, (datapoint, ts, value))
    decoded = orjson.loads(raw)
    assert decoded == {
        "v": 1,
        "ts": decoded["ts"],
        "device_id": device,
        "datapoint_id": datapoint,
        "value": value,
    }
    assert datetime.fromisoformat(decoded["ts"]) == ts
    assert reading_key(device, datapoint) == f"{device}:{datapoint}".encode()
    assert raw == reading_value(device, (datapoint, ts, value))  # deterministic for replay
    assert not math.isnan(decoded["value"])


_STAMPS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
_VALUES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(1e-6, 1e-3),  # where float texts switch to exponents
    st.floats(1e15, 1e17),
    st.sampled_from([0.0, -0.0, 1e-4, -1e-4, 1e16, 9999999999999998.0, 5e-324]),
    st.integers(-(2**63), 2**63 - 1).map(float),
)


@given(
    st.integers(1, 2**31 - 1),
    st.lists(st.tuples(st.integers(1, 2**31 - 1), _VALUES), min_size=1, max_size=5),
    _STAMPS,
)
def test_the_encoder_writes_exactly_what_orjson_writes(
    device: int, rows: list[tuple[int, float]], stamp: datetime
) -> None:
    ids = tuple(dp for dp, _ in rows)
    values = tuple(value for _, value in rows)
    encoder = ReadingEncoder()
    for datapoint_ids in (ids, ids, tuple(ids)[::-1][::-1]):  # cold, cached, an equal tuple
        out: list[tuple[bytes, bytes]] = []
        encoder.encode_values(device, datapoint_ids, stamp, values, out)
        assert out == [
            (reading_key(device, dp), reading_value(device, (dp, stamp, value)))
            for dp, value in rows
        ]


def test_the_encoder_follows_a_template_change_of_the_same_device() -> None:
    encoder = ReadingEncoder()
    stamp = datetime(2024, 7, 15, 12, 30, tzinfo=UTC)
    first: list[tuple[bytes, bytes]] = []
    encoder.encode_values(5, (11, 12), stamp, (1.0, 2.0), first)
    second: list[tuple[bytes, bytes]] = []
    encoder.encode_values(5, (13,), stamp, (3.0,), second)
    assert [key for key, _ in first + second] == [b"5:11", b"5:12", b"5:13"]
    assert orjson.loads(second[0][1])["datapoint_id"] == 13


def test_emit_hands_over_values_in_datapoint_order_and_handle_agrees() -> None:
    stage, _ = _stage()
    topic = f"tele/f2-{MAC}/sensor-mode/J1/sensor-1".encode()
    out: list[tuple[bytes, bytes]] = []
    assert stage.emit(topic, PAYLOAD, NOW, ReadingEncoder().encode_values, out) is None
    decoded = stage.handle(topic, PAYLOAD, NOW)
    assert isinstance(decoded, Decoded)
    assert out == [(reading_key(5, r[0]), reading_value(5, r)) for r in decoded.readings]
    rejected = stage.emit(topic, b"[", NOW, ReadingEncoder().encode_values, out)
    assert isinstance(rejected, Rejected)
    assert len(out) == 3  # a dead letter adds no output


def test_the_dead_letter_alarm_rises_and_falls_without_stopping_anything() -> None:
    alarm = DeadLetterAlarm(ratio=0.5, window_s=10, min_messages=100)
    assert alarm.observe(50, 50, now=0.0) is False  # too few messages to judge
    assert alarm.observe(100, 80, now=1.0) is True
    assert (alarm.active, alarm.current) == (True, 130 / 150)
    assert alarm.observe(1000, 0, now=20.0) is False  # the bad batches left the window
    assert (alarm.active, alarm.current) == (False, 0.0)


def test_the_stage_and_the_alarm_load_no_client_library() -> None:
    # They are tested with plain asserts and run in any process; the runner owns the I/O.
    probe = "import sys, f2pipe.processor.stage, f2pipe.processor.alarm; print(*sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split()
    clients = {"confluent_kafka", "psycopg", "psycopg_pool", "redis", "prometheus_client"}
    assert not {name.split(".")[0] for name in loaded} & clients


def test_since_accepts_ages_and_iso_times() -> None:
    assert parse_since("15m", now=1000.0) == 100_000
    assert parse_since("2024-07-15T00:00:00Z") == 1_721_001_600_000
    assert parse_since("2024-07-15 00:00:00") == 1_721_001_600_000
    with pytest.raises(DeadLetterError):
        parse_since("yesterday")


def test_replay_keeps_original_headers_and_drops_dlq_ones() -> None:
    letter = DeadLetter(
        0,
        7,
        b"aabbccddee01",
        b"{}",
        [("mqtt.topic", b"t"), ("dlq.reason", b"unknown_device"), ("dlq.stage", b"processor")],
    )
    assert letter.original_headers() == [("mqtt.topic", b"t")]
    assert (letter.stage, letter.reason, letter.ref) == ("processor", "unknown_device", "0/7")


def test_controller_document_groups_wiring_and_templates() -> None:
    rows = [
        (1, "UTC", 1, 1, 5, 9, "modbus_crc", 11, "T", "int16", 0, 2, "ABCD", 2, "C", None),
        (1, "UTC", 1, 1, 5, 9, "modbus_crc", 12, "H", "uint16", 2, 2, "ABCD", 2, "%", None),
        (1, "UTC", 2, None, None, None, None, None, None, None, None, None, None, None, None, None),
    ]
    doc = controller_document(rows)
    assert doc is not None
    assert doc["pins"] == {"1:1": {"device_id": 5, "template": 9}}
    assert [dp[0] for dp in doc["templates"]["9"]["datapoints"]] == [11, 12]
    assert controller_document([]) is None
