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
- The MQTT PUBACK of a message is sent only from the Kafka delivery report of
  its record (idempotent producer, ``acks=all``), in the order the messages
  arrived. A crash therefore loses nothing: whatever Kafka has not
  acknowledged was not acknowledged to the broker either, and the persistent
  session redelivers it (duplicates in Kafka are possible, losses are not).
- In-flight messages are bounded twice: the broker may not send more than the
  Receive Maximum unacknowledged QoS 1 messages, and the connector stops
  reading its socket while ``receive_maximum`` messages wait for Kafka.

Threading: one thread owns both clients. It drives paho's socket itself
(``loop_read``/``loop_write``/``loop_misc`` around ``select``) and calls
``producer.poll``, so the delivery callbacks that send PUBACKs run on the
thread that owns the MQTT connection; paho is never touched from librdkafka's
threads. Signal handlers only set a flag.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import functools
import logging
import select
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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

from f2pipe import tls
from f2pipe.backoff import Backoff
from f2pipe.kafka import producer_config
from f2pipe.logs import setup_logging
from f2pipe.mqttwire import decode_length
from f2pipe.ops import OpsServer
from f2pipe.reasons import Reason
from f2pipe.settings import Settings, get_settings
from f2pipe.topics import parse_topic

log = logging.getLogger("f2pipe.connector")

SUBSCRIPTIONS = ("stat/+/+/+/+", "tele/+/+/+/+")
_QOS = (b"0", b"1", b"2")

