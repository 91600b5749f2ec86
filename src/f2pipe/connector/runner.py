"""MQTT -> Kafka connector: every acknowledged device message ends up in ``raw-iot-data``.

Contract (SPEC sections 4 and 7):

- MQTT v5, persistent session (clean start off, session expiry configurable),
  client id = the connector's identity, QoS 1 subscriptions to ``stat/+/+/+/+``
  and ``tele/+/+/+/+`` (through ``$share/<group>/`` when a share group is set).
- Each message becomes one Kafka record: key = the MAC from the topic, value =
  the payload bytes unchanged, headers ``mqtt.topic``, ``mqtt.qos``,
  ``mqtt.retain`` (``0``/``1``) and ``ingest.ts`` (receive time, epoch ms).
  A topic that is not an F2 topic, or a payload over ``max_payload_bytes``,
  becomes a dead letter (``invalid_topic`` / ``payload_too_large``) instead.
- The MQTT PUBACK of a message is sent only once Kafka acknowledged its
  record (idempotent producer, ``acks=all``), in the order the messages
  arrived. A crash therefore loses nothing: whatever Kafka has not
  acknowledged was not acknowledged to the broker either, and the persistent
  session redelivers it (duplicates in Kafka are possible, losses are not).
- Records go to Kafka in rounds: what arrived while the previous round was
  with Kafka is produced together, and the round's PUBACKs go out once the
  producer holds nothing any more (``len(producer) == 0``: every record
  acknowledged, and no failure report waiting). Only failures produce a
  delivery report (``delivery.report.only.error``); a failed record is
  produced again and its round waits for it. Tying each PUBACK to a
  per-record report instead cost more CPU than the rest of the connector.
- In-flight messages are bounded twice: the broker may not send more than the
  Receive Maximum unacknowledged QoS 1 messages, and the connector stops
  reading its socket while ``receive_maximum`` messages wait for Kafka.

Threading: one thread owns both clients. It drives paho's socket itself
(``loop_read``/``loop_write``/``loop_misc`` around ``select``) and calls
``producer.poll``, so PUBACKs are written by the thread that owns the MQTT
connection; paho is never touched from librdkafka's threads. Signal handlers
only set a flag.
"""

from __future__ import annotations

import argparse
import array
import bisect
import logging
import select
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from f2pipe.core.reasons import Reason
from f2pipe.core.topics import parse_topic
from f2pipe.runtime import tls
from f2pipe.runtime.backoff import Backoff
from f2pipe.runtime.gctune import quiet_gc
from f2pipe.runtime.kafka import producer_config
from f2pipe.runtime.logs import setup_logging
from f2pipe.runtime.metrics import DEAD_LETTERS
from f2pipe.runtime.mqttwire import decode_length
from f2pipe.runtime.opsserver import OpsServer
from f2pipe.settings import Settings, get_settings

log = logging.getLogger("f2pipe.connector.runner")

SUBSCRIPTIONS = ("stat/+/+/+/+", "tele/+/+/+/+")
_QOS = (b"0", b"1", b"2")

# --- metrics (one place; every name with its meaning) ---
# Dead letters are counted in the family all stages share, f2pipe_dead_letters_total
# {stage="connector", reason=...}; the connector's reasons are exported at 0 from the
# start, for alerting.
for _reason in (Reason.INVALID_TOPIC, Reason.PAYLOAD_TOO_LARGE):
    DEAD_LETTERS.labels(stage="connector", reason=_reason.value)
DELIVERY_ERRORS = Counter(
    "f2pipe_connector_delivery_errors", "Kafka delivery reports with an error (record retried)"
)
RECONNECTS = Counter("f2pipe_connector_reconnects", "MQTT connection attempts after a loss")
# Per-message metrics live in _HotMetrics (plain integers, exported at scrape time):
HOT_METRICS = {
    "f2pipe_connector_received": "MQTT messages received from the broker",
    "f2pipe_connector_redelivered": "received messages flagged DUP (redelivered by the broker)",
    "f2pipe_connector_produced": "records Kafka acknowledged (raw + dead letters)",
    "f2pipe_connector_acked": "MQTT PUBACKs sent after Kafka acknowledged the record",
    "f2pipe_connector_in_flight": "messages received and not yet acknowledged (gauge)",
    "f2pipe_connector_produce_seconds": "time from MQTT receipt to Kafka acknowledgement",
}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


