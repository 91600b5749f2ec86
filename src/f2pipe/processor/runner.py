"""The stream processor's runner (``f2pipe processor``): raw frames in, typed readings out.

The pure step is :class:`~f2pipe.processor.stage.Stage` (one raw record ->
readings, a dead-letter verdict or skipped). :class:`Processor` here owns all
the I/O around it: a Kafka consumer on the raw topic, an idempotent producer to
the processed and dead-letter topics, the metadata
:class:`~f2pipe.metadata.resolver.Resolver`, metrics
(:mod:`f2pipe.processor.metrics`), the dead-letter alarm
(:mod:`f2pipe.processor.alarm`), the consumer's lag as an age and offsets out
of retention (:class:`~f2pipe.runtime.kafka.ConsumerWatch`) and signals.

Delivery (SPEC section 7): a batch is polled, run through the stage, its
readings and dead letters are produced, the producer is flushed (every record
acknowledged by Kafka, ``acks=all``), and only then are the batch's input
offsets committed. A crash anywhere before the commit means the batch is
consumed again: readings may repeat (the sink's primary key absorbs them), none
is lost. With ``F2PIPE_PROCESSOR_TRANSACTIONS=true`` the outputs and the input
offsets commit in one Kafka transaction instead: exactly once into the
processed and dead-letter topics for ``read_committed`` readers (the sink,
``f2pipe dlq``), crashes included. Either way the commit is
:meth:`~f2pipe.processor.delivery.Delivery.commit_offsets`, reached only
after the flush (:mod:`f2pipe.processor.delivery`).

Outages: PostgreSQL unreachable -> the consumer is paused, the batch kept (and
nothing more, see :meth:`Processor._run_stage`), the lookup retried with jittered
backoff from 0.25 s up to 5 s (a failed lookup never becomes ``unknown_device``).
Kafka unreachable -> the flush waits; nothing is committed that was not
produced. Redis unreachable -> see :mod:`f2pipe.metadata.resolver`.

Shutdown: SIGINT/SIGTERM set a flag; the current batch finishes (produce,
flush, commit), then consumer, producer and resolver close. A second signal
exits at once (whatever was not committed is consumed again later).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from datetime import UTC, datetime

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from f2pipe.core.deadletter import Rejected
from f2pipe.core.records import INGEST_HEADER, TOPIC_HEADER, Headers, ReadingEncoder
from f2pipe.errors import MetadataUnavailable
from f2pipe.metadata.resolver import TIERS, Resolver
from f2pipe.processor.alarm import DeadLetterAlarm
from f2pipe.processor.delivery import Delivery
from f2pipe.processor.metrics import (
    AMBIGUOUS,
    ASSIGNED,
    BATCH_SECONDS,
    BATCH_SIZE,
    BUFFERED,
    CACHE_HITS,
    CACHE_MISSES,
    CONSUMED,
    DECODE_SECONDS,
    DLQ_ALARM,
    DLQ_RATIO,
    LAG,
    METADATA_VERSION,
    PAUSED,
    PRODUCED,
    SKIPPED_TOTAL,
)
from f2pipe.processor.stage import Stage
from f2pipe.runtime.backoff import Backoff
from f2pipe.runtime.gctune import quiet_gc
from f2pipe.runtime.kafka import (
    ConsumerWatch,
    Stopping,
    consume_available,
    consumer_config,
    set_fetching,
)
from f2pipe.runtime.kafkatrouble import KafkaTrouble
from f2pipe.runtime.logs import add_log_level_argument, setup_logging
from f2pipe.runtime.metrics import DEAD_LETTERS, REBALANCES
from f2pipe.runtime.opsserver import NotReady, OpsServer
from f2pipe.runtime.shutdown import stop_on_signals
from f2pipe.settings import Settings, get_settings

__all__ = ["Processor", "configure"]

log = logging.getLogger(__name__)

# Waits while the metadata database is unreachable (SPEC section 7: pause, never guess).
OUTAGE_BACKOFF_BASE_S = 0.25
OUTAGE_BACKOFF_CAP_S = 5.0


class Processor:
    """Consumes the raw topic until :meth:`stop`; see the module docstring for guarantees."""

    def __init__(self, settings: Settings, resolver: Resolver | None = None) -> None:
        self.settings = settings
        self.resolver = resolver or Resolver(settings)
        self.stage = Stage(self.resolver.resolve)
        self.encoder = ReadingEncoder()
        self._stop = threading.Event()
        self._paused = False
        self._hard_stop = False  # set by a second stop request: abandon waits for Kafka
        transactions = settings.processor_transactions
        self.kafka_trouble = KafkaTrouble(settings)  # its clients' errors, with the fix
        self.consumer = Consumer(
            consumer_config(
                settings,
                settings.processor_group,
                on_commit=self._on_commit,
                error_cb=self.kafka_trouble.heard,
                **{
                    "session.timeout.ms": int(settings.processor_session_timeout_s * 1000),
                    "heartbeat.interval.ms": int(settings.processor_session_timeout_s * 1000 / 4),
                },
                **({"isolation.level": "read_committed"} if transactions else {}),
            )
        )
        self.delivery = Delivery(
            settings, self.consumer, self._stop.is_set, self._abandoning, self.kafka_trouble.heard
        )
        # Lag as an age and in records, offsets out of retention.
        self.watch = ConsumerWatch("processor", records=LAG)
        self.alarm = DeadLetterAlarm(
            settings.dlq_alarm_ratio, settings.dlq_alarm_window_s, settings.dlq_alarm_min_messages
        )
        self._last_hits = dict.fromkeys(TIERS, 0)
        self._last_misses = dict.fromkeys(TIERS, 0)
        self._synced_at = 0.0  # monotonic time of the last metadata version read
        self._held: list[Message] = []  # the batch being handled, see _handle_batch
        self._routes_version = -1  # metadata version the stage's remembered lookups are of
        self._route_hits = 0  # stage.route_hits already exported
        self._ambiguous = 0  # stage.ambiguous_readings already exported
        self._outage_backoff = Backoff(OUTAGE_BACKOFF_BASE_S, OUTAGE_BACKOFF_CAP_S)

    # --- control ---

    def stop(self) -> None:
        """Ask the loop to finish the current batch and return (safe from signal handlers).

        A second call also abandons a wait for Kafka (the batch stays uncommitted).
        """
        if self._stop.is_set():
            self._hard_stop = True
        self._stop.set()

    def ready(self) -> bool:
        self.kafka_trouble.check()  # an error of its Kafka clients only an operator can fix
        if (trouble := self.resolver.database_trouble) is not None:
            raise NotReady(trouble)
        return self.resolver.database_ok and not self._paused

    def _abandoning(self) -> bool:
        """Whether a wait for room in the producer queue should end (a second stop)."""
        return self._hard_stop

    # --- callbacks (run inside poll/flush/consume on this thread) ---

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            log.warning("offset commit failed (committed again)", extra={"error": str(err)})
            self.delivery.commit_failed()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions revoked", extra={"partitions": [p.partition for p in partitions]})
        ASSIGNED.dec(len(partitions))
        REBALANCES.labels("processor", "revoked").inc()
        revoked = {tp.partition for tp in partitions}
        # Their new owner consumes them from the last committed offset: records held
        # for them (a batch waiting out a metadata outage) and offsets not yet
        # committed here must go, or they would be produced twice and a stale offset
        # committed over the new owner's progress.
        if self._held:
            self._held[:] = [m for m in self._held if m.partition() not in revoked]
            BUFFERED.set(len(self._held))
        self.delivery.forget(partitions)
        self.watch.revoked(partitions)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": [p.partition for p in partitions]})
        ASSIGNED.inc(len(partitions))
        REBALANCES.labels("processor", "assigned").inc()
        self.watch.assigned(consumer, partitions)
        set_fetching(consumer, partitions, paused=self._paused)

    # --- main loop ---

    def run(self) -> None:
        """Consume until stopped. Raises KafkaException on a fatal producer error."""
        settings = self.settings
        self.consumer.subscribe(
            [settings.topic_raw], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        log.info(
            "processor started",
            extra={
                "topic": settings.topic_raw,
                "group": settings.processor_group,
                "transactions": self.delivery.transactions,
            },
        )
        try:
            while not self._stop.is_set():
                batch = self._poll(settings.processor_poll_timeout_s)
                if batch:
                    self._handle_batch(batch)
                    self._synced_at = time.monotonic()
                elif time.monotonic() - self._synced_at > 5.0:
                    self._idle_sync()
                self.delivery.recommit()
                self.watch.update(self.consumer)
        except Stopping:
            log.info("stopping with a batch uncommitted; it will be consumed again")
        finally:
            self._close()

    def _idle_sync(self) -> None:
        # With no traffic, still probe the metadata database now and then so /readyz
        # tells the truth and the caches do not hold a stale version until the next batch.
        self._synced_at = time.monotonic()
        try:
            METADATA_VERSION.set(self.resolver.sync())
        except MetadataUnavailable as exc:
            log.warning("metadata database unreachable while idle", extra={"error": str(exc)})

    def _poll(self, timeout: float) -> list[Message]:
        """The next batch: up to ``processor_batch_size`` records, waiting at most
        ``timeout`` seconds for the first one and never for the rest."""
        msgs = consume_available(self.consumer, self.settings.processor_batch_size, timeout)
        good = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.fatal():
                raise KafkaException(err)
            elif not self.watch.reset_reported(err):
                self.kafka_trouble.heard(err)
        return good

    def _handle_batch(self, batch: list[Message]) -> None:
        started = time.perf_counter()
        # Held here (not only on the stack) so a revocation during an outage can drop
        # the records of partitions this replica no longer owns.
        self._held = batch
        BUFFERED.set(len(batch))
        try:
            outputs, dead, skipped = self._run_stage(batch)
        finally:
            self._held = []
            BUFFERED.set(0)
        if not batch:  # every record was of a partition revoked during an outage
            return
        staged = time.perf_counter()
        self.delivery.deliver(batch, outputs, dead)
        # metrics once per batch: per-record updates would cost more than the decode
        n = len(batch)
        CONSUMED.inc(n)
        PRODUCED.inc(len(outputs))
        BATCH_SIZE.observe(n)
        DECODE_SECONDS.observe((staged - started) / n)
        BATCH_SECONDS.observe(time.perf_counter() - started)
        reasons: dict[str, int] = {}
        for _, rejected in dead:
            reasons[rejected.reason.value] = reasons.get(rejected.reason.value, 0) + 1
        for reason, count in reasons.items():
            DEAD_LETTERS.labels("processor", reason).inc(count)
        for kind, count in skipped.items():
            SKIPPED_TOTAL.labels(kind).inc(count)
        self._export_stage_counts()
        self._watch_dead_letters(n, len(dead))

    def _run_stage(
        self, batch: list[Message]
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[Message, Rejected]], dict[str, int]]:
        """Run the stage over the batch; on a metadata outage pause, wait, redo.

        While paused the batch never grows: the consumer is polled only to stay in
        the group, every partition it owns stays paused (newly assigned ones too),
        and a record that slips through is not kept: its partition is rewound to
        it. A revocation meanwhile drops the revoked partitions' records from the
        batch (:meth:`_on_revoke`), so memory stays at one batch.
        """
        try:
            while True:
                try:
                    version = self.resolver.sync()
                    if version != self._routes_version:
                        # the stage's remembered lookups answered from older metadata
                        self.stage.forget_routes()
                        self._routes_version = version
                    METADATA_VERSION.set(version)
                    return self._stage_all(batch)
                except MetadataUnavailable as exc:
                    if not self._paused:
                        self._paused = True
                        PAUSED.set(1)
                        self.consumer.pause(self.consumer.assignment())
                        log.error(
                            "metadata database unreachable: paused, batch kept",
                            extra={"error": str(exc), "batch": len(batch)},
                        )
                    if self._stop.is_set():
                        raise Stopping(
                            "stopped while the metadata database was unreachable"
                        ) from None
                    self._wait_paused(self._outage_backoff.next_delay())
        finally:
            if self._paused:
                self._outage_backoff.reset()
                self._paused = False
                PAUSED.set(0)
                self.consumer.resume(self.consumer.assignment())
                log.info("metadata database back: resumed")

    def _wait_paused(self, timeout: float) -> None:
        """Poll while paused (rebalances and group membership are served inside; a
        partition assigned meanwhile is paused at assignment, :meth:`_on_assign`), and
        rewind any partition that delivered a record fetched before its pause."""
        first: dict[int, int] = {}
        for msg in self._poll(timeout):
            first.setdefault(msg.partition(), msg.offset())  # type: ignore[arg-type]
        for partition, offset in first.items():
            self.consumer.seek(TopicPartition(self.settings.topic_raw, partition, offset))
        self.watch.update(self.consumer)  # the lag keeps growing during an outage: show it

    def _stage_all(
        self, batch: list[Message]
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[Message, Rejected]], dict[str, int]]:
        now = datetime.now(UTC)
        emit = self.stage.emit
        encode = self.encoder.encode_values
        outputs: list[tuple[bytes, bytes]] = []
        dead: list[tuple[Message, Rejected]] = []
        skipped: dict[str, int] = {}
        topic: bytes | None
        ingest: bytes | None
        # No typing.cast() in this loop: at run time it is a Python call per use.
        for msg in batch:
            # Consumed headers are a list of (str, bytes | None) pairs, never a dict.
            headers: Headers | None = msg.headers()  # type: ignore[assignment]
            # The connector writes mqtt.topic first and ingest.ts fourth; look further
            # only when they are not there.
            if headers and (first := headers[0])[0] == TOPIC_HEADER:
                topic = first[1]  # type: ignore[assignment]
            else:
                topic = _header(headers, TOPIC_HEADER)
            if headers and len(headers) > 3 and (fourth := headers[3])[0] == INGEST_HEADER:
                ingest = fourth[1]  # type: ignore[assignment]
            else:
                ingest = _header(headers, INGEST_HEADER)
            verdict = emit(topic, msg.value(), now, encode, outputs, ingest)
            if verdict is not None:
                if isinstance(verdict, Rejected):
                    dead.append((msg, verdict))
                else:
                    kind = verdict.kind
                    skipped[kind] = skipped.get(kind, 0) + 1
        return outputs, dead, skipped

    def _watch_dead_letters(self, consumed: int, dead: int) -> None:
        """Feed the alarm one batch; report its ratio, and each change of its verdict."""
        alarm = self.alarm
        was_active = alarm.active
        active = alarm.observe(consumed, dead)
        DLQ_RATIO.set(alarm.current)
        if active == was_active:
            return
        DLQ_ALARM.set(1 if active else 0)
        if active:
            log.error(
                "dead-letter ratio above threshold",
                extra={"ratio": round(alarm.current, 4), "threshold": alarm.ratio},
            )
        else:
            log.info("dead-letter ratio back to normal", extra={"ratio": round(alarm.current, 4)})

    def _export_stage_counts(self) -> None:
        route_hits = self.stage.route_hits
        if route_hits != self._route_hits:  # lookups the stage remembered: process tier
            CACHE_HITS.labels("process").inc(route_hits - self._route_hits)
            self._route_hits = route_hits
        ambiguous = self.stage.ambiguous_readings
        if ambiguous != self._ambiguous:
            AMBIGUOUS.inc(ambiguous - self._ambiguous)
            self._ambiguous = ambiguous
        hits, misses = self.resolver.hits, self.resolver.misses
        for tier in TIERS:
            if hits[tier] != self._last_hits[tier]:
                CACHE_HITS.labels(tier).inc(hits[tier] - self._last_hits[tier])
                self._last_hits[tier] = hits[tier]
            if misses[tier] != self._last_misses[tier]:
                CACHE_MISSES.labels(tier).inc(misses[tier] - self._last_misses[tier])
                self._last_misses[tier] = misses[tier]

    def _close(self) -> None:
        try:
            self.delivery.close()
        finally:
            self.consumer.close()
            self.resolver.close()
            log.info("processor stopped")


def _header(headers: Headers | None, wanted: str) -> bytes | None:
    """The first ``wanted`` header's value, or None (absent, or not bytes)."""
    for name, raw in headers or ():
        if name == wanted:
            return raw if isinstance(raw, bytes) else None
    return None


# --- CLI ----------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    add_log_level_argument(parser)
    parser.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    setup_logging("processor", args.log_level)
    settings = get_settings()
    processor = Processor(settings)
    # A batch keeps about 15 containers per record alive until it is done (messages,
    # header tuples, parsed payloads, outputs); a young-generation threshold below
    # that made every batch traverse itself several times for nothing (about 3 µs of
    # CPU per frame).
    quiet_gc(max(200_000, 40 * settings.processor_batch_size))
    # A second signal exits at once: uncommitted input is consumed again by the next start.
    stop_on_signals(processor.stop)
    ops = OpsServer(settings.ops_host, settings.processor_port, processor.ready)
    try:
        processor.run()
    finally:
        ops.close()
    return 0