# --- metrics (one place; every name with its meaning) ---
DEAD_LETTERS = Counter(
    "f2pipe_connector_dead_letters", "messages sent to the dead-letter topic", ["reason"]
)
for _reason in (Reason.INVALID_TOPIC, Reason.PAYLOAD_TOO_LARGE):
    DEAD_LETTERS.labels(_reason.value)  # exported at 0 from the start, for alerting
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

    def observe_latency(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

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

    The grammar is :func:`f2pipe.topics.parse_topic` (SPEC section 1); a
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


PublishHandler = Callable[[bytes, bytes, int, bool, bool, int], None]
"""``(topic, payload, qos, retain, dup, packet id)`` of one incoming PUBLISH."""


class _LeanClient(mqtt.Client):
    """paho's client with a lean receive path for incoming PUBLISH packets.

    paho reads each packet with three or more ``recv`` calls and builds an
    ``MQTTMessage`` plus an MQTT v5 ``Properties`` object for every PUBLISH;
    at tens of thousands of messages per second that bookkeeping, not the
    network, is the ceiling. This subclass reads up to 256 KiB per ``recv``,
    splits complete packets out of that buffer itself, and hands each QoS 0/1
    PUBLISH straight to ``publish_handler`` (its properties are skipped: the
    connector asks for no topic aliases, so none carries state it needs). Every
    other packet (CONNACK, SUBACK, PINGRESP, DISCONNECT, ...) goes through
    paho's own handler, so session state, callbacks and keepalive stay paho's.
    Outgoing packets, paho's and :meth:`ack`'s, are gathered in one buffer that
    :meth:`flush_output` writes in one call.

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
        for _ in range(self._READS_PER_PASS):
            try:
                data = sock.recv(self._READ_SIZE)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError:
                self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
                return False
            if not data:
                self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
                return False
            self._rbuf += data
            if len(self._rbuf) >= self._READ_SIZE:
                break
        return self._handle_buffered(limit)

    def _handle_buffered(self, limit: int) -> bool:
        buf = self._rbuf
        pos = self._rpos
        end = len(buf)
        handled = 0
        handler = self.publish_handler
        self.backlog = False
        while end - pos >= 2:
            if handled >= limit:
                self.backlog = True
                break
            command = buf[pos]
            try:
                length, i = decode_length(buf, pos + 1, end)
            except ValueError:
                self._rpos = end
                self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)
                return False
            if length < 0 or end - i < length:
                break  # incomplete: wait for more bytes
            body_end = i + length
            pos = body_end
            handled += 1
            if command & 0xF0 == 0x30 and command & 0x06 != 0x04:
                qos = (command >> 1) & 0x03
                topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
                topic = bytes(buf[i + 2 : topic_end])
                j = topic_end
                mid = 0
                if qos:
                    mid = (buf[j] << 8) | buf[j + 1]
                    j += 2
                # MQTT v5 property length (variable byte integer), then the properties.
                plen, j = decode_length(buf, j, body_end)
                handler(
                    topic,
                    bytes(buf[j + plen : body_end]),
                    qos,
                    bool(command & 1),
                    bool(command & 0x08),
                    mid,
                )
                continue
            self._rpos = pos
            if not self._paho_handle(command, bytes(buf[i:body_end])):
                return False
            if self._sock is None:
                return False
            buf = self._rbuf  # a callback may have reconnected and replaced the buffer
            pos, end = self._rpos, len(buf)
        self._rpos = pos
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

    def ack(self, mid: int, qos: int) -> MQTTErrorCode:
        """Queue the PUBACK of QoS 1 message ``mid`` (QoS 0 needs none)."""
        if qos == 1 and self._sock is not None:
            self._wbuf += b"\x40\x02" + mid.to_bytes(2, "big")
        return MQTTErrorCode.MQTT_ERR_SUCCESS

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


@dataclass(slots=True)
class _Pending:
    """One received message waiting for Kafka (then for its turn to be acknowledged)."""

    mid: int
    qos: int
    generation: int  # connection it arrived on; a PUBACK is only valid on that connection
    received: float
    done: bool = False


class Connector:
    """Bridges the broker's F2 topics into Kafka; see the module docstring for the contract.

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
        self._generation = 0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._retry: list[tuple[float, _Pending, tuple[Any, ...]]] = []
        self._connected = False
        self._subscribed = False
        self._kafka_up = True
        self._fatal: str | None = None
        self._backoff = Backoff()
        self._next_connect = 0.0
        self._ever_connected = False
        self.stats = _HotMetrics(lambda: len(self._pending))
        _register(self.stats)

        self.producer = Producer(
            producer_config(
                settings,
                error_cb=self._on_kafka_error,
                logger=logging.getLogger("f2pipe.connector.kafka"),
                **(producer_overrides or {}),
            )
        )
        client = _LeanClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.connector_client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
            publish_handler=self._on_publish,
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
        return len(self._pending)

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
        # the broker redelivers them there under the same session.
        self._generation += 1
        if not self._stopping:
            delay = self._backoff.next_delay()
            self._next_connect = time.monotonic() + delay
            if was:
                log.warning(
                    "lost broker connection",
                    extra={"reason": str(reason), "retry_in": round(delay, 2)},
                )

    def _on_publish(
        self, topic: bytes, payload: bytes, qos: int, retain: bool, dup: bool, mid: int
    ) -> None:
        received = time.monotonic()
        stats = self.stats
        stats.received += 1
        if dup:
            stats.redelivered += 1
        entry = _Pending(mid, qos, self._generation, received)
        self._pending.append(entry)
        mac, reason = classify(topic, len(payload), self.settings.max_payload_bytes)
        if self.bare:
            entry.done = True
            self._ack_ready()
            return
        now_ms = b"%d" % int(time.time() * 1000)
        headers = [
            ("mqtt.topic", topic),
            ("mqtt.qos", _QOS[qos]),
            ("mqtt.retain", b"1" if retain else b"0"),
            ("ingest.ts", now_ms),
        ]
        if reason is None:
            args: tuple[Any, ...] = (self.settings.topic_raw, payload, mac, headers)
        else:
            detail = (
                f"{len(payload)} bytes > {self.settings.max_payload_bytes}"
                if reason is Reason.PAYLOAD_TOO_LARGE
                else "not an F2 status or telemetry topic"
            )
            dlq_headers = [
                *headers,
                ("dlq.stage", b"connector"),
                ("dlq.reason", reason.value),
                ("dlq.detail", detail),
                ("dlq.source", b"mqtt/" + topic),
                ("dlq.ts", now_ms),
            ]
            args = (self.settings.topic_dead_letter, payload, mac, dlq_headers)
            DEAD_LETTERS.labels(reason.value).inc()
            log.info(
                "dead letter",
                extra={"reason": reason.value, "topic": topic[:200].decode(errors="replace")},
            )
        self._produce(entry, args)

    # --- Kafka ---

    def _produce(self, entry: _Pending, args: tuple[Any, ...]) -> None:
        topic, value, key, headers = args
        callback = functools.partial(self._on_delivery, entry, args)
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, on_delivery=callback)
                return
            except BufferError:
                # The local queue is full (far above the in-flight bound; only if misconfigured).
                self.producer.poll(0.05)

    def _on_delivery(
        self, entry: _Pending, args: tuple[Any, ...], err: KafkaError | None, _msg: Message
    ) -> None:
        if err is not None:
            DELIVERY_ERRORS.inc()
            if err.fatal():
                self._fatal = str(err)
                return
            # Not acknowledged to MQTT; produce again after a pause (the idempotent producer
            # has already retried internally, so this is a longer outage or a missing topic).
            log.warning("kafka delivery failed; retrying", extra={"error": str(err)})
            self._retry.append((time.monotonic() + 1.0, entry, args))
            return
        self._kafka_up = True
        self.stats.produced += 1
        self.stats.observe_latency(time.monotonic() - entry.received)
        entry.done = True
        self._ack_ready()

    def _ack_ready(self) -> None:
        # PUBACKs go out in arrival order (MQTT requires it); a record Kafka acknowledged
        # early waits for those before it.
        pending = self._pending
        generation = self._generation
        client = self.client
        while pending and pending[0].done:
            entry = pending.popleft()
            if entry.qos > 0 and entry.generation == generation:
                client.ack(entry.mid, entry.qos)
                self.stats.acked += 1

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._kafka_up = False
        if err.fatal():
            self._fatal = str(err)
        log.warning("kafka client error", extra={"error": str(err)})

    def _retry_due(self) -> None:
        if not self._retry:
            return
        now = time.monotonic()
        due = [item for item in self._retry if item[0] <= now]
        if due:
            self._retry = [item for item in self._retry if item[0] > now]
            for _when, entry, args in due:
                self._produce(entry, args)

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
                self.producer.poll(0.05)
                self._retry_due()
                if time.monotonic() >= self._next_connect:
                    self._connect()
                continue
            room = self.max_in_flight - len(self._pending)
            if room > 0 and client.backlog:
                readable: list[Any] = [sock]
            else:
                want_read = [sock] if room > 0 else []
                want_write = [sock] if client.pending_output() else []
                # Short waits while records are with Kafka keep PUBACK latency low.
                timeout = 0.001 if self._pending else 0.1
                try:
                    readable, _w, _x = select.select(want_read, want_write, [], timeout)
                except (OSError, ValueError):
                    readable = []
            if readable and room > 0:
                client.read_packets(room)
            self.producer.poll(0)
            self._retry_due()
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
        log.info("draining", extra={"in_flight": len(self._pending)})
        deadline = time.monotonic() + self.settings.connector_shutdown_timeout
        while self._pending and time.monotonic() < deadline:
            self.producer.poll(0.01)
            self._retry_due()
            if client.socket() is not None:
                client.flush_output()
                client.loop_misc()
        left = len(self._pending)
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
    # A longer linger than the shared default: bigger batches cost Kafka and librdkafka
    # less CPU per record, and the Receive Maximum covers the extra acknowledgement wait.
    overrides = {"linger.ms": settings.connector_linger_ms}
    connector = Connector(settings, build_ssl_context(settings), overrides, bare=args.bare)
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