_active_stats: list[Collector] = []


def _register(stats: Collector) -> None:
    """Export ``stats``, replacing an earlier connector's in this process (one per process
    in production; tests may build several)."""
    while _active_stats:
        REGISTRY.unregister(_active_stats.pop())
    REGISTRY.register(stats)
    _active_stats.append(stats)


class _HotMetrics(Collector):
    """Per-message counters as plain integers, exported when Prometheus scrapes.

    A prometheus_client metric takes a lock on every update; at tens of
    thousands of messages per second, five of them per message cost more than
    the rest of the receive path. Only the loop thread writes these fields;
    the scrape thread reads them (an int read is atomic under the GIL).
    """

    def __init__(self, in_flight: Callable[[], int]) -> None:
        self.received = 0
        self.redelivered = 0
        self.produced = 0
        self.acked = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self._in_flight = in_flight

    def observe_latency(self, seconds: float, count: int = 1) -> None:
        """``count`` messages took ``seconds`` each."""
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += count
        self.latency_sum += seconds * count

    def collect(self) -> Iterator[Metric]:
        doc = HOT_METRICS
        for field_name in ("received", "redelivered", "produced", "acked"):
            name = f"f2pipe_connector_{field_name}"
            yield CounterMetricFamily(name, doc[name], value=getattr(self, field_name))
        name = "f2pipe_connector_in_flight"
        yield GaugeMetricFamily(name, doc[name], value=self._in_flight())
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.latency_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        name = "f2pipe_connector_produce_seconds"
        yield HistogramMetricFamily(name, doc[name], buckets=buckets, sum_value=self.latency_sum)


_PIPELINE_TYPES = frozenset({"stat", "tele"})


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

    Pure; the precedence of SPEC section 7 holds (``invalid_topic`` before
    ``payload_too_large``).
    """
    mac = topic_mac(topic)
    if mac is None:
        return None, Reason.INVALID_TOPIC
    if payload_size > max_payload_bytes:
        return mac, Reason.PAYLOAD_TOO_LARGE
    return mac, None


Publish = tuple[bytes, bytes, int, int]
"""One incoming PUBLISH: ``(topic, payload, first byte of the fixed header, packet id)``.

The first byte holds the flags: QoS ``(byte >> 1) & 3``, DUP ``byte & 0x08``,
RETAIN ``byte & 0x01``; the packet id is 0 for QoS 0.
"""
PublishHandler = Callable[[list[Publish]], None]
"""Takes the PUBLISH packets of one read, in the order the broker sent them."""

_LITTLE_ENDIAN = sys.byteorder == "little"


def pubacks(mids: list[int]) -> bytes:
    """The PUBACK packets (``40 02 <id>``) of ``mids``, in order, as one buffer.

    Built with a handful of bulk operations rather than one small object per
    message: the connector acknowledges thousands of messages at a time.
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


