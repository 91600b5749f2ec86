"""Properties of the decoding core (SPEC sections 1, 2 and 7), checked with Hypothesis.

The oracles here are written from the SPEC, independently of the code under
test: the byte orders by their definition, the frame checks by their order,
the CRC by the pure-Python reference.
"""

from __future__ import annotations

import math
import re
import struct
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from f2pipe.core.decode import (
    CompiledTemplate,
    DatapointSpec,
    DecodeError,
    TemplateSpec,
    compile_template,
    parse_timestamp,
)
from f2pipe.core.frames import crc16_modbus_reference
from f2pipe.core.reasons import PRECEDENCE, Reason

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
UTC_ZONE = ZoneInfo("UTC")
STAMP = "2024-07-15 14:30:25.123456"
STAMP_UTC = datetime(2024, 7, 15, 14, 30, 25, 123456, tzinfo=UTC)
ZONES = [
    "UTC",
    "Europe/Madrid",
    "America/Santiago",
    "America/St_Johns",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
]

# encoding -> (struct code for a big-endian pack, width)
ENCODINGS = {
    "int8": ("b", 1),
    "uint8": ("B", 1),
    "int16": ("h", 2),
    "uint16": ("H", 2),
    "int32": ("i", 4),
    "uint32": ("I", 4),
    "int64": ("q", 8),
    "uint64": ("Q", 8),
    "float32": ("f", 4),
    "float64": ("d", 8),
}
ORDERS = ["ABCD", "DCBA", "BADC", "CDAB"]

# The machines this runs on are shared: time per example is not a property under test.
NO_DEADLINE = settings(deadline=None)


def crc_frame(address: int, function: int, data: bytes) -> bytes:
    body = bytes([address, function, len(data)]) + data
    return body + crc16_modbus_reference(body).to_bytes(2, "little")


def store(big_endian: bytes, order: str) -> bytes:
    """The frame bytes of a value, by SPEC section 2's definition of each order."""
    if len(big_endian) == 1 or order == "ABCD":
        return big_endian
    if order == "DCBA":
        return big_endian[::-1]
    words = [big_endian[i : i + 2] for i in range(0, len(big_endian), 2)]
    if order == "BADC":
        return b"".join(word[::-1] for word in words)
    return b"".join(reversed(words))  # CDAB


def message(data_hex: str, timestamp: Any = STAMP) -> bytes:
    return orjson.dumps({"timestamp": timestamp, "data": data_hex})


def frame_reason(frame: bytes) -> Reason | None:
    """SPEC section 2's checks, in order, with the reference CRC."""
    if len(frame) < 5:
        return Reason.BAD_FRAME
    crc_ok = crc16_modbus_reference(frame[:-2]) == int.from_bytes(frame[-2:], "little")
    if frame[1] & 0x80:
        return Reason.MODBUS_EXCEPTION if crc_ok else Reason.CRC_MISMATCH
    if frame[2] != len(frame) - 5:
        return Reason.BAD_FRAME
    return None if crc_ok else Reason.CRC_MISMATCH


def reason_of(template: CompiledTemplate, payload: bytes, kind: str = "sensor") -> Reason | None:
    try:
        template.decode(kind, payload, UTC_ZONE, NOW)
    except DecodeError as exc:
        return exc.reason
    return None


@st.composite
def encoded_values(draw: st.DrawFn) -> tuple[str, str, int, bytes, float]:
    """(encoding, order, decimals, big-endian bytes, expected value)."""
    encoding = draw(st.sampled_from(sorted(ENCODINGS)))
    order = draw(st.sampled_from(ORDERS))
    code, width = ENCODINGS[encoding]
    decimals = draw(st.integers(0, 12))
    if encoding.startswith("float"):
        value = draw(st.floats(allow_nan=False, allow_infinity=False, width=width * 8))
        return encoding, order, decimals, struct.pack(">" + code, value), value
    signed = not encoding.startswith("u")
    bits = width * 8
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    raw = draw(st.integers(low, high))
    return encoding, order, decimals, raw.to_bytes(width, "big", signed=signed), raw / 10**decimals


