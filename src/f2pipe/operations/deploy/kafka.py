"""Kafka for a deployment: its nodes, their security settings, users, ACLs and topics.

One KRaft node (``kafka``), or with ``F2PIPE_KAFKA_BROKERS=3`` the local
stack's cluster (:mod:`f2pipe.operations.stack.kafka_cluster`): ``kafka-1`` to
``kafka-3``, each broker and controller at once, all three voters of the
quorum, topics with the stack's replicas and ``min.insync.replicas``. Every
container reaches every node on the INTERNAL listener (:func:`internal_bootstrap`).

As the secured local stack does (SPEC section 10): the services authenticate
with SCRAM-SHA-512 each as its own user from :mod:`f2pipe.operations.principals`
and hold only its ACLs (``StandardAuthorizer``, nothing allowed without an
ACL); the broker reaches its own controller and itself as
:data:`~f2pipe.operations.principals.KAFKA_BROKER_USER` with PLAIN (SCRAM users
live in the metadata the controller serves, so they cannot authenticate that
link); that user and the operator are super users. In the compose file every
Kafka link stays on one host's container network, so the listeners are
SASL_PLAINTEXT; a deployment across hosts puts TLS under them (SASL_SSL).

``deploy/kafka/setup.sh`` (run by the kafka-setup one-shot with the Kafka
image's tools) creates the SCRAM users, the ACLs and the topics; all of it is
idempotent. Passwords come from the environment (``.env``), never the file.
"""

from __future__ import annotations

import shlex

from f2pipe.operations.principals import (
    ADMIN,
    KAFKA_BROKER_USER,
    Names,
    deployment_principals,
    kafka_acl_arguments,
)
from f2pipe.operations.stack.kafka import (
    AUTHORIZER,
    SCRAM_JAAS,
    SINGLE_NODE,
    broker_jaas,
    topic_plan,
)
from f2pipe.operations.stack.kafka_cluster import CLUSTER, node_ports, quorum_voters, replication
from f2pipe.settings import Settings

__all__ = [
    "ADMIN_PASSWORD",
    "BROKER_PASSWORD",
    "INTERNAL_PORT",
    "image_environment",
    "internal_bootstrap",
    "node_names",
    "password_variable",
    "server_properties",
    "setup_script",
]

#: The environment variables (from .env) of the broker's and the operator's passwords.
BROKER_PASSWORD = "BROKER_KAFKA_PASSWORD"  # noqa: S105 (a variable's name, not a password)
ADMIN_PASSWORD = "ADMIN_KAFKA_PASSWORD"  # noqa: S105 (a variable's name, not a password)
#: The listener the containers use; EXTERNAL (the settings' port) is for tools on the host.
INTERNAL_PORT = 19092
_CONTROLLER_PORT = 9093


def password_variable(service: str) -> str:
    """The environment variable holding ``service``'s Kafka password (CONNECTOR_KAFKA_...,
    CONNECTOR_MQTT_2_KAFKA_... for ``connector-mqtt-2``)."""
    return f"{service.upper().replace('-', '_')}_KAFKA_PASSWORD"


def node_names(settings: Settings) -> list[str]:
    """The Kafka services' names: ``kafka`` alone, or ``kafka-1``... for a cluster."""
    if settings.kafka_brokers == 1:
        return ["kafka"]
    return [f"kafka-{n}" for n in range(1, settings.kafka_brokers + 1)]


def internal_bootstrap(settings: Settings) -> str:
    """The containers' bootstrap: every node on the INTERNAL listener."""
    return ",".join(f"{name}:{INTERNAL_PORT}" for name in node_names(settings))