class _LeanClient(mqtt.Client):
    """paho's client with a lean receive path for incoming PUBLISH packets.

    paho reads each packet with three or more ``recv`` calls and builds an
    ``MQTTMessage`` plus an MQTT v5 ``Properties`` object for every PUBLISH;
    at tens of thousands of messages per second that bookkeeping, not the
    network, is the ceiling. This subclass reads up to 256 KiB per ``recv``,
    splits complete packets out of that buffer itself, and hands the QoS 0/1
    PUBLISH packets of each read to ``publish_handler`` in one call (their
    properties are skipped: the connector asks for no topic aliases, so none
    carries state it needs). Every other packet (CONNACK, SUBACK, PINGRESP,
    DISCONNECT, ...) goes through paho's own handler, so session state,
    callbacks and keepalive stay paho's. Outgoing packets, paho's and
    :meth:`ack_many`'s, are gathered in one buffer that :meth:`flush_output`
    writes in one call.

    Relies on paho 2.x internals (``_in_packet``, ``_packet_handle``,
    ``_sock_send``, ``_loop_rc_handle``); the dependency range pins 2.x.
    """

    _READ_SIZE = 256 * 1024
    _READS_PER_PASS = 256

    def __init__(self, *args: Any, publish_handler: PublishHandler, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.publish_handler = publish_handler
        self._rbuf = bytearray()
        self._rpos = 0
        self._wbuf = bytearray()
        self.backlog = False  # complete packets may be waiting in the buffer or TLS layer

    # --- input ---

    def read_packets(self, limit: int) -> bool:
        """Receive what the socket has and handle up to ``limit`` packets.

        Returns False when the connection was lost (paho has then closed it
        and called ``on_disconnect``). Never blocks.
        """
        sock = self._sock
        if sock is None:
            return False
        if self._rpos:
            del self._rbuf[: self._rpos]
            self._rpos = 0
        # Over TLS one recv returns one record, and brokers often send one packet per
        # record: gather several before handling, so one pass (and one write of the
        # PUBACKs it produces) covers many messages.
        recv = sock.recv
        size = self._READ_SIZE
        for _ in range(self._READS_PER_PASS):
            try:
                data = recv(size)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError:
                self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
                return False
            if not data:
                self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
                return False
            self._rbuf += data
            if len(self._rbuf) >= size:
                break
        return self._handle_buffered(limit)

    def _handle_buffered(self, limit: int) -> bool:
        rbuf = self._rbuf
        # bytes, not the bytearray: slices of it are the payloads, copied once.
        buf = bytes(rbuf)
        pos = self._rpos
        end = len(buf)
        handled = 0
        batch: list[Publish] = []
        append = batch.append
        self.backlog = False
        while end - pos >= 2:
            if handled >= limit:
                self.backlog = True
                break
            command = buf[pos]
            # Remaining Length: one or two bytes inline (every packet under 16 KiB).
            length = buf[pos + 1]
            i = pos + 2
            if length & 0x80:
                if end - pos < 3 or buf[pos + 2] & 0x80:
                    try:
                        length, i = decode_length(buf, pos + 1, end)
                    except ValueError:
                        self._rpos = end
                        self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)
                        return False
                else:
                    length = (length & 0x7F) | (buf[pos + 2] << 7)
                    i = pos + 3
            if length < 0 or end - i < length:
                break  # incomplete: wait for more bytes
            body_end = i + length
            pos = body_end
            handled += 1
            if command & 0xF0 == 0x30 and command & 0x06 != 0x04:
                topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
                if command & 0x06:
                    mid = (buf[topic_end] << 8) | buf[topic_end + 1]
                    j = topic_end + 2
                else:
                    mid = 0
                    j = topic_end
                # MQTT v5 property length (variable byte integer), then the properties.
                plen = buf[j]
                if plen & 0x80:
                    plen, j = decode_length(buf, j, body_end)
                else:
                    j += 1
                append((buf[i + 2 : topic_end], buf[j + plen : body_end], command, mid))
                continue
            if batch:
                self.publish_handler(batch)
                batch = []
                append = batch.append
            self._rpos = pos
            if not self._paho_handle(command, buf[i:body_end]):
                return False
            if self._sock is None:
                return False
            if self._rbuf is not rbuf:
                return True  # a callback reconnected: what is left was the old connection's
        self._rpos = pos
        if batch:
            self.publish_handler(batch)
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            self.backlog = True
        if handled:
            with self._msgtime_mutex:
                self._last_bytes_received = mqtt.time_func()
        return True

    def _paho_handle(self, command: int, body: bytes) -> bool:
        """Let paho handle one non-PUBLISH packet as if it had read it itself."""
        self._in_packet = {
            "command": command,
            "have_remaining": 1,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": len(body),
            "packet": bytearray(body),
            "to_process": 0,
            "pos": 0,
        }
        try:
            rc = self._packet_handle()
        except MalformedPacket:
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._loop_rc_handle(rc)
            return False
        return True

    # --- output ---

    def ack_many(self, mids: list[int]) -> None:
        """Queue the PUBACKs of the QoS 1 messages ``mids``, in order."""
        if mids and self._sock is not None:
            self._wbuf += pubacks(mids)

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._sock is None:
            raise ConnectionError("not connected")
        self._wbuf += buf
        return len(buf)

    def pending_output(self) -> bool:
        return bool(self._wbuf) or self.want_write()

    def flush_output(self) -> bool:
        """Hand queued packets to the socket; False when the connection failed."""
        if self.loop_write() not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            return False
        sock = self._sock
        if not self._wbuf or sock is None:
            return True
        try:
            sent = sock.send(self._wbuf)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return True
        except OSError:
            return False
        del self._wbuf[:sent]
        return True

    def connection_lost(self) -> None:
        """Treat the connection as lost now (a write failed): paho closes it and reports it."""
        self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)

    def _sock_close(self) -> None:
        super()._sock_close()
        self._rbuf, self._rpos, self._wbuf = bytearray(), 0, bytearray()
        self.backlog = False