@NO_DEADLINE
@given(
    encoded_values(),
    st.binary(max_size=12),
    st.binary(max_size=12),
    st.sampled_from(["modbus_crc", "none"]),
    st.data(),
)
def test_any_value_in_any_encoding_and_order_decodes_back(
    value: tuple[str, str, int, bytes, float],
    before: bytes,
    after: bytes,
    frame_check: str,
    data: st.DataObject,
) -> None:
    encoding, order, decimals, big_endian, expected = value
    spelled = data.draw(st.sampled_from([encoding, encoding.upper(), encoding.title()]))
    payload = before + store(big_endian, order) + after
    if frame_check == "modbus_crc":
        frame = crc_frame(1, 3, payload)
    else:
        frame = bytes([1, 3, data.draw(st.integers(0, 255))]) + payload
    spec = DatapointSpec(7, "X", spelled, len(before), len(big_endian), order, decimals)
    template = compile_template(TemplateSpec(frame_check, (spec,)))
    hex_text = data.draw(st.sampled_from([frame.hex(), frame.hex(" ").upper(), frame.hex(" ", 2)]))
    [(dp_id, ts, decoded)] = template.decode("sensor", message(hex_text), UTC_ZONE, NOW)
    assert dp_id == 7
    assert ts == STAMP_UTC
    assert type(decoded) is float
    assert decoded == expected


@NO_DEADLINE
@given(st.binary(min_size=1, max_size=8), st.integers(0, 6), st.sampled_from(ORDERS))
def test_bool_is_one_when_any_byte_is_set(raw: bytes, offset: int, order: str) -> None:
    frame = crc_frame(1, 3, bytes(offset) + raw)
    spec = DatapointSpec(1, "B", "bool", offset, len(raw), order)
    [(_, _, value)] = compile_template(TemplateSpec("modbus_crc", (spec,))).decode(
        "sensor", message(frame.hex()), UTC_ZONE, NOW
    )
    assert value == (1.0 if any(raw) else 0.0)


