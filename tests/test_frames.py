"""CRC-16/MODBUS and the Modbus RTU frame checks of SPEC section 2."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from f2pipe.core.deadletter import Rejected
from f2pipe.core.frames import (
    check_modbus_frame,
    crc16_modbus,
    crc16_modbus_reference,
    encode_modbus_response,
    modbus_data,
)
from f2pipe.core.reasons import Reason

# The machines this runs on are shared: time per example is not a property under test.
NO_DEADLINE = settings(deadline=None)


def test_crc_check_value() -> None:
    # The catalogue check value of CRC-16/MODBUS.
    assert crc16_modbus(b"123456789") == 0x4B37
    assert crc16_modbus_reference(b"123456789") == 0x4B37


def test_crc_of_the_documented_frame() -> None:
    frame = bytes.fromhex("01 03 06 09 F8 11 A0 01 9F C4 DE")
    assert crc16_modbus(frame[:-2]) == 0xDEC4  # sent low byte first
    assert check_modbus_frame(frame) is None
    assert modbus_data(frame) == bytes.fromhex("09 F8 11 A0 01 9F")


@NO_DEADLINE
@given(st.binary(max_size=300))
def test_native_crc_equals_the_reference(data: bytes) -> None:
    assert crc16_modbus(data) == crc16_modbus_reference(data)


@NO_DEADLINE
@given(st.integers(0, 255), st.integers(0, 0x7F), st.binary(max_size=250))
def test_encoded_frames_pass(address: int, function: int, data: bytes) -> None:
    frame = encode_modbus_response(address, function, data)
    assert len(frame) == len(data) + 5
    assert check_modbus_frame(frame) is None
    assert modbus_data(frame) == data


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4])
def test_fewer_than_five_bytes_is_bad_frame(size: int) -> None:
    error = check_modbus_frame(bytes.fromhex("01 83 02 C0 F1")[:size])
    assert isinstance(error, Rejected)
    assert error.reason is Reason.BAD_FRAME


def test_exception_response_names_its_code() -> None:
    error = check_modbus_frame(bytes.fromhex("01 83 02 C0 F1"))
    assert error == Rejected(
        Reason.MODBUS_EXCEPTION, "exception code 2 (illegal data address) for function 3"
    )


def test_exception_response_with_a_bad_crc_is_crc_mismatch() -> None:
    error = check_modbus_frame(bytes.fromhex("01 83 02 C0 F2"))
    assert error is not None
    assert error.reason is Reason.CRC_MISMATCH


def test_byte_count_is_checked_before_the_crc() -> None:
    frame = bytearray(encode_modbus_response(1, 3, b"\x00\x01"))
    frame[2] = 3
    frame[-1] ^= 0xFF
    error = check_modbus_frame(bytes(frame))
    assert error is not None
    assert error.reason is Reason.BAD_FRAME
    assert "byte count 3" in error.detail


def test_crc_mismatch_detail_shows_both_values() -> None:
    error = check_modbus_frame(bytes.fromhex("01 03 06 00 01 00 01 00 01 8D B4"))
    assert error is not None
    assert error.reason is Reason.CRC_MISMATCH
    assert "0xB48D" in error.detail
