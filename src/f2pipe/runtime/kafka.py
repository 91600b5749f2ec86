"""Kafka client configuration, built in one place.

Consumers never auto-commit: every stage commits offsets itself, only after the
effects of what it consumed are durable (SPEC section 7). Producers are
idempotent with ``acks=all`` so a retried send never duplicates or reorders
records within a partition.

Every Kafka client f2pipe creates takes its configuration from
:func:`consumer_config`, :func:`producer_config` or :func:`admin_config`, which
all start from :func:`client_config`: the bootstrap servers, the security
settings (``F2PIPE_KAFKA_SECURITY_PROTOCOL``, SASL, TLS files) and the
properties file. ``tests/test_kafka_config.py`` fails on a construction that
bypasses them.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import Counter, Gauge

from f2pipe.errors import ConfigError, F2PipeError
from f2pipe.settings import Settings

log = logging.getLogger(__name__)

# Properties that have an F2PIPE variable, or that f2pipe's guarantees fix: the
# properties file may not set them (a silent override would be worse than an error).
_OWN_VARIABLES = {
    "bootstrap.servers": "F2PIPE_KAFKA_BOOTSTRAP",
    "security.protocol": "F2PIPE_KAFKA_SECURITY_PROTOCOL",
    "sasl.mechanism": "F2PIPE_KAFKA_SASL_MECHANISM",
    "sasl.mechanisms": "F2PIPE_KAFKA_SASL_MECHANISM",
    "sasl.username": "F2PIPE_KAFKA_SASL_USERNAME",
    "sasl.password": "F2PIPE_KAFKA_SASL_PASSWORD",
    "ssl.ca.location": "F2PIPE_KAFKA_SSL_CA_LOCATION",
    "ssl.certificate.location": "F2PIPE_KAFKA_SSL_CERTIFICATE_LOCATION",
    "ssl.key.location": "F2PIPE_KAFKA_SSL_KEY_LOCATION",
}
_FIXED = {
    "enable.auto.commit": "offsets are committed only once their effects are durable",
    "enable.idempotence": "producers are always idempotent",
    "acks": "producers always wait for all in-sync replicas",
}


def read_properties(path: Path) -> dict[str, str]:
    """librdkafka properties from ``path``: ``key=value`` a line, ``#`` or ``!`` comments.

    Raises ConfigError naming ``F2PIPE_KAFKA_PROPERTIES_FILE`` and the line for
    an unreadable file, a line without ``=``, or a key with its own variable.
    Values are never echoed: the file may hold passwords.
    """
    name = "F2PIPE_KAFKA_PROPERTIES_FILE"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{name}: cannot read {path}: {reason}") from None
    properties: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{name}: {path} line {number}: expected key=value")
        if key in _OWN_VARIABLES:
            raise ConfigError(
                f"{name}: {path} line {number}: {key} is set by {_OWN_VARIABLES[key]}"
            )
        if key in _FIXED:
            raise ConfigError(f"{name}: {path} line {number}: {key} is fixed: {_FIXED[key]}")
        properties[key] = value.strip()
    return properties


def _readable(path: Path, field: str) -> str:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        variable = "F2PIPE_" + field.upper()
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    return str(path)


def client_config(settings: Settings) -> dict[str, Any]:
    """What every Kafka client shares: bootstrap servers, security settings, properties file.

    Raises ConfigError (one line naming the variable, never a secret) for a
    TLS file that cannot be read, SASL without a user name or password, or
    SASL or TLS files given for a protocol that does not use them.
    """
    protocol = settings.kafka_security_protocol
    config: dict[str, Any] = {}
    if settings.kafka_properties_file is not None:
        config.update(read_properties(settings.kafka_properties_file))
    config["bootstrap.servers"] = settings.kafka_bootstrap
    config["security.protocol"] = protocol
    sasl_given = [
        name
        for name in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password")
        if getattr(settings, name) is not None
    ]
    if protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password_value()
        if not settings.kafka_sasl_username:
            raise ConfigError(f"F2PIPE_KAFKA_SASL_USERNAME is required with {protocol}")
        if not password:
            raise ConfigError(
                f"F2PIPE_KAFKA_SASL_PASSWORD or F2PIPE_KAFKA_SASL_PASSWORD_FILE is required"
                f" with {protocol}"
            )
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism or "SCRAM-SHA-512"
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = password
    elif sasl_given:
        raise ConfigError(
            f"F2PIPE_{sasl_given[0].upper()} is set but F2PIPE_KAFKA_SECURITY_PROTOCOL={protocol}"
            " uses no SASL (SASL_SSL or SASL_PLAINTEXT do)"
        )
    files = {
        "ssl.ca.location": "kafka_ssl_ca_location",
        "ssl.certificate.location": "kafka_ssl_certificate_location",
        "ssl.key.location": "kafka_ssl_key_location",
    }
    for key, field in files.items():
        path = getattr(settings, field)
        if path is None:
            continue
        if not protocol.endswith("SSL"):
            raise ConfigError(
                f"F2PIPE_{field.upper()} is set but F2PIPE_KAFKA_SECURITY_PROTOCOL={protocol}"
                " uses no TLS (SSL or SASL_SSL do)"
            )
        config[key] = _readable(path, field)
    if (settings.kafka_ssl_certificate_location is None) != (
        settings.kafka_ssl_key_location is None
    ):
        raise ConfigError(
            "F2PIPE_KAFKA_SSL_CERTIFICATE_LOCATION and F2PIPE_KAFKA_SSL_KEY_LOCATION"
            " go together: set both or neither"
        )
    return config


def consumer_config(settings: Settings, group_id: str, **extra: Any) -> dict[str, Any]:
    """A confluent-kafka consumer config; ``enable.auto.commit`` is always off."""
    config: dict[str, Any] = {
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        # Offsets are stored and committed explicitly after the batch is durable.
        "enable.auto.offset.store": False,
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.wait.max.ms": 50,
        "queued.min.messages": 20000,
    }
    config.update(client_config(settings))
    config.update(extra)
    config["enable.auto.commit"] = False
    return config


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """A confluent-kafka producer config: idempotent, acks=all, batched."""
    config: dict[str, Any] = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500000,
        "message.timeout.ms": 0,  # never give up on a record: a lost record is a lost reading
    }
    config.update(client_config(settings))
    config.update(extra)
    config["enable.idempotence"] = True
    config["acks"] = "all"
    return config


def admin_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """A confluent-kafka admin client config: the shared settings plus ``extra``."""
    config = client_config(settings)
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


# Partitions whose committed offset Kafka no longer held, so the consumer restarted from
# the earliest one it has: the records in between were never consumed (retention).
OFFSET_RESETS = Counter(
    "f2pipe_offset_resets",
    "partitions whose committed offset was out of range (records lost to retention)",
    ["stage"],
)
# Age of the oldest record the stage has not consumed yet, the worst of its partitions.
CONSUMER_LAG_SECONDS = Gauge(
    "f2pipe_consumer_lag_seconds", "age of the oldest record not consumed yet", ["stage"]
)
# A lag this old is logged as an error (Kafka's default retention is 7 days).
LAG_ALARM_S = 3600.0


def set_fetching(consumer: Consumer, partitions: list[TopicPartition], paused: bool) -> None:
    """Pause or resume newly assigned ``partitions``, whatever their state was before.

    Called from each stage's ``on_assign``. The client keeps a partition's pause
    across assignments: one paused during an outage, revoked, and assigned back
    after the outage ended would otherwise never be fetched again, and its lag
    would grow without an error.
    """
    if not partitions:
        return
    if paused:
        consumer.pause(partitions)
    else:
        consumer.resume(partitions)


class ConsumerWatch:
    """A stage's consumer lag as an age, and offsets that fell out of retention.

    Nothing here runs per record. :meth:`assigned` (from the ``on_assign``
    callback) compares each newly assigned partition's committed offset with
    its low watermark: below it, retention deleted records this group never
    consumed, and the client is about to restart from the earliest offset.
    :meth:`update` (from the loop; it does work at most every ``every_s``)
    samples each partition's high watermark from the client's cache, so the
    age of the record at the consumer's position is the time since the high
    watermark first passed it; a position found below the low watermark is
    counted as a reset too. Samples are kept only for records not consumed
    yet, thinned to ``samples`` per partition (the age stays exact to within
    the spacing of what is kept). Given ``records`` (a gauge labelled by
    partition), the same pass sets each partition's lag in records, high
    watermark minus position; :meth:`revoked` removes a partition's label.
    """

    def __init__(
        self, stage: str, every_s: float = 2.0, samples: int = 512, records: Gauge | None = None
    ) -> None:
        self.stage = stage
        self.every_s = every_s
        self.max_samples = samples
        self.records = records
        self.lag_s = 0.0
        """The age last exported (seconds)."""
        self.resets = 0
        """Partitions found out of range since start."""
        self._history: dict[tuple[str, int], list[tuple[float, int]]] = {}
        self._flagged: set[tuple[str, int]] = set()  # counted, not yet back in range
        self._at = 0.0
        self._alarmed = False

    def assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> int:
        """Count the partitions whose committed offset is below their low watermark
        (or beyond the high one); return how many. Blocks for one round trip."""
        found = 0
        self.revoked(partitions)  # whatever was known of them is stale
        try:
            committed = consumer.committed(partitions, timeout=10)
            for tp in committed:
                if tp.offset < 0:  # nothing committed: a first start, not a reset
                    continue
                low, high = consumer.get_watermark_offsets(tp, timeout=10)
                if not low <= tp.offset <= high:
                    self._reset(tp.topic, tp.partition, tp.offset, low, high)
                    found += 1
        except KafkaException as exc:
            log.warning(
                "committed offsets not checked against retention", extra={"error": str(exc)}
            )
        return found

    def revoked(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._history.pop((tp.topic, tp.partition), None)
            self._flagged.discard((tp.topic, tp.partition))
            if self.records is not None:
                with contextlib.suppress(KeyError):  # no lag reported for it yet
                    self.records.remove(str(tp.partition))

    def reset_reported(self, err: KafkaError) -> bool:
        """Count a reset the client reports as an error (``auto.offset.reset=error``);
        return whether ``err`` was one."""
        if err.code() != KafkaError._AUTO_OFFSET_RESET:
            return False
        self._count("consumer offset reset", error=str(err))
        return True

    def update(self, consumer: Consumer, now: float | None = None) -> float:
        """Export the lag age if ``every_s`` passed since the last export; return it."""
        now = time.time() if now is None else now
        if now - self._at < self.every_s:
            return self.lag_s
        self._at = now
        worst = 0.0
        try:
            assignment = consumer.assignment()
            positions = consumer.position(assignment) if assignment else []
            for tp in positions:
                low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    continue  # no fetch answered yet
                worst = max(worst, self._age(tp, low, high, now))
                if self.records is not None and tp.offset >= 0:
                    self.records.labels(str(tp.partition)).set(max(high - tp.offset, 0))
        except KafkaException as exc:
            log.debug("lag not available", extra={"error": str(exc)})
            return self.lag_s
        self.lag_s = worst
        CONSUMER_LAG_SECONDS.labels(self.stage).set(worst)
        if (worst >= LAG_ALARM_S) != self._alarmed:
            self._alarmed = not self._alarmed
            level = logging.ERROR if self._alarmed else logging.INFO
            text = "consumer lag above alarm" if self._alarmed else "consumer lag back to normal"
            log.log(level, text, extra={"stage": self.stage, "lag_s": round(worst, 1)})
        return worst

    def _age(self, tp: TopicPartition, low: int, high: int, now: float) -> float:
        key = (tp.topic, tp.partition)
        history = self._history.setdefault(key, [])
        if not history or history[-1][1] != high:
            history.append((now, high))
        position = tp.offset
        if position < 0:  # not fetched yet: the committed offset is checked on assignment
            return 0.0
        if position < low:
            if key not in self._flagged:
                self._reset(tp.topic, tp.partition, position, low, high)
        else:
            self._flagged.discard(key)
        # Samples at or below the position are of consumed records: the first one
        # above it is when the oldest unconsumed record was already there.
        del history[: bisect.bisect_right(history, position, key=lambda sample: sample[1])]
        if len(history) > self.max_samples:
            del history[1:-1:2]  # thin out, keeping the oldest and the newest
        return now - history[0][0] if history and position < high else 0.0

    def _reset(self, topic: str, partition: int, offset: int, low: int, high: int) -> None:
        self._flagged.add((topic, partition))
        self._count(
            "committed offset out of range: consuming from the earliest record kept;"
            " the records before it were never consumed",
            topic=topic,
            partition=partition,
            offset=offset,
            low=low,
            high=high,
        )

    def _count(self, text: str, **details: object) -> None:
        """Count one reset, in :attr:`resets` and the metric, and log it as an error."""
        self.resets += 1
        OFFSET_RESETS.labels(self.stage).inc()
        log.error(text, extra={"stage": self.stage, **details})