@NO_DEADLINE
@given(
    st.sampled_from([("float32", "f", 4), ("float64", "d", 8)]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.sampled_from(ORDERS),
)
def test_nan_and_infinity_are_non_finite_value(
    encoding: tuple[str, str, int], value: float, order: str
) -> None:
    name, code, width = encoding
    frame = crc_frame(1, 3, store(struct.pack(">" + code, value), order))
    template = compile_template(
        TemplateSpec("modbus_crc", (DatapointSpec(1, "F", name, 0, width, order),))
    )
    assert reason_of(template, message(frame.hex())) is Reason.NON_FINITE_VALUE


# --- mutated frames -------------------------------------------------------------------

SIX_BYTES = compile_template(TemplateSpec("modbus_crc", (DatapointSpec(1, "A", "uint16", 0, 2),)))


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    data = draw(st.binary(min_size=2, max_size=40))
    return crc_frame(draw(st.integers(0, 255)), draw(st.integers(0, 0x7F)), data)


@NO_DEADLINE
@given(valid_frames(), st.data())
def test_a_flipped_bit_gives_the_reason_of_the_check_order(
    frame: bytes, data: st.DataObject
) -> None:
    assert reason_of(SIX_BYTES, message(frame.hex())) is None
    position = data.draw(st.integers(0, len(frame) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    mutated = bytearray(frame)
    mutated[position] ^= 1 << bit
    got = reason_of(SIX_BYTES, message(bytes(mutated).hex()))
    assert got is frame_reason(bytes(mutated))
    # CRC-16 catches every single-bit error, so only the byte count is seen first.
    assert got is (Reason.BAD_FRAME if position == 2 else Reason.CRC_MISMATCH)


@NO_DEADLINE
@given(valid_frames(), st.data())
def test_a_cut_frame_is_bad_frame(frame: bytes, data: st.DataObject) -> None:
    keep = data.draw(st.integers(0, len(frame) - 1), label="keep")
    got = reason_of(SIX_BYTES, message(frame[:keep].hex()))
    assert got is frame_reason(frame[:keep]) is Reason.BAD_FRAME


@NO_DEADLINE
@given(valid_frames(), st.integers(0, 255), st.booleans())
def test_a_wrong_byte_count_is_bad_frame(frame: bytes, count: int, fix_crc: bool) -> None:
    assume(count != frame[2])
    body = frame[:2] + bytes([count]) + frame[3:-2]
    crc = crc16_modbus_reference(body).to_bytes(2, "little") if fix_crc else frame[-2:]
    got = reason_of(SIX_BYTES, message((body + crc).hex()))
    assert got is frame_reason(body + crc) is Reason.BAD_FRAME


@NO_DEADLINE
@given(st.integers(0, 255), st.integers(0x80, 0xFF), st.integers(0, 255), st.data())
def test_exception_responses(address: int, function: int, code: int, data: st.DataObject) -> None:
    frame = crc_frame(address, function, b"")[:2] + bytes([code])
    frame += crc16_modbus_reference(frame).to_bytes(2, "little")
    with pytest.raises(DecodeError) as caught:
        SIX_BYTES.decode("sensor", message(frame.hex()), UTC_ZONE, NOW)
    assert caught.value.reason is Reason.MODBUS_EXCEPTION
    assert f"exception code {code} " in caught.value.detail
    position = data.draw(st.integers(0, len(frame) - 1))
    mutated = bytearray(frame)
    mutated[position] ^= 1 << data.draw(st.integers(0, 7))
    assert reason_of(SIX_BYTES, message(bytes(mutated).hex())) is frame_reason(bytes(mutated))


@NO_DEADLINE
@given(st.binary(max_size=30))
def test_any_bytes_as_frame_follow_the_check_order(frame: bytes) -> None:
    expected = frame_reason(frame)
    if expected is None and len(frame) - 5 < 2:
        expected = Reason.DECODE_ERROR  # the datapoint reaches past the data
    assert reason_of(SIX_BYTES, message(frame.hex())) is expected


# --- reason precedence across layers --------------------------------------------------

TIMESTAMPS = {
    None: STAMP,
    Reason.MISSING_FIELD: ...,
    Reason.INVALID_TIMESTAMP: "15/07/2024 14:30",
    Reason.TIMESTAMP_OUT_OF_RANGE: "1970-01-01 00:00:07",
}
GOOD_DATA = crc_frame(1, 3, bytes.fromhex("0001 7FC00000"))
DATA = {
    None: GOOD_DATA.hex(" "),
    Reason.MISSING_FIELD: ...,
    Reason.INVALID_HEX: "01 03 XY",
    Reason.BAD_FRAME: "01 03",
    Reason.CRC_MISMATCH: (GOOD_DATA[:-1] + bytes([GOOD_DATA[-1] ^ 1])).hex(),
    Reason.MODBUS_EXCEPTION: "01 83 02 C0 F1",
}
GOOD_POINT = DatapointSpec(1, "A", "uint16", 0, 2)
POINTS = {
    None: (GOOD_POINT,),
    Reason.NO_DATAPOINTS: (),
    Reason.DECODE_ERROR: (GOOD_POINT, DatapointSpec(2, "Far", "uint16", 30, 2)),
    Reason.NON_FINITE_VALUE: (GOOD_POINT, DatapointSpec(3, "NaN", "float32", 2, 4)),
}


@NO_DEADLINE
@given(
    st.sampled_from(list(TIMESTAMPS)),
    st.sampled_from(list(DATA)),
    st.sampled_from(list(POINTS)),
    st.sampled_from([None, Reason.INVALID_JSON]),
)
def test_the_first_reason_in_spec_order_wins(
    ts_fault: Reason | None,
    data_fault: Reason | None,
    point_fault: Reason | None,
    json_fault: Reason | None,
) -> None:
    if json_fault is not None:
        payload = b'{"timestamp": "2024-07-15 14:30:25", "data": "01 03"'  # truncated
    else:
        document = {"timestamp": TIMESTAMPS[ts_fault], "data": DATA[data_fault]}
        payload = orjson.dumps({k: v for k, v in document.items() if v is not ...})
    template = compile_template(TemplateSpec("modbus_crc", POINTS[point_fault]))
    faults = [f for f in (ts_fault, data_fault, point_fault, json_fault) if f is not None]
    if point_fault is None or point_fault is Reason.NON_FINITE_VALUE:
        # The NaN datapoint only exists when the good frame gets through.
        faults = [f for f in faults if f is not Reason.NON_FINITE_VALUE] + (
            [Reason.NON_FINITE_VALUE] if point_fault else []
        )
    expected = min(faults, key=PRECEDENCE.__getitem__, default=None)
    assert reason_of(template, payload) is expected


# --- arbitrary input never raises anything but DecodeError ----------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = st.sampled_from(["timestamp", "data", "status", "door-sensor-1", "x"])
ANY_TEMPLATE = compile_template(
    TemplateSpec(
        "modbus_crc",
        (
            DatapointSpec(1, "A", "int16", 0, 2, json_field="status"),
            DatapointSpec(2, "B", "float64", 1, 8, "CDAB", json_field="door-sensor-1"),
            DatapointSpec(3, "C", "bool", 3, 3),
        ),
    )
)
KINDS = st.sampled_from(
    ["sensor", "strike", "door-sensors", "exit-buttons", "siren", "motion-sensor"]
)


def _only_decode_errors(kind: str, payload: bytes) -> None:
    try:
        readings = ANY_TEMPLATE.decode(kind, payload, ZoneInfo("Europe/Madrid"), NOW)
    except DecodeError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert error.reason in Reason
        assert isinstance(error.detail, str)
        return
    assert len(readings) == 3
    for _, ts, value in readings:
        assert math.isfinite(value)
        assert ts.utcoffset() == timedelta(0)


@NO_DEADLINE
@given(KINDS, st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_decode_error(kind: str, payload: bytes) -> None:
    _only_decode_errors(kind, payload)


@NO_DEADLINE
@given(KINDS, json_values)
def test_arbitrary_json_raises_only_decode_error(kind: str, value: Any) -> None:
    _only_decode_errors(kind, orjson.dumps(value))


@NO_DEADLINE
@given(
    KINDS,
    st.dictionaries(KEYS, json_values | st.text("0123456789abcdefABCDEF -:.TZ+", max_size=40)),
)
def test_arbitrary_objects_raise_only_decode_error(kind: str, value: dict[str, Any]) -> None:
    _only_decode_errors(kind, orjson.dumps(value))


# --- timestamps -----------------------------------------------------------------------

GRAMMAR = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)?", re.ASCII)


def reference_instant(text: str, zone: ZoneInfo) -> datetime | Reason:
    """SPEC section 1 read literally: the grammar, then zoneinfo's own conversion."""
    if not GRAMMAR.fullmatch(text):
        return Reason.INVALID_TIMESTAMP
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return Reason.INVALID_TIMESTAMP
    try:
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=zone)
        instant = parsed.astimezone(UTC)
    except OverflowError:
        return Reason.TIMESTAMP_OUT_OF_RANGE
    if instant < datetime(2000, 1, 1, tzinfo=UTC) or instant > NOW + timedelta(hours=24):
        return Reason.TIMESTAMP_OUT_OF_RANGE
    return instant


def _parsed(text: str, zone: ZoneInfo) -> datetime | Reason:
    try:
        return parse_timestamp(text, zone, NOW)
    except DecodeError as exc:
        return exc.reason


@st.composite
def timestamp_texts(draw: st.DrawFn) -> str:
    moment = draw(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)))
    text = (
        moment.strftime("%Y-%m-%d")
        + draw(st.sampled_from([" ", "T"]))
        + moment.strftime("%H:%M:%S")
    )
    digits = draw(st.integers(0, 6))
    if digits:
        text += "." + f"{moment.microsecond:06d}"[:digits]
    text += draw(
        st.sampled_from(["", "", "Z"])
        | st.builds(
            lambda sign, h, m: f"{sign}{h:02d}:{m:02d}",
            st.sampled_from("+-"),
            st.integers(0, 25),
            st.integers(0, 61),
        )
    )
    return text


