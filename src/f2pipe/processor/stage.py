"""The stream processor (``f2pipe processor``): raw frames in, typed readings out.

Two parts, as every stage:

- :class:`Stage`, the pure step: one raw record (its ``mqtt.topic`` header and
  payload) -> the sensor's readings, a dead-letter verdict (:class:`Rejected`,
  reason chosen in SPEC section 7's order) or :class:`Skipped` (status
  components and readers with no wired device, reader text, commands). Its only
  dependency is a metadata lookup function.
- :class:`Processor`, the runner that owns the I/O: a Kafka consumer on the raw
  topic, an idempotent producer to the processed and dead-letter topics, the
  metadata :class:`~f2pipe.metadata.resolver.Resolver`, metrics and signals.

Delivery (SPEC section 7): a batch is polled, run through the stage, its
readings and dead letters are produced, the producer is flushed (every record
acknowledged by Kafka, ``acks=all``), and only then are the batch's input
offsets committed. A crash anywhere before the commit means the batch is
consumed again: readings may repeat (the sink's primary key absorbs them), none
is lost. With ``F2PIPE_PROCESSOR_TRANSACTIONS=true`` the outputs and the input
offsets commit in one Kafka transaction instead (exactly once into the
processed topic for read_committed consumers).

Outages: PostgreSQL unreachable -> the consumer is paused, the batch kept, and
the lookup retried with backoff (a failed lookup never becomes
``unknown_device``). Kafka unreachable -> the flush waits; nothing is committed
that was not produced. Redis unreachable -> see :mod:`f2pipe.metadata.resolver`.

Shutdown: SIGINT/SIGTERM set a flag; the current batch finishes (produce,
flush, commit), then consumer, producer and resolver close. A second signal
exits at once (whatever was not committed is consumed again later).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from types import FrameType
from typing import Any, Final, TypeVar, cast
from zoneinfo import ZoneInfo

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from f2pipe.core.decode import DecodeError
from f2pipe.core.reasons import Reason
from f2pipe.core.records import INGEST_HEADER, TOPIC_HEADER, Reading, ReadingEncoder
from f2pipe.core.topics import Topic, parse_topic
from f2pipe.errors import MetadataUnavailable
from f2pipe.metadata.resolver import SKIPPED, TIERS, Resolution, Resolved, Resolver
from f2pipe.runtime.gctune import quiet_gc
from f2pipe.runtime.kafka import consume_available, consumer_config, producer_config
from f2pipe.runtime.logs import setup_logging
from f2pipe.runtime.metrics import DEAD_LETTERS
from f2pipe.runtime.opsserver import OpsServer
from f2pipe.settings import Settings, get_settings

log = logging.getLogger(__name__)

_UTC_ZONE: Final = ZoneInfo("UTC")

Headers = list[tuple[str, str | bytes | None]]

# --- metrics (all of the processor's, in one place) -----------------------------------

CONSUMED = Counter("f2pipe_processor_consumed", "raw records consumed")
PRODUCED = Counter("f2pipe_processor_produced", "readings produced to the processed topic")
SKIPPED_TOTAL = Counter(
    "f2pipe_processor_skipped", "records deliberately not decoded (no wired device, text)", ["kind"]
)
CACHE_HITS = Counter("f2pipe_metadata_cache_hits", "metadata lookups answered by a tier", ["tier"])
CACHE_MISSES = Counter("f2pipe_metadata_cache_misses", "metadata lookups a tier missed", ["tier"])
BATCH_SIZE = Histogram(
    "f2pipe_processor_batch_size",
    "records per consumed batch",
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 50000),
)
DECODE_SECONDS = Histogram(
    "f2pipe_processor_decode_seconds",
    "stage time per record (lookup + decode + serialise), averaged over each batch",
    buckets=(1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3, 1e-2, 0.1),
)
BATCH_SECONDS = Histogram(
    "f2pipe_processor_batch_seconds", "poll-to-commit time of a batch (incl. Kafka acks)"
)
LAG = Gauge("f2pipe_processor_consumer_lag", "records behind the high watermark", ["partition"])
DLQ_RATIO = Gauge("f2pipe_processor_dead_letter_ratio", "dead letters / consumed, recent window")
DLQ_ALARM = Gauge("f2pipe_processor_dead_letter_alarm", "1 while the dead-letter ratio is too high")
ASSIGNED = Gauge("f2pipe_processor_assigned_partitions", "raw-topic partitions this replica owns")
PAUSED = Gauge("f2pipe_processor_paused", "1 while waiting for the metadata database")
METADATA_VERSION = Gauge("f2pipe_processor_metadata_version", "metadata version in use")
AMBIGUOUS = Counter(
    "f2pipe_ambiguous_timestamps",
    "readings decoded from an ambiguous local time (clocks went back)",
)

# --- the pure stage ---------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: a frozen init costs ~0.5 µs per message
class Decoded:
    """The readings of one message (all of its datapoints, in datapoint order)."""

    device_id: int
    readings: list[Reading]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A dead letter: the reason (SPEC section 7) and a one-line detail for operators."""

    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class Skipped:
    """Deliberately not a reading and not a dead letter; counted by kind."""

    kind: str


