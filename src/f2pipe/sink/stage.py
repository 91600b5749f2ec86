"""The sink's pure stage: a processed record's value -> a row of ``decoded_data``.

:func:`parse_reading` turns one ``processed-iot-data`` value (SPEC section 4)
into a :data:`Row` or the ``dlq.detail`` of a ``sink_rejected`` dead letter;
:func:`parse_batch` does the same for a whole poll at once in the common case
where every value is valid. :func:`encode_rows` and :func:`encode_copy` turn
rows into PostgreSQL's binary COPY format, and :func:`newest_per_key` picks
what ``latest_readings`` takes from a batch. No client, no clock: the runner
(:mod:`.runner`) and the writer (:mod:`.writer`) do the I/O.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import Annotated, Final, Literal, cast

import msgspec
import orjson

__all__ = [
    "COPY_HEADER",
    "COPY_TRAILER",
    "Row",
    "encode_copy",
    "encode_rows",
    "newest_per_key",
    "parse_batch",
    "parse_reading",
    "row_timestamp",
]

# A row of decoded_data: (microseconds since 2000-01-01 UTC, device_id, datapoint_id, value).
Row = tuple[int, int, int, float]

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_INT4_MAX = 2**31 - 1
# The binary COPY stream's signature, flags and header extension length; its end marker.
COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER: Final = b"\xff\xff"
# field count, then (length, value) for timestamptz (int64 us), int4, int4, float8.
_PACK_ROW = struct.Struct("!hiqiiiiid").pack


def _ts_micros(ts: str) -> int:
    # No cache: readings of one message go to different partitions (their keys
    # differ), so equal timestamps rarely meet in one consumer's stream.
    dt = datetime.fromisoformat(ts)
    if dt.tzinfo is None:
        raise ValueError(f"timestamp without UTC offset: {ts!r}")
    return (dt - _PG_EPOCH) // _ONE_US


def parse_reading(value: bytes | None) -> Row | str:
    """One ``processed-iot-data`` value (SPEC section 4) -> a row, or why it is not one.

    Accepts exactly ``{"v":1,"ts":<ISO-8601 with offset>,"device_id":<1..2^31-1>,
    "datapoint_id":<1..2^31-1>,"value":<finite number>}`` (extra keys ignored).
    Never raises; the string returned is the ``dlq.detail`` of a ``sink_rejected``.
    """
    if value is None:
        return "empty record value"
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return f"invalid JSON: {exc}"
    if type(obj) is not dict:
        return "value is not a JSON object"
    try:
        version = obj["v"]
        ts = obj["ts"]
        device_id = obj["device_id"]
        datapoint_id = obj["datapoint_id"]
        number = obj["value"]
    except KeyError as exc:
        return f"missing field {exc.args[0]}"
    if type(version) is not int or version != 1:
        return f"unsupported version {version!r}"
    if type(device_id) is not int or not 0 < device_id <= _INT4_MAX:
        return f"device_id out of range: {device_id!r}"
    if type(datapoint_id) is not int or not 0 < datapoint_id <= _INT4_MAX:
        return f"datapoint_id out of range: {datapoint_id!r}"
    kind = type(number)
    if kind is float:
        if not math.isfinite(number):  # orjson refuses NaN/inf; kept for other producers
            return f"value is not finite: {number!r}"
    elif kind is int:
        try:
            number = float(number)
        except OverflowError:
            return "value out of range of double precision"
    else:
        return f"value is not a number: {number!r}"
    if type(ts) is not str:
        return f"ts is not a string: {ts!r}"
    try:
        micros = _ts_micros(ts)
    except (ValueError, OverflowError) as exc:
        return f"invalid ts: {exc}"
    return (micros, device_id, datapoint_id, number)


_Int4Id = Annotated[int, msgspec.Meta(ge=1, le=_INT4_MAX)]


class _Reading(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The exact shape of a processed value, for :func:`parse_batch`'s decoder.

    msgspec checks the types and ranges in C while it decodes: ``v`` is the
    integer 1, the ids are integers in 1..2^31-1 (JSON ``true`` or ``5.0``
    are refused, as by :func:`parse_reading`), ``value`` is a number that is
    finite as a double (an integer is converted, as by :func:`parse_reading`).
    Unknown keys are refused here, not skipped: msgspec skips an unknown
    key's value without the checks orjson makes (invalid UTF-8, numbers
    beyond the double range), so such a value would be accepted here and
    refused by :func:`parse_reading`. The processor writes no extra keys; a
    value that has any takes the per-record path. ``ts`` stays a string,
    parsed by ``datetime.fromisoformat`` as in :func:`parse_reading`.
    ``gc=False``: the fields are a str, ints and a float, which form no cycles.
    """

    v: Literal[1]
    ts: str
    device_id: _Int4Id
    datapoint_id: _Int4Id
    value: float