@st.composite
def damaged_timestamps(draw: st.DrawFn) -> str:
    text = list(draw(timestamp_texts()))
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        char = draw(st.sampled_from(list("0123456789 -:.TtZz+,/٣x\n")))
        if action == "replace" and position < len(text):
            text[position] = char
        elif action == "insert":
            text.insert(position, char)
        elif position < len(text):
            del text[position]
    return "".join(text)


@NO_DEADLINE
@given(timestamp_texts() | damaged_timestamps(), st.sampled_from(ZONES))
def test_timestamps_follow_the_grammar_and_zoneinfo(text: str, zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    assert _parsed(text, zone) == reference_instant(text, zone)


@NO_DEADLINE
@given(st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2030, 5, 31)),
       st.sampled_from(ZONES), st.sampled_from([" ", "T"]), st.booleans())  # fmt: skip
def test_wall_clock_times_convert_like_zoneinfo(
    moment: datetime, zone_name: str, separator: str, fraction: bool
) -> None:
    zone = ZoneInfo(zone_name)
    moment = moment.replace(fold=0)  # text carries no fold: SPEC section 2 reads it as 0
    if not fraction:
        moment = moment.replace(microsecond=0)
    text = moment.isoformat(sep=separator, timespec="microseconds" if fraction else "seconds")
    instant = _parsed(text, zone)
    first = moment.replace(tzinfo=zone)
    assert instant == first.astimezone(UTC)
    assert isinstance(instant, datetime)
    assert instant.tzinfo is UTC
    # With an ingest time after both passes, a repeated hour takes its second pass
    # (fold=1 with the smaller offset); any other time is unchanged.
    second = moment.replace(tzinfo=zone, fold=1)
    repeated = second.utcoffset() < first.utcoffset()  # type: ignore[operator]
    late = parse_timestamp(text, zone, NOW, NOW)
    assert late == (second if repeated else first).astimezone(UTC)


