"""The one piece of MQTT's wire format f2pipe handles itself: the Remaining Length.

The connector's receive path and the simulator's lean client split packets out
of bulk reads themselves (paho's per-packet path costs several times more CPU);
both use these two functions for the variable-length integer of MQTT 3.1.1 and
5 (section 1.5.5 of the v5 specification): up to four 7-bit groups, least
significant first, the high bit meaning "more follows".
"""

from __future__ import annotations

__all__ = ["decode_length", "encode_length"]


def encode_length(n: int) -> bytes:
    """The variable-byte encoding of ``n`` (0 .. 268,435,455)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_length(buf: bytes | bytearray, i: int, end: int) -> tuple[int, int]:
    """Decode the integer starting at ``buf[i]``; return (value, index after it).

    Returns (-1, i) when ``buf[:end]`` ends inside the integer (wait for more
    bytes). Raises ValueError for a malformed one (more than four bytes).
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
            raise ValueError("malformed MQTT variable byte integer")
    return -1, i
