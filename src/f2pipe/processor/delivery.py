"""The processor's outputs into Kafka, then its input offsets committed (SPEC section 7).

:class:`Delivery` owns the processor's producer. A batch's readings and dead
letters are produced, the producer is flushed (every record acknowledged,
``acks=all``), and only then does :meth:`Delivery.commit_offsets` commit the
batch's input offsets. A crash before that commit means the batch is consumed
again: readings and dead letters may repeat, none is lost.

With ``F2PIPE_PROCESSOR_TRANSACTIONS=true`` the three steps run inside one Kafka
transaction, and :meth:`Delivery.commit_offsets` adds the offsets to it and
commits it: a crash anywhere leaves nothing visible to ``read_committed``
readers (the sink, ``f2pipe dlq``), so no reading or dead letter repeats. The
transactional id is the same for a replica across restarts
(:func:`transactional_id`), so a restart fences its crashed predecessor and
aborts its open transaction at once instead of leaving readers held back until
Kafka times it out.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from f2pipe.core.deadletter import Rejected, dead_letter_headers
from f2pipe.runtime.kafka import Stopping, producer_config
from f2pipe.runtime.kafka import produce as produce_when_room
from f2pipe.settings import Settings

__all__ = ["Delivery", "transactional_id"]

log = logging.getLogger(__name__)

# A commit failed inside a rebalance is retried this long after: by then the group
# has usually settled, and a retry that fails again only schedules another.
RECOMMIT_AFTER_S = 1.0


def transactional_id(settings: Settings) -> str:
    """The producer's transactional id: the same for a replica across restarts.

    A new id at each start would leave a crashed replica's open transaction
    holding back every ``read_committed`` reader of the partitions it wrote
    until Kafka times it out (60 s). Replicas on one host differ by their ops
    port, which only one live process can hold.
    """
    host = socket.gethostname()
    return f"{settings.processor_group}-{host}-{settings.processor_port}"


class Delivery:
    """Produces a batch's outputs, waits for Kafka's acknowledgements, commits its offsets.

    ``stopping`` answers whether the service was asked to stop (a flush then
    gives up after 30 s), ``abandoning`` whether it was told to stop at once
    (every wait for Kafka ends with :class:`~f2pipe.runtime.kafka.Stopping`);
    ``on_error`` hears the producer's client errors.
    """

    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        stopping: Callable[[], bool],
        abandoning: Callable[[], bool],
        on_error: Callable[[KafkaError], None],
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.transactions = settings.processor_transactions
        self._stopping = stopping
        self._abandoning = abandoning
        self._errors: list[str] = []
        self._pending: dict[tuple[str, int], int] = {}  # offsets committed asynchronously
        self._recommit_at: float | None = None  # after a failed commit: when to retry
        extra: dict[str, Any] = {
            "on_delivery": self._on_delivery,
            # Only failures come back to Python: a callback per record would cost ~1 µs each.
            "delivery.report.only.error": True,
            "error_cb": on_error,
        }
        if self.transactions:
            extra["transactional.id"] = transactional_id(settings)
        self.producer = Producer(producer_config(settings, **extra))
        if self.transactions:
            self.producer.init_transactions(30)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def deliver(
        self,
        batch: list[Message],
        outputs: list[tuple[bytes, bytes]],
        dead: list[tuple[Message, Rejected]],
    ) -> None:
        """Produce, flush, :meth:`commit_offsets`; with transactions, all inside one
        transaction, redone when Kafka aborts it. Raises KafkaException on a record
        Kafka refused for good, Stopping when told to stop while waiting."""
        if not self.transactions:
            self.produce(outputs, dead)
            self.flush()
            self.commit_offsets(batch)
            return
        while True:
            self.producer.begin_transaction()
            try:
                self.produce(outputs, dead)
                self.flush()
                self.commit_offsets(batch)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if isinstance(error, KafkaError) and error.txn_requires_abort():
                    log.warning("transaction aborted, retrying", extra={"error": str(error)})
                    self.producer.abort_transaction(60)
                    if self._stopping():
                        raise Stopping("stopped after an aborted transaction") from None
                    continue
                raise

    def produce(
        self, outputs: list[tuple[bytes, bytes]], dead: list[tuple[Message, Rejected]]
    ) -> None:
        """Hand the readings and dead letters to the producer, waiting for room."""
        produce = self.producer.produce
        topic = self.settings.topic_processed
        for key, value in outputs:
            try:
                produce(topic, value, key)
            except BufferError:  # queue full: wait for room, as every stage does
                produce_when_room(self.producer, topic, value, key, give_up=self._abandoning)
        dlq_topic = self.settings.topic_dead_letter
        for msg, rejected in dead:
            headers = dead_letter_headers(
                msg.headers(),  # type: ignore[arg-type]  # consumed: a list of pairs or None
                "processor",
                rejected,
                f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode(),
                int(time.time() * 1000),
            )
            produce_when_room(
                self.producer, dlq_topic, msg.value(), msg.key(), headers, give_up=self._abandoning
            )

    def flush(self) -> None:
        """Block until Kafka acknowledged every record produced; raise on a lost one."""
        waited = 0.0
        while self.producer.flush(1.0) > 0:
            waited += 1.0
            if waited % 10 == 0:
                log.warning("waiting for Kafka to acknowledge outputs", extra={"seconds": waited})
            if self._abandoning() or (self._stopping() and waited >= 30):
                raise Stopping("stopped before Kafka acknowledged the batch's outputs")
        if self._errors:
            errors, self._errors = self._errors, []
            # A record Kafka refused for good: never commit past it.
            raise KafkaException(f"records not delivered: {errors[:3]}")

    def commit_offsets(self, batch: list[Message]) -> None:
        """Commit the batch's input offsets; called only after :meth:`flush` returned.

        The one step between the flush and the commit: a crash just before it is
        the case the delivery guarantee (module docstring) is about.
        """
        offsets = _batch_offsets(self.settings.topic_raw, batch)
        if self.transactions:
            metadata = self.consumer.consumer_group_metadata()
            self.producer.send_offsets_to_transaction(offsets, metadata, 30)
            self.producer.commit_transaction(60)
            return
        for tp in offsets:
            self._pending[(tp.topic, tp.partition)] = tp.offset
        # Asynchronous: ordered after every earlier commit, and only issued once the
        # outputs are acknowledged; the final commit at shutdown is synchronous.
        self.consumer.commit(offsets=offsets, asynchronous=True)

    def commit_failed(self) -> None:
        """An asynchronous commit failed (a rebalance moved the group on, or its
        coordinator): :meth:`recommit` commits the offsets still owned again."""
        if self._recommit_at is None:
            self._recommit_at = time.monotonic() + RECOMMIT_AFTER_S

    def recommit(self) -> None:
        """After a failed commit, commit the latest delivered offset of every partition
        still owned, once the group has had time to settle; a failure schedules another.

        Without it a partition that got no record after the failure keeps its old
        committed offset: nothing is lost, but its lag never returns to 0 and a
        restart consumes those records again.
        """
        if self._recommit_at is None or time.monotonic() < self._recommit_at:
            return
        self._recommit_at = None
        if self._pending:
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._pending.items()]
            self.consumer.commit(offsets=offsets, asynchronous=True)

    def forget(self, partitions: list[TopicPartition]) -> None:
        """Never commit again for ``partitions`` (revoked: their new owner commits)."""
        for tp in partitions:
            self._pending.pop((tp.topic, tp.partition), None)

    def close(self) -> None:
        """At shutdown: flush and commit synchronously what was delivered; with
        transactions, abort one left open by a stop (none open is not an error)."""
        if self.transactions:
            with contextlib.suppress(KafkaException):
                self.producer.abort_transaction(10)
            return
        remaining = self.producer.flush(10.0)
        if remaining == 0 and self._pending and not self._errors:
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._pending.items()]
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                log.warning("final commit failed", extra={"error": str(exc)})


def _batch_offsets(topic: str, batch: list[Message]) -> list[TopicPartition]:
    # One topic; a partition's records arrive in offset order, so the last one seen wins.
    last: dict[int, int] = {}
    for msg in batch:
        last[msg.partition()] = msg.offset()  # type: ignore[index,assignment]
    return [TopicPartition(topic, p, o + 1) for p, o in last.items()]