def _repeated_hours(zone: ZoneInfo, years: range) -> list[datetime]:
    """Wall-clock times (on the quarter hour) that ``zone`` shows twice, in ``years``."""
    found = []
    day = datetime(years.start, 1, 1)
    while day.year < years.stop:
        noon, next_noon = (
            day.replace(hour=12, tzinfo=zone),
            (day + timedelta(1)).replace(hour=12, tzinfo=zone),
        )
        if next_noon.utcoffset() < noon.utcoffset():  # type: ignore[operator]
            wall = day + timedelta(hours=12)
            while wall < day + timedelta(hours=36):
                first, second = wall.replace(tzinfo=zone), wall.replace(tzinfo=zone, fold=1)
                if second.utcoffset() < first.utcoffset():  # type: ignore[operator]
                    found.append(wall)
                wall += timedelta(minutes=15)
        day += timedelta(1)
    return found


REPEATED = [
    (name, wall) for name in ZONES for wall in _repeated_hours(ZoneInfo(name), range(2001, 2030))
]


@NO_DEADLINE
@given(st.sampled_from(REPEATED), st.integers(0, 899), st.integers(-3 * 3600, 3 * 3600))
def test_an_ambiguous_time_takes_its_latest_instant_not_after_the_ingest_time(
    repeated: tuple[str, datetime], seconds: int, ingest_shift: int
) -> None:
    zone_name, wall = repeated
    zone = ZoneInfo(zone_name)
    moment = wall + timedelta(seconds=seconds)
    earlier = moment.replace(tzinfo=zone).astimezone(UTC)
    later = moment.replace(tzinfo=zone, fold=1).astimezone(UTC)
    ingest = later + timedelta(seconds=ingest_shift)
    text = moment.isoformat(sep=" ")
    assert parse_timestamp(text, zone, NOW, ingest) == (later if later <= ingest else earlier)
    assert parse_timestamp(text, zone, NOW) == earlier  # no ingest time: the first pass