_DECODE_READING = msgspec.json.Decoder(_Reading).decode
# Any value the decoder refuses: malformed JSON or a wrong shape (DecodeError,
# ValidationError), invalid UTF-8 in ``ts`` (UnicodeDecodeError, a ValueError),
# a tombstone (TypeError).
_NOT_A_READING = (msgspec.DecodeError, ValueError, TypeError)


def parse_batch(values: Sequence[bytes | None]) -> list[Row] | None:
    """Rows for ``values`` if every one is a valid reading, else None.

    The common case of :func:`parse_reading` for a whole poll at once:
    msgspec decodes each value into a typed struct and makes the type and
    range checks in C, and each distinct ``ts`` string is parsed once.
    Whenever it returns rows they equal ``[parse_reading(v) for v in values]``;
    it returns None (the caller then parses record by record, which yields
    the reasons) when any value is invalid, or valid in a less common form
    (a key beyond the five of SPEC section 4).
    """
    if not values:
        return []
    try:
        readings = list(map(_DECODE_READING, cast(Sequence[bytes], values)))
    except _NOT_A_READING:
        return None
    stamps = [r.ts for r in readings]
    try:
        # (ts - epoch) // 1 µs, as _ts_micros; a naive ts fails the subtraction.
        # Once per distinct string: the readings of one message share their ts
        # and mostly arrive in the same poll (bench/sink.json: 0.43 -> 0.29 µs
        # per record at three readings per message).
        distinct = list(set(stamps))
        deltas = map(operator.sub, map(datetime.fromisoformat, distinct), repeat(_PG_EPOCH))
        per_stamp = map(operator.floordiv, deltas, repeat(_ONE_US))
        micros_of = dict(zip(distinct, per_stamp, strict=True))
    except (ValueError, TypeError, OverflowError):
        return None
    micros = micros_of.__getitem__
    return [(micros(r.ts), r.device_id, r.datapoint_id, r.value) for r in readings]


def encode_rows(rows: Iterable[Row]) -> bytes:
    """Rows in PostgreSQL's binary COPY row format (no header, no trailer).

    Columns: timestamp, device_id, datapoint_id, value (the order of the COPY statements).
    """
    pack = _PACK_ROW
    return b"".join([pack(4, 8, r[0], 4, r[1], 4, r[2], 8, r[3]) for r in rows])


def encode_copy(rows: Iterable[Row]) -> bytes:
    """Rows as one complete binary COPY stream (header, rows, trailer)."""
    return COPY_HEADER + encode_rows(rows) + COPY_TRAILER


def row_timestamp(row: Row) -> datetime:
    """The row's timestamp as an aware UTC datetime."""
    return _PG_EPOCH + timedelta(microseconds=row[0])


def newest_per_key(rows: Iterable[Row]) -> dict[tuple[int, int], Row]:
    """(device_id, datapoint_id) -> a row with the newest timestamp among ``rows``.

    Which of several rows with the same key and timestamp is returned is
    unspecified: only the timestamp matters when the value comes from
    decoded_data, and a batch stored whole cannot hold two such rows.
    """
    # A stable sort by time, then last one wins: C loops instead of a Python one.
    return {(row[1], row[2]): row for row in sorted(rows, key=_BY_TIME)}


_BY_TIME = operator.itemgetter(0)