Header = tuple[str, str | bytes | None]
Record = tuple[str, bytes, bytes | None, list[Header]]
"""What the connector produces: ``(Kafka topic, value, key, headers)``."""

_QOS_HEADER: tuple[Header, ...] = tuple(("mqtt.qos", qos) for qos in _QOS)
_RETAIN_HEADER: tuple[Header, ...] = (("mqtt.retain", b"0"), ("mqtt.retain", b"1"))
# Topics seen, with their MAC and header: bounded so topics made up by a misbehaving
# client cannot grow it without limit (it is emptied and refilled when full).
_TOPIC_CACHE_SIZE = 100_000


class Connector:
    """Bridges the broker's F2 topics into Kafka; see the module docstring for the contract.

    Messages go to Kafka in rounds: the records gathered since the last round
    are produced together, and only once Kafka acknowledged all of them
    (:meth:`Producer.__len__` back at zero, no error report outstanding) are
    their PUBACKs sent, in arrival order; meanwhile the next round gathers.
    librdkafka then needs no delivery report per record (only failures are
    reported), which is most of the cost of tying each PUBACK to Kafka.

    :meth:`run` blocks until :meth:`stop` (or SIGTERM/SIGINT through
    :func:`main`), then drains: it stops reading, waits for Kafka to acknowledge
    what was produced (up to ``connector_shutdown_timeout``), sends those
    PUBACKs and disconnects, leaving the rest to the persistent session.
    """

    def __init__(
        self,
        settings: Settings,
        ssl_context: ssl.SSLContext | None,
        producer_overrides: dict[str, Any] | None = None,
        *,
        bare: bool = False,
    ) -> None:
        self.settings = settings
        # Benchmark baseline: the same MQTT client and receive path, acknowledging on receipt.
        self.bare = bare
        self.max_in_flight = settings.connector_receive_maximum
        self._stopping = False
        # The round being gathered: records, the packet ids to acknowledge once Kafka has
        # them, and (receive time, messages) per read, for the latency histogram.
        self._next: list[Record] = []
        self._next_acks: list[int] = []
        self._next_reads: list[tuple[float, int]] = []
        # The round with Kafka.
        self._round_size = 0
        self._round_due = 0.0
        self._round_acks: list[int] = []
        self._round_reads: list[tuple[float, int]] = []
        self._retry: list[tuple[float, Record]] = []  # records of the round Kafka refused
        self._topics: dict[bytes, tuple[bytes, Header]] = {}
        self._connected = False
        self._subscribed = False
        self._kafka_up = True
        self._fatal: str | None = None
        self._backoff = Backoff()
        self._next_connect = 0.0
        self._ever_connected = False
        self.stats = _HotMetrics(self.in_flight)
        _register(self.stats)

        extra: dict[str, Any] = {
            # Longer than the shared default: a round's batches are bigger, and Kafka and
            # librdkafka spend less CPU per record (about 6 us at 20 ms, 4 at 50 ms, on
            # loopback with 6 partitions); the Receive Maximum covers the longer round.
            "linger.ms": settings.connector_linger_ms,
            **(producer_overrides or {}),
            "error_cb": self._on_kafka_error,
            "logger": logging.getLogger("f2pipe.connector.runner.kafka"),
            # Success is read from the producer's queue length (see the class docstring);
            # a failed record still gets a report, and is produced again.
            "on_delivery": self._on_delivery_error,
            "delivery.report.only.error": True,
        }
        self.producer = Producer(producer_config(settings, **extra))
        client = _LeanClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.connector_client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
            publish_handler=self._on_bare_publishes if bare else self._on_publishes,
        )
        if ssl_context is not None:
            client.tls_set_context(ssl_context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        # With a write callback registered paho queues packets instead of writing them at
        # once from inside callbacks; this loop writes them in one batch per iteration.
        client.on_socket_register_write = lambda _c, _u, _s: None
        self.client = client

    # --- readiness ---

    def ready(self) -> bool:
        """Connected and subscribed to the broker, and Kafka reachable."""
        return self._connected and self._subscribed and self._kafka_up

    def in_flight(self) -> int:
        """Messages received and not yet acknowledged to the broker (or dropped unacked)."""
        return self._round_size + len(self._next)

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return (safe from a signal handler)."""
        self._stopping = True

    # --- MQTT callbacks (run on the loop thread) ---

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.connector_session_expiry
        props.ReceiveMaximum = self.settings.connector_receive_maximum
        return props

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection", extra={"reason": str(reason)})
            return
        self._connected = True
        self._backoff.reset()
        log.info("connected to broker", extra={"session_present": flags.session_present})
        # Subscribing again is harmless with a present session and needed without one.
        prefix = (
            f"$share/{self.settings.connector_share_group}/"
            if self.settings.connector_share_group
            else ""
        )
        client.subscribe([(prefix + topic, 1) for topic in SUBSCRIPTIONS])

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("subscription refused", extra={"reasons": failed})
            return
        self._subscribed = True
        log.info("subscribed", extra={"topics": list(SUBSCRIPTIONS)})

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        was = self._connected
        self._connected = self._subscribed = False
        # PUBACKs for messages of the lost connection must not be sent on the next one:
        # the broker redelivers them there under the same session. Their records still go
        # to Kafka (a duplicate at worst).
        self._next_acks = []
        self._round_acks = []
        if not self._stopping:
            delay = self._backoff.next_delay()
            self._next_connect = time.monotonic() + delay
            if was:
                log.warning(
                    "lost broker connection",
                    extra={"reason": str(reason), "retry_in": round(delay, 2)},
                )

    def _on_bare_publishes(self, batch: list[Publish]) -> None:
        """Benchmark baseline: count and acknowledge at once."""
        stats = self.stats
        stats.received += len(batch)
        mids = [mid for _topic, _payload, command, mid in batch if command & 0x06]
        stats.redelivered += sum(1 for _t, _p, command, _m in batch if command & 0x08)
        self.client.ack_many(mids)
        stats.acked += len(mids)

    def _on_publishes(self, batch: list[Publish]) -> None:
        """Turn one read's messages into records for the next round (SPEC section 4)."""
        received = time.monotonic()
        ingest: Header = ("ingest.ts", b"%d" % (time.time_ns() // 1_000_000))
        self.stats.received += len(batch)
        self._next_reads.append((received, len(batch)))
        records = self._next
        acks = self._next_acks
        topics = self._topics
        raw = self.settings.topic_raw
        limit = self.settings.max_payload_bytes
        qos1, retain0 = _QOS_HEADER[1], _RETAIN_HEADER[0]
        for topic, payload, command, mid in batch:
            known = topics.get(topic)
            # The common case inline: a known F2 topic, QoS 1, not a retained message or a
            # redelivery, a payload within the limit; anything else takes the long way.
            if known is not None and command == 0x32 and len(payload) <= limit:
                records.append((raw, payload, known[0], [known[1], qos1, retain0, ingest]))
                acks.append(mid)
            else:
                self._record(topic, payload, command, mid, ingest)

    def _record(self, topic: bytes, payload: bytes, command: int, mid: int, ingest: Header) -> None:
        """The general case of :meth:`_on_publishes`: any topic, QoS, flag or size."""
        qos = (command >> 1) & 0x03
        if command & 0x08:
            self.stats.redelivered += 1
        if qos:
            self._next_acks.append(mid)
        mac, reason = classify(topic, len(payload), self.settings.max_payload_bytes)
        headers: list[Header] = [
            ("mqtt.topic", topic),
            _QOS_HEADER[qos],
            _RETAIN_HEADER[command & 0x01],
            ingest,
        ]
        if mac is not None:
            if len(self._topics) >= _TOPIC_CACHE_SIZE:
                self._topics.clear()
            self._topics[topic] = (mac, headers[0])
        if reason is None:
            self._next.append((self.settings.topic_raw, payload, mac, headers))
            return
        detail = (
            f"{len(payload)} bytes > {self.settings.max_payload_bytes}"
            if reason is Reason.PAYLOAD_TOO_LARGE
            else "not an F2 status or telemetry topic"
        )
        headers += [
            ("dlq.stage", b"connector"),
            ("dlq.reason", reason.value.encode()),
            ("dlq.detail", detail.encode()),
            ("dlq.source", b"mqtt/" + topic),
            ("dlq.ts", ingest[1]),
        ]
        self._next.append((self.settings.topic_dead_letter, payload, mac, headers))
        DEAD_LETTERS.labels(stage="connector", reason=reason.value).inc()
        log.info(
            "dead letter",
            extra={"reason": reason.value, "topic": topic[:200].decode(errors="replace")},
        )

    # --- Kafka ---

    def _kafka_step(self) -> None:
        """Serve Kafka's reports; finish the round Kafka has acknowledged; start the next."""
        self.producer.poll(0)
        if self._retry:
            self._retry_due()
        if self._round_size and not self._retry and len(self.producer) == 0:
            self._round_done()
        if not self._round_size and self._next:
            self._start_round()

    def _start_round(self) -> None:
        records, self._next = self._next, []
        self._round_acks, self._next_acks = self._next_acks, []
        self._round_reads, self._next_reads = self._next_reads, []
        self._round_size = len(records)
        # librdkafka holds a partial batch for linger.ms: no acknowledgement before then.
        self._round_due = time.monotonic() + self.settings.connector_linger_ms / 1000
        produce = self.producer.produce
        for topic, value, key, headers in records:
            try:
                produce(topic, value, key, headers=headers)
            except BufferError:
                self._produce_when_room((topic, value, key, headers))

    def _produce_when_room(self, record: Record) -> None:
        # The local queue is full (far above the in-flight bound; only if misconfigured).
        topic, value, key, headers = record
        while True:
            self.producer.poll(0.05)
            try:
                self.producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:
                continue

    def _round_done(self) -> None:
        """Every record of the round is in Kafka: acknowledge its messages to the broker."""
        stats = self.stats
        now = time.monotonic()
        for received, count in self._round_reads:
            stats.observe_latency(now - received, count)
        stats.produced += self._round_size
        acks = self._round_acks
        self.client.ack_many(acks)
        stats.acked += len(acks)
        self._round_size = 0
        self._round_acks, self._round_reads = [], []
        self._kafka_up = True

    def _on_delivery_error(self, err: KafkaError | None, msg: Message) -> None:
        # Only failures are reported (delivery.report.only.error).
        if err is None:
            return
        DELIVERY_ERRORS.inc()
        if err.fatal():
            self._fatal = str(err)
            return
        # Not acknowledged to MQTT; produce again after a pause (the idempotent producer
        # has already retried internally, so this is a longer outage or a missing topic).
        log.warning("kafka delivery failed; retrying", extra={"error": str(err)})
        headers: list[Header] = [(str(item[0]), item[1]) for item in msg.headers() or []]
        record = (msg.topic() or "", msg.value() or b"", msg.key(), headers)
        self._retry.append((time.monotonic() + 1.0, record))

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._kafka_up = False
        if err.fatal():
            self._fatal = str(err)
        log.warning("kafka client error", extra={"error": str(err)})

    def _retry_due(self) -> None:
        now = time.monotonic()
        due = [record for when, record in self._retry if when <= now]
        if due:
            self._retry = [item for item in self._retry if item[0] > now]
            for topic, value, key, headers in due:
                try:
                    self.producer.produce(topic, value, key, headers=headers)
                except BufferError:
                    self._produce_when_room((topic, value, key, headers))

    # --- the loop ---

    def _connect(self) -> None:
        """One connection attempt; on failure schedule the next with backoff."""
        s = self.settings
        try:
            if self._ever_connected:
                RECONNECTS.inc()
                self.client.reconnect()
            else:
                self.client.connect(
                    s.mqtt_host,
                    s.mqtt_port,
                    keepalive=s.mqtt_keepalive,
                    clean_start=False,
                    properties=self._connect_properties(),
                )
                self._ever_connected = True
        except (OSError, ssl.SSLError, ValueError) as exc:
            delay = self._backoff.next_delay()
            self._next_connect = time.monotonic() + delay
            log.warning(
                "cannot reach broker",
                extra={
                    "error": str(exc),
                    "host": s.mqtt_host,
                    "port": s.mqtt_port,
                    "retry_in": round(delay, 2),
                },
            )

    def run(self) -> int:
        """Bridge until stopped; return the exit code (0 after a clean drain)."""
        client = self.client
        last_misc = 0.0
        self._connect()
        while not self._stopping and self._fatal is None:
            sock = client.socket()
            if sock is None:
                self._kafka_step()
                if time.monotonic() >= self._next_connect:
                    self._connect()
                else:
                    time.sleep(0.01)
                continue
            room = self.max_in_flight - self.in_flight()
            if room > 0 and client.backlog:
                readable: list[Any] = [sock]
            else:
                want_read = [sock] if room > 0 else []
                want_write = [sock] if client.pending_output() else []
                # Once a round may be acknowledged, short waits keep PUBACK latency low;
                # before that, waking up only to find it unacknowledged costs CPU.
                if self._round_size:
                    timeout = max(0.001, self._round_due - time.monotonic())
                else:
                    timeout = 0.001 if self._next else 0.1
                try:
                    readable, _w, _x = select.select(want_read, want_write, [], timeout)
                except (OSError, ValueError):
                    readable = []
            if readable and room > 0:
                client.read_packets(room)
            self._kafka_step()
            if not client.flush_output():
                client.connection_lost()
            now = time.monotonic()
            if now - last_misc > 0.5:
                last_misc = now
                client.loop_misc()  # keepalive PINGREQ and timeout detection
        return self._drain()

    def _drain(self) -> int:
        """Stop reading, let Kafka acknowledge what it has, send those PUBACKs, disconnect."""
        client = self.client
        if self._fatal is not None:
            log.error(
                "fatal Kafka error; exiting without acknowledging", extra={"error": self._fatal}
            )
            client.disconnect()
            client.flush_output()
            return 1
        log.info("draining", extra={"in_flight": self.in_flight()})
        deadline = time.monotonic() + self.settings.connector_shutdown_timeout
        while self.in_flight() and time.monotonic() < deadline and self._fatal is None:
            self._kafka_step()
            if client.socket() is not None:
                client.flush_output()
                client.loop_misc()
            if self.in_flight():
                time.sleep(0.002)
        left = self.in_flight()
        if client.socket() is not None:
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.settings.connector_session_expiry
            client.disconnect(properties=props)
            end = time.monotonic() + 5.0
            while (
                client.socket() is not None and client.pending_output() and time.monotonic() < end
            ):
                client.flush_output()
                select.select([], [], [], 0.01)
        unsent = self.producer.flush(0)
        log.info("stopped", extra={"unacknowledged": left, "kafka_unsent": unsent})
        return 0


def build_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The connector's mTLS context, or None when plain MQTT is explicitly configured."""
    if not settings.mqtt_tls:
        log.warning("plain MQTT (F2PIPE_MQTT_TLS=false): development brokers only")
        return None
    return tls.service_context(settings.pki_dir, settings.connector_identity)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    parser.add_argument(
        "--bare",
        action="store_true",
        help="benchmark baseline only: acknowledge on receipt and write nothing to Kafka",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    setup_logging("connector", args.log_level)
    settings = get_settings()
    connector = Connector(settings, build_ssl_context(settings), bare=args.bare)
    ops = OpsServer(settings.ops_host, settings.connector_port, connector.ready)
    interrupted = 0

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted > 1:
            # A second signal means "now": the persistent session redelivers what is unacked.
            sys.exit(130)
        connector.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A round of pending records lives until Kafka acknowledges it.
    quiet_gc(50_000)
    log.info(
        "connector starting",
        extra={
            "broker": f"{settings.mqtt_host}:{settings.mqtt_port}",
            "kafka": settings.kafka_bootstrap,
            "topic": settings.topic_raw,
            "client_id": settings.connector_client_id,
            "share_group": settings.connector_share_group or None,
            "receive_maximum": settings.connector_receive_maximum,
        },
    )
    try:
        return connector.run()
    except KafkaException as exc:
        log.error("kafka failure", extra={"error": str(exc)})
        return 1
    finally:
        ops.close()