Outcome = Decoded | Rejected | Skipped
Lookup = Callable[[str, int, str, int], Resolution]
T = TypeVar("T")
# Where :meth:`Stage.emit` hands a decoded message: (device_id, datapoint ids, UTC
# timestamp, values in datapoint order, the caller's output list).
Emit = Callable[[int, tuple[int, ...], datetime, tuple[float, ...], list[T]], None]

_TOPIC_CACHE_MAX: Final = 100_000
_NO_TOPIC_HEADER: Final = Rejected(Reason.INVALID_TOPIC, f"no {TOPIC_HEADER} header")
_SKIP_COMMAND: Final = Skipped("command")
_SKIP_READER: Final = Skipped("reader")


class Stage:
    """Turns one raw record into an :data:`Outcome`. No I/O but the injected lookup.

    Order of verdicts (SPEC section 7): ``invalid_topic`` (header missing, not
    UTF-8, or not the topic grammar), then the lookup (``unknown_device``,
    ``unmapped_sensor``, or skipped), then the template's own checks from
    ``no_datapoints`` to ``non_finite_value``. Readers and commands are skipped
    before any lookup: reader data is free text, commands are not telemetry.
    The lookup may raise MetadataUnavailable; nothing else escapes.
    """

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        # topic header -> (parsed topic, None) when the lookup decides, or (None, verdict)
        # when the topic alone does (invalid, a command, a reader); verdicts are immutable.
        self._topics: dict[bytes | None, tuple[Topic | None, Rejected | Skipped | None]] = {}
        # topic header -> (kind, what the lookup resolved it to), for wired components
        # only, valid for the metadata the lookup answered from: see forget_routes().
        self._routes: dict[bytes | None, tuple[str, Resolved]] = {}
        self.route_hits = 0
        """Messages whose lookup the stage answered itself (a process-cache hit)."""
        self.ambiguous_readings = 0
        """Readings decoded from an ambiguous local time (SPEC section 2)."""

    def clear(self) -> None:
        self._topics.clear()
        self._routes.clear()

    def forget_routes(self) -> None:
        """Drop every remembered lookup result. Call it whenever the lookup's metadata
        may have changed (the runner: after each batch's version read, when it moved),
        and before handling records published after that change."""
        self._routes.clear()

    def handle(
        self,
        topic_header: bytes | None,
        payload: bytes | None,
        now: datetime,
        ingest_header: bytes | None = None,
    ) -> Outcome:
        """The outcome of one record, its readings as :class:`Decoded`.

        ``ingest_header`` is the record's ``ingest.ts`` (epoch milliseconds as
        text): it places an ambiguous local time (SPEC section 2); without it, or
        when it is not a number, such a time takes its earlier instant.
        """
        out: list[Decoded] = []
        verdict = self.emit(topic_header, payload, now, _as_decoded, out, ingest_header)
        return out[0] if verdict is None else verdict

    def emit(
        self,
        topic_header: bytes | None,
        payload: bytes | None,
        now: datetime,
        encode: Emit[T],
        out: list[T],
        ingest_header: bytes | None = None,
    ) -> Rejected | Skipped | None:
        """:meth:`handle` for the hot path: a decoded message goes to ``encode`` (with
        ``out``) as its values, with no object per reading, and None is returned;
        otherwise the verdict is. ``encode`` is called at most once, only after every
        check passed (a message yields all of its readings or none)."""
        route = self._routes.get(topic_header)
        if route is None:
            found = self._route(topic_header)
            if not isinstance(found, tuple):
                return found
            route = found
        else:
            self.route_hits += 1
        kind, resolved = route
        template = resolved.template
        tz = resolved.tz
        # Only a zone with repeated hours needs the ingest time; UTC devices skip the parse.
        ingest = None if ingest_header is None or tz is _UTC_ZONE else _ingest_time(ingest_header)
        try:
            stamp, values, ambiguous = template.decode_values(kind, payload or b"", tz, now, ingest)
        except DecodeError as exc:
            return Rejected(exc.reason, exc.detail)
        if ambiguous:
            self.ambiguous_readings += len(values)
        encode(resolved.device_id, template.datapoint_ids, stamp, values, out)
        return None

    def _route(self, topic_header: bytes | None) -> tuple[str, Resolved] | Rejected | Skipped:
        """The topic's wired component (remembered) or the verdict the topic or the lookup
        gives (in SPEC section 7's order)."""
        entry = self._topics.get(topic_header)
        if entry is None:
            entry = self._parse(topic_header)
        topic, verdict = entry
        if topic is None:
            assert verdict is not None
            return verdict
        found = self._lookup(topic.mac, topic.connector, topic.kind, topic.index)
        if type(found) is not Resolved:
            if found is SKIPPED:
                return Skipped(topic.kind)
            reason = cast(Reason, found)
            return Rejected(reason, _lookup_detail(reason, topic))
        if len(self._routes) >= _TOPIC_CACHE_MAX:
            self._routes.clear()
        route = self._routes[topic_header] = (topic.kind, found)
        return route

    def _parse(self, topic_header: bytes | None) -> tuple[Topic | None, Rejected | Skipped | None]:
        entry: tuple[Topic | None, Rejected | Skipped | None]
        if topic_header is None:
            return None, _NO_TOPIC_HEADER
        try:
            topic = parse_topic(topic_header.decode("utf-8"))
        except UnicodeDecodeError:
            topic = None
        if topic is None:
            text = topic_header.decode("utf-8", "replace")[:300]
            entry = None, Rejected(Reason.INVALID_TOPIC, text)
        elif topic.type == "cmnd":
            entry = None, _SKIP_COMMAND
        elif topic.kind == "reader":
            entry = None, _SKIP_READER
        else:
            entry = topic, None
        if len(self._topics) >= _TOPIC_CACHE_MAX:
            self._topics.clear()
        self._topics[topic_header] = entry
        return entry


