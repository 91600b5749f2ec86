"""The pieces of MQTT's wire format f2pipe writes and reads itself, in one place.

The connector decodes what its broker sends with the ``mqtt5`` codec; what
stays here is done in bulk for a fraction of a packet-at-a-time codec's cost
(``bench/mqtt5_bench.py`` measures both), or is MQTT 3.1.1, which the simulated
devices speak and ``mqtt5`` does not:

- the UTF-8 string field (:func:`mqtt_string`): a two-byte length, then the bytes;
- the Remaining Length, MQTT's variable byte integer (section 1.5.5 of the v5
  specification, 2.2.3 of 3.1.1): up to four 7-bit groups, least significant
  first, the high bit meaning "more follows";
- splitting a stream read in arbitrary chunks into packets
  (:func:`split_packets`, :func:`packet_end`);
- PUBACKs in bulk: :func:`pubacks` writes many at once (the connector
  acknowledges thousands per round), :func:`puback_ids` reads a buffer of
  nothing but PUBACKs at once (the simulator's usual read).

A PUBACK is ``40 02 <packet id>`` in both versions: MQTT 5 lets a PUBACK with
reason Success and no properties leave both out (section 3.4.2.1).
"""

from __future__ import annotations

import array
import sys

from f2pipe.errors import F2PipeError

__all__ = [
    "MalformedPacket",
    "Packet",
    "decode_length",
    "encode_length",
    "mqtt_string",
    "packet_end",
    "puback_ids",
    "pubacks",
    "split_packets",
]

_LITTLE_ENDIAN = sys.byteorder == "little"
LENGTH_MAX = 268_435_455  # four 7-bit groups

Packet = tuple[int, int, int]
"""One packet in a buffer: ``(first byte of the fixed header, body start, body end)``."""


class MalformedPacket(F2PipeError, ValueError):
    """The peer sent bytes that are not MQTT (a Remaining Length of more than four bytes)."""


def mqtt_string(text: str) -> bytes:
    """``text`` as an MQTT UTF-8 string field: a two-byte big-endian length, then the bytes."""
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def encode_length(n: int) -> bytes:
    """The variable-byte encoding of ``n`` (0 .. 268,435,455)."""
    if not 0 <= n <= LENGTH_MAX:
        raise ValueError(f"{n} does not fit in an MQTT variable byte integer")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_length(buf: bytes | bytearray | memoryview, i: int, end: int) -> tuple[int, int]:
    """Decode the integer starting at ``buf[i]``; return (value, index after it).

    Returns (-1, i) when ``buf[:end]`` ends inside the integer (wait for more
    bytes). Raises :class:`MalformedPacket` for one of more than four bytes.
    """
    value, shift = 0, 0
    while i < end:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise MalformedPacket("malformed MQTT variable byte integer")
    return -1, i


def packet_end(buf: bytes | bytearray | memoryview, pos: int, end: int) -> int:
    """Where the packet starting at ``buf[pos]`` ends, or -1 when ``buf[:end]`` does not
    hold all of it yet. Raises :class:`MalformedPacket`."""
    if end - pos < 2:
        return -1
    length, i = decode_length(buf, pos + 1, end)
    if length < 0 or end - i < length:
        return -1
    return i + length


def split_packets(data: bytes, pos: int = 0) -> tuple[list[Packet], int]:
    """The complete packets in ``data[pos:]``, in order, and where the incomplete rest
    begins (``len(data)`` when nothing is left over).

    Raises :class:`MalformedPacket` when a fixed header is not MQTT; the packets
    before it are lost with the connection the caller then closes.
    """
    end = len(data)
    packets: list[Packet] = []
    append = packets.append
    while end - pos >= 2:
        length, i = decode_length(data, pos + 1, end)
        if length < 0 or end - i < length:
            break
        append((data[pos], i, i + length))
        pos = i + length
    return packets, pos


def pubacks(mids: list[int]) -> bytes:
    """The PUBACK packets (``40 02 <id>``) of ``mids``, in order, as one buffer.

    Built with a handful of bulk operations rather than one small object per
    message.
    """
    n = len(mids)
    ids = array.array("H", mids)
    if _LITTLE_ENDIAN:
        ids.byteswap()
    raw = ids.tobytes()
    out = bytearray(4 * n)
    out[0::4] = b"\x40" * n
    out[1::4] = b"\x02" * n
    out[2::4] = raw[0::2]
    out[3::4] = raw[1::2]
    return bytes(out)


def puback_ids(data: bytes) -> array.array[int] | None:
    """The packet ids of ``data`` if it is nothing but whole PUBACKs (``40 02 <id>`` each),
    in order; None otherwise (then split it with :func:`split_packets`).

    Checked and read with strided operations in C, not packet by packet: under
    load a publisher's reads are exactly this.
    """
    size = len(data)
    count = size >> 2
    if size & 3 or data[0::4].count(0x40) != count or data[1::4].count(0x02) != count:
        return None
    ids = array.array("H", data)
    if _LITTLE_ENDIAN:
        ids.byteswap()
    return ids[1::2]
