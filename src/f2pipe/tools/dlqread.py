"""Reading the dead-letter topic: every committed dead letter, or one at its offset.

Partitions are *assigned*, never subscribed: no consumer group state is
created or committed, so reading twice reads the same. Only committed records
are read (``isolation.level=read_committed``): dead letters of a transaction a
crashed processor left open or aborted (``F2PIPE_PROCESSOR_TRANSACTIONS``) are
not letters, its batch is dead-lettered again when consumed again.

- :func:`read_dead_letters` reads each partition from its low to its high
  watermark as of the call, so a listing ends;
- :func:`read_one` assigns the one partition at the one offset and reads that
  record: its cost does not grow with the topic.

Both count what they read in a :class:`Scan`, which a progress line reads
and a test can check.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from f2pipe.core import deadletter
from f2pipe.core.records import Headers
from f2pipe.errors import F2PipeError
from f2pipe.runtime.kafka import consumer_config
from f2pipe.settings import Settings

# The group is required by the client; it is never joined or committed.
READER_GROUP = "f2pipe-dlq-reader"


class DeadLetterError(F2PipeError):
    """The dead-letter topic could not be read, or a replay could not be delivered."""


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", "replace")
        return ""

    @property
    def stage(self) -> str:
        return self.header("dlq.stage")

    @property
    def reason(self) -> str:
        return self.header("dlq.reason")

    @property
    def ts_ms(self) -> int:
        text = self.header("dlq.ts")
        return int(text) if text.isdigit() else 0

    @property
    def ref(self) -> str:
        """How ``dlq show`` names it: ``<partition>/<offset>``."""
        return f"{self.partition}/{self.offset}"

    def original_headers(self) -> Headers:
        """The headers the record had before it was dead-lettered (no ``dlq.*`` ones)."""
        return deadletter.original_headers(self.headers)


@dataclass
class Scan:
    """How far a read got; the reader updates it as it goes.

    ``total`` offsets lie between the watermarks at the start (dead letters,
    transaction markers, aborted records); ``done`` of them were passed;
    ``records`` counts the records the client handed over, what reading cost.
    ``on_progress`` is called once the total is known and after every batch.
    """

    total: int = 0
    done: int = 0
    records: int = 0
    on_progress: Callable[[Scan], None] | None = field(default=None, repr=False)

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self)


def parse_ref(text: str) -> tuple[int, int]:
    """``<partition>/<offset>`` (as ``dlq list`` prints it) as two numbers; DeadLetterError."""
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", text.strip())
    if match is None:
        raise DeadLetterError(
            f"expected <partition>/<offset> as `dlq list` prints it (such as 0/42), got {text!r}"
        )
    return int(match.group(1)), int(match.group(2))


def _consumer(settings: Settings, isolation: str, **extra: Any) -> Consumer:
    return Consumer(
        consumer_config(
            settings,
            READER_GROUP,
            **{"enable.partition.eof": True, "isolation.level": isolation, **extra},
        )
    )


def _partitions(consumer: Consumer, topic: str, timeout: float) -> list[int]:
    """The topic's partitions, none when it does not exist; DeadLetterError without Kafka."""
    try:
        meta = consumer.list_topics(topic, timeout=timeout)
    except KafkaException as exc:
        raise DeadLetterError(f"cannot reach Kafka: {exc}") from exc
    info = meta.topics.get(topic)
    if info is None or info.error is not None:
        return []
    return sorted(info.partitions)


def _watermarks(consumer: Consumer, topic: str, partition: int, timeout: float) -> tuple[int, int]:
    try:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=timeout
        )
    except KafkaException as exc:
        raise DeadLetterError(f"cannot read the offsets of {topic}: {exc}") from exc
    return int(low), int(high)


def _letter(msg: Message) -> DeadLetter:
    raw = msg.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    headers = [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in pairs]
    return DeadLetter(msg.partition() or 0, msg.offset() or 0, msg.key(), msg.value(), headers)


def read_dead_letters(
    settings: Settings, timeout: float = 10.0, scan: Scan | None = None
) -> Iterator[DeadLetter]:
    """Every dead letter present when called, partition by partition, in offset order.

    Raises DeadLetterError when Kafka cannot be reached or a partition yields
    nothing for ``max(timeout, 30)`` seconds before its end.
    """
    scan = Scan() if scan is None else scan
    topic = settings.topic_dead_letter
    # A partition ends where the client says it does: with transactions the log
    # ends in a commit marker (no record) and may hold aborted records, so no
    # record need sit at high watermark - 1.
    consumer = _consumer(settings, "read_committed")
    try:
        ends: dict[int, int] = {}
        starts: list[TopicPartition] = []
        done_at: dict[int, int] = {}  # partition -> its offsets passed
        for partition in _partitions(consumer, topic, timeout):
            low, high = _watermarks(consumer, topic, partition, timeout)
            if high > low:
                ends[partition] = high
                starts.append(TopicPartition(topic, partition, low))
                scan.total += high - low
                done_at[partition] = low
        scan._progress()
        if not starts:
            return
        consumer.assign(starts)

        def finish(partition: int) -> None:
            scan.done += ends.pop(partition) - done_at[partition]
            consumer.pause([TopicPartition(topic, partition)])

        deadline = time.monotonic() + max(timeout, 30.0)
        while ends:
            msgs = consumer.consume(num_messages=1000, timeout=1.0)
            if not msgs and time.monotonic() > deadline:
                raise DeadLetterError(f"timed out reading {topic}")
            for msg in msgs:
                partition, offset = msg.partition() or 0, msg.offset() or 0
                if partition not in ends:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:  # nothing more, for now
                        finish(partition)
                    continue
                scan.records += 1
                if offset >= ends[partition]:  # written after the command started
                    finish(partition)
                    continue
                scan.done += offset + 1 - done_at[partition]
                done_at[partition] = offset + 1
                yield _letter(msg)
                if offset + 1 >= ends[partition]:
                    finish(partition)
            scan._progress()
            deadline = time.monotonic() + max(timeout, 30.0) if msgs else deadline
    finally:
        consumer.close()


