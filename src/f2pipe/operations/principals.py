"""Who may do what: each service's Kafka principal, PostgreSQL role and Redis user (SPEC 6, 10).

Pure data and renderers, no I/O: the local stack applies them to its own
servers (:mod:`f2pipe.operations.stack`) and ``f2pipe deploy render`` writes
the same rights into production configuration, so both come from this one
source.

Least privilege, as SPEC section 10 states it:

- connector: Kafka write to the raw topic and the dead letters; no database;
  no Redis;
- processor: Kafka read of the raw topic in its consumer group, write to the
  processed topic and the dead letters (and its transactional ids, when
  transactions are on); PostgreSQL read of the metadata tables; Redis read and
  write of the lookup cache's keys only;
- sink: Kafka read of the processed topic in its group, write to the dead
  letters; PostgreSQL write of ``decoded_data`` and ``latest_readings``;
- certgen: no Kafka; PostgreSQL its own tables (``certificates``,
  ``device_claims``) and read of ``devices`` (claiming codes).

With several MQTT brokers a deployment adds two kinds of principal
(:func:`deployment_principals`): each further broker's connector group
(:func:`broker_connector`: the connector's rights under a Kafka user and MQTT
identity of its own) and :data:`ACL_SYNC`, which reads which broker each
controller belongs to (``devices.mac_address`` and ``devices.broker``, no other
column) to write the brokers' ACLs (:mod:`f2pipe.operations.aclsync`).

The operator (:data:`ADMIN`) holds every right on every server; the broker's
own principal (:data:`KAFKA_BROKER_USER`) is a Kafka super user so the node
can talk to itself. Devices have no Kafka principal at all: the only way
into Kafka is through a service's credentials.

Names a deployment may change (topics, consumer groups) come in through
:class:`Names`, so the rights follow the settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final, Literal, Protocol

__all__ = [
    "ACL_SYNC",
    "ADMIN",
    "KAFKA_BROKER_USER",
    "PRINCIPALS",
    "REDIS_CACHE_PATTERN",
    "SERVICES",
    "KafkaAcl",
    "Names",
    "PgGrant",
    "Principal",
    "broker_connector",
    "deployment_principals",
    "kafka_acl_arguments",
    "pg_grant_sql",
    "principal",
    "principals",
    "redis_acl_line",
]

#: The services that hold their own credentials, in start order.
SERVICES: Final = ("certgen", "connector", "processor", "sink")

#: The operator's identity on every server (a Kafka super user, the Redis
#: ``~* +@all`` user); its PostgreSQL role is the one the metadata DSN names.
ADMIN: Final = "f2pipe-admin"

#: The broker's own SASL principal for its inter-broker and controller links.
KAFKA_BROKER_USER: Final = "f2pipe-broker"

#: The Redis keys of the processor's lookup cache (``f2pipe.metadata.resolver``).
REDIS_CACHE_PATTERN: Final = "f2pipe:meta:*"

KafkaResource = Literal["topic", "group", "transactional_id", "cluster"]
KafkaOperation = Literal["READ", "WRITE", "DESCRIBE", "CREATE", "IDEMPOTENT_WRITE"]


class _SettingsLike(Protocol):
    @property
    def topic_raw(self) -> str: ...
    @property
    def topic_processed(self) -> str: ...
    @property
    def topic_dead_letter(self) -> str: ...
    @property
    def processor_group(self) -> str: ...
    @property
    def sink_group(self) -> str: ...


@dataclass(frozen=True)
class Names:
    """The resource names the rights refer to; the defaults are f2pipe's."""

    topic_raw: str = "raw-iot-data"
    topic_processed: str = "processed-iot-data"
    topic_dead_letter: str = "iot-dead-letter"
    processor_group: str = "f2pipe-processor"
    sink_group: str = "f2pipe-sink"

    @classmethod
    def from_settings(cls, settings: _SettingsLike) -> Names:
        """The names a :class:`~f2pipe.settings.Settings` (or anything alike) configures."""
        return cls(
            topic_raw=settings.topic_raw,
            topic_processed=settings.topic_processed,
            topic_dead_letter=settings.topic_dead_letter,
            processor_group=settings.processor_group,
            sink_group=settings.sink_group,
        )


