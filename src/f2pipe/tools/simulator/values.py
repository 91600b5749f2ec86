"""Templates and values: what a simulated sensor measures and how it encodes it.

A template is one of a fleet document's (:func:`sensor_templates`; the demo
ones of SPEC section 3 are :func:`demo_templates`); its datapoints are the
core's :class:`~f2pipe.core.models.Datapoint`. Beside them the simulator keeps
only what a device needs to make up readings: a plausible range per datapoint
(:func:`value_range`) and the bytes of a value (:func:`encode_value`,
big-endian, byte order ABCD). Frames are Modbus RTU read responses
``01 03 <count> <data> <crc lo> <crc hi>`` (:mod:`f2pipe.core.frames`).
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from typing import TYPE_CHECKING

from f2pipe.core.decode import ENCODINGS
from f2pipe.core.frames import encode_modbus_response
from f2pipe.core.models import Datapoint

if TYPE_CHECKING:
    from f2pipe.metadata.fleet.document import Fleet

__all__ = [
    "Template",
    "demo_templates",
    "encode_value",
    "modbus_frame",
    "sensor_templates",
    "struct_format",
    "value_range",
]


def modbus_frame(data: bytes, address: int = 1, function: int = 3) -> bytes:
    """A Modbus RTU read response carrying ``data``, CRC appended low byte first."""
    return encode_modbus_response(address, function, data)


# Plausible ranges by datapoint label (engineering units); others use the encoding's range.
_RANGES = {
    "temperature": (15.0, 30.0),
    "humidity": (30.0, 70.0),
    "co2": (400.0, 2000.0),
    "voltage": (220.0, 240.0),
    "current": (0.0, 16.0),
}


def struct_format(point: Datapoint) -> str:
    """The big-endian struct format of ``point``'s encoding (``bool`` has none: KeyError)."""
    code, _width = ENCODINGS[point.data_encoding]
    if not code:
        raise KeyError(point.data_encoding)
    return ">" + code


def value_range(point: Datapoint) -> tuple[float, float]:
    """The range ``point``'s simulated values random-walk in."""
    known = _RANGES.get(point.label.lower())
    if known:
        return known
    enc = point.data_encoding
    if enc.startswith("float"):
        return (0.0, 100.0)
    bits = struct.calcsize(struct_format(point)) * 8
    lo, hi = (0, 2**bits - 1) if enc.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    scale = 10**point.decimals
    return (lo / scale, hi / scale)


def encode_value(point: Datapoint, value: float) -> tuple[bytes, float]:
    """The bytes of ``value`` and the value a decoder reads back from them."""
    fmt = struct_format(point)
    if point.data_encoding.startswith("float"):
        raw = struct.pack(fmt, value)
        return raw, float(struct.unpack(fmt, raw)[0])
    scaled = round(value * 10**point.decimals)
    return struct.pack(fmt, scaled), scaled / 10**point.decimals


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    datapoints: tuple[Datapoint, ...]

    @functools.cached_property
    def data_length(self) -> int:
        return max(d.byte_offset + d.byte_length for d in self.datapoints)

    @functools.cached_property
    def has_float(self) -> bool:
        return any(d.data_encoding.startswith("float") for d in self.datapoints)

    @functools.cached_property
    def head(self) -> bytes:
        """The frame's first three bytes: address 1, function 3 (read), byte count."""
        return bytes((1, 3, self.data_length))

    @functools.cached_property
    def layout(self) -> struct.Struct | None:
        """One struct for the frame's data, every datapoint in template order, when they
        follow each other without overlapping; None otherwise.

        Packing the data in one call rather than per datapoint is a good part of what
        keeps the load generator cheap per message.
        """
        fmt = ">"
        end = 0
        for point in self.datapoints:
            code = struct_format(point)
            if point.byte_offset < end or point.byte_length != struct.calcsize(code):
                return None
            fmt += "x" * (point.byte_offset - end) + code[1]
            end = point.byte_offset + point.byte_length
        return struct.Struct(fmt)


def sensor_templates(document: Fleet) -> dict[str, Template]:
    """The templates of a fleet document's sensor device types, by name.

    Raises ValueError for a datapoint the simulator cannot encode (it writes
    big-endian numbers only): a simulated frame must decode to what the ledger says.
    """
    sensor_types = {kind.name for kind in document.device_types if kind.is_sensor}
    chosen = [t for t in document.templates if t.device_type in sensor_types]
    for template in chosen:
        for point in template.datapoints:
            if point.byte_order != "ABCD" or point.data_encoding == "bool":
                raise ValueError(
                    f"{template.name}/{point.label}: the simulator encodes big-endian"
                    f" numbers only, not {point.data_encoding} {point.byte_order}"
                )
    return {
        template.name: Template(template.name, tuple(template.datapoints)) for template in chosen
    }


def demo_templates() -> dict[str, Template]:
    """The demo templates of SPEC section 3, from the demo fleet document (one source of truth)."""
    from f2pipe.metadata.fleet.demo import demo_fleet

    return sensor_templates(demo_fleet())
