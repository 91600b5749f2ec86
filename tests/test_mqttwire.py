"""MQTT's wire format as f2pipe writes and reads it itself (f2pipe.runtime.mqttwire)."""

from __future__ import annotations

import mqtt5
import pytest
from hypothesis import given
from hypothesis import strategies as st

from f2pipe.runtime.mqttwire import (
    LENGTH_MAX,
    MalformedPacket,
    decode_length,
    encode_length,
    packet_end,
    puback_ids,
    pubacks,
    split_packets,
)

mids = st.lists(st.integers(1, 65535), max_size=300)


@given(st.integers(0, LENGTH_MAX))
def test_remaining_length_round_trip(n: int) -> None:
    raw = encode_length(n)
    assert len(raw) == 1 + (n > 127) + (n > 16383) + (n > 2097151)
    assert decode_length(raw, 0, len(raw)) == (n, len(raw))
    # Cut anywhere inside, it asks for more bytes.
    for cut in range(len(raw)):
        assert decode_length(raw, 0, cut)[0] == -1


def test_remaining_length_of_five_bytes_is_malformed() -> None:
    with pytest.raises(MalformedPacket):
        decode_length(b"\xff\xff\xff\xff\x01", 0, 5)
    with pytest.raises(ValueError, match="variable byte"):
        encode_length(LENGTH_MAX + 1)


packets = st.lists(
    st.tuples(st.integers(1, 15).map(lambda kind: kind << 4), st.binary(max_size=300)),
    max_size=20,
)


@given(packets, st.lists(st.integers(1, 400), max_size=30))
def test_split_packets_on_any_chunking(parts: list[tuple[int, bytes]], cuts: list[int]) -> None:
    """However a stream is cut into reads, the packets come out whole and in order."""
    stream = b"".join(bytes((first,)) + encode_length(len(body)) + body for first, body in parts)
    got: list[tuple[int, bytes]] = []
    rest = b""
    pos = 0
    for size in [*cuts, len(stream)]:
        data = rest + stream[pos : pos + size]
        pos += size
        found, stop = split_packets(data)
        got += [(first, data[start:end]) for first, start, end in found]
        assert stop == len(data) or packet_end(data, stop, len(data)) == -1
        rest = data[stop:]
    assert got == parts
    assert rest == b""


@given(mids)
def test_pubacks_are_what_the_codec_writes(ids: list[int]) -> None:
    assert pubacks(ids) == b"".join(mqtt5.PubAckPacket(mid).write() for mid in ids)


def test_pubacks_are_built_in_order() -> None:
    assert pubacks([1, 0x1234, 65535]) == bytes.fromhex("40020001 40021234 4002ffff")
    assert pubacks([]) == b""


@given(mids)
def test_puback_ids_reads_back_what_pubacks_wrote(ids: list[int]) -> None:
    found = puback_ids(pubacks(ids))
    assert found is not None
    assert list(found) == ids


def test_puback_ids_refuses_anything_else() -> None:
    assert puback_ids(pubacks([7]) + b"\xd0\x00") is None  # a PINGRESP after it
    assert puback_ids(b"\x20\x02\x00\x00") is None  # a CONNACK
    assert puback_ids(pubacks([7])[:3]) is None  # incomplete
