"""Kafka client configuration, built in one place.

Consumers never auto-commit: every stage commits offsets itself, only after the
effects of what it consumed are durable (SPEC section 7). Producers are
idempotent with ``acks=all`` so a retried send never duplicates or reorders
records within a partition.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, Message

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
