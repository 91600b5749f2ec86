"""The servers' configuration for a deployment, from the code the local stack uses.

Each function returns the text of one file under ``deploy/``; none holds a
secret (passwords are read from the environment when the file runs) or a
timestamp, so a render is the same wherever and whenever it runs.

- Mosquitto: the configuration and ACL of :mod:`f2pipe.operations.stack.mosquitto`
  for a broker in a container (:func:`broker_site`), and its start script,
  which reloads the CRL when certgen changes it. With several brokers, one
  configuration each; their ACLs are written by the ``broker-acls`` service
  instead (:mod:`.mqtt`), and the start script reloads them too.
- Kafka: all of it (users, ACLs, topics) is in :mod:`.kafka`.
- PostgreSQL and Redis: each service's role, grants and user, from
  :mod:`f2pipe.operations.principals`.
- Prometheus: the scrape configuration of the four services.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from f2pipe.operations.deploy.mqtt import BROKER_ACL, connector_service
from f2pipe.operations.principals import (
    ADMIN,
    Names,
    Principal,
    deployment_principals,
    pg_grant_sql,
)
from f2pipe.operations.principals import redis_acl_line as _redis_acl_line
from f2pipe.operations.services import connector_ops_port
from f2pipe.operations.stack import retainguard
from f2pipe.operations.stack.mosquitto import (
    BrokerSite,
    render_acl,
    render_conf,
    render_start_script,
)
from f2pipe.operations.stack.mqtt_shards import connector_group
from f2pipe.pki.ca import PkiPaths
from f2pipe.runtime.mqttbrokers import DEFAULT_BROKER, brokers
from f2pipe.settings import Settings

__all__ = [
    "BROKER_CONF",
    "BROKER_MEMORY_BYTES",
    "BROKER_PKI",
    "DATABASES",
    "PASSWORD_VARIABLES",
    "broker_site",
    "mosquitto_acl",
    "mosquitto_conf",
    "mosquitto_start",
    "postgres_roles",
    "prometheus_config",
    "redis_start",
]

# In the eclipse-mosquitto image: configuration (read-only), the broker's share of
# the PKI (read-only, kept current by certgen) and its persistence.
BROKER_CONF = PurePosixPath("/mosquitto/config")
BROKER_PKI = PurePosixPath("/mosquitto/pki")
_BROKER_DATA = PurePosixPath("/mosquitto/data")
#: The broker container's memory limit; its queue bound is 1/32 of it, as the local
#: stack's is of the machine's (see f2pipe.operations.stack.mosquitto).
BROKER_MEMORY_BYTES = 4 * 1024**3

#: Which database each service with a PostgreSQL role uses: the DSN it is given.
DATABASES = {
    "certgen": "metadata",
    "processor": "metadata",
    "sink": "timeseries",
    "aclsync": "metadata",  # several brokers only
}

#: The environment variable (from .env) holding each service's password on a server.
PASSWORD_VARIABLES = {
    ("postgres", "certgen"): "CERTGEN_DB_PASSWORD",
    ("postgres", "processor"): "PROCESSOR_DB_PASSWORD",
    ("postgres", "sink"): "SINK_DB_PASSWORD",
    ("postgres", "aclsync"): "ACLSYNC_DB_PASSWORD",
    ("redis", "processor"): "PROCESSOR_REDIS_PASSWORD",
}


def broker_site(settings: Settings) -> BrokerSite:
    """The broker in its container: its own user, no pid file, every interface; with several
    brokers its ACL is the one the broker-acls service writes into its ACL folder."""
    queued = settings.broker_max_queued_bytes or BROKER_MEMORY_BYTES // 32
    return BrokerSite(
        acl_file=Path((BROKER_ACL if settings.mqtt_brokers > 1 else BROKER_CONF) / "acl"),
        persistence=Path(_BROKER_DATA),
        max_queued_bytes=queued,
        max_queued_messages=settings.mqtt_max_queued_messages or min(queued, 2**31 - 1),
        plugin=Path(retainguard.IMAGE_PLUGIN),
    )


def mosquitto_conf(settings: Settings, number: int = 1) -> str:
    """Broker mqtt-<number>'s configuration: on its port of the stack's."""
    broker = brokers(settings)[number - 1].settings(settings)
    return render_conf(broker, PkiPaths(Path(BROKER_PKI)), broker_site(settings))


def mosquitto_acl(connectors: int) -> str:
    """The ACL with ``connectors`` connector identities (svc-connector, svc-connector-2...)."""
    return render_acl(connector_group(DEFAULT_BROKER, connectors))


def mosquitto_start(settings: Settings) -> str:
    return render_start_script(watch_acl=settings.mqtt_brokers > 1)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def postgres_roles(settings: Settings, database: str) -> str:
    """``psql`` script giving each service of ``database`` its login role and grants.

    Run by the owner after the migrations, with ``-v <service>_password=...``
    for each role (from .env); idempotent: roles are created once, passwords
    and grants set again on every run.
    """
    lines = [
        "-- Written by `f2pipe deploy render`; changes are overwritten.",
        f"-- The {database} database's service roles (SPEC section 10), from",
        "-- f2pipe.operations.principals.",
        "-- Run after `f2pipe db migrate`, as the owner, with psql -v <service>_password=...",
        r"\set ON_ERROR_STOP on",
    ]
    for who in _principals(settings):
        if who.pg_role is None or DATABASES.get(who.service) != database:
            continue
        role = who.pg_role
        lines += [
            "",
            f"-- {who.service}",
            f"SELECT format('CREATE ROLE %I LOGIN', {_sql_literal(role)})",
            f"WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_sql_literal(role)})\\gexec",
            f"ALTER ROLE \"{role}\" LOGIN PASSWORD :'{who.service}_password';",
            *(f"{statement};" for statement in pg_grant_sql(who)),
        ]
    return "\n".join(lines) + "\n"


def redis_start(settings: Settings) -> str:
    """The Redis start script: the ACL users file from the environment's passwords, then Redis.

    The default user is off; the operator's user has every right, each service
    user its rules from the principals. Passwords enter the file only as their
    SHA-256, and the file lives in the container's /tmp. Arguments are passed on to
    ``redis-server``.
    """
    lines = [
        "#!/bin/sh",
        "# Written by `f2pipe deploy render`; changes are overwritten.",
        "# Redis with one ACL user per service (f2pipe.operations.principals) and the",
        "# operator's; the passwords come from the environment, as SHA-256 in the users file.",
        "set -eu",
        'digest() { printf %s "$1" | sha256sum | cut -c1-64; }',
        "umask 077",
        "acl=$(mktemp)",
        "{",
        '    echo "user default off"',
        f'    echo "user {ADMIN} on #$(digest "$REDIS_PASSWORD") ~* &* +@all"',
    ]
    for who in _principals(settings):
        if who.redis_user is None:
            continue
        variable = PASSWORD_VARIABLES[("redis", who.service)]
        line = _redis_acl_line(who, f'$(digest "${variable}")')
        lines.append(f'    echo "{line}"')
    lines += [
        '} > "$acl"',
        "# The cache keeps its data across restarts (append-only file), as the local stack does.",
        'exec redis-server --appendonly yes --appendfsync everysec --aclfile "$acl" "$@"',
    ]
    return "\n".join(lines) + "\n"


def prometheus_config(settings: Settings, ca_file: str) -> str:
    """prometheus.yml: the four services by their compose names; certgen over HTTPS. Every
    broker's connector is a target of the ``connector`` job."""
    connectors = [
        f"{connector_service(n)}:{connector_ops_port(settings, n)}"
        for n in range(1, settings.mqtt_brokers + 1)
    ]
    jobs = [
        ("certgen", [f"certgen:{settings.certgen_port}"]),
        ("connector", connectors),
        ("processor", [f"processor:{settings.processor_port}"]),
        ("sink", [f"sink:{settings.sink_port}"]),
    ]
    lines = [
        "# Written by `f2pipe deploy render`; changes are overwritten.",
        "# Prometheus for f2pipe: every service serves /metrics on its ops port (SPEC section 8);",
        "# certgen serves HTTPS only, checked against the f2pipe CA. For the native stack",
        "# (`make run`) replace the targets with 127.0.0.1.",
        "global:",
        "  scrape_interval: 5s",
        "  evaluation_interval: 15s",
        "",
        "scrape_configs:",
    ]
    for name, targets in jobs:
        lines.append(f"  - job_name: {name}")
        if name == "certgen":
            lines += ["    scheme: https", "    tls_config:", f"      ca_file: {ca_file}"]
        listed = ", ".join(f'"{target}"' for target in targets)
        lines += ["    static_configs:", f"      - targets: [{listed}]"]
    lines += ["", "rule_files:", "  - alerts.yml"]
    return "\n".join(lines) + "\n"


def _principals(settings: Settings) -> tuple[Principal, ...]:
    return deployment_principals(settings.mqtt_brokers, Names.from_settings(settings))
