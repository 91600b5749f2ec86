"""``f2pipe deploy render``: every file of a deployment target, and nothing else.

:func:`render_files` maps each path (relative to the output folder) to its
text; the committed ``docker-compose.yml``, ``.env.example`` and ``deploy/``
files are exactly the render of the default settings, which
``tests/test_deploy.py`` proves byte for byte. :func:`issue_broker_files`
writes, only when asked, the broker's certificate and key with the names given
into ``<out>/secrets`` (never committed: that folder ignores itself in git).
"""

from __future__ import annotations

import os
from pathlib import Path

from f2pipe.operations.deploy import configs, kafka
from f2pipe.operations.deploy.compose import render_compose
from f2pipe.operations.deploy.configs import PASSWORD_VARIABLES
from f2pipe.operations.deploy.containers import broker_names
from f2pipe.operations.deploy.images import images
from f2pipe.operations.deploy.kafka import password_variable
from f2pipe.operations.deploy.mqtt import broker_conf_file, broker_port, connector_service, several
from f2pipe.operations.stack import retainguard
from f2pipe.settings import Settings

__all__ = ["TARGETS", "issue_broker_files", "render_files", "write_files"]

#: The deployment targets ``--target`` accepts.
TARGETS = ("compose",)

_ENV_EXAMPLE = """\
# Written by `f2pipe deploy render --target compose .`; changes are overwritten.
# Copy to .env (which git ignores) and replace every value before `docker compose up`.
# Generate secrets with e.g. `openssl rand -hex 24`: the passwords go into
# postgresql:// and redis:// URLs, so keep them to letters, digits, '-' and '_'.

# PostgreSQL (metadata, host port 5432) and TimescaleDB (time series, host port 5433):
# the owner f2pipe, which runs the migrations and is the operator's login.
POSTGRES_PASSWORD=change-me-metadata
TIMESCALE_PASSWORD=change-me-timeseries
# The services' own database roles (deploy/postgres): certgen and the processor on
# the metadata, the sink on the time series.
CERTGEN_DB_PASSWORD=change-me-certgen
PROCESSOR_DB_PASSWORD=change-me-processor
SINK_DB_PASSWORD=change-me-sink
# Kafka (SCRAM-SHA-512): the broker's own user, the operator's f2pipe-admin, and
# each service's user (deploy/kafka/setup.sh).
BROKER_KAFKA_PASSWORD=change-me-kafka-broker
ADMIN_KAFKA_PASSWORD=change-me-kafka-admin
CONNECTOR_KAFKA_PASSWORD=change-me-kafka-connector
PROCESSOR_KAFKA_PASSWORD=change-me-kafka-processor
SINK_KAFKA_PASSWORD=change-me-kafka-sink
# Redis: the operator's user f2pipe-admin, and the processor's own user.
REDIS_PASSWORD=change-me-redis
PROCESSOR_REDIS_PASSWORD=change-me-processor-cache
# certgen's admin token (mounted as a secret into certgen only, read through
# F2PIPE_ADMIN_TOKEN_FILE): at least 32 random characters, e.g. `openssl rand -hex 32`.
# certgen refuses to start with a shorter token or a placeholder, so this one must be set.
F2PIPE_ADMIN_TOKEN=
# Kafka KRaft cluster id: 22 base64url characters, e.g. the output of
# `docker run --rm {kafka} /opt/kafka/bin/kafka-storage.sh random-uuid`.
KAFKA_CLUSTER_ID=5L6g3nShT-eMCtK--X86sw
# Grafana (profile "observability") administrator.
GRAFANA_ADMIN_PASSWORD=change-me-grafana
"""


