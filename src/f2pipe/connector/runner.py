"""MQTT -> Kafka connector: every acknowledged device message ends up in ``raw-iot-data``.

Contract (SPEC sections 4 and 7):

- MQTT v5, persistent session (clean start off, session expiry configurable),
  client id = the connector's identity, QoS 1 subscriptions to ``stat/+/+/+/+``
  and ``tele/+/+/+/+`` (through ``$share/<group>/`` when a share group is set).
- Each message becomes one Kafka record, or a dead letter
  (:mod:`f2pipe.connector.stage` decides which and builds it).
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
  Receive Maximum unacknowledged QoS 1 messages, and the connector turns no
  more messages into records while ``receive_maximum`` of them wait for Kafka.
  It goes on reading its socket all the same (the client holds what arrives
  until there is room): with Kafka down the window stays full, and the
  keepalive's PINGRESP, or the CONNACK after a reconnection, must still be
  read, or the connection would drop every couple of keepalive periods.
- PUBACKs leave through :meth:`Connector.send_pubacks` only (outside the
  ``--bare`` benchmark baseline), once Kafka acknowledged every record of the
  round.

Threading: one thread owns both clients. It drives the MQTT socket itself
(:class:`f2pipe.connector.client.MqttClient` around ``select``) and calls
``producer.poll``, so PUBACKs are written by the thread that owns the MQTT
connection, never from librdkafka's threads. Signal handlers only set a flag.
"""

from __future__ import annotations

import argparse
import logging
import select
import ssl
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from mqtt5 import PublishPacket

from f2pipe.connector.client import MqttClient
from f2pipe.connector.metrics import (
    DELIVERY_ERRORS,
    RECONNECTS,
    HotMetrics,
    count_dead_letter,
    register,
)
from f2pipe.connector.stage import Record, RecordBuilder
from f2pipe.core.records import Headers
from f2pipe.runtime import tls
from f2pipe.runtime.backoff import Backoff
from f2pipe.runtime.gctune import quiet_gc
from f2pipe.runtime.kafka import produce, producer_config
from f2pipe.runtime.kafkatrouble import KafkaTrouble
from f2pipe.runtime.logs import add_log_level_argument, setup_logging
from f2pipe.runtime.opsserver import OpsServer
from f2pipe.runtime.shutdown import stop_on_signals
from f2pipe.settings import Settings, get_settings

__all__ = ["SUBSCRIPTIONS", "Connector", "build_ssl_context", "configure", "main"]

log = logging.getLogger("f2pipe.connector.runner")

