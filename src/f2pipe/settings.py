"""Configuration from ``F2PIPE_*`` environment variables (SPEC section 8).

One frozen settings model for the whole package; entry points read it once
through :func:`get_settings`. A bad value fails at start with
:class:`~f2pipe.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from f2pipe.errors import ConfigError

ENV_PREFIX = "F2PIPE_"


def _default_state_dir() -> Path:
    # var/ in the checkout when run from one (src layout: <checkout>/src/f2pipe/settings.py),
    # else var/ under the working directory.
    here = Path(__file__).resolve().parent
    checkout = here.parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "var"
    return Path.cwd() / "var"


class Settings(BaseSettings):
    """Every setting f2pipe reads; names are ``F2PIPE_`` plus the field name, upper-cased."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    metadata_dsn: str = "postgresql://postgres@127.0.0.1:5432/f2pipe"
    timeseries_dsn: str = ""  # empty: same as metadata_dsn
    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=8883, ge=1, le=65535)
    certgen_url: str = "http://127.0.0.1:8080"
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    state_dir: Path = Field(default_factory=_default_state_dir)
    max_payload_bytes: int = Field(default=65536, ge=1, le=256 * 1024)

    topic_raw: str = "raw-iot-data"
    topic_processed: str = "processed-iot-data"
    topic_dead_letter: str = "iot-dead-letter"
    data_topic_partitions: int = Field(default=6, ge=1, le=1024)
    dead_letter_partitions: int = Field(default=3, ge=1, le=1024)
    processor_group: str = "f2pipe-processor"
    sink_group: str = "f2pipe-sink"

    # Processor (SPEC sections 2 and 7).
    processor_batch_size: int = Field(default=5000, ge=1, le=1_000_000)
    processor_poll_timeout_s: float = Field(default=0.2, gt=0, le=60)
    # A replica killed without leaving holds its partitions this long (Kafka's 45 s
    # default stalls them too long; 6 s is the broker's minimum).
    processor_session_timeout_s: float = Field(default=10.0, ge=6, le=300)
    processor_transactions: bool = False  # exactly once into processed-iot-data, at a cost
    cache_ttl_s: int = Field(default=3600, ge=1)  # backstop only: changes invalidate at once
    cache_size: int = Field(default=100_000, ge=1)  # controllers kept in process (LRU)
    negative_cache_s: float = Field(default=5.0, ge=0, le=5.0)  # unknown MACs, at most 5 s
    dlq_alarm_ratio: float = Field(default=0.5, gt=0, le=1)  # dead letters / consumed
    dlq_alarm_window_s: float = Field(default=60.0, gt=0)
    dlq_alarm_min_messages: int = Field(default=100, ge=1)

    certgen_host: str = "127.0.0.1"
    certgen_port: int = Field(default=8080, ge=1, le=65535)
    connector_port: int = Field(default=9101, ge=1, le=65535)
    processor_port: int = Field(default=9102, ge=1, le=65535)
    sink_port: int = Field(default=9103, ge=1, le=65535)
    ops_host: str = "127.0.0.1"  # where /healthz, /readyz, /metrics listen
    # `f2pipe up`: seconds between two messages of one demo sensor (live simulator).
    simulator_interval: float = Field(default=1.0, gt=0, le=3600)

    # Sink batching: a batch is written when it holds this many rows or its first
    # record is this old, whichever comes first (defaults from bench/sink.json).
    sink_batch_rows: int = Field(default=20000, ge=1, le=1_000_000)
    sink_batch_age_ms: int = Field(default=500, ge=1, le=600_000)
    # Also write a batch as soon as the sink has caught up with its input and no
    # commit is in flight (low latency at light load; batches still grow under load).
    sink_flush_when_caught_up: bool = True
    # Longest wait between two attempts to reach the database during an outage.
    sink_backoff_max_ms: int = Field(default=5000, ge=10, le=600_000)

    # The local stack (`f2pipe stack`): Kafka's KRaft controller listener, the broker's
    # maximum heap (a JVM -Xmx size), and whether root may apt-get install missing servers.
    kafka_controller_port: int = Field(default=9093, ge=1, le=65535)
    kafka_heap: str = Field(default="1g", pattern=r"^[1-9][0-9]*[kKmMgG]$")
    stack_install: bool = True
    # Certificates (section 6). The CA key may be encrypted with a passphrase from a
    # secret; the file form keeps it out of the process environment.
    ca_passphrase: SecretStr | None = None
    ca_passphrase_file: Path | None = None
    ca_days: int = Field(default=3650, ge=1, le=36500)
    device_cert_days: int = Field(default=365, ge=1, le=3650)
    service_cert_days: int = Field(default=730, ge=1, le=3650)
    # The broker refuses every client once its CRL is past nextUpdate, so the CRL is
    # long-lived and renewed by certgen (and `stack up`) when half of it has run out.
    crl_days: int = Field(default=90, ge=2, le=3650)
    # Extra DNS names or IP addresses for the broker's (and certgen's) server
    # certificate, comma-separated; localhost and 127.0.0.1 are always included.
    broker_names: str = ""
    certgen_tls: bool = False
    certgen_max_failures: int = Field(default=5, ge=1, le=1000)
    certgen_failure_window: float = Field(default=60.0, gt=0, le=86400)

    # Broker limits written into mosquitto.conf (the reasoning: f2pipe.operations.stack.mosquitto).
    mqtt_max_connections: int = Field(default=10000, ge=1, le=1_000_000)
    mqtt_max_queued_messages: int = Field(default=6_000_000, ge=1000)
    mqtt_max_inflight_messages: int = Field(default=2000, ge=20, le=65535)
    mqtt_autosave_interval: int = Field(default=60, ge=1, le=86400)
    # MQTT clients (connector, simulator). Plain MQTT is for a development broker only.
    mqtt_tls: bool = True
    mqtt_keepalive: int = Field(default=30, ge=5, le=3600)

    # Connector: its MQTT identity is its client id (the broker enforces it under mTLS).
    connector_client_id: str = "svc-connector"
    connector_identity: str = "svc-connector"  # certificate under <state>/pki/services/
    connector_share_group: str = ""  # non-empty: subscribe through $share/<group>/
    connector_session_expiry: int = Field(default=7 * 86400, ge=0, le=0xFFFFFFFF)
    # MQTT v5 Receive Maximum: unacknowledged QoS 1 messages the broker may send us. It must
    # cover Kafka's acknowledgement latency at full rate (rate x latency), and it bounds memory.
    connector_receive_maximum: int = Field(default=10000, ge=1, le=65535)
    connector_shutdown_timeout: float = Field(default=30.0, gt=0)
    # Kafka producer batching wait: each round of records takes about this plus Kafka's
    # acknowledgement; longer rounds cost Kafka and librdkafka less CPU per record.
    connector_linger_ms: int = Field(default=50, ge=0, le=1000)

    # TimescaleDB policies (used only where the extension is present).
    compress_after: str = "7 days"
    retention: str = "5 years"

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    @field_validator("metadata_dsn", "timeseries_dsn")
    @classmethod
    def _dsn_is_postgres(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError(f"expected a postgresql:// URL, got {value!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"expected a redis:// URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _default_timeseries_dsn(self) -> Settings:
        if not self.timeseries_dsn:
            object.__setattr__(self, "timeseries_dsn", self.metadata_dsn)
        return self

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def mosquitto_dir(self) -> Path:
        return self.state_dir / "mosquitto"

    def extra_server_names(self) -> list[str]:
        """``broker_names`` as a list, blanks dropped."""
        return [name.strip() for name in self.broker_names.split(",") if name.strip()]

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    def pg_port(self) -> int:
        return urlsplit(self.metadata_dsn).port or 5432

    def redis_port(self) -> int:
        return urlsplit(self.redis_url).port or 6379

    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.split(",")[0].rpartition(":")[2])


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus ``overrides``); raise ConfigError naming a bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        name = ENV_PREFIX + field.upper()
        shown = os.environ.get(name, overrides.get(field, ""))
        raise ConfigError(f"{name}={shown!r} is invalid: {first['msg']}") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