def server_properties(settings: Settings, broker_password: str, node: int = 1) -> dict[str, str]:
    """Node ``node``'s (from 1) KRaft properties; ``broker_password`` as it should appear.

    Each node is broker and controller at once. EXTERNAL listens on the node's
    port of the settings' bootstrap (the stack's: 9092, then 9094 and 9096 for
    a cluster). Raises ConfigError when the bootstrap names another number of
    brokers than ``F2PIPE_KAFKA_BROKERS``.
    """
    names = node_names(settings)
    port = node_ports(settings)[node - 1][0]
    plain = broker_jaas(broker_password)
    return {
        "node.id": str(node),
        "process.roles": "broker,controller",
        # Every node has a host name of its own, so all use the same controller port.
        "controller.quorum.voters": quorum_voters([(name, _CONTROLLER_PORT) for name in names]),
        "controller.listener.names": "CONTROLLER",
        "listeners": f"INTERNAL://:{INTERNAL_PORT},EXTERNAL://:{port},"
        f"CONTROLLER://:{_CONTROLLER_PORT}",
        "advertised.listeners": f"INTERNAL://{names[node - 1]}:{INTERNAL_PORT},"
        f"EXTERNAL://127.0.0.1:{port}",
        "listener.security.protocol.map": "INTERNAL:SASL_PLAINTEXT,EXTERNAL:SASL_PLAINTEXT,"
        "CONTROLLER:SASL_PLAINTEXT",
        "inter.broker.listener.name": "INTERNAL",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512,PLAIN",
        "listener.name.internal.sasl.enabled.mechanisms": "SCRAM-SHA-512,PLAIN",
        "listener.name.external.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "sasl.mechanism.inter.broker.protocol": "PLAIN",
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.internal.scram-sha-512.sasl.jaas.config": SCRAM_JAAS,
        "listener.name.external.scram-sha-512.sasl.jaas.config": SCRAM_JAAS,
        "listener.name.internal.plain.sasl.jaas.config": plain,
        "listener.name.controller.plain.sasl.jaas.config": plain,
        **AUTHORIZER,
        "log.dirs": "/var/lib/kafka/data",
        # Topics are created explicitly (setup.sh), never by a typo.
        "auto.create.topics.enable": "false",
        **(CLUSTER if settings.kafka_brokers > 1 else SINGLE_NODE),
    }


def image_environment(properties: dict[str, str]) -> dict[str, str]:
    """The apache/kafka image's variables for ``properties``: KAFKA_ + the name, upper case,
    ``_`` doubled, ``-`` tripled, ``.`` as ``_`` (the image turns them back)."""
    return {
        "KAFKA_" + name.replace("_", "__").replace("-", "___").replace(".", "_").upper(): value
        for name, value in properties.items()
    }


