"""Decoding rules of SPEC sections 1, 2 and 7 that the shared vectors do not spell out."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from f2pipe.core.decode import (
    DatapointSpec,
    DecodeError,
    TemplateSpec,
    compile_template,
    template_from_mapping,
)
from f2pipe.core.frames import encode_modbus_response
from f2pipe.core.reasons import Reason
from f2pipe.errors import F2PipeError

NOW = datetime(2030, 6, 1, tzinfo=UTC)
ZONE = ZoneInfo("UTC")
STAMP = "2024-07-15 14:30:25.123456"
FRAME = "01 03 06 09 F8 11 A0 01 9F C4 DE"
ENV = TemplateSpec(
    "modbus_crc",
    (
        DatapointSpec(1, "Temperature", "int16", 0, 2, decimals=2),
        DatapointSpec(2, "Humidity", "uint16", 2, 2, decimals=2),
        DatapointSpec(3, "CO2", "uint16", 4, 2),
    ),
)
DOORS = TemplateSpec(
    "modbus_crc",
    (
        DatapointSpec(10, "Door 1", "bool", 0, 1, json_field="door-sensor-1"),
        DatapointSpec(11, "Door 2", "uint16", 0, 2, decimals=2, json_field="door-sensor-2"),
    ),
)


def decode(
    spec: TemplateSpec, payload: Any, kind: str = "sensor"
) -> list[tuple[int, datetime, float]]:
    raw = payload if isinstance(payload, bytes | str) or payload is None else orjson.dumps(payload)
    return compile_template(spec).decode(kind, raw, ZONE, NOW)


def reason(spec: TemplateSpec, payload: Any, kind: str = "sensor") -> Reason:
    with pytest.raises(DecodeError) as caught:
        decode(spec, payload, kind)
    return caught.value.reason


def test_readings_share_one_utc_timestamp() -> None:
    readings = decode(ENV, {"timestamp": STAMP, "data": FRAME})
    assert [(dp, value) for dp, _, value in readings] == [(1, 25.52), (2, 45.12), (3, 415.0)]
    stamps = {ts for _, ts, _ in readings}
    assert stamps == {datetime(2024, 7, 15, 14, 30, 25, 123456, tzinfo=UTC)}


def test_str_payload_is_accepted_like_bytes() -> None:
    payload = orjson.dumps({"timestamp": STAMP, "data": FRAME})
    assert decode(ENV, payload.decode()) == decode(ENV, payload)


@pytest.mark.parametrize(
    "data",
    [
        "0103 0609F8 11A0019F C4DE",
        "01\t03\n06 09 f8 11 a0 01 9f c4 de",
        " 01 03 06 09 F8 11 A0 01 9F C4 DE ",
    ],
)
def test_hex_whitespace_between_pairs_and_case_do_not_matter(data: str) -> None:
    assert decode(ENV, {"timestamp": STAMP, "data": data}) == decode(
        ENV, {"timestamp": STAMP, "data": FRAME}
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("0 1 03", Reason.INVALID_HEX),  # whitespace inside a pair
        ("01 03 06 09 F8 11 A0 01 9F C4 D\u0415", Reason.INVALID_HEX),  # non-ASCII
        ("01\u00a003", Reason.INVALID_HEX),  # non-ASCII whitespace
        ("0x01 03", Reason.INVALID_HEX),
        ("", Reason.BAD_FRAME),
        (None, Reason.INVALID_HEX),
        (["01", "03"], Reason.INVALID_HEX),
        (True, Reason.INVALID_HEX),
    ],
)
def test_hex_faults(data: Any, expected: Reason) -> None:
    assert reason(ENV, {"timestamp": STAMP, "data": data}) is expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", Reason.INVALID_JSON),
        (b"\xff\xfe", Reason.INVALID_JSON),
        (b'{"timestamp": NaN}', Reason.INVALID_JSON),
        (b'{"a": 1e400}', Reason.INVALID_JSON),
        (b"null", Reason.INVALID_JSON),
        (b'"text"', Reason.INVALID_JSON),
        (b"42", Reason.INVALID_JSON),
        (None, Reason.INVALID_JSON),
        (b"{}", Reason.MISSING_FIELD),
        (b'{"timestamp": "bad"}', Reason.MISSING_FIELD),  # missing data outranks the timestamp
        (b'{"timestamp": null, "data": "zz"}', Reason.INVALID_TIMESTAMP),
        (b'{"timestamp": "1970-01-01 00:00:00", "data": "zz"}', Reason.TIMESTAMP_OUT_OF_RANGE),
    ],
)
def test_payload_faults(payload: Any, expected: Reason) -> None:
    assert reason(ENV, payload) is expected


def test_an_empty_template_is_no_datapoints_before_anything_else() -> None:
    assert reason(TemplateSpec("modbus_crc", ()), b"not json") is Reason.NO_DATAPOINTS
    assert reason(TemplateSpec("modbus_crc", ()), b"{}", "strike") is Reason.NO_DATAPOINTS


@pytest.mark.parametrize("kind", ["reader", "thermostat", ""])
def test_kinds_without_readings_are_refused(kind: str) -> None:
    with pytest.raises(ValueError, match="no readings"):
        decode(ENV, {"timestamp": STAMP, "data": FRAME}, kind)


@pytest.mark.parametrize(
    ("point", "detail"),
    [
        (DatapointSpec(4, "Bad", "int24", 0, 3), "unknown data_encoding"),
        (DatapointSpec(4, "Bad", "int16", 0, 2, "ACBD"), "unknown byte_order"),
        (DatapointSpec(4, "Bad", "int16", -2, 2), "negative"),
        (DatapointSpec(4, "Bad", "int16", 0, 4), "byte_length 2"),
        (DatapointSpec(4, "Bad", "float32", 0, 8), "byte_length 4"),
        (DatapointSpec(4, "Bad", "bool", 0, 9), "1..8"),
        (DatapointSpec(4, "Bad", "bool", 0, 0), "1..8"),
        (DatapointSpec(4, "Bad", "int16", 0, 2, decimals=-1), "decimals"),
        (DatapointSpec(4, "Bad", "uint16", 5, 2), "data bytes 5..6"),
    ],
)
def test_template_faults_are_decode_error_after_the_frame_checks(
    point: DatapointSpec, detail: str
) -> None:
    spec = TemplateSpec("modbus_crc", (*ENV.datapoints, point))
    with pytest.raises(DecodeError) as caught:
        decode(spec, {"timestamp": STAMP, "data": FRAME})
    assert caught.value.reason is Reason.DECODE_ERROR
    assert caught.value.detail.startswith("Bad")
    assert detail in caught.value.detail
    # A frame fault comes first in SPEC section 7's order.
    assert reason(spec, {"timestamp": STAMP, "data": "01 03"}) is Reason.BAD_FRAME


def test_decode_error_outranks_an_earlier_non_finite_value() -> None:
    frame = encode_modbus_response(1, 3, bytes.fromhex("7FC00000"))
    spec = TemplateSpec(
        "modbus_crc",
        (DatapointSpec(1, "NaN", "float32", 0, 4), DatapointSpec(2, "Far", "uint8", 4, 1)),
    )
    assert reason(spec, {"timestamp": STAMP, "data": frame.hex()}) is Reason.DECODE_ERROR


def test_frame_check_none_reads_every_byte_after_the_header() -> None:
    spec = TemplateSpec("NONE", (DatapointSpec(1, "Last", "uint16", 2, 2),))
    [(_, _, value)] = decode(spec, {"timestamp": STAMP, "data": "01 03 FF 00 00 12 34"})
    assert value == 0x1234
    assert reason(spec, {"timestamp": STAMP, "data": "01 03 FF 00 00 12"}) is Reason.DECODE_ERROR
    assert reason(spec, {"timestamp": STAMP, "data": "01"}) is Reason.DECODE_ERROR


def test_an_unknown_frame_check_is_decode_error() -> None:
    spec = TemplateSpec("parity", ENV.datapoints)
    assert reason(spec, {"timestamp": STAMP, "data": FRAME}) is Reason.DECODE_ERROR


def test_integer_values_are_true_division_by_a_power_of_ten() -> None:
    spec = TemplateSpec("modbus_crc", (DatapointSpec(1, "Big", "uint64", 0, 8, decimals=12),))
    raw = 2**64 - 1
    frame = encode_modbus_response(1, 3, raw.to_bytes(8, "big"))
    [(_, _, value)] = decode(spec, {"timestamp": STAMP, "data": frame.hex()})
    assert value == raw / 10**12


def test_float_decimals_are_display_only() -> None:
    spec = TemplateSpec("modbus_crc", (DatapointSpec(1, "F", "FLOAT32", 0, 4, decimals=3),))
    frame = encode_modbus_response(1, 3, bytes.fromhex("41AC0000"))
    assert decode(spec, {"timestamp": STAMP, "data": frame.hex()})[0][2] == 21.5


# --- status messages ------------------------------------------------------------------


def test_status_booleans_and_numbers() -> None:
    readings = decode(
        DOORS, {"timestamp": STAMP, "door-sensor-1": True, "door-sensor-2": 7}, "door-sensors"
    )
    assert [(dp, value) for dp, _, value in readings] == [(10, 1.0), (11, 7.0)]
    readings = decode(
        DOORS, {"timestamp": STAMP, "door-sensor-1": False, "door-sensor-2": -2.5}, "strike"
    )
    assert [value for _, _, value in readings] == [0.0, -2.5]


@pytest.mark.parametrize("bad", [None, "on", [True], {"v": 1}])
def test_status_fields_that_are_neither_bool_nor_number(bad: Any) -> None:
    payload = {"timestamp": STAMP, "door-sensor-1": True, "door-sensor-2": bad}
    assert reason(DOORS, payload, "door-sensors") is Reason.DECODE_ERROR


def test_status_missing_field_outranks_a_bad_timestamp() -> None:
    payload = {"timestamp": "yesterday", "door-sensor-1": True}
    assert reason(DOORS, payload, "door-sensors") is Reason.MISSING_FIELD
    assert reason(DOORS, {"door-sensor-1": 1, "door-sensor-2": 1}, "siren") is (
        Reason.MISSING_FIELD
    )
    payload = {"timestamp": "yesterday", "door-sensor-1": True, "door-sensor-2": "x"}
    assert reason(DOORS, payload, "door-sensors") is Reason.INVALID_TIMESTAMP


def test_a_status_datapoint_without_json_field_is_decode_error() -> None:
    assert reason(ENV, {"timestamp": STAMP, "data": FRAME}, "motion-sensor") is (
        Reason.DECODE_ERROR
    )


# --- the error and the template loader ------------------------------------------------


def test_decode_error_carries_reason_and_detail_and_pickles() -> None:
    error = DecodeError(Reason.CRC_MISMATCH, "frame CRC 0x0001, computed 0x0002")
    assert isinstance(error, F2PipeError)
    assert str(error) == "crc_mismatch: frame CRC 0x0001, computed 0x0002"
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes, just made
    assert (copy.reason, copy.detail) == (error.reason, error.detail)


def test_template_from_mapping() -> None:
    spec = template_from_mapping(
        {
            "frame_check": "none",
            "datapoints": [
                {"label": "A", "data_encoding": "Int16", "byte_offset": 0, "byte_length": 2,
                 "decimals": None, "unit": "V"},
                {"datapoint_id": 9, "label": "B", "data_encoding": "bool", "byte_offset": 2,
                 "byte_length": 1, "byte_order": None, "json_field": "status"},
            ],
        }
    )  # fmt: skip
    assert spec == TemplateSpec(
        "none",
        (
            DatapointSpec(1, "A", "Int16", 0, 2, "ABCD", 0, "V"),
            DatapointSpec(9, "B", "bool", 2, 1, "ABCD", 0, None, "status"),
        ),
    )


@pytest.mark.parametrize(
    "mapping",
    [
        [],
        {"datapoints": "x"},
        {"datapoints": [{"data_encoding": "int16", "byte_length": 2}]},
        {"datapoints": [{"label": "A", "data_encoding": "int16", "byte_length": "two"}]},
        {"datapoints": [7]},
    ],
)
def test_template_from_mapping_rejects_bad_shapes(mapping: Any) -> None:
    with pytest.raises(ValueError, match=r"template|datapoint"):
        template_from_mapping(mapping)
