"""The closed set of dead-letter reasons (SPEC section 7), in precedence order.

When several reasons apply to one record, the one listed first wins. Stages
return a :class:`Reason` (never a free-form string) so metrics, headers and
replay filters all speak the same words.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    INVALID_TOPIC = "invalid_topic"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_DEVICE = "unknown_device"
    UNMAPPED_SENSOR = "unmapped_sensor"
    NO_DATAPOINTS = "no_datapoints"
    INVALID_JSON = "invalid_json"
    MISSING_FIELD = "missing_field"
    INVALID_TIMESTAMP = "invalid_timestamp"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
    INVALID_HEX = "invalid_hex"
    BAD_FRAME = "bad_frame"
    CRC_MISMATCH = "crc_mismatch"
    MODBUS_EXCEPTION = "modbus_exception"
    DECODE_ERROR = "decode_error"
    NON_FINITE_VALUE = "non_finite_value"
    SINK_REJECTED = "sink_rejected"


# Precedence: lower wins when several reasons apply.
PRECEDENCE: dict[Reason, int] = {reason: rank for rank, reason in enumerate(Reason)}

# Which stage can emit which reason; replay sends a dead letter back to its stage's input.
STAGE_OF: dict[Reason, str] = {
    Reason.INVALID_TOPIC: "connector",
    Reason.PAYLOAD_TOO_LARGE: "connector",
    Reason.SINK_REJECTED: "sink",
}


def stage_of(reason: Reason) -> str:
    """The stage that emits ``reason`` (the processor emits all decoding reasons).

    ``invalid_topic`` may also come from the processor when a raw record's
    ``mqtt.topic`` header is malformed; the ``dlq.stage`` header is authoritative.
    """
    return STAGE_OF.get(reason, "processor")
