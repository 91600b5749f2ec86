"""Turn one F2 message into readings, or into exactly one dead-letter reason.

This is the pure core of the processor (SPEC sections 1, 2 and 7): no I/O, no
clocks (the caller passes ``now``), no globals that change. A template is
compiled once (:func:`compile_template`, cached by the caller) into a reader
generated for it (one precompiled ``struct`` call per byte order, a byte gather
only for BADC and CDAB); :meth:`CompiledTemplate.decode` then runs the checks
in SPEC section 7's order and returns every reading of the message or raises
:class:`DecodeError` with the first reason that applies::

    no_datapoints, invalid_json, missing_field, invalid_timestamp,
    timestamp_out_of_range, invalid_hex, bad_frame, crc_mismatch,
    modbus_exception, decode_error, non_finite_value

A message yields all its readings or none. Template faults that the database
constraints normally prevent (an unknown encoding, a length that is not the
encoding's width, a datapoint reaching past the data) are ``decode_error`` at
decode time rather than failures of :func:`compile_template`, so a bad
metadata row dead-letters its messages instead of stopping a processor.
"""

from __future__ import annotations

import re
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from itertools import pairwise, repeat
from operator import itemgetter
from typing import Any, Final
from zoneinfo import ZoneInfo

import orjson

from f2pipe.core.frames import DATA_START, check_modbus_frame, crc16_modbus
from f2pipe.core.reasons import Reason
from f2pipe.core.topics import STATUS_KINDS
from f2pipe.errors import F2PipeError

__all__ = [
    "BYTE_ORDERS",
    "ENCODINGS",
    "FRAME_CHECKS",
    "CompiledTemplate",
    "DatapointSpec",
    "DecodeError",
    "TemplateSpec",
    "compile_template",
    "parse_timestamp",
    "template_from_mapping",
]

# encoding -> (struct code, width); bool has no code and a width of 1..8.
ENCODINGS: Final[dict[str, tuple[str, int]]] = {
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
    "bool": ("", 0),
}
_FLOAT_CODES: Final = frozenset("fd")
BYTE_ORDERS: Final = ("ABCD", "DCBA", "BADC", "CDAB")
FRAME_CHECKS: Final = ("modbus_crc", "none")

# Earliest acceptable device time; devices with a reset clock report 1970.
_EARLIEST: Final = datetime(2000, 1, 1, tzinfo=UTC)
# How far ahead of the processor's clock a device clock may run.
_AHEAD: Final = timedelta(hours=24)
_UTC_ZONE: Final = ZoneInfo("UTC")
_SECOND: Final = timedelta(seconds=1)
_MISSING: Final[Any] = object()
# The strict timestamp grammar of SPEC section 1; the hand-written fast path in
# parse_timestamp covers the forms devices actually send.
_TIMESTAMP: Final = re.compile(
    r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)?", re.ASCII
)
# Characters 4, 7, 10, 13, 16 (and 19, before a fraction) of the usual forms.
_SEPARATORS: Final = frozenset({"-- ::", "--T::", "-- ::.", "--T::."})
_fromisoformat = datetime.fromisoformat
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


class DecodeError(F2PipeError):
    """A message that cannot become readings: ``reason`` (SPEC section 7) and a human ``detail``."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[DecodeError], tuple[Reason, str]]:
        return DecodeError, (self.reason, self.detail)


@dataclass(frozen=True, slots=True)
class DatapointSpec:
    """One datapoint of a template, as the metadata holds it (SPEC section 3)."""

    datapoint_id: int
    label: str
    data_encoding: str
    byte_offset: int
    byte_length: int
    byte_order: str = "ABCD"
    decimals: int = 0
    unit: str | None = None
    json_field: str | None = None


@dataclass(frozen=True, slots=True)
class TemplateSpec:
    """A device template: how its frames are checked and which datapoints they carry."""

    frame_check: str
    datapoints: tuple[DatapointSpec, ...]


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One datapoint, checked and resolved: where it is and how its bytes become a value."""

    datapoint_id: int
    label: str
    start: int  # offset in the data (after the 3-byte header)
    width: int
    fault: str | None = None  # a template fault: every frame is decode_error
    code: str = ""  # struct code; "" for bool
    endian: str = ">"  # ">" or "<", or "" when the bytes must be gathered first
    gather: tuple[int, ...] = ()  # data offsets of the value's bytes, big-endian first
    divisor: int = 1  # 10**decimals for integers

    @property
    def is_float(self) -> bool:
        return self.code in _FLOAT_CODES


