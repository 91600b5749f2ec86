"""Configuration from ``F2PIPE_*`` environment variables and a TOML file (SPEC section 8).

One frozen settings model for the whole package; entry points read it once
through :func:`get_settings`. Sources, strongest first: keyword overrides,
``F2PIPE_<NAME>`` variables, ``F2PIPE_<NAME>_FILE`` for a URL that may carry
a password, deprecated variable names (one warning line each), the TOML file
named by ``F2PIPE_CONFIG_FILE`` (keys are the setting names in lower case,
without the prefix), the defaults. A bad value fails at start with
:class:`~f2pipe.errors.ConfigError` naming the variable or the file's key,
never echoing a secret.

Durations have one convention: the name ends in the unit a bare number is read
in (``_MS``, ``_S`` or ``_DAYS``), and every duration also takes a number with
a unit, such as ``500ms``, ``90s``, ``5m``, ``2h``, ``7d`` or ``7 days``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from f2pipe._settings_values import (
    CONFIG_FILE_VARIABLE,
    DEPRECATED_NAMES,
    ENV_PREFIX,
    URL_CHECKS,
    Days,
    Milliseconds,
    Seconds,
    config_file_values,
    default_state_dir,
    deprecated_environment,
    every_broker,
    mask_url,
    read_secret_file,
    secret_file_environment,
    upper,
    variable,
)
from f2pipe.errors import ConfigError

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)


class Settings(BaseSettings):
    """Every setting f2pipe reads; names are ``F2PIPE_`` plus the field name, upper-cased."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    config_file: Path | None = Field(
        default=None,
        description="TOML file holding any of these settings (lower-case names without the "
        "prefix); environment variables override it. Read from the environment only.",
    )
    log_level: Annotated[LogLevel, BeforeValidator(upper)] = Field(
        default="INFO",
        description="Log level of every service (debug, info, warning, error, critical); "
        "a service's --log-level overrides it.",
    )
    metadata_dsn: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/f2pipe",
        description="PostgreSQL URL of the metadata database; may carry a password and "
        "?sslmode=verify-full.",
    )
    timeseries_dsn: str = Field(
        default="",
        description="PostgreSQL URL of the time-series database; empty: the metadata one.",
    )
    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port...]."
    )
    kafka_security_protocol: Annotated[
        Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"], BeforeValidator(upper)
    ] = Field(default="PLAINTEXT", description="How every Kafka client connects.")
    kafka_sasl_mechanism: Annotated[
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None, BeforeValidator(upper)
    ] = Field(default=None, description="SASL mechanism; unset: SCRAM-SHA-512 when SASL is used.")
    kafka_sasl_username: str | None = Field(default=None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="SASL password.")
    kafka_sasl_password_file: Path | None = Field(
        default=None, description="File holding the SASL password (instead of the variable)."
    )
    kafka_ssl_ca_location: Path | None = Field(
        default=None, description="CA certificate(s) the Kafka brokers' certificates chain to."
    )
    kafka_ssl_certificate_location: Path | None = Field(
        default=None, description="Client certificate for Kafka mTLS."
    )
    kafka_ssl_key_location: Path | None = Field(
        default=None, description="Client private key for Kafka mTLS."
    )
    kafka_properties_file: Path | None = Field(
        default=None,
        description="Further librdkafka properties, key=value a line (# comments); they "
        "override f2pipe's tuning but not a setting that has its own variable.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis URL; rediss:// for TLS, redis://user:password@host for an ACL user.",
    )
    mqtt_host: str = Field(default="127.0.0.1", description="MQTT broker host.")
    mqtt_port: int = Field(default=8883, ge=1, le=65535, description="MQTT broker port (TLS).")
    # Devices are spread over brokers mqtt-1..N (SPEC section 10; f2pipe.runtime.mqttbrokers).
    mqtt_brokers: int = Field(
        default=1, ge=1, le=16, description="MQTT brokers mqtt-1..N; mqtt-n listens on "
        "F2PIPE_MQTT_PORT + 2 (n - 1), and `f2pipe up` runs a connector group for each; "
        "`deploy render` renders them, with broker-acls keeping their ACLs.",
    )  # fmt: skip
    mqtt_broker_urls: str = Field(
        default="", description="Where devices reach the brokers, name=mqtts://host:port "
        "comma-separated (certgen's answer); unset: F2PIPE_MQTT_HOST and the brokers' ports.",
    )  # fmt: skip
    mqtt_broker_hosts: str = Field(
        default="", description="Where the services reach brokers on hosts of their own, "
        "name=host comma-separated (e.g. mqtt-2=mosquitto-2); unset: F2PIPE_MQTT_HOST.",
    )  # fmt: skip
    certgen_url: str = Field(
        default="http://127.0.0.1:8080", description="Where tools reach the certificate service."
    )
    admin_token: SecretStr | None = Field(
        default=None, description="certgen admin token; unset: generated into <state>/admin-token."
    )
    admin_token_file: Path | None = Field(
        default=None, description="File holding the certgen admin token."
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Local state: CA, keys, server data, logs (default var/ in the checkout).",
    )
    max_payload_bytes: int = Field(
        default=65536, ge=1, le=256 * 1024, description="Largest MQTT payload accepted."
    )

    topic_raw: str = Field(default="raw-iot-data", description="Kafka topic of device messages.")
    topic_processed: str = Field(
        default="processed-iot-data", description="Kafka topic of decoded readings."
    )
    topic_dead_letter: str = Field(
        default="iot-dead-letter", description="Kafka topic of dead letters."
    )
    data_topic_partitions: int = Field(
        default=6, ge=1, le=1024, description="Partitions of the raw and processed topics."
    )
    dead_letter_partitions: int = Field(
        default=3, ge=1, le=1024, description="Partitions of the dead-letter topic."
    )
    processor_group: str = Field(
        default="f2pipe-processor", description="Kafka consumer group of the processors."
    )
    sink_group: str = Field(default="f2pipe-sink", description="Kafka consumer group of the sinks.")

    # Processor (SPEC sections 2 and 7).
    processor_batch_size: int = Field(
        default=5000, ge=1, le=1_000_000, description="Records the processor handles per batch."
    )
    processor_poll_timeout_s: Annotated[float, Seconds] = Field(
        default=0.2, gt=0, le=60, description="Longest wait for the first record of a batch."
    )
    # A replica killed without leaving holds its partitions this long (the sink's too:
    # Kafka's 45 s default stalls them too long; 6 s is the broker's minimum).
    processor_session_timeout_s: Annotated[float, Seconds] = Field(
        default=10.0,
        ge=6,
        le=300,
        description="Kafka session timeout: how long a dead processor holds its partitions.",
    )
    processor_transactions: bool = Field(
        default=False, description="Exactly once into processed-iot-data, at a cost in speed."
    )
    cache_ttl_s: Annotated[int, Seconds] = Field(
        default=3600,
        ge=1,
        description="Backstop expiry of cached metadata (changes invalidate at once).",
    )
    cache_size: int = Field(default=100_000, ge=1, description="Controllers kept in process (LRU).")
    negative_cache_s: Annotated[float, Seconds] = Field(
        default=5.0, ge=0, le=5.0, description="How long an unknown MAC is remembered (<= 5 s)."
    )
    dlq_alarm_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Dead letters per consumed record that raise the alarm.",
    )
    dlq_alarm_window_s: Annotated[float, Seconds] = Field(
        default=60.0, gt=0, description="Window over which the dead-letter ratio is measured."
    )
    dlq_alarm_min_messages: int = Field(
        default=100, ge=1, description="Records a window needs before the alarm can fire."
    )

    certgen_host: str = Field(default="127.0.0.1", description="certgen bind address.")
    certgen_port: int = Field(
        default=8080, ge=1, le=65535, description="certgen port (API, health)."
    )
    connector_port: int = Field(
        default=9101, ge=1, le=65535, description="Connector health and metrics port."
    )
    processor_port: int = Field(
        default=9102, ge=1, le=65535, description="Processor health and metrics port."
    )
    sink_port: int = Field(
        default=9103, ge=1, le=65535, description="Sink health and metrics port."
    )
    # Replica n > 1 of a stage serves health and metrics on the stage's port + 100 (n - 1).
    connector_replicas: int = Field(
        default=1, ge=1, le=32, description="`f2pipe up`: connectors, on one $share group if > 1."
    )
    processor_replicas: int = Field(
        default=1, ge=1, le=32, description="`f2pipe up`: processors in the processors' group."
    )
    sink_replicas: int = Field(
        default=1, ge=1, le=32, description="`f2pipe up`: sinks in the sinks' consumer group."
    )
    ops_host: str = Field(
        default="127.0.0.1", description="Where /healthz, /readyz and /metrics listen."
    )
    simulator_interval_s: Annotated[float, Seconds] = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="`f2pipe up`: time between two messages of one demo sensor.",
    )

    # Sink batching: a batch is written when it holds this many rows or its first
    # record is this old, whichever comes first (defaults from bench/sink.json).
    sink_batch_rows: int = Field(
        default=20000, ge=1, le=1_000_000, description="Rows that make a sink batch full."
    )
    sink_batch_age_ms: Annotated[int, Milliseconds] = Field(
        default=500, ge=1, le=600_000, description="Age of its first record that ends a batch."
    )
    sink_session_timeout_s: Annotated[float, Seconds] = Field(
        default=10.0, ge=6, le=300, description="How long a dead sink holds its partitions."
    )
    # Also write a batch as soon as the sink has caught up with its input and no
    # commit is in flight (low latency at light load; batches still grow under load).
    sink_flush_when_caught_up: bool = Field(
        default=True, description="Write a batch as soon as the sink has caught up."
    )
    sink_backoff_max_ms: Annotated[int, Milliseconds] = Field(
        default=5000,
        ge=10,
        le=600_000,
        description="Longest wait between two attempts to reach the database in an outage.",
    )
    # Every wait of the sink on its database is bounded (SPEC section 7, no deadlock);
    # a write cut short is retried like any database failure.
    sink_connect_timeout_s: Annotated[float, Seconds] = Field(
        default=5.0, gt=0, le=300, description="Longest wait to connect to the database."
    )
    sink_lock_timeout_s: Annotated[float, Seconds] = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Longest wait of a sink write for a lock (PostgreSQL lock_timeout).",
    )
    sink_statement_timeout_s: Annotated[float, Seconds] = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Longest a sink statement may run once its batch is complete"
        " (PostgreSQL statement_timeout; the COPY streaming a batch gets the batch age on top).",
    )
    sink_stall_s: Annotated[float, Seconds] = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="/readyz fails once the oldest unwritten batch has waited this long.",
    )

    # The local stack (`f2pipe stack`).
    kafka_controller_port: int = Field(
        default=9093, ge=1, le=65535, description="Local stack: Kafka's KRaft controller port."
    )
    kafka_heap: str = Field(
        default="1g",
        pattern=r"^[1-9][0-9]*[kKmMgG]$",
        description="Local stack: the Kafka broker's maximum heap (a JVM -Xmx size).",
    )
    kafka_brokers: Annotated[Literal[1, 3], BeforeValidator(int)] = Field(
        default=1,
        description="Local stack and `deploy render`: Kafka brokers, 1 or 3 (a KRaft cluster); "
        "brokers 2 and 3 use the first's ports + 2 and + 4 unless the bootstrap names them.",
    )
    stack_install: bool = Field(
        default=True, description="Local stack: root may apt-get install missing servers."
    )
    stack_secured: bool = Field(
        default=True,
        description="Local stack: passwords, TLS and one user per service on every server "
        "(false: trust on loopback, for experiments only).",
    )
    # Certificates (section 6). The file form keeps the passphrase out of the environment.
    ca_passphrase: SecretStr | None = Field(
        default=None, description="Passphrase encrypting the CA key."
    )
    ca_passphrase_file: Path | None = Field(
        default=None, description="File holding the CA key's passphrase."
    )
    ca_days: Annotated[int, Days] = Field(
        default=3650, ge=1, le=36500, description="Validity of a new CA certificate."
    )
    device_cert_days: Annotated[int, Days] = Field(
        default=365, ge=1, le=3650, description="Validity of a device certificate."
    )
    service_cert_days: Annotated[int, Days] = Field(
        default=730, ge=1, le=3650, description="Validity of a service certificate."
    )
    # The broker refuses every client once its CRL is past nextUpdate, so the CRL is
    # long-lived and renewed by certgen (and `stack up`) when half of it has run out.
    crl_days: Annotated[int, Days] = Field(
        default=90, ge=2, le=3650, description="Validity of the CRL (renewed at half-life)."
    )
    broker_names: str = Field(
        default="",
        description="Extra DNS names or IPs for the broker's and certgen's certificates, "
        "comma-separated (localhost and 127.0.0.1 are always in).",
    )
    certgen_tls: bool = Field(default=False, description="certgen serves HTTPS.")
    certgen_max_failures: int = Field(
        default=5, ge=1, le=1000, description="Failed claims per MAC or address before a pause."
    )
    certgen_failure_window_s: Annotated[float, Seconds] = Field(
        default=60.0, gt=0, le=86400, description="Window over which failed claims are counted."
    )
    # A guesser spraying many devices from many addresses meets this budget (SPEC section 6).
    certgen_global_max_failures: int = Field(
        default=50,
        ge=1,
        le=1_000_000,
        description="Failed claims over all devices and addresses before claiming pauses.",
    )
    certgen_trusted_proxies: str = Field(
        default="",
        description="Reverse proxies (addresses or networks, comma-separated) whose "
        "X-Forwarded-For names certgen's client; empty: the peer is the client.",
    )
    certgen_plain_http_behind_proxy: bool = Field(
        default=False,
        description="Allow certgen plain HTTP on a non-loopback address because a "
        "TLS-terminating proxy is in front (warned at every start).",
    )

    # Broker limits written into mosquitto.conf (the reasoning: f2pipe.operations.stack.mosquitto).
    mqtt_max_connections: int = Field(
        default=10000, ge=1, le=1_000_000, description="Broker: most client connections."
    )
    # 0: a count as large as the byte bound below, so that bound is the one that holds.
    mqtt_max_queued_messages: int = Field(
        default=0,
        ge=0,
        description="Broker: messages queued per session; 0: as many as the byte bound.",
    )
    # Payload bytes queued per session (SPEC section 7); unset: 1/32 of the memory.
    broker_max_queued_bytes: int | None = Field(
        default=None,
        ge=4096,
        description="Broker: payload bytes queued per session; unset: sized from memory.",
    )
    mqtt_max_inflight_messages: int = Field(
        default=2000, ge=20, le=65535, description="Broker: QoS 1 messages in flight per client."
    )
    mqtt_autosave_interval_s: Annotated[int, Seconds] = Field(
        default=60, ge=1, le=86400, description="Broker: time between two persistence saves."
    )
    # MQTT clients (connector, simulator). Plain MQTT is for a development broker only.
    mqtt_tls: bool = Field(default=True, description="MQTT clients use mTLS (false: dev only).")
    mqtt_keepalive_s: Annotated[int, Seconds] = Field(
        default=30, ge=5, le=3600, description="MQTT clients' keep-alive."
    )

    # Connector: its MQTT identity is its client id (the broker enforces it under mTLS).
    connector_client_id: str = Field(
        default="svc-connector", description="The connector's MQTT client id."
    )
    connector_identity: str = Field(
        default="svc-connector", description="Certificate under <state>/pki/services/."
    )
    connector_share_group: str = Field(
        default="", description="Non-empty: subscribe through $share/<group>/ (several connectors)."
    )
    connector_session_expiry_s: Annotated[int, Seconds] = Field(
        default=7 * 86400,
        ge=0,
        le=0xFFFFFFFF,
        description="How long the broker keeps the connector's session while it is away.",
    )
    # MQTT v5 Receive Maximum: it must cover Kafka's acknowledgement latency at full
    # rate (rate x latency), and it bounds memory.
    connector_receive_maximum: int = Field(
        default=10000,
        ge=1,
        le=65535,
        description="Unacknowledged QoS 1 messages the broker may send the connector.",
    )
    connector_shutdown_timeout_s: Annotated[float, Seconds] = Field(
        default=30.0, gt=0, description="Longest wait for Kafka's acknowledgements at stop."
    )
    # Longer rounds cost Kafka and librdkafka less CPU per record.
    connector_linger_ms: Annotated[int, Milliseconds] = Field(
        default=50, ge=0, le=1000, description="Kafka producer batching wait of the connector."
    )

    # TimescaleDB policies (used only where the extension is present).
    compress_after_days: Annotated[int, Days] = Field(
        default=7, ge=1, description="TimescaleDB compresses chunks older than this."
    )
    retention_days: Annotated[int, Days] = Field(
        default=5 * 365, ge=1, description="TimescaleDB drops chunks older than this."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file_values = config_file_values(os.environ.get(CONFIG_FILE_VARIABLE), FILE_KEYS)
        return (
            init_settings,
            env_settings,
            InitSettingsSource(settings_cls, secret_file_environment()),
            InitSettingsSource(settings_cls, deprecated_environment()),
            InitSettingsSource(settings_cls, file_values),
        )

    @field_validator(*URL_CHECKS)
    @classmethod
    def _url_shape(cls, value: str, info: ValidationInfo) -> str:
        return URL_CHECKS[str(info.field_name)](value)

    @model_validator(mode="after")
    def _derived_defaults(self) -> Settings:
        object.__setattr__(self, "kafka_bootstrap", every_broker(self))
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

    def kafka_sasl_password_value(self) -> str | None:
        """The SASL password from its variable or its file (ConfigError if unreadable)."""
        if self.kafka_sasl_password is not None:
            return self.kafka_sasl_password.get_secret_value()
        if self.kafka_sasl_password_file is None:
            return None
        return read_secret_file(self.kafka_sasl_password_file, "kafka_sasl_password_file")


FILE_KEYS = frozenset(Settings.model_fields) - {"config_file"}
SECRET_FIELDS = frozenset(
    name for name, field in Settings.model_fields.items() if field.annotation == SecretStr | None
)


def shown_value(name: str, value: object) -> str:
    """How setting ``name`` may be printed: secrets as ``****``, URLs without passwords."""
    if value is None:
        return ""
    if name in SECRET_FIELDS:
        return "****"
    text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    return mask_url(text) if "://" in text else text


def load_settings(**overrides: object) -> Settings:
    """Read the file, the environment and ``overrides``; ConfigError naming a bad setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        message = first["msg"].removeprefix("Value error, ")
        shown = shown_value(field, first.get("input"))
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting {field!r}") from None
        env = variable(field)
        if env not in os.environ and field not in overrides:
            in_file = config_file_values(os.environ.get(CONFIG_FILE_VARIABLE), FILE_KEYS)
            if field in in_file:
                where = f"{field} = {shown!r} in {os.environ[CONFIG_FILE_VARIABLE]}"
                raise ConfigError(f"{where} is invalid: {message}") from None
            old = next((o for o, n in DEPRECATED_NAMES.items() if n == field), None)
            if old is not None and variable(old) in os.environ:
                env = variable(old)
        raise ConfigError(f"{env}={shown!r} is invalid: {message}") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