SUBSCRIPTIONS = ("stat/+/+/+/+", "tele/+/+/+/+")


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
    what was produced (up to ``connector_shutdown_timeout_s``), sends those
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
        self.stage = RecordBuilder(
            settings.topic_raw, settings.topic_dead_letter, settings.max_payload_bytes
        )
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
        self._connected = False
        self._subscribed = False
        self._kafka_up = True
        self._fatal: str | None = None
        self.kafka_trouble = KafkaTrouble(settings)  # its producer's errors, with the fix
        self._backoff = Backoff()
        self._next_connect = 0.0
        self._ever_connected = False

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
        self.client = MqttClient(
            settings.connector_client_id,
            ssl_context=ssl_context,
            keepalive=settings.mqtt_keepalive_s,
            session_expiry=settings.connector_session_expiry_s,
            receive_maximum=settings.connector_receive_maximum,
            publish_handler=self._on_bare_publishes if bare else self._on_publishes,
            on_connect=self._on_connect,
            on_subscribe=self._on_subscribe,
            on_disconnect=self._on_disconnect,
        )
        self.stats = HotMetrics(self.in_flight)
        register(self.stats)

    # --- readiness ---

    def ready(self) -> bool:
        """Connected and subscribed to the broker, and Kafka reachable with no error only
        an operator can fix (:attr:`kafka_trouble`)."""
        self.kafka_trouble.check()
        return self._connected and self._subscribed and self._kafka_up

    def in_flight(self) -> int:
        """Messages received and not yet acknowledged to the broker (or dropped unacked):
        records waiting for Kafka and messages the client holds until there is room."""
        return self._waiting() + self.client.held()

    def room(self) -> int:
        """How many more messages may become records now (negative: over the window,
        after a reconnection while the old connection's records wait for Kafka)."""
        return self.max_in_flight - self._waiting()

    def _waiting(self) -> int:
        """Records not yet acknowledged by Kafka."""
        return self._round_size + len(self._next)

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return (safe from a signal handler)."""
        self._stopping = True

    # --- MQTT callbacks (run on the loop thread) ---

    def _on_connect(self, session_present: bool, refusal: str | None) -> None:
        if refusal is not None:
            log.error("broker refused the connection", extra={"reason": refusal})
            return
        self._connected = True
        self._backoff.reset()
        log.info("connected to broker", extra={"session_present": session_present})
        # Subscribing again is harmless with a present session and needed without one.
        group = self.settings.connector_share_group
        prefix = f"$share/{group}/" if group else ""
        self.client.subscribe([prefix + topic for topic in SUBSCRIPTIONS], qos=1)

    def _on_subscribe(self, refusals: list[str]) -> None:
        if refusals:
            log.error("subscription refused", extra={"reasons": refusals})
            return
        self._subscribed = True
        log.info("subscribed", extra={"topics": list(SUBSCRIPTIONS)})

    def _on_disconnect(self, reason: str) -> None:
        was = self._connected
        self._connected = self._subscribed = False
        # PUBACKs for messages of the lost connection must not be sent on the next one:
        # the broker redelivers them there under the same session. Their records still go
        # to Kafka (a duplicate at worst).
        self._next_acks = []
        self._round_acks = []
        if not self._stopping:
            delay = self._schedule_reconnect()
            if was:
                log.warning(
                    "lost broker connection",
                    extra={"reason": reason, "retry_in": round(delay, 2)},
                )

    def _on_bare_publishes(self, batch: list[PublishPacket]) -> None:
        """Benchmark baseline: count and acknowledge at once."""
        stats = self.stats
        stats.received += len(batch)
        mids = [p.packet_id for p in batch if p.packet_id is not None]
        stats.redelivered += sum(1 for p in batch if p.duplicate)
        self.client.ack_many(mids)
        stats.acked += len(mids)

    def _on_publishes(self, batch: list[PublishPacket]) -> None:
        """Turn one read's messages into records for the next round (SPEC section 4)."""
        self.stats.received += len(batch)
        self._next_reads.append((time.monotonic(), len(batch)))
        redelivered, rejected = self.stage.add(
            batch, time.time_ns() // 1_000_000, self._next, self._next_acks
        )
        if redelivered:
            self.stats.redelivered += redelivered
        for rejection, topic in rejected:
            count_dead_letter(rejection.reason)
            log.info(
                "dead letter",
                extra={
                    "reason": rejection.reason.value,
                    "topic": topic[:200],
                },
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
        produce_now = self.producer.produce
        for topic, value, key, headers in records:
            try:
                produce_now(topic, value, key, headers=headers)
            except BufferError:
                # The local queue is full (far above the in-flight bound; only if misconfigured).
                produce(self.producer, topic, value, key, headers, wait=0.05)

    def _round_done(self) -> None:
        """Every record of the round is in Kafka: acknowledge its messages to the broker."""
        stats = self.stats
        now = time.monotonic()
        for received, count in self._round_reads:
            stats.observe_latency(now - received, count)
        stats.produced += self._round_size
        self.send_pubacks(self._round_acks)
        self._round_size = 0
        self._round_acks, self._round_reads = [], []
        self._kafka_up = True

    def send_pubacks(self, mids: list[int]) -> None:
        """Queue the PUBACKs of the messages ``mids``, every record of which Kafka has
        acknowledged: the one place the connector acknowledges a message to the broker
        (outside ``--bare``). They are written by the loop's next ``flush_output``."""
        self.client.ack_many(mids)
        self.stats.acked += len(mids)

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
        headers: Headers = [(str(item[0]), item[1]) for item in msg.headers() or []]
        record = (msg.topic() or "", msg.value() or b"", msg.key(), headers)
        self._retry.append((time.monotonic() + 1.0, record))

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._kafka_up = False
        if err.fatal():
            self._fatal = str(err)
        self.kafka_trouble.heard(err)

    def _retry_due(self) -> None:
        now = time.monotonic()
        due = [record for when, record in self._retry if when <= now]
        if due:
            self._retry = [item for item in self._retry if item[0] > now]
            for topic, value, key, headers in due:
                produce(self.producer, topic, value, key, headers, wait=0.05)

    # --- the loop ---

    def _schedule_reconnect(self) -> float:
        """Set the next connection attempt after a jittered backoff; return the delay."""
        delay = self._backoff.next_delay()
        self._next_connect = time.monotonic() + delay
        return delay

    def _connect(self) -> None:
        """One connection attempt; on failure schedule the next with backoff."""
        s = self.settings
        try:
            if self._ever_connected:
                RECONNECTS.inc()
            self.client.connect(s.mqtt_host, s.mqtt_port)
            self._ever_connected = True
        except (OSError, ssl.SSLError, ValueError) as exc:
            delay = self._schedule_reconnect()
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
            # With no room the socket is read all the same: the client handles control
            # packets and holds PUBLISH packets until there is room (see the module docs).
            room = self.room()
            if client.has_work(room):
                readable: list[Any] = [sock]
            else:
                want_read = [sock] if client.wants_read() else []
                want_write = [sock] if client.pending_output() else []
                # Once a round may be acknowledged, short waits keep PUBACK latency low;
                # before that, waking up only to find it unacknowledged costs CPU. A round
                # long overdue (Kafka slow or down) is checked on less often: a tenth of
                # its lateness, at most 0.1 s, instead of spinning through an outage.
                if self._round_size:
                    due = self._round_due - time.monotonic()
                    timeout = due if due > 0.001 else min(0.1, max(0.001, -due / 10))
                else:
                    timeout = 0.001 if self._next else 0.1
                try:
                    readable, _w, _x = select.select(want_read, want_write, [], timeout)
                except (OSError, ValueError):
                    readable = []
            if readable:
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
        log.info("draining", extra={"in_flight": self._waiting()})
        deadline = time.monotonic() + self.settings.connector_shutdown_timeout_s
        while self._waiting() and time.monotonic() < deadline and self._fatal is None:
            self._kafka_step()
            if client.socket() is not None:
                client.flush_output()
                client.loop_misc()
            if self._waiting():
                time.sleep(0.002)
        left = self._waiting()
        if client.socket() is not None:
            client.disconnect(session_expiry=self.settings.connector_session_expiry_s)
            end = time.monotonic() + 5.0
            while client.socket() is not None and time.monotonic() < end:
                if not client.flush_output():
                    client.connection_lost()
                elif client.socket() is not None:
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
    add_log_level_argument(parser)
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
    # A second signal means "now": the persistent session redelivers what is unacked.
    stop_on_signals(connector.stop)
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