def _value_order(order: str, width: int) -> tuple[int, ...]:
    """For each byte of the big-endian value, the index of the frame byte that holds it."""
    if width == 1 or order == "ABCD":
        return tuple(range(width))
    if order == "DCBA":
        return tuple(range(width - 1, -1, -1))
    if order == "BADC":
        return tuple(j ^ 1 for j in range(width))
    # CDAB: 16-bit words in reverse order, bytes inside each word as they are.
    words = width // 2
    return tuple(2 * (words - 1 - j // 2) + j % 2 for j in range(width))


def _compile_datapoint(dp: DatapointSpec) -> _Compiled:
    """Resolve ``dp``; a faulty datapoint keeps its fault rather than raising.

    Raises ``TypeError`` or ``ValueError`` only for a ``datapoint_id`` that is not
    an integer, which the schema cannot hold.
    """
    encoding = str(dp.data_encoding).lower()
    order = str(dp.byte_order or "ABCD").upper()
    decimals = dp.decimals or 0
    start, length = dp.byte_offset, dp.byte_length
    here = _Compiled(int(dp.datapoint_id), dp.label, 0, 0)

    def broken(why: str) -> _Compiled:
        return _Compiled(here.datapoint_id, here.label, 0, 0, fault=why)

    if type(start) is not int or type(length) is not int:
        return broken(f"byte_offset {start!r} and byte_length {length!r} must be integers")
    here = _Compiled(here.datapoint_id, here.label, start, length)
    if encoding not in ENCODINGS:
        return broken(f"unknown data_encoding {dp.data_encoding!r}")
    if order not in BYTE_ORDERS:
        return broken(f"unknown byte_order {dp.byte_order!r}")
    if not isinstance(decimals, int) or decimals < 0:
        return broken(f"decimals {dp.decimals!r} is not a non-negative integer")
    if start < 0:
        return broken(f"byte_offset {start} is negative")
    code, width = ENCODINGS[encoding]
    if encoding == "bool":
        if not 1 <= length <= 8:
            return broken(f"bool byte_length {length} is not 1..8")
        return here
    if length != width:
        return broken(f"{encoding} needs byte_length {width}, not {length}")
    value_order = _value_order(order, width)
    gather: tuple[int, ...]
    divisor = 1 if code in _FLOAT_CODES else 10**decimals
    if value_order == tuple(range(width)):
        endian, gather = ">", ()
    elif value_order == tuple(range(width - 1, -1, -1)):
        endian, gather = "<", ()
    else:  # BADC or CDAB of 4 or 8 bytes: no struct format reads these
        endian, gather = "", tuple(start + i for i in value_order)
    return _Compiled(here.datapoint_id, here.label, start, width, None, code, endian, gather,
                     divisor)  # fmt: skip


def _non_finite(label: str, value: float) -> DecodeError:
    return DecodeError(Reason.NON_FINITE_VALUE, f"{label} is {value}")


def _build_reader(points: Sequence[_Compiled]) -> tuple[Any, str]:
    """Generate ``read(frame) -> values`` for fault-free ``points`` and its source.

    A loop over per-datapoint readers costs about 0.2 µs a datapoint; the
    generated function reads every same-endian, non-overlapping value with one
    ``struct`` call and returns the values, in datapoint order, as one tuple,
    about half of that. Only integers and generated names enter the source:
    labels and the other objects are passed in the namespace.
    """
    namespace: dict[str, Any] = {"_non_finite": _non_finite}
    lines: list[str] = []
    # One struct per byte order when its values do not overlap (the usual case).
    for endian in (">", "<"):
        members = sorted(
            (p.start, i) for i, p in enumerate(points) if p.code and p.endian == endian
        )
        groups = [members]
        if any(a + points[i].width > b for (a, i), (b, _) in pairwise(members)):
            groups = [[member] for member in members]
        for group in groups:
            if not group:
                continue
            fmt, cursor = endian, group[0][0]
            for start, i in group:
                fmt += f"{start - cursor}x" * (start > cursor) + points[i].code
                cursor = start + points[i].width
            name = f"_s{group[0][1]}"
            namespace[name] = struct.Struct(fmt).unpack_from
            targets = "".join(f"r{i}, " for _, i in group)
            lines.append(f"{targets}= {name}(frame, {DATA_START + group[0][0]:d})")
    for i, p in enumerate(points):
        if not p.code:  # bool: 1.0 when any byte is set
            namespace[f"_z{i}"] = bytes(p.width)
            first = DATA_START + p.start
            lines.append(f"r{i} = 0.0 if frame[{first:d}:{first + p.width:d}] == _z{i} else 1.0")
        elif not p.endian:
            namespace[f"_g{i}"] = itemgetter(*(DATA_START + j for j in p.gather))
            namespace[f"_u{i}"] = struct.Struct(">" + p.code).unpack
            lines.append(f"r{i} = _u{i}(bytes(_g{i}(frame)))[0]")
    for i, p in enumerate(points):
        if p.is_float:  # NaN and infinities, the first in template order
            namespace[f"_l{i}"] = p.label
            lines.append(f"if r{i} - r{i} != 0.0: raise _non_finite(_l{i}, r{i})")
    # Integers divide by 10**decimals; floats and bools are values as they are.
    scaled = [f"r{i} / {p.divisor:d}" if p.code and not p.is_float else f"r{i}"
              for i, p in enumerate(points)]  # fmt: skip
    lines.append(f"return ({''.join(f'{v}, ' for v in scaled)})")
    source = "def read(frame):\n" + "".join(f"    {line}\n" for line in lines)
    exec(source, namespace)  # noqa: S102 - the source holds only integers and generated names
    return namespace["read"], source


def _strict_wall_clock(text: str) -> datetime | None:
    """Any timestamp of SPEC section 1's grammar: naive, or aware with its offset."""
    if _TIMESTAMP.fullmatch(text) is None:
        return None
    try:
        return _fromisoformat(text)
    except ValueError:  # a day, hour or offset out of its range
        return None


@lru_cache(maxsize=4096)
def _repeated_walls(tz: tzinfo, year: int) -> tuple[tuple[datetime, datetime, timedelta], ...]:
    """The wall-clock spans ``[start, end)`` that ``tz`` shows twice (clocks going back)
    and overlapping ``year``, each with how far apart its two passes are.

    Walls are labelled UTC, as :func:`_parse_timestamp` holds them. Found by sampling
    the offset every six hours and bisecting each change to the second (tzdata
    transitions fall on whole seconds, never two within six hours); a pure function of
    its arguments, so caching it changes no result.
    """
    spans = []
    step = timedelta(hours=6)
    at = datetime(year - 1, 12, 31, tzinfo=UTC)
    end = datetime(year + 1, 1, 2, tzinfo=UTC)
    before = at.astimezone(tz).utcoffset()
    while at < end:
        after = (at + step).astimezone(tz).utcoffset()
        if after != before and before is not None and after is not None:
            low, high = at, at + step  # offset `before` at low, `after` at high
            while high - low > _SECOND:
                middle = (low + (high - low) // 2).replace(microsecond=0)
                if middle.astimezone(tz).utcoffset() == before:
                    low = middle
                else:
                    high = middle
            if after < before:
                spans.append((high + after, high + before, before - after))
        at, before = at + step, after
    return tuple(spans)


def parse_timestamp(
    value: object, tz: tzinfo, now: datetime, ingest: datetime | None = None
) -> datetime:
    """The device timestamp ``value`` as an aware UTC datetime.

    Without an offset the wall clock is read in ``tz`` (SPEC section 2): a time
    in a gap keeps the offset before it (``fold=0``); an ambiguous time (the
    hour repeated when clocks go back) takes the later of its two instants when
    that is not after ``ingest`` (the record's aware ingest time), else the
    earlier, which is also the answer without ``ingest``. With an offset the
    offset wins. Raises :class:`DecodeError` with ``invalid_timestamp`` (not
    the grammar, or not a real date and time) or ``timestamp_out_of_range``
    (before 2000-01-01 UTC, or more than 24 h after ``now``, which must be
    aware).
    """
    return _parse_timestamp(value, tz, now, ingest)[0]


def _parse_timestamp(
    value: object, tz: tzinfo, now: datetime, ingest: datetime | None
) -> tuple[datetime, bool]:
    """:func:`parse_timestamp`, and whether the wall clock was ambiguous in ``tz``."""
    # The forms devices send (no offset; no fraction, or one to six digits) skip the
    # regular expression: once the length and the separators at 4, 7, 10, 13, 16 (and
    # 19) are in place, fromisoformat checks every digit itself and, given an explicit
    # "+00:00", returns the wall clock labelled with the UTC singleton. Each check is one
    # C call: indexing a str costs several times more from Python. NUL is excluded
    # because fromisoformat reads past "Z\0" as if the text ended there.
    # datetime.replace() and astimezone() cost about a microsecond each here, so they
    # are avoided too.
    wall = None
    if (
        type(value) is str
        and ((size := len(value)) == 19 or 20 < size < 27)
        and value.isascii()
        and value[4:20:3] in _SEPARATORS
        and "\x00" not in value
    ):
        try:
            wall = _fromisoformat(value + "+00:00")
        except ValueError:
            wall = None  # another form of the same length: the strict path decides
    try:
        if wall is None:
            parsed = _strict_wall_clock(value) if type(value) is str else None
            if parsed is None:
                raise DecodeError(
                    Reason.INVALID_TIMESTAMP, f"timestamp {value!r} is not the F2 format"
                )
            if parsed.tzinfo is not None:
                wall, tz = parsed.astimezone(UTC), UTC
            else:
                wall = parsed.replace(tzinfo=UTC)
        ambiguous = False
        if tz is _UTC_ZONE or tz is UTC:
            stamp = wall
        else:
            # utcoffset() reads the wall-clock fields and fold: the same rule as
            # replace(tzinfo=tz).astimezone(UTC) at a third of the cost. fold=0 is the
            # first pass of a repeated hour; a smaller offset at fold=1 is the second
            # pass (in a gap fold=1 gives the larger one, the offset after it).
            offset = tz.utcoffset(wall)
            stamp = wall if offset is None else wall - offset
            for start, end, repeat_by in _repeated_walls(tz, wall.year):
                if start <= wall < end:  # fold=0 took the first pass; the second is later
                    ambiguous = True
                    later = stamp + repeat_by
                    if ingest is not None and later <= ingest:
                        stamp = later
    except OverflowError:  # an offset pushed year 1 or 9999 off the calendar
        raise DecodeError(
            Reason.TIMESTAMP_OUT_OF_RANGE, f"timestamp {value!r} is outside 2000..now+24h"
        ) from None
    # `stamp > now` first: a device clock behind ours (the usual case) needs no addition
    if stamp < _EARLIEST or (stamp > now and stamp > now + _AHEAD):
        raise DecodeError(
            Reason.TIMESTAMP_OUT_OF_RANGE,
            f"timestamp {value!r} ({stamp.isoformat()}) is outside 2000..now+24h",
        )
    return stamp, ambiguous


_JSON_KINDS: Final = {
    dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
    float: "number", type(None): "null",
}  # fmt: skip


def _json_kind(obj: object) -> str:
    return _JSON_KINDS.get(type(obj), type(obj).__name__)


class CompiledTemplate:
    """A template ready to decode messages; immutable and safe to share between threads."""

    __slots__ = (
        "_count", "_crc", "_fault", "_fields", "_need", "_points", "_read", "datapoint_ids",
        "source",
    )  # fmt: skip

    def __init__(self, spec: TemplateSpec) -> None:
        check = str(spec.frame_check or "modbus_crc").lower()
        self._crc = check != "none"
        points = tuple(_compile_datapoint(dp) for dp in spec.datapoints)
        self._points = points
        self._count = len(points)
        self.datapoint_ids: tuple[int, ...] = tuple(p.datapoint_id for p in points)
        """The ids of the values :meth:`decode_values` returns, in the same order."""
        # A fault of the template itself, reported after the frame checks.
        self._fault = next(
            (f"{p.label}: {p.fault}" for p in points if p.fault is not None),
            None if check in FRAME_CHECKS else f"unknown frame_check {spec.frame_check!r}",
        )
        self._fields = tuple((p.datapoint_id, dp.json_field, p.label)
                             for p, dp in zip(points, spec.datapoints, strict=True))  # fmt: skip
        # Data bytes a frame needs for the straight path; a faulty template never takes it.
        self._need = (
            sys.maxsize
            if self._fault is not None
            else max((p.start + p.width for p in points), default=0)
        )
        self._read: Any = None
        self.source = ""
        """The generated reader's source, for inspection."""
        if self._fault is None and points:
            self._read, self.source = _build_reader(points)

    def decode(
        self,
        kind: str,
        payload: bytes | str,
        tz: tzinfo,
        now: datetime,
        ingest: datetime | None = None,
    ) -> list[tuple[int, datetime, float]]:
        """All readings of one message: ``(datapoint_id, UTC timestamp, value)`` per datapoint.

        ``kind`` is the topic's component kind: ``'sensor'`` decodes the frame in
        ``data``; the status kinds read each datapoint's ``json_field``. Readers
        are not readings and raise ``ValueError``, as does any other kind.
        ``tz`` is the controller's zone, ``now`` the processor's aware clock,
        ``ingest`` the record's aware ingest time if known (it places an
        ambiguous local time: :func:`parse_timestamp`). Raises :class:`DecodeError`
        with the first reason of SPEC section 7 that applies; any payload bytes
        raise nothing else.
        """
        stamp, values, _ = self.decode_values(kind, payload, tz, now, ingest)
        return list(zip(self.datapoint_ids, repeat(stamp), values))

    def decode_values(
        self,
        kind: str,
        payload: bytes | str,
        tz: tzinfo,
        now: datetime,
        ingest: datetime | None = None,
    ) -> tuple[datetime, tuple[float, ...], bool]:
        """:meth:`decode` without a tuple per reading: the message's UTC timestamp, its
        values, one per datapoint in :attr:`datapoint_ids` order, and whether the
        timestamp was an ambiguous local time (SPEC section 2 counts those).

        Same arguments, checks and exceptions as :meth:`decode`.
        """
        sensor = kind == "sensor"
        if not sensor and kind not in STATUS_KINDS:
            raise ValueError(f"messages of kind {kind!r} carry no readings")
        if not self._count:
            raise DecodeError(Reason.NO_DATAPOINTS, "the template has no datapoints")
        try:
            obj = _loads(payload)
        except (_JSONDecodeError, TypeError) as exc:
            raise DecodeError(Reason.INVALID_JSON, str(exc)) from None
        if type(obj) is not dict:
            raise DecodeError(Reason.INVALID_JSON, f"a JSON {_json_kind(obj)}, not an object")
        if not sensor:
            return self._decode_status(obj, tz, now, ingest)

        timestamp = obj.get("timestamp", _MISSING)
        data = obj.get("data", _MISSING)
        if timestamp is _MISSING or data is _MISSING:
            name = "timestamp" if timestamp is _MISSING else "data"
            raise DecodeError(Reason.MISSING_FIELD, f"no {name!r} field")
        stamp, ambiguous = _parse_timestamp(timestamp, tz, now, ingest)
        if type(data) is not str:
            raise DecodeError(
                Reason.INVALID_HEX, f"data is a JSON {_json_kind(data)}, not a string"
            )
        try:
            # fromhex ignores ASCII whitespace between pairs and the case of digits.
            frame = bytes.fromhex(data)
        except ValueError as exc:
            raise DecodeError(Reason.INVALID_HEX, str(exc)) from None
        size = len(frame)
        if self._crc:
            # The common case inline; check_modbus_frame says what is wrong otherwise.
            if not (
                size >= 5 and frame[1] < 0x80 and frame[2] == size - 5 and crc16_modbus(frame) == 0
            ):
                error = check_modbus_frame(frame)
                if error is not None:
                    raise DecodeError(error.reason, error.detail)
            available = size - 5
        else:
            available = size - DATA_START
        if available < self._need:
            self._raise_decode_error(available)
        values: tuple[float, ...] = self._read(frame)
        return stamp, values, ambiguous

    def _raise_decode_error(self, available: int) -> None:
        """Raise ``decode_error`` for a template fault, else for the first datapoint
        (template order) that reaches past the ``available`` data bytes."""
        if self._fault is not None:
            raise DecodeError(Reason.DECODE_ERROR, self._fault)
        for p in self._points:
            if p.start + p.width > available:
                raise DecodeError(
                    Reason.DECODE_ERROR,
                    f"{p.label} needs data bytes {p.start}..{p.start + p.width - 1}"
                    f" but the frame has {max(available, 0)}",
                )

    def _decode_status(
        self, obj: dict[str, Any], tz: tzinfo, now: datetime, ingest: datetime | None
    ) -> tuple[datetime, tuple[float, ...], bool]:
        timestamp = obj.get("timestamp", _MISSING)
        if timestamp is _MISSING:
            raise DecodeError(Reason.MISSING_FIELD, "no 'timestamp' field")
        for _dp_id, field, _label in self._fields:
            if field is not None and field not in obj:
                raise DecodeError(Reason.MISSING_FIELD, f"no {field!r} field")
        stamp, ambiguous = _parse_timestamp(timestamp, tz, now, ingest)
        values: list[float] = []
        non_finite: str | None = None
        for _dp_id, field, label in self._fields:
            if field is None:
                raise DecodeError(Reason.DECODE_ERROR, f"{label}: no json_field for a status")
            raw = obj[field]
            kind = type(raw)
            if kind is bool:
                value = 1.0 if raw else 0.0
            elif kind is int or kind is float:
                # orjson yields at most 64-bit integers, so this never overflows.
                value = float(raw)
            else:
                raise DecodeError(
                    Reason.DECODE_ERROR,
                    f"{field!r} is a JSON {_json_kind(raw)}, not a boolean or number",
                )
            if value - value != 0.0 and non_finite is None:
                non_finite = f"{field!r} is {value}"
            values.append(value)
        if non_finite is not None:
            raise DecodeError(Reason.NON_FINITE_VALUE, non_finite)
        return stamp, tuple(values), ambiguous


def compile_template(spec: TemplateSpec) -> CompiledTemplate:
    """Compile ``spec`` once; never raises for a faulty datapoint (see the module docstring)."""
    return CompiledTemplate(spec)


def template_from_mapping(mapping: Mapping[str, Any]) -> TemplateSpec:
    """Build a :class:`TemplateSpec` from the JSON shape of a vector's ``template``.

    ``{"frame_check": ..., "datapoints": [{"label", "data_encoding", "byte_offset",
    "byte_length", "byte_order"?, "decimals"?, "unit"?, "json_field"?,
    "datapoint_id"?}]}``; datapoints without an id are numbered from 1 in order.
    Raises ``ValueError`` naming the first bad entry.
    """
    if not isinstance(mapping, Mapping):
        raise ValueError("a template is a JSON object")
    raw_points = mapping.get("datapoints", [])
    if not isinstance(raw_points, Sequence) or isinstance(raw_points, str):
        raise ValueError("'datapoints' is a list")
    points = []
    for number, raw in enumerate(raw_points, start=1):
        try:
            points.append(
                DatapointSpec(
                    datapoint_id=int(raw.get("datapoint_id", number)),
                    label=str(raw["label"]),
                    data_encoding=str(raw["data_encoding"]),
                    byte_offset=int(raw.get("byte_offset", 0)),
                    byte_length=int(raw["byte_length"]),
                    byte_order=str(raw.get("byte_order") or "ABCD"),
                    decimals=int(raw.get("decimals") or 0),
                    unit=raw.get("unit"),
                    json_field=raw.get("json_field"),
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"datapoint {number}: {exc!r}") from None
    return TemplateSpec(str(mapping.get("frame_check") or "modbus_crc"), tuple(points))
