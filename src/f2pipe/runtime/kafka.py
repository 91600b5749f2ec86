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

from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer

from f2pipe.errors import ConfigError, F2PipeError
from f2pipe.settings import Settings

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