@pytest.mark.parametrize("zone_name", ["Europe/Madrid", "America/New_York", "Australia/Sydney"])
def test_only_the_repeated_hour_is_ambiguous(zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    template = compile_template(
        TemplateSpec("none", (DatapointSpec(1, "T", "uint8", 0, 1),))
    )  # fmt: skip
    flagged = []
    moment = datetime(2024, 1, 1)
    while moment < datetime(2025, 1, 1):
        payload = orjson.dumps({"timestamp": moment.isoformat(sep=" "), "data": "01 03 01 07"})
        if template.decode_values("sensor", payload, zone, NOW)[2]:
            flagged.append(moment)
        moment += timedelta(minutes=30)
    # One repeated hour a year: its two half-hour marks, whose fold=1 offset is smaller.
    assert len(flagged) == 2
    for wall in flagged:
        first, second = wall.replace(tzinfo=zone), wall.replace(tzinfo=zone, fold=1)
        assert second.utcoffset() < first.utcoffset()  # type: ignore[operator]


@pytest.mark.parametrize(
    "text",
    [
        "2024-07-15 14:Z\x00:25",  # fromisoformat stops reading at "Z\0": 14:00
        "2024-07-15 14:30:Z\x00.1",
        "2024-07-15 14:30:25.",  # a point without digits
        "2024-07-15 14:30:25.1234567",  # seven digits
        "2024-07-15 14:30:25,123",
        "2024-W29-1T14:30:25",  # an ISO week date of the same length
    ],
)
def test_texts_fromisoformat_takes_are_still_invalid(text: str) -> None:
    for zone in (UTC_ZONE, ZoneInfo("Europe/Madrid")):
        assert reference_instant(text, zone) is Reason.INVALID_TIMESTAMP
        assert _parsed(text, zone) is Reason.INVALID_TIMESTAMP


@given(st.integers(0, 6), st.sampled_from([" ", "T"]), st.sampled_from(ZONES))
def test_every_fraction_length_takes_the_same_value(digits: int, sep: str, zone_name: str) -> None:
    text = f"2024-07-15{sep}14:30:25" + ("." + "123456"[:digits] if digits else "")
    zone = ZoneInfo(zone_name)
    assert _parsed(text, zone) == reference_instant(text, zone)


def test_range_edges() -> None:
    zone = UTC_ZONE
    assert _parsed("2000-01-01 00:00:00", zone) == datetime(2000, 1, 1, tzinfo=UTC)
    assert _parsed("1999-12-31 23:59:59.999999", zone) is Reason.TIMESTAMP_OUT_OF_RANGE
    assert _parsed("2000-01-01 00:30:00+01:00", zone) is Reason.TIMESTAMP_OUT_OF_RANGE
    assert _parsed("2030-06-02 12:00:00", zone) == NOW + timedelta(hours=24)
    assert _parsed("2030-06-02 12:00:00.000001", zone) is Reason.TIMESTAMP_OUT_OF_RANGE
    assert _parsed("2030-06-02 13:00:00+01:00", zone) == NOW + timedelta(hours=24)
    assert _parsed("0001-01-01 00:00:00+01:00", zone) is Reason.TIMESTAMP_OUT_OF_RANGE
    assert _parsed("9999-12-31 23:59:59-01:00", zone) is Reason.TIMESTAMP_OUT_OF_RANGE
    assert _parsed("9999-12-31 23:59:59", ZoneInfo("America/Santiago")) is (
        Reason.TIMESTAMP_OUT_OF_RANGE
    )
