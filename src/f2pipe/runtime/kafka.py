"""Kafka client configuration, built in one place.

Consumers never auto-commit: every stage commits offsets itself, only after the
effects of what it consumed are durable (SPEC section 7). Producers are
idempotent with ``acks=all`` so a retried send never duplicates or reorders
records within a partition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer

from f2pipe.errors import F2PipeError
from f2pipe.settings import Settings


def consumer_config(settings: Settings, group_id: str, **extra: Any) -> dict[str, Any]:
    """A confluent-kafka consumer config; ``enable.auto.commit`` is always off."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        # Offsets are stored and committed explicitly after the batch is durable.
        "enable.auto.offset.store": False,
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.wait.max.ms": 50,
        "queued.min.messages": 20000,
    }
    config.update(extra)
    config["enable.auto.commit"] = False
    return config


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """A confluent-kafka producer config: idempotent, acks=all, batched."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500000,
        "message.timeout.ms": 0,  # never give up on a record: a lost record is a lost reading
    }
    config.update(extra)
    config["enable.idempotence"] = True
    config["acks"] = "all"
    return config


def admin_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap}
    config.update(extra)
    return config


def consume_available(consumer: Consumer, size: int, timeout: float) -> list[Message]:
    """Up to ``size`` records, waiting at most ``timeout`` s for the first and never for the rest.

    ``consume(size, timeout)`` alone waits until ``size`` records are there or the
    timeout passes, so at light load every record would sit out the whole timeout;
    under load the client's prefetched queue fills the batch at once.
    """
    msgs: list[Message] = consumer.consume(num_messages=size, timeout=0)
    if not msgs and timeout > 0:
        msgs = consumer.consume(num_messages=1, timeout=timeout)
        if msgs and size > 1:
            msgs += consumer.consume(num_messages=size - 1, timeout=0)
    return msgs


class Stopping(F2PipeError):
    """Raised out of a wait for Kafka when the service was told to stop at once."""


def produce(
    producer: Producer,
    topic: str,
    value: bytes | None,
    key: bytes | None = None,
    headers: list[tuple[str, str | bytes | None]] | None = None,
    *,
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    give_up: Callable[[], bool] | None = None,
    wait: float = 0.1,
) -> None:
    """Hand one record to the producer, waiting while its local queue is full.

    A full queue (Kafka slow or down) is back-pressure: delivery reports are
    served for ``wait`` s at a time until there is room, so nothing is dropped.
    ``give_up`` is asked after each wait; when it answers True the wait ends
    with :class:`Stopping` (the record was not produced).
    """
    while True:
        try:
            if on_delivery is None:
                producer.produce(topic, value, key, headers=headers)
            else:
                producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(wait)
            if give_up is not None and give_up():
                raise Stopping(
                    f"stopped while waiting for room in the {topic} producer queue"
                ) from None