def _as_decoded(
    device_id: int,
    datapoint_ids: tuple[int, ...],
    stamp: datetime,
    values: tuple[float, ...],
    out: list[Decoded],
) -> None:
    out.append(Decoded(device_id, list(zip(datapoint_ids, repeat(stamp), values))))


def _ingest_time(header: bytes) -> datetime | None:
    """The aware UTC time of an ``ingest.ts`` header (epoch ms), None if it is not one."""
    try:
        return datetime.fromtimestamp(int(header) / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _lookup_detail(reason: Reason, topic: Topic) -> str:
    if reason is Reason.UNKNOWN_DEVICE:
        return f"no device with MAC {topic.mac}"
    return f"nothing wired to J{topic.connector} {topic.kind}-{topic.index} of {topic.mac}"


# --- the runner ------------------------------------------------------------------------


class _Stopping(Exception):
    """The stop flag was raised while waiting; leave without committing the batch."""


class DeadLetterAlarm:
    """Dead letters / consumed over a sliding time window; alarms above a ratio.

    Only observes: it raises a metric and logs on each transition, it never stops
    processing (what devices send must not halt the pipeline).
    """

    def __init__(self, ratio: float, window_s: float, min_messages: int) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.min_messages = min_messages
        self._batches: deque[tuple[float, int, int]] = deque()
        self._consumed = 0
        self._dead = 0
        self.active = False

    def observe(self, consumed: int, dead: int, now: float | None = None) -> bool:
        """Add one batch; return whether the alarm is raised."""
        now = time.monotonic() if now is None else now
        self._batches.append((now, consumed, dead))
        self._consumed += consumed
        self._dead += dead
        while self._batches and self._batches[0][0] < now - self.window_s:
            _, c, d = self._batches.popleft()
            self._consumed -= c
            self._dead -= d
        current = self._dead / self._consumed if self._consumed else 0.0
        DLQ_RATIO.set(current)
        alarm = self._consumed >= self.min_messages and current > self.ratio
        if alarm != self.active:
            self.active = alarm
            DLQ_ALARM.set(1 if alarm else 0)
            if alarm:
                log.error(
                    "dead-letter ratio above threshold",
                    extra={"ratio": round(current, 4), "threshold": self.ratio},
                )
            else:
                log.info("dead-letter ratio back to normal", extra={"ratio": round(current, 4)})
        return alarm


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
        self._transactions = settings.processor_transactions
        self._delivery_errors: list[str] = []
        self.consumer = Consumer(
            consumer_config(
                settings,
                settings.processor_group,
                on_commit=self._on_commit,
                **{
                    "session.timeout.ms": int(settings.processor_session_timeout_s * 1000),
                    "heartbeat.interval.ms": int(settings.processor_session_timeout_s * 1000 / 4),
                },
                **({"isolation.level": "read_committed"} if self._transactions else {}),
            )
        )
        extra: dict[str, Any] = {
            "on_delivery": self._on_delivery,
            # Only failures come back to Python: a callback per record would cost ~1 µs each.
            "delivery.report.only.error": True,
        }
        if self._transactions:
            extra["transactional.id"] = f"{settings.processor_group}-{uuid.uuid4().hex[:12]}"
        self.producer = Producer(producer_config(settings, **extra))
        if self._transactions:
            self.producer.init_transactions(30)
        self.alarm = DeadLetterAlarm(
            settings.dlq_alarm_ratio, settings.dlq_alarm_window_s, settings.dlq_alarm_min_messages
        )
        self._last_hits = dict.fromkeys(TIERS, 0)
        self._last_misses = dict.fromkeys(TIERS, 0)
        self._lag_at = 0.0
        self._synced_at = 0.0  # monotonic time of the last metadata version read
        self._pending: dict[tuple[str, int], int] = {}  # offsets produced, not yet committed
        self._routes_version = -1  # metadata version the stage's remembered lookups are of
        self._route_hits = 0  # stage.route_hits already exported
        self._ambiguous = 0  # stage.ambiguous_readings already exported

    # --- control ---

    def stop(self) -> None:
        """Ask the loop to finish the current batch and return (safe from signal handlers).

        A second call also abandons a wait for Kafka (the batch stays uncommitted).
        """
        if self._stop.is_set():
            self._hard_stop = True
        self._stop.set()

    def ready(self) -> bool:
        return self.resolver.database_ok and not self._paused

    # --- callbacks (run inside poll/flush/consume on this thread) ---

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err}")

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            log.warning(
                "offset commit failed (batch will be consumed again)", extra={"error": str(err)}
            )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions revoked", extra={"partitions": [p.partition for p in partitions]})
        ASSIGNED.dec(len(partitions))
        for tp in partitions:
            with contextlib.suppress(KeyError):  # no lag reported for it yet
                LAG.remove(str(tp.partition))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": [p.partition for p in partitions]})
        ASSIGNED.inc(len(partitions))

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
                "transactions": self._transactions,
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
                self._update_lag()
        except _Stopping:
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
            else:
                log.warning("consumer error", extra={"error": str(err)})
        return good

    def _handle_batch(self, batch: list[Message]) -> None:
        started = time.perf_counter()
        outputs, dead, skipped = self._run_stage(batch)
        staged = time.perf_counter()
        if self._transactions:
            self._commit_transaction(batch, outputs, dead)
        else:
            self._produce(outputs, dead)
            self._flush()
            self._commit(batch)
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
        self._export_cache_counts()
        self.alarm.observe(n, len(dead))

    def _run_stage(
        self, batch: list[Message]
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[Message, Rejected]], dict[str, int]]:
        """Run the stage over the batch; on a metadata outage pause, wait, redo.

        Messages arriving while paused (newly assigned partitions) join the batch.
        """
        delay = 0.25
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
                        raise _Stopping from None
                    batch.extend(self._poll(delay))
                    delay = min(delay * 2, 5.0)
        finally:
            if self._paused:
                self._paused = False
                PAUSED.set(0)
                self.consumer.resume(self.consumer.assignment())
                log.info("metadata database back: resumed")

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

    def _produce(
        self, outputs: list[tuple[bytes, bytes]], dead: list[tuple[Message, Rejected]]
    ) -> None:
        produce = self.producer.produce
        topic = self.settings.topic_processed
        for key, value in outputs:
            try:
                produce(topic, value, key)
            except BufferError:
                self._produce_when_room(topic, value, key, None)
        dlq_topic = self.settings.topic_dead_letter
        for msg, rejected in dead:
            headers = dead_letter_headers(msg, rejected)
            try:
                produce(dlq_topic, msg.value(), msg.key(), headers=headers)
            except BufferError:
                self._produce_when_room(dlq_topic, msg.value(), msg.key(), headers)

    def _produce_when_room(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Headers | None,
    ) -> None:
        # The local queue is full (Kafka slow or down): serve delivery reports until
        # there is room; nothing is dropped.
        while True:
            self.producer.poll(0.1)
            try:
                self.producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:
                if self._stop.is_set() and self._hard_stop:
                    raise _Stopping from None

    def _flush(self) -> None:
        """Block until Kafka acknowledged every record produced; raise on a lost one."""
        waited = 0.0
        while self.producer.flush(1.0) > 0:
            waited += 1.0
            if waited % 10 == 0:
                log.warning("waiting for Kafka to acknowledge outputs", extra={"seconds": waited})
            if self._hard_stop or (self._stop.is_set() and waited >= 30):
                raise _Stopping
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            # A record Kafka refused for good: never commit past it.
            raise KafkaException(f"records not delivered: {errors[:3]}")

    def _batch_offsets(self, batch: list[Message]) -> list[TopicPartition]:
        # One topic; a partition's records arrive in offset order, so the last one seen wins.
        last: dict[int, int] = {}
        for msg in batch:
            last[msg.partition()] = msg.offset()  # type: ignore[index,assignment]
        topic = self.settings.topic_raw
        return [TopicPartition(topic, p, o + 1) for p, o in last.items()]

    def _commit(self, batch: list[Message]) -> None:
        offsets = self._batch_offsets(batch)
        for tp in offsets:
            self._pending[(tp.topic, tp.partition)] = tp.offset
        # Asynchronous: ordered after every earlier commit, and only issued once the
        # outputs are acknowledged; the final commit at shutdown is synchronous.
        self.consumer.commit(offsets=offsets, asynchronous=True)

    def _commit_transaction(
        self,
        batch: list[Message],
        outputs: list[tuple[bytes, bytes]],
        dead: list[tuple[Message, Rejected]],
    ) -> None:
        offsets = self._batch_offsets(batch)
        while True:
            self.producer.begin_transaction()
            try:
                self._produce(outputs, dead)
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), 30
                )
                self.producer.commit_transaction(60)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if isinstance(error, KafkaError) and error.txn_requires_abort():
                    log.warning("transaction aborted, retrying", extra={"error": str(error)})
                    self.producer.abort_transaction(60)
                    if self._stop.is_set():
                        raise _Stopping from None
                    continue
                raise

    def _export_cache_counts(self) -> None:
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

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_at < 2.0:
            return
        self._lag_at = now
        try:
            assignment = self.consumer.assignment()
            if not assignment:
                return
            for tp in self.consumer.position(assignment):
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    LAG.labels(str(tp.partition)).set(max(high - tp.offset, 0))
        except KafkaException as exc:
            log.debug("lag not available", extra={"error": str(exc)})

    def _close(self) -> None:
        try:
            if not self._transactions:
                remaining = self.producer.flush(10.0)
                if remaining == 0 and self._pending and not self._delivery_errors:
                    offsets = [TopicPartition(t, p, o) for (t, p), o in self._pending.items()]
                    try:
                        self.consumer.commit(offsets=offsets, asynchronous=False)
                    except KafkaException as exc:
                        log.warning("final commit failed", extra={"error": str(exc)})
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