@dataclass(frozen=True)
class KafkaAcl:
    """One ALLOW rule for a principal: ``operation`` on ``resource`` ``name``.

    ``pattern`` is ``literal`` (exactly ``name``) or ``prefixed`` (every name
    starting with it); ``cluster`` rules name ``kafka-cluster``.
    """

    resource: KafkaResource
    name: str
    operation: KafkaOperation
    pattern: Literal["literal", "prefixed"] = "literal"


@dataclass(frozen=True)
class PgGrant:
    """``GRANT <privileges> ON <tables>``: table privileges for one role."""

    privileges: tuple[str, ...]
    tables: tuple[str, ...]


@dataclass(frozen=True)
class Principal:
    """One service's identities and rights on every server (None: it has none there)."""

    service: str
    kafka_user: str | None
    kafka_acls: tuple[KafkaAcl, ...]
    pg_role: str | None
    pg_grants: tuple[PgGrant, ...]
    redis_user: str | None
    redis_rules: tuple[str, ...]
    mqtt_identity: str | None


def _produce(topic: str) -> tuple[KafkaAcl, ...]:
    return (KafkaAcl("topic", topic, "WRITE"), KafkaAcl("topic", topic, "DESCRIBE"))


def _consume(topic: str, group: str) -> tuple[KafkaAcl, ...]:
    return (
        KafkaAcl("topic", topic, "READ"),
        KafkaAcl("topic", topic, "DESCRIBE"),
        KafkaAcl("group", group, "READ"),
        KafkaAcl("group", group, "DESCRIBE"),
    )


METADATA_TABLES: Final = (
    "device_types",
    "device_templates",
    "devices",
    "connectors",
    "pins",
    "datapoints",
    "metadata_version",
)


def principals(names: Names | None = None) -> tuple[Principal, ...]:
    """Every service's principal, in :data:`SERVICES` order."""
    n = names or Names()
    return (
        Principal(
            service="certgen",
            kafka_user=None,
            kafka_acls=(),
            pg_role="f2pipe_certgen",
            pg_grants=(
                PgGrant(("SELECT",), ("devices",)),
                PgGrant(("SELECT", "INSERT"), ("device_claims",)),
                PgGrant(("SELECT", "INSERT", "UPDATE"), ("certificates",)),
            ),
            redis_user=None,
            redis_rules=(),
            mqtt_identity=None,
        ),
        Principal(
            service="connector",
            kafka_user="f2pipe-connector",
            kafka_acls=(*_produce(n.topic_raw), *_produce(n.topic_dead_letter)),
            pg_role=None,
            pg_grants=(),
            redis_user=None,
            redis_rules=(),
            mqtt_identity="svc-connector",
        ),
        Principal(
            service="processor",
            kafka_user="f2pipe-processor",
            kafka_acls=(
                *_consume(n.topic_raw, n.processor_group),
                *_produce(n.topic_processed),
                *_produce(n.topic_dead_letter),
                # Transactional ids start with the group (f2pipe.processor.delivery).
                KafkaAcl("transactional_id", n.processor_group, "WRITE", "prefixed"),
                KafkaAcl("transactional_id", n.processor_group, "DESCRIBE", "prefixed"),
            ),
            pg_role="f2pipe_processor",
            pg_grants=(PgGrant(("SELECT",), METADATA_TABLES),),
            redis_user="f2pipe-processor",
            # Connection commands (AUTH, HELLO, PING, SELECT, CLIENT) and the cache's keys.
            redis_rules=(f"~{REDIS_CACHE_PATTERN}", "+@connection", "+get", "+set"),
            mqtt_identity=None,
        ),
        Principal(
            service="sink",
            kafka_user="f2pipe-sink",
            kafka_acls=(*_consume(n.topic_processed, n.sink_group), *_produce(n.topic_dead_letter)),
            pg_role="f2pipe_sink",
            pg_grants=(
                PgGrant(("SELECT", "INSERT"), ("decoded_data",)),
                PgGrant(("SELECT", "INSERT", "UPDATE"), ("latest_readings",)),
            ),
            redis_user=None,
            redis_rules=(),
            mqtt_identity=None,
        ),
    )