def render_files(
    settings: Settings, target: str = "compose", connectors: int = 1
) -> dict[str, str]:
    """Path -> text of every file of ``target`` for ``settings``; pure and deterministic.

    ``connectors`` is how many connector identities the broker's ACL admits
    (``svc-connector``, ``svc-connector-2``...); with several brokers, each
    broker's from its own group (:mod:`.mqtt`). Raises ValueError for an
    unknown target, StackError if the Kafka pom cannot be read.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    pinned = images()
    brokers = range(1, settings.mqtt_brokers + 1)
    # One broker: f2pipe's pattern ACL, a file here. Several: broker-acls writes theirs.
    acl = {} if several(settings) else {"deploy/mosquitto/acl": configs.mosquitto_acl(connectors)}
    return {
        "docker-compose.yml": render_compose(settings, pinned, connectors),
        ".env.example": _ENV_EXAMPLE.format(kafka=pinned.kafka) + _env_brokers(settings),
        **{
            f"deploy/mosquitto/{broker_conf_file(n)}": configs.mosquitto_conf(settings, n)
            for n in brokers
        },
        **acl,
        "deploy/mosquitto/broker.sh": configs.mosquitto_start(settings),
        "deploy/mosquitto/Dockerfile": retainguard.render_dockerfile(pinned.mosquitto),
        "deploy/kafka/setup.sh": kafka.setup_script(settings),
        "deploy/postgres/metadata-roles.sql": configs.postgres_roles(settings, "metadata"),
        "deploy/postgres/timeseries-roles.sql": configs.postgres_roles(settings, "timeseries"),
        "deploy/redis/redis.sh": configs.redis_start(settings),
        "deploy/prometheus/prometheus.yml": configs.prometheus_config(
            settings, "/etc/prometheus/pki/ca.pem"
        ),
    }


def _env_brokers(settings: Settings) -> str:
    """.env.example's lines for several brokers (none for one)."""
    if not several(settings):
        return ""
    connectors = [connector_service(n) for n in range(2, settings.mqtt_brokers + 1)]
    first = broker_port(settings, 1)
    return "\n".join(
        [
            "",
            f"# {settings.mqtt_brokers} MQTT brokers (F2PIPE_MQTT_BROKERS): the database role of",
            "# broker-acls, which reads which broker each controller belongs to, and the Kafka",
            "# user of each further broker's connector.",
            f"{PASSWORD_VARIABLES[('postgres', 'aclsync')]}=change-me-aclsync",
            *(f"{password_variable(c)}=change-me-kafka-{c}" for c in connectors),
            "# Where devices reach each broker, named in certgen's certificate answers: set it",
            "# to the public names and ports, e.g. (one line)",
            f"# mqtt-1=mqtts://mqtt1.example.net:{first},",
            f"#   mqtt-2=mqtts://mqtt2.example.net:{first + 2}",
            "# Empty: the compose host names (mosquitto, mosquitto-2...), which only the",
            "# containers (the simulator) resolve.",
            "F2PIPE_MQTT_BROKER_URLS=",
            "",
        ]
    )


def write_files(out: Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` under ``out`` (only those whose content changed); return them all."""
    written = []
    for relative, text in files.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            unchanged = path.read_text(encoding="utf-8") == text
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        written.append(path)
    return written


def issue_broker_files(settings: Settings, out: Path, names: list[str]) -> list[Path]:
    """Issue the broker's certificate into ``<out>/secrets``: for ``names``, the settings'
    names, its compose host name and loopback.

    Signed by the CA of ``settings.state_dir`` (run where the CA is); also
    copies the CA certificate and the CRL, the rest of what the broker reads.
    The key is written 0600. Raises CertError if the CA cannot be loaded.
    """
    from f2pipe.pki.ca import cert_pem, key_pem, pki_paths, write_private, write_public
    from f2pipe.pki.local import load_ca
    from f2pipe.pki.state import server_names

    ca = load_ca(settings)
    secrets = out / "secrets"
    secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(secrets, 0o700)
    (secrets / ".gitignore").write_text("# Keys and certificates: never committed.\n*\n")
    all_names = list(dict.fromkeys([*server_names(settings), *broker_names(settings), *names]))
    issued = ca.issue_server("f2pipe broker", all_names, settings.service_cert_days)
    assert issued.private_key is not None
    paths = pki_paths(settings)
    write_private(secrets / "broker.key", key_pem(issued.private_key))
    write_public(secrets / "broker.pem", cert_pem(issued.certificate))
    write_public(secrets / "ca.pem", paths.ca_cert.read_bytes())
    write_public(secrets / "crl.pem", paths.crl.read_bytes())
    return [secrets / name for name in ("broker.pem", "broker.key", "ca.pem", "crl.pem")]
