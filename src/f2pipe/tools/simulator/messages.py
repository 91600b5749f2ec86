"""What a simulated device publishes: messages, injected faults, timestamps, the ledger.

A :class:`Message` is one PUBLISH and the readings the pipeline must make of
it; :meth:`Message.ledger_line` is its line in the load mode's ledger, the
ground truth tests compare the pipeline against. A :class:`Summary` counts what
a run published and what the broker acknowledged.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from f2pipe.runtime.mqttwire import mqtt_string

if TYPE_CHECKING:
    from f2pipe.tools.simulator.fleet import Sensor

__all__ = ["FAULTS", "Message", "Summary", "format_timestamp", "make_message"]


FAULTS = ("bad_crc", "bad_json", "unknown_mac", "duplicate", "clock_skew")


@dataclasses.dataclass(slots=True, eq=False)  # by identity: cheap lookups as PUBACKs arrive
class Message:
    """One PUBLISH of a simulated device and what the pipeline must make of it.

    ``values`` (with ``labels``) are the readings the frame encodes; both are
    empty for a fault that makes the message a dead letter.
    """

    topic: str
    payload: bytes
    timestamp: str
    values: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()
    fault: str | None = None
    client: str = ""  # MAC of the connection it is published on
    wire_topic: bytes = b""  # the topic as an MQTT string field; derived when empty

    def __post_init__(self) -> None:
        if not self.wire_topic:
            self.wire_topic = mqtt_string(self.topic)

    @property
    def readings(self) -> list[dict[str, Any]]:
        """``[{"label", "value"}]``: what the pipeline must produce from this message."""
        return [
            {"label": label, "value": value}
            for label, value in zip(self.labels, self.values, strict=True)
        ]

    def ledger_line(self) -> str:
        """The message as one line of the ledger (JSON, newline-terminated)."""
        return (
            json.dumps(
                {
                    "topic": self.topic,
                    "timestamp": self.timestamp,
                    "payload": self.payload.decode(),
                    "readings": self.readings,
                    "fault": self.fault,
                }
            )
            + "\n"
        )


@dataclasses.dataclass
class Summary:
    """What a run published and what the broker acknowledged."""

    published: int = 0
    acknowledged: int = 0
    elapsed: float = 0.0
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    reconnects: int = 0  # connections reopened after a loss
    republished: int = 0  # unacknowledged messages sent again (DUP) after a reconnect

    @property
    def rate(self) -> float:
        return self.acknowledged / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "acknowledged": self.acknowledged,
            "elapsed_s": round(self.elapsed, 3),
            "rate_per_s": round(self.rate, 1),
            "faults": self.faults,
            "reconnects": self.reconnects,
            "republished": self.republished,
        }


def format_timestamp(ts: datetime) -> str:
    """``YYYY-MM-DD HH:MM:SS.ffffff``: the controller's format (SPEC section 1)."""
    return ts.isoformat(" ", "microseconds")


_second_cache: list[Any] = [None, b""]  # [epoch second, its "YYYY-MM-DD HH:MM:SS"]


def _stamp(us: int) -> bytes:
    """``us`` (microseconds since the epoch) in the controller's format, as UTC wall time.

    Only the fraction changes within a second, so the date and time part is
    formatted once per second (this runs for every message).
    """
    second, fraction = divmod(us, 1_000_000)
    if _second_cache[0] != second:
        _second_cache[0] = second
        _second_cache[1] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second)).encode()
    return b"%s.%06d" % (_second_cache[1], fraction)


_SKEW_US = 48 * 3600 * 1_000_000


def make_message(sensor: Sensor, rng: random.Random, fault: str | None) -> Message:
    """One telemetry message of ``sensor`` stamped now, with ``fault`` injected when given.

    ``readings`` are what the pipeline must produce; they are empty for a fault
    that makes the message a dead letter (``duplicate`` keeps them: the copy
    must not create second readings; ``clock_skew`` puts the timestamp 48 h
    ahead, which is ``timestamp_out_of_range``).
    """
    frame, values = sensor.step(rng)
    us = sensor.next_timestamp_us(time.time_ns() // 1000)
    if fault is None or fault == "duplicate":
        stamp = _stamp(us)
        payload = b'{"timestamp": "%s", "data": "%s"}' % (stamp, frame.hex(" ").upper().encode())
        return Message(
            sensor.topic, payload, stamp.decode(), values, sensor.labels, fault, sensor.mac,
            sensor.wire_topic,
        )  # fmt: skip
    topic, wire_topic = sensor.topic, sensor.wire_topic
    if fault == "bad_crc":
        frame = frame[:-1] + bytes((frame[-1] ^ 0xFF,))
    elif fault == "clock_skew":
        us += _SKEW_US
    elif fault == "unknown_mac":
        topic = f"tele/f2-ffffff{rng.randrange(16**6):06x}/sensor-mode/J1/sensor-1"
        wire_topic = b""
    stamp = _stamp(us)
    body = b'{"timestamp": "%s", "data": "%s"' % (stamp, frame.hex(" ").upper().encode())
    payload = body if fault == "bad_json" else body + b"}"
    return Message(topic, payload, stamp.decode(), (), (), fault, sensor.mac, wire_topic)