#: The principals for f2pipe's default names.
PRINCIPALS: Final = principals()


def principal(service: str, names: Names | None = None) -> Principal:
    """The principal of ``service``; ValueError naming the known services otherwise."""
    for candidate in principals(names):
        if candidate.service == service:
            return candidate
    raise ValueError(f"unknown service {service!r}; choose from {', '.join(SERVICES)}")


#: The broker ACL writer of a deployment with several brokers: one column pair, read only.
ACL_SYNC: Final = Principal(
    service="aclsync",
    kafka_user=None,
    kafka_acls=(),
    pg_role="f2pipe_aclsync",
    pg_grants=(PgGrant(("SELECT (mac_address, broker)",), ("devices",)),),
    redis_user=None,
    redis_rules=(),
    mqtt_identity=None,
)


def broker_connector(broker: int, names: Names | None = None) -> Principal:
    """The connector group of broker ``mqtt-<broker>`` (> 1) as a principal of its own:
    the connector's rights, as ``connector-mqtt-<broker>`` with Kafka user
    ``f2pipe-connector-mqtt-<broker>`` and MQTT identity ``svc-connector-mqtt-<broker>``."""
    if broker < 2:
        raise ValueError("broker mqtt-1's connectors are the connector principal")
    base = principal("connector", names)
    suffix = f"-mqtt-{broker}"
    return replace(
        base,
        service=f"{base.service}{suffix}",
        kafka_user=f"{base.kafka_user}{suffix}",
        mqtt_identity=f"{base.mqtt_identity}{suffix}",
    )


def deployment_principals(brokers: int = 1, names: Names | None = None) -> tuple[Principal, ...]:
    """Every principal of a deployment with ``brokers`` MQTT brokers: :func:`principals`,
    then (several brokers) each further broker's connector group and :data:`ACL_SYNC`."""
    if brokers < 2:
        return principals(names)
    extra = tuple(broker_connector(b, names) for b in range(2, brokers + 1))
    return (*principals(names), *extra, ACL_SYNC)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def pg_grant_sql(who: Principal) -> list[str]:
    """The statements that give ``who``'s role exactly its grants (role must exist).

    Revokes first, so running them again after a change of rights leaves no
    stale privilege on the tables named here.
    """
    if who.pg_role is None:
        return []
    role = _quote_ident(who.pg_role)
    statements = [f"GRANT USAGE ON SCHEMA public TO {role}"]
    for grant in who.pg_grants:
        tables = ", ".join(_quote_ident(table) for table in grant.tables)
        statements.append(f"REVOKE ALL ON {tables} FROM {role}")
        statements.append(f"GRANT {', '.join(grant.privileges)} ON {tables} TO {role}")
    return statements


def redis_acl_line(who: Principal, password_sha256: str) -> str:
    """``who``'s line of a Redis ACL file, with the password given as its SHA-256 hex."""
    if who.redis_user is None:
        raise ValueError(f"{who.service} has no Redis user")
    return f"user {who.redis_user} on #{password_sha256} resetchannels {' '.join(who.redis_rules)}"


def kafka_acl_arguments(who: Principal) -> list[list[str]]:
    """``kafka-acls.sh --add`` arguments for each of ``who``'s rules (bootstrap not included)."""
    if who.kafka_user is None:
        return []
    flags = {"topic": "--topic", "group": "--group", "transactional_id": "--transactional-id"}
    commands = []
    for acl in who.kafka_acls:
        target = ["--cluster"] if acl.resource == "cluster" else [flags[acl.resource], acl.name]
        commands.append(
            [
                "--add",
                "--allow-principal",
                f"User:{who.kafka_user}",
                "--operation",
                acl.operation.title().replace("_", ""),
                *target,
                "--resource-pattern-type",
                acl.pattern,
            ]
        )
    return commands
