"""What follows a batch's database commit: counted, dead letters acknowledged, offsets committed.

In that order, and only after the database commit, so that a crash anywhere
before the offset commit re-delivers the batch (which the idempotent write
absorbs) and a dead letter is never lost behind a committed offset. The
headers of a dead letter are those of every stage
(:func:`f2pipe.core.deadletter.dead_letter_headers`) with ``dlq.stage=sink``
and the reason ``sink_rejected``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from f2pipe.core.deadletter import Rejected, dead_letter_headers
from f2pipe.core.reasons import Reason
from f2pipe.errors import F2PipeError
from f2pipe.runtime.backoff import Backoff
from f2pipe.runtime.kafka import produce
from f2pipe.runtime.metrics import DEAD_LETTERS
from f2pipe.sink.batching import Batch
from f2pipe.sink.metrics import DUPLICATES, FALLBACKS, LAG, REJECTED, ROWS_WRITTEN
from f2pipe.sink.writer import WriteResult

__all__ = ["DeadLettersUndelivered", "Settler"]

log = logging.getLogger(__name__)

# Commit errors that mean the group moved on to a new generation: the partitions may
# have gone to another member (nothing to commit), or stayed (committed again later).
_REBALANCED = (
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError._NO_OFFSET,
)

# Commit errors that pass once Kafka (or its group coordinator) is back: retried.
# The client marks none of them retriable, so they are named here. Any other
# error skips the commit: the rows are stored, and re-reading them (the next
# commit covers them, or the next owner re-reads) is absorbed by the idempotent
# write, whereas retrying an error that cannot change would stop the sink.
_TRANSIENT = (
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._WAIT_COORD,
    KafkaError._ALL_BROKERS_DOWN,
)


# A commit refused inside a rebalance is tried again this long after: by then the
# group has usually settled.
RECOMMIT_AFTER_S = 1.0


class DeadLettersUndelivered(F2PipeError):
    """Kafka refused a dead letter: the batch's offsets stay uncommitted."""


class Settler:
    """Settles the sink's batches on the Kafka side, on the consumer loop's thread.

    ``stopping`` tells whether the sink was asked to stop (then a failing
    offset commit is given up, not retried); ``sleep`` waits between retries
    and returns early when stopping; ``backoff`` is the retry schedule.
    """

    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        dead_letter_topic: str,
        *,
        backoff: Backoff,
        stopping: Callable[[], bool],
        sleep: Callable[[float], None],
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.dead_letter_topic = dead_letter_topic
        self.backoff = backoff
        self._stopping = stopping
        self._sleep = sleep
        self._delivery_errors: list[str] = []
        # Offsets refused by a rebalance, committed again once the group settled if
        # their partitions stayed here; and when to try.
        self._deferred: dict[tuple[str, int], int] = {}
        self._recommit_at = 0.0

    def settle(self, batch: Batch, result: WriteResult) -> None:
        """After the database commit: count, dead-letter the rejects, commit offsets.

        Blocks while Kafka is unreachable. Raises :class:`DeadLettersUndelivered`
        (offsets not committed) if Kafka refused a dead letter.
        """
        ROWS_WRITTEN.inc(result.inserted)
        DUPLICATES.inc(len(batch.rows) - len(result.rejected) - result.inserted)
        if result.fallback:
            FALLBACKS.inc()
        rejected = [(batch.messages[i], detail, "database") for i, detail in result.rejected]
        rejected += [(msg, detail, "parse") for msg, detail in batch.unparsed]
        if rejected:
            self.dead_letter(rejected)
        self.commit_offsets(batch.offsets)

    def recommit(self, owned: set[tuple[str, int]]) -> None:
        """Commit again the offsets a rebalance refused whose partitions are still
        ``owned``, once the group settled (called from the loop; nothing to do in the
        common case). A rebalance that refuses them again defers them again."""
        if self._deferred and time.monotonic() >= self._recommit_at:
            deferred, self._deferred = self._deferred, {}
            self.commit_offsets({k: v for k, v in deferred.items() if k in owned})

    def forget(self, partitions: set[tuple[str, int]]) -> None:
        """Never commit the deferred offsets of ``partitions`` (newly assigned: whoever
        owned them meanwhile committed progress that a late commit would rewind)."""
        for key in partitions:
            self._deferred.pop(key, None)

    def dead_letter(self, rejected: Sequence[tuple[Message, str, str]]) -> None:
        """Dead-letter each ``(record, detail, cause)`` and wait until Kafka acknowledged all.

        ``cause`` (``parse`` or ``database``) labels the rejected-rows metric.
        """
        now = int(time.time() * 1000)
        for msg, detail, cause in rejected:
            source = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
            headers = dead_letter_headers(
                msg.headers(),  # type: ignore[arg-type]  # consumed: a list of pairs or None
                "sink",
                Rejected(Reason.SINK_REJECTED, detail),
                source.encode(),
                now,
            )
            produce(
                self.producer,
                self.dead_letter_topic,
                msg.value(),
                msg.key(),
                headers,
                on_delivery=self._on_delivery,
                wait=0.5,
            )
            REJECTED.labels(cause=cause).inc()
            log.warning(
                "record dead-lettered",
                extra={
                    "reason": Reason.SINK_REJECTED.value,
                    "cause": cause,
                    "detail": detail[:300],
                    "source": source,
                },
            )
        while self.producer.flush(1.0):
            log.warning("waiting for Kafka to acknowledge dead letters")
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            # Not committing: the batch will be re-delivered and tried again.
            raise DeadLettersUndelivered(f"dead letters not delivered: {errors[:3]}")
        DEAD_LETTERS.labels(stage="sink", reason=Reason.SINK_REJECTED.value).inc(len(rejected))

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(str(err))

    def commit_offsets(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit ``offsets`` (last offset seen + 1) synchronously; wait while Kafka is down.

        The one place the sink commits offsets, always after the batch's
        database commit and its dead letters' acknowledgement.

        Defers a commit a rebalance refused (:meth:`recommit` makes it for the
        partitions still owned; a new owner re-reads the others into the idempotent
        write), and gives up without committing when stopping.
        """
        if not offsets:
            return
        tps = [TopicPartition(t, p, off + 1) for (t, p), off in offsets.items()]
        backoff = self.backoff
        backoff.reset()
        while True:
            try:
                self.consumer.commit(offsets=tps, asynchronous=False)
                break
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                code = err.code() if isinstance(err, KafkaError) else None
                if code in _REBALANCED:
                    # The rows are stored. Partitions that moved are re-read by their
                    # new owner into the idempotent write; those that stayed here are
                    # committed by recommit(), or their lag would never reach 0 when
                    # no record follows.
                    if code != KafkaError._NO_OFFSET:  # that one: nothing left to commit
                        log.info("offset commit deferred by a rebalance", extra={"error": str(err)})
                        self._deferred.update(offsets)
                        self._recommit_at = time.monotonic() + RECOMMIT_AFTER_S
                    return
                if code not in _TRANSIENT:
                    log.warning(
                        "offset commit skipped: the rows are stored and will be re-read",
                        extra={"error": str(exc)},
                    )
                    return
                log.warning("offset commit failed; retrying", extra={"error": str(exc)})
                if self._stopping():
                    # The rows are stored; the next start re-reads them into the
                    # idempotent write. Waiting here would make shutdown hang.
                    log.warning("stopping without an offset commit")
                    return
                self._sleep(backoff.next_delay())
        for key in offsets:
            self._deferred.pop(key, None)  # batches settle in order: this one is newer
        for (t, p), off in offsets.items():
            try:
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                LAG.labels(partition=str(p)).set(max(high - off - 1, 0))
