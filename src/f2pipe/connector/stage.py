"""The connector's pure stage: one MQTT message in, one Kafka record out (SPEC sections 4, 7).

Each message becomes a record keyed by the MAC of its topic, its value the
payload bytes unchanged, with the headers ``mqtt.topic``, ``mqtt.qos``,
``mqtt.retain`` (``0``/``1``) and ``ingest.ts`` (receive time, epoch ms). A
topic that is not an F2 status or telemetry topic, or a payload over the
limit, becomes a dead letter instead (``invalid_topic`` before
``payload_too_large``). No client, no clock: the runner passes the receive time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from f2pipe.core.deadletter import Rejected, dead_letter_headers
from f2pipe.core.reasons import Reason
from f2pipe.core.records import (
    INGEST_HEADER,
    QOS_HEADER,
    RETAIN_HEADER,
    TOPIC_HEADER,
    Header,
    Headers,
)
from f2pipe.core.topics import parse_topic

__all__ = [
    "STAGE",
    "Incoming",
    "Record",
    "RecordBuilder",
    "classify",
    "topic_mac",
]

STAGE: Final = "connector"
_PIPELINE_TYPES: Final = frozenset({"stat", "tele"})

Record = tuple[str, bytes, bytes | None, Headers]
"""What the connector produces: ``(Kafka topic, value, key, headers)``."""

_QOS: Final[tuple[Header, ...]] = tuple((QOS_HEADER, qos) for qos in (b"0", b"1", b"2"))
_RETAIN: Final[tuple[Header, ...]] = ((RETAIN_HEADER, b"0"), (RETAIN_HEADER, b"1"))
# Topics seen, with their MAC and header: bounded so topics made up by a misbehaving
# client cannot grow it without limit (it is emptied and refilled when full).
TOPIC_CACHE_SIZE: Final = 100_000


class Incoming(Protocol):
    """One PUBLISH as the MQTT codec decoded it (``mqtt5.PublishPacket`` has this shape)."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def qos(self) -> int: ...
    @property
    def packet_id(self) -> int | None: ...
    @property
    def duplicate(self) -> bool: ...
    @property
    def retain(self) -> bool: ...


def topic_mac(topic: str | bytes) -> bytes | None:
    """The device MAC (ASCII bytes) of an F2 status or telemetry topic, or None.

    The grammar is :func:`f2pipe.core.topics.parse_topic` (SPEC section 1); a
    command topic is valid F2 but not pipeline input, so it is None here too.
    """
    text = topic.decode("utf-8", "replace") if isinstance(topic, bytes) else topic
    parsed = parse_topic(text)
    if parsed is None or parsed.type not in _PIPELINE_TYPES:
        return None
    return parsed.mac.encode()


def classify(
    topic: str | bytes, payload_size: int, max_payload_bytes: int
) -> tuple[bytes | None, Reason | None]:
    """Decide one message: ``(mac, None)`` to produce it raw, ``(mac?, reason)`` to dead-letter it.

    The precedence of SPEC section 7 holds (``invalid_topic`` before
    ``payload_too_large``).
    """
    mac = topic_mac(topic)
    if mac is None:
        return None, Reason.INVALID_TOPIC
    if payload_size > max_payload_bytes:
        return mac, Reason.PAYLOAD_TOO_LARGE
    return mac, None


class RecordBuilder:
    """Turns the messages of one read into records, and their packet ids into acks to send.

    The common case (a topic seen before, QoS 1, neither retained nor
    redelivered, a payload within the limit) costs one dictionary lookup and
    one small list per message; anything else takes :meth:`_general`.
    """

    def __init__(self, raw_topic: str, dead_letter_topic: str, max_payload_bytes: int) -> None:
        self.raw_topic = raw_topic
        self.dead_letter_topic = dead_letter_topic
        self.max_payload_bytes = max_payload_bytes
        # MQTT topic -> (MAC, its mqtt.topic header)
        self.topics: dict[str, tuple[bytes, Header]] = {}

    def add(
        self,
        batch: Sequence[Incoming],
        ingest_ms: int,
        records: list[Record],
        acks: list[int],
    ) -> tuple[int, list[tuple[Rejected, str]]]:
        """Append the records of ``batch`` to ``records`` and the ids of its QoS 1 messages
        to ``acks``, both in arrival order; ``ingest_ms`` is the receive time.

        Returns how many messages were flagged DUP (redelivered) and the dead
        letters among the records, each as its rejection and MQTT topic.
        """
        ingest: Header = (INGEST_HEADER, b"%d" % ingest_ms)
        append, ack = records.append, acks.append
        topics = self.topics
        raw = self.raw_topic
        limit = self.max_payload_bytes
        qos1, retain0 = _QOS[1], _RETAIN[0]
        redelivered = 0
        rejected: list[tuple[Rejected, str]] = []
        for message in batch:
            known = topics.get(message.topic)
            payload = message.payload
            # The common case inline: a known F2 topic, QoS 1, not a retained message or a
            # redelivery, a payload within the limit; anything else takes the long way.
            if (
                known is not None
                and message.qos == 1
                and not (message.duplicate or message.retain)
                and len(payload) <= limit
            ):
                append((raw, payload, known[0], [known[1], qos1, retain0, ingest]))
                ack(message.packet_id)  # type: ignore[arg-type]  # QoS 1 always has one
                continue
            if message.duplicate:
                redelivered += 1
            if message.qos and message.packet_id is not None:
                ack(message.packet_id)
            record, why = self._general(message, ingest, ingest_ms)
            append(record)
            if why is not None:
                rejected.append((why, message.topic))
        return redelivered, rejected

    def _general(
        self, message: Incoming, ingest: Header, ingest_ms: int
    ) -> tuple[Record, Rejected | None]:
        """Any topic, QoS, flag or size: the record, and its rejection if it is a dead letter."""
        topic, payload = message.topic, message.payload
        wire_topic = topic.encode()
        mac, reason = classify(topic, len(payload), self.max_payload_bytes)
        headers: Headers = [
            (TOPIC_HEADER, wire_topic),
            _QOS[int(message.qos)],
            _RETAIN[message.retain],
            ingest,
        ]
        if mac is not None:
            if len(self.topics) >= TOPIC_CACHE_SIZE:
                self.topics.clear()
            self.topics[topic] = (mac, headers[0])
        if reason is None:
            return (self.raw_topic, payload, mac, headers), None
        detail = (
            f"{len(payload)} bytes > {self.max_payload_bytes}"
            if reason is Reason.PAYLOAD_TOO_LARGE
            else "not an F2 status or telemetry topic"
        )
        rejected = Rejected(reason, detail)
        headers = dead_letter_headers(headers, STAGE, rejected, b"mqtt/" + wire_topic, ingest_ms)
        return (self.dead_letter_topic, payload, mac, headers), rejected