def setup_script(settings: Settings) -> str:
    """``setup.sh apply|probe BOOTSTRAP``: users, ACLs and topics; or a health probe."""
    every = deployment_principals(settings.mqtt_brokers, Names.from_settings(settings))
    services = [p for p in every if p.kafka_user]
    replicas, min_insync = replication(settings)
    # As the stack's create_topics: a cluster's topics also say how many replicas a write needs.
    durability = [f"        --config min.insync.replicas={min_insync} \\"] if replicas > 1 else []
    lines = [
        "#!/bin/bash",
        "# Written by `f2pipe deploy render`; changes are overwritten.",
        "# `setup.sh apply BOOTSTRAP`: the SCRAM-SHA-512 users of the operator and of each",
        "# service, exactly the services' ACLs (f2pipe.operations.principals) and the topics,",
        "# as `f2pipe stack up` makes them. `setup.sh probe BOOTSTRAP`: the broker answers.",
        "# Connects as the broker's own super user (PLAIN); idempotent. Passwords come from",
        f"# the environment: {BROKER_PASSWORD}, {ADMIN_PASSWORD} and <SERVICE>_KAFKA_PASSWORD.",
        "set -euo pipefail",
        "mode=${1:?usage: setup.sh apply|probe BOOTSTRAP}",
        "bootstrap=${2:?usage: setup.sh apply|probe BOOTSTRAP}",
        "bin=${KAFKA_TOOLS:-/opt/kafka/bin}",
        "umask 077",
        "config=$(mktemp)",
        'cat > "$config" <<EOF',
        "security.protocol=SASL_PLAINTEXT",
        "sasl.mechanism=PLAIN",
        "sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{KAFKA_BROKER_USER}" password="${{{BROKER_PASSWORD}}}";',
        "EOF",
        'if [ "$mode" = probe ]; then',
        '    exec "$bin/kafka-broker-api-versions.sh" --bootstrap-server "$bootstrap" \\',
        '        --command-config "$config" >/dev/null',
        "fi",
        "user() {",
        '    "$bin/kafka-configs.sh" --bootstrap-server "$bootstrap" --command-config "$config" \\',
        '        --alter --entity-type users --entity-name "$1" \\',
        '        --add-config "SCRAM-SHA-512=[iterations=8192,password=$2]" >/dev/null',
        "}",
        "acl() {",
        '    "$bin/kafka-acls.sh" --bootstrap-server "$bootstrap" --command-config "$config" \\',
        '        "$@" >/dev/null',
        "}",
        "topic() {",
        '    "$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --command-config "$config" \\',
        '        --create --if-not-exists --topic "$1" --partitions "$2" '
        f"--replication-factor {replicas} \\",
        *durability,
        '        --config cleanup.policy=delete --config retention.ms="$3"',
        "}",
        *(_replicated_function(replicas, min_insync) if replicas > 1 else []),
        "",
        "# Users: the operator (a super user) and every service.",
        f'user {ADMIN} "${{{ADMIN_PASSWORD}}}"',
    ]
    for who in services:
        lines.append(f'user {who.kafka_user} "${{{password_variable(who.service)}}}"')
    lines += ["", "# ACLs: nothing else is allowed (allow.everyone.if.no.acl.found=false)."]
    for who in services:
        for arguments in kafka_acl_arguments(who):
            lines.append("acl " + " ".join(shlex.quote(a) for a in arguments))
    lines += [
        "",
        "# Topics: explicit partitions, the delete policy (the sink needs every record),",
        "# 7 days for the data topics, 30 for dead letters (SPEC section 4).",
    ]
    if replicas > 1:
        lines.append(
            f"# {replicas} replicas each; a write is acknowledged once {min_insync} hold it."
        )
    plan = topic_plan(settings)
    if replicas > 1:
        lines.append(
            "# A topic that exists already must be as durable: checked before any is made."
        )
        lines += [f"replicated {shlex.quote(topic)}" for topic in plan]
    for topic, (partitions, retention) in plan.items():
        lines.append(f"topic {shlex.quote(topic)} {partitions} {retention}")
    return "\n".join(lines) + "\n"


def _replicated_function(replicas: int, min_insync: int) -> list[str]:
    """``replicated TOPIC``: stop with one line naming the fix when TOPIC exists with
    fewer replicas or a lower ``min.insync.replicas`` than the cluster's topics need
    (the stack refuses the same, :func:`~f2pipe.operations.stack.kafka.check_replicas`)."""
    thin = (
        f"topic $1 has $have replica(s) where {replicas} are needed; raise its replication"
        " factor with kafka-reassign-partitions, or delete it to have it created again"
        " (its records with it)"
    )
    loose = (
        f"topic $1 has min.insync.replicas=$insync where {min_insync} are needed; set it with"
        " kafka-configs.sh --alter --entity-type topics --entity-name $1 --add-config"
        f" min.insync.replicas={min_insync}"
    )
    return f"""replicated() {{
    local line have insync
    line=$("$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --command-config "$config" \\
        --describe --if-exists --topic "$1" | grep -m1 "ReplicationFactor:" || true)
    [ -n "$line" ] || return 0
    have=$(sed -n 's/.*ReplicationFactor: *\\([0-9]*\\).*/\\1/p' <<< "$line")
    insync=$(sed -n 's/.*min\\.insync\\.replicas=\\([0-9]*\\).*/\\1/p' <<< "$line")
    if [ "${{have:-0}}" -lt {replicas} ]; then
        echo "setup.sh: {thin}" >&2
        exit 1
    fi
    if [ "${{insync:-{min_insync}}}" -lt {min_insync} ]; then
        echo "setup.sh: {loose}" >&2
        exit 1
    fi
}}""".splitlines()