def read_one(
    settings: Settings, partition: int, offset: int, timeout: float = 10.0, scan: Scan | None = None
) -> DeadLetter:
    """The committed dead letter at ``partition``/``offset``, read directly.

    The one partition is assigned at the one offset, so the record comes with
    the first fetch however long the topic is. Raises DeadLetterError, one
    line, when there is no such letter: no such partition; an offset below the
    low watermark (deleted by retention) or at or past the high watermark (not
    written yet); a transaction marker; a record of an aborted transaction or
    of one still open; or nothing came within ``timeout`` seconds.
    """
    scan = Scan() if scan is None else scan
    topic = settings.topic_dead_letter
    ref = f"{partition}/{offset}"
    # No prefetching beyond the record (and no backing off for having it queued: a
    # second of waiting); an offset retention deletes meanwhile is an error, not a
    # silent jump to the next record.
    one = {"queued.min.messages": 1, "fetch.queue.backoff.ms": 0, "auto.offset.reset": "error"}
    # Read uncommitted, the offsets are the log's own: a committed read's high
    # watermark is the last stable offset, before any transaction still open.
    consumer = _consumer(settings, "read_uncommitted", **one)
    try:
        partitions = _partitions(consumer, topic, timeout)
        if not partitions:
            raise DeadLetterError(f"{ref}: there is no topic {topic}")
        if partition not in partitions:
            raise DeadLetterError(
                f"{ref}: {topic} has no partition {partition} (it has 0 to {partitions[-1]})"
            )
        low, high = _watermarks(consumer, topic, partition, timeout)
        where = f"{topic} partition {partition} holds offsets {low} to {high - 1}"
        if low >= high:
            where = f"{topic} partition {partition} is empty (its next offset is {high})"
        if offset < low:
            raise DeadLetterError(f"{ref}: deleted by retention ({where})")
        if offset >= high:
            raise DeadLetterError(f"{ref}: not written yet ({where})")
    finally:
        consumer.close()
    scan.total = 1
    consumer = _consumer(settings, "read_committed", **one)
    try:
        # A committed read's high watermark is the last stable offset: from there on
        # nothing is delivered while the transaction before it is open.
        _, stable = _watermarks(consumer, topic, partition, timeout)
        if offset >= stable:
            raise DeadLetterError(
                f"{ref}: not committed yet (a transaction is open from offset {stable})"
            )
        msg = _first_from(consumer, topic, partition, offset, timeout, scan)
    finally:
        consumer.close()
    if msg is not None and msg.offset() == offset:
        scan.done = 1
        return _letter(msg)
    # Nothing committed at the offset: what is there, read uncommitted, tells why.
    consumer = _consumer(settings, "read_uncommitted", **one)
    try:
        raw = _first_from(consumer, topic, partition, offset, timeout, scan)
    finally:
        consumer.close()
    if raw is not None and raw.offset() == offset:
        raise DeadLetterError(f"{ref}: a record of an aborted transaction, not a dead letter")
    raise DeadLetterError(f"{ref}: a transaction marker, not a record")


def _first_from(
    consumer: Consumer, topic: str, partition: int, offset: int, timeout: float, scan: Scan
) -> Message | None:
    """The first record the consumer gives from ``offset`` on, None when the partition
    ends first; DeadLetterError after ``timeout`` seconds."""
    consumer.assign([TopicPartition(topic, partition, offset)])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=1, timeout=0.5):
            err = msg.error()
            if err is None:
                scan.records += 1
                return msg
            if err.code() == KafkaError._PARTITION_EOF:
                return None
            if err.code() == KafkaError._AUTO_OFFSET_RESET:
                raise DeadLetterError(f"{partition}/{offset}: deleted by retention ({topic})")
            if not _transient(err):
                raise DeadLetterError(f"cannot read {partition}/{offset} of {topic}: {err}")
    raise DeadLetterError(f"timed out reading {partition}/{offset} of {topic}")


def _transient(err: KafkaError) -> bool:
    retriable: bool = err.retriable()
    return retriable or err.code() in {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}
