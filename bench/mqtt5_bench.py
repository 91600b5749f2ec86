"""MQTT codec micro-benchmark: the ``mqtt5`` codec against hand-written bulk code, per message.

What the connector and the simulator do with MQTT bytes, without a network,
so only the codec work is measured (CPU time of this process, best of
``--repeat`` runs, with the garbage-collector setting the services run with):

1. ``receive``: N MQTT 5 QoS 1 PUBLISH packets, as a broker sends them, read
   in 256 KiB chunks and turned into Kafka records, rounds of 10,000 at a time
   (the connector's receive path):
   - ``hand_split``: the hand-written splitter the connector had before
     ``mqtt5`` and the record building it had inline (kept here as the
     reference);
   - ``mqtt5``: :class:`f2pipe.connector.client.MqttClient` decoding with
     ``mqtt5.read`` and :class:`f2pipe.connector.stage.RecordBuilder` building
     the records, exactly as the connector runs them.
2. ``puback``: N PUBACKs into one buffer: :func:`f2pipe.runtime.mqttwire.pubacks`
   (bulk) against ``mqtt5.PubAckPacket(...).write()`` per message.
3. ``publish``: N QoS 1 PUBLISH packets encoded (the simulator's send path):
   the simulator's MQTT 3.1.1 encoding (cached fixed header + topic + packet id
   + payload appended to one buffer) against ``mqtt5.PublishPacket(...).write()``
   (MQTT 5 only: ``mqtt5`` cannot write 3.1.1, which the devices speak).

Usage: ``.venv/bin/python bench/mqtt5_bench.py [--count N] [--repeat R] [--json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import mqtt5

from f2pipe.connector.client import MqttClient
from f2pipe.connector.stage import Record, RecordBuilder
from f2pipe.core.records import Header
from f2pipe.runtime.gctune import quiet_gc
from f2pipe.runtime.mqttwire import decode_length, encode_length, pubacks

READ = 256 * 1024  # what the connector asks of one recv
ROUND = 10_000  # the default Receive Maximum: records held at most, then acknowledged
TOPIC = "tele/f2-02f200000001/sensor-mode/J1/sensor-1"
# About the size of a simulated telemetry message.
PAYLOAD = (
    b'{"timestamp":"2026-01-01T00:00:00.123456Z","data":"010304000a0014abcd","x":'
    + b"1" * 80
    + b"}"
)


def publish_buffer(count: int) -> bytes:
    return b"".join(
        mqtt5.PublishPacket(
            TOPIC, PAYLOAD, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=i % 65535 + 1
        ).write()
        for i in range(count)
    )


def hand_split(buf: bytes, batch: list[tuple[bytes, bytes, int, int]]) -> int:
    """The connector's splitter before ``mqtt5`` (the reference): the PUBLISH packets of
    ``buf`` appended to ``batch`` as ``(topic, payload, first byte, packet id)``; returns
    where the incomplete rest begins."""
    pos, end = 0, len(buf)
    append = batch.append
    while end - pos >= 2:
        command = buf[pos]
        length = buf[pos + 1]
        i = pos + 2
        if length & 0x80:
            if end - pos < 3 or buf[pos + 2] & 0x80:
                length, i = decode_length(buf, pos + 1, end)
            else:
                length = (length & 0x7F) | (buf[pos + 2] << 7)
                i = pos + 3
        if length < 0 or end - i < length:
            break
        body_end = i + length
        pos = body_end
        if command & 0xF0 == 0x30 and command & 0x06 != 0x04:
            topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
            if command & 0x06:
                mid = (buf[topic_end] << 8) | buf[topic_end + 1]
                j = topic_end + 2
            else:
                mid, j = 0, topic_end
            plen = buf[j]
            if plen & 0x80:
                plen, j = decode_length(buf, j, body_end)
            else:
                j += 1
            append((buf[i + 2 : topic_end], buf[j + plen : body_end], command, mid))
    return pos


def receive_hand(buf: bytes) -> int:
    """Split by hand, then the common-case record building the connector had inline."""
    topics: dict[bytes, tuple[bytes, Header]] = {
        TOPIC.encode(): (b"02f200000001", ("mqtt.topic", TOPIC.encode()))
    }
    ingest: Header = ("ingest.ts", b"%d" % (time.time_ns() // 1_000_000))
    qos1: Header = ("mqtt.qos", b"1")
    retain0: Header = ("mqtt.retain", b"0")
    records: list[Record] = []
    acks: list[int] = []
    done = 0
    rest = b""
    for start in range(0, len(buf), READ):
        chunk = rest + buf[start : start + READ]
        batch: list[tuple[bytes, bytes, int, int]] = []
        rest = chunk[hand_split(chunk, batch) :]
        for topic, payload, command, mid in batch:
            known = topics.get(topic)
            if known is not None and command == 0x32 and len(payload) <= 65536:
                records.append(("raw", payload, known[0], [known[1], qos1, retain0, ingest]))
                acks.append(mid)
        if len(records) >= ROUND:  # a round acknowledged: its records go
            done += len(records)
            records.clear()
            acks.clear()
    return done + len(records)


def receive_mqtt5(buf: bytes) -> int:
    """The connector's receive path as it runs: MqttClient decoding with ``mqtt5.read``
    and the stage's record building."""
    stage = RecordBuilder("raw", "dlq", 65536)
    stage.topics[TOPIC] = (b"02f200000001", ("mqtt.topic", TOPIC.encode()))
    records: list[Record] = []
    acks: list[int] = []

    def handler(batch: list[mqtt5.PublishPacket]) -> None:
        stage.add(batch, time.time_ns() // 1_000_000, records, acks)

    client = MqttClient(
        "bench",
        ssl_context=None,
        keepalive=60,
        session_expiry=0,
        receive_maximum=65535,
        publish_handler=handler,
        on_connect=lambda _present, _refusal: None,
        on_subscribe=lambda _refusals: None,
        on_disconnect=lambda _reason: None,
    )
    done = 0
    for start in range(0, len(buf), READ):
        client.feed(buf[start : start + READ], ROUND)
        if len(records) >= ROUND:  # a round acknowledged: its records go
            done += len(records)
            records.clear()
            acks.clear()
    return done + len(records)


def puback_mqtt5(mids: list[int]) -> bytes:
    write = mqtt5.PubAckPacket
    return b"".join([write(mid).write() for mid in mids])


def publish_hand(count: int) -> bytes:
    """The simulator's encoding: MQTT 3.1.1, fixed header cached per length."""
    wire = len(TOPIC.encode()).to_bytes(2, "big") + TOPIC.encode()
    heads: dict[tuple[int, int], bytes] = {}
    out = bytearray()
    for k in range(count):
        length = len(wire) + 2 + len(PAYLOAD)
        head = heads.get((0x32, length))
        if head is None:
            head = heads[(0x32, length)] = b"\x32" + encode_length(length)
        out += head
        out += wire
        out += (k % 65535 + 1).to_bytes(2, "big")
        out += PAYLOAD
    return bytes(out)


def publish_mqtt5(count: int) -> bytes:
    out = bytearray()
    packet = mqtt5.PublishPacket
    qos = mqtt5.QoS.AT_LEAST_ONCE
    for k in range(count):
        out += packet(TOPIC, PAYLOAD, qos=qos, packet_id=k % 65535 + 1).write()
    return bytes(out)


def best(repeat: int, fn: Callable[..., Any], *args: Any) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn(*args)
        times.append(time.process_time() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200_000, help="packets per run")
    parser.add_argument("--repeat", type=int, default=7, help="runs; the best counts")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    quiet_gc(50_000)  # as `f2pipe connector` and `f2pipe simulate` run
    n = args.count
    buf = publish_buffer(n)
    mids = [i % 65535 + 1 for i in range(n)]
    assert receive_hand(buf) == receive_mqtt5(buf) == n
    assert pubacks(mids[:1000]) == puback_mqtt5(mids[:1000])

    cases = {
        "receive": {
            "hand_split": best(args.repeat, receive_hand, buf),
            "mqtt5": best(args.repeat, receive_mqtt5, buf),
        },
        "puback": {
            "hand_bulk": best(args.repeat, pubacks, mids),
            "mqtt5": best(args.repeat, puback_mqtt5, mids),
        },
        "publish": {
            "hand_mqtt311": best(args.repeat, publish_hand, n),
            "mqtt5_v5": best(args.repeat, publish_mqtt5, n),
        },
    }
    results = {
        case: {
            way: {"us_per_msg": round(seconds / n * 1e6, 3), "msgs_per_s": round(n / seconds)}
            for way, seconds in ways.items()
        }
        for case, ways in cases.items()
    }
    report = {
        "benchmark": "mqtt5 codec",
        "packets": n,
        "packet_bytes": len(buf) // n,
        "results": results,
        "versions": {"python": sys.version.split()[0], "mqtt5": metadata.version("mqtt5")},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for case, ways in results.items():
            for way, numbers in ways.items():
                print(
                    f"{case:8} {way:13} {numbers['us_per_msg']:7.3f} us/msg "
                    f"{numbers['msgs_per_s']:>11,} msgs/s"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