def original_headers(msg: Message) -> Headers:
    """The record's headers without any ``dlq.*`` ones, as a list of pairs."""
    raw = msg.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    return [(name, value) for name, value in pairs if not name.startswith("dlq.")]


def dead_letter_headers(msg: Message, rejected: Rejected) -> Headers:
    """The original headers plus ``dlq.*`` (SPEC section 4) for a processor dead letter."""
    headers = original_headers(msg)
    headers += [
        ("dlq.stage", b"processor"),
        ("dlq.reason", rejected.reason.value.encode()),
        ("dlq.detail", rejected.detail.encode("utf-8", "replace")[:1000]),
        ("dlq.source", f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()),
        ("dlq.ts", b"%d" % int(time.time() * 1000)),
    ]
    return headers


# --- CLI ----------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    parser.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    setup_logging("processor", args.log_level)
    settings = get_settings()
    processor = Processor(settings)
    signals = {"count": 0}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(130)  # second Ctrl-C: leave now, uncommitted input is consumed again
        processor.stop()

    # A batch keeps about 15 containers per record alive until it is done (messages,
    # header tuples, parsed payloads, outputs); a young-generation threshold below
    # that made every batch traverse itself several times for nothing (about 3 µs of
    # CPU per frame).
    quiet_gc(max(200_000, 40 * settings.processor_batch_size))
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ops = OpsServer(settings.ops_host, settings.processor_port, processor.ready)
    try:
        processor.run()
    finally:
        ops.close()
    return 0
