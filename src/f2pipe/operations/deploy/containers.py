"""The compose file's building blocks: users, shares, probes, and the server containers.

:mod:`.compose` puts the f2pipe services beside these; the servers here are
the official images the local stack's versions pin (:mod:`.images`), each
run as its image's own user, plus Prometheus and Grafana.
"""

from __future__ import annotations

from typing import Any

from f2pipe.operations.deploy.configs import (
    BROKER_CONF,
    BROKER_MEMORY_BYTES,
    BROKER_PKI,
    PASSWORD_VARIABLES,
)
from f2pipe.operations.deploy.images import Images
from f2pipe.operations.deploy.kafka import (
    BROKER_PASSWORD,
    INTERNAL_PORT,
    image_environment,
    node_names,
    server_properties,
)
from f2pipe.operations.deploy.mqtt import (
    ACL_SERVICE,
    BROKER_ACL,
    broker_conf_file,
    broker_port,
    broker_service,
    broker_share,
    connector_service,
    several,
)
from f2pipe.operations.deploy.yamltext import Commented
from f2pipe.operations.stack.kafka_cluster import node_ports
from f2pipe.settings import Settings

__all__ = [
    "F2PIPE_GROUP",
    "PARTIES",
    "PKI",
    "SHARES",
    "STATE",
    "USERS",
    "broker_names",
    "done",
    "dsn",
    "env",
    "f2pipe_service",
    "healthy",
    "observability",
    "parties",
    "probe",
    "readyz",
    "servers",
    "share",
]

STATE = "/var/lib/f2pipe"
SHARES = f"{STATE}/shares"
PKI = f"{STATE}/pki"
_PROMETHEUS_PKI = "/etc/prometheus/pki"

#: The group of certgen's user, which may read the keys in the shares.
F2PIPE_GROUP = 10001
#: Each container's user (uid:gid). One-shots acting for certgen or a server run as it.
USERS = {
    "certgen": f"{F2PIPE_GROUP}:{F2PIPE_GROUP}",
    "connector": f"10002:{F2PIPE_GROUP}",
    "processor": f"10003:{F2PIPE_GROUP}",
    "sink": f"10004:{F2PIPE_GROUP}",
    "simulator": f"10005:{F2PIPE_GROUP}",
    "db-migrate": f"10006:{F2PIPE_GROUP}",
    "db-seed": f"10007:{F2PIPE_GROUP}",
    "db-roles": "10008:10008",
    "broker-acls": f"10009:{F2PIPE_GROUP}",  # several brokers only
    "mosquitto": "1883:1883",  # the eclipse-mosquitto image's own user
    "prometheus": "65534:65534",  # the prom/prometheus image's own user
    "grafana": "472:0",  # the grafana image's own user
}
#: Share name -> the service that mounts it as its PKI folder.
PARTIES = {
    "broker": "mosquitto",
    "svc-connector": "connector",
    "simulator": "simulator",
    "prometheus": "prometheus",
}

_PROBE = {"interval": "10s", "timeout": "5s", "retries": 6, "start_period": "30s"}


def parties(settings: Settings) -> dict[str, str]:
    """:data:`PARTIES`, and with several brokers each further broker's share and its
    connector's (``broker-2``, ``svc-connector-mqtt-2``...)."""
    found = dict(PARTIES)
    for n in range(2, settings.mqtt_brokers + 1):
        found[broker_share(n)] = broker_service(n)
        found[f"svc-{connector_service(n)}"] = connector_service(n)
    return found


def broker_names(settings: Settings) -> list[str]:
    """The brokers' and certgen's certificate names: their compose host names (every
    broker's: they share one certificate), then the settings' (``--broker-name``:
    what devices reach the brokers by)."""
    hosts = [broker_service(n) for n in range(1, settings.mqtt_brokers + 1)]
    return list(dict.fromkeys([*hosts, "certgen", *settings.extra_server_names()]))


def env(name: str) -> str:
    return f"${{{name}:?set it in .env}}"


def healthy(*names: str) -> dict[str, dict[str, str]]:
    return {name: {"condition": "service_healthy"} for name in names}


def done(*names: str) -> dict[str, dict[str, str]]:
    return {name: {"condition": "service_completed_successfully"} for name in names}


def probe(test: list[str], **more: object) -> dict[str, object]:
    return {**_PROBE, **more, "test": test}


def readyz(port: int) -> dict[str, object]:
    code = f"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/readyz', timeout=3)"
    return probe(["CMD", "python", "-c", code])


def share(party: str, target: str, source: str = "shares") -> dict[str, object]:
    """A party's share, read-only (Compose volume subpath: Docker Engine 26+, Compose 2.23+);
    ``source`` another volume than the shares, its folder ``party``."""
    return {
        "type": "volume",
        "source": source,
        "target": target,
        "read_only": True,
        "volume": {"subpath": party},
    }


def dsn(user: str, password: str, host: str) -> str:
    return f"postgresql://{user}:{env(password)}@{host}:5432/f2pipe"


def f2pipe_service(images: Images, user: str, command: list[str], **more: Any) -> dict[str, Any]:
    service: dict[str, Any] = {"image": images.f2pipe}
    if more.pop("build", False):
        service["build"] = {"context": ".", "dockerfile": "Dockerfile"}
    service.update({"user": USERS[user], "command": command, **more})
    return service


def servers(images: Images, settings: Settings) -> dict[str, Commented]:
    pg_probe = ["CMD", "pg_isready", "--host=127.0.0.1", "--username=f2pipe", "--dbname=f2pipe"]
    database = {
        "POSTGRES_USER": "f2pipe",
        "POSTGRES_DB": "f2pipe",
    }
    return {
        "postgres": Commented(
            {
                "image": images.postgres,
                "user": "postgres",
                "command": ["postgres", "-c", "shared_buffers=1GB"],
                "environment": {**database, "POSTGRES_PASSWORD": env("POSTGRES_PASSWORD")},
                "volumes": ["metadata:/var/lib/postgresql/data"],
                "ports": ["127.0.0.1:5432:5432"],
                "healthcheck": probe(pg_probe),
                "restart": "unless-stopped",
            },
            [
                "The metadata (host port 5432). The owner f2pipe runs the migrations; the",
                "services log in with their own roles (db-roles).",
            ],
        ),
        "timescaledb": Commented(
            {
                "image": images.timescaledb,
                "user": "postgres",
                "environment": {
                    **database,
                    "POSTGRES_PASSWORD": env("TIMESCALE_PASSWORD"),
                    "TIMESCALEDB_TELEMETRY": "off",
                },
                "volumes": ["timeseries:/var/lib/postgresql/data"],
                "ports": ["127.0.0.1:5433:5432"],
                "healthcheck": probe(pg_probe),
                "restart": "unless-stopped",
            },
            ["The time series (host port 5433), as in the original brief."],
        ),
        "redis": Commented(
            {
                "image": images.redis,
                "user": "redis",
                "command": ["sh", "/etc/f2pipe/redis.sh"],
                "environment": {
                    "REDIS_PASSWORD": env("REDIS_PASSWORD"),
                    "PROCESSOR_REDIS_PASSWORD": env(PASSWORD_VARIABLES[("redis", "processor")]),
                    "REDISCLI_AUTH": env("REDIS_PASSWORD"),
                },
                "volumes": ["./deploy/redis/redis.sh:/etc/f2pipe/redis.sh:ro", "cache:/data"],
                "ports": ["127.0.0.1:6379:6379"],
                "healthcheck": probe(["CMD", "redis-cli", "--user", "f2pipe-admin", "ping"]),
                "restart": "unless-stopped",
            },
            ["The metadata cache: ACL users only (deploy/redis/redis.sh), append-only file."],
        ),
        **_kafka(images, settings),
        **_mosquitto(images, settings),
    }


def _mosquitto(images: Images, settings: Settings) -> dict[str, Commented]:
    """The broker, or each broker of several: the same image, limits and probe."""
    services: dict[str, Commented] = {}
    for n in range(1, settings.mqtt_brokers + 1):
        port = broker_port(settings, n)
        acl: list[object] = []
        waits = done("certgen-init")
        if several(settings):
            acl = [share(f"mqtt-{n}", str(BROKER_ACL), source=ACL_SERVICE)]
            waits = {**waits, **healthy(ACL_SERVICE)}
        services[broker_service(n)] = Commented(
            {
                "image": images.broker,
                "build": {"context": ".", "dockerfile": "deploy/mosquitto/Dockerfile"},
                "user": USERS["mosquitto"],
                "group_add": [str(F2PIPE_GROUP)],
                "command": [
                    "sh",
                    f"{BROKER_CONF}/broker.sh",
                    f"{BROKER_CONF}/{broker_conf_file(n)}",
                ],
                "stop_grace_period": "30s",
                "mem_limit": BROKER_MEMORY_BYTES,
                "ulimits": {"nofile": settings.mqtt_max_connections + 1024},
                "volumes": [
                    f"./deploy/mosquitto:{BROKER_CONF}:ro",
                    share(broker_share(n), str(BROKER_PKI)),
                    *acl,
                    f"{broker_service(n)}:/mosquitto/data",
                ],
                "ports": [f"{port}:{port}"],
                "healthcheck": probe(["CMD", "nc", "-z", "127.0.0.1", str(port)]),
                "depends_on": waits,
                "restart": "unless-stopped",
            },
            _mosquitto_comment(n, settings.mqtt_brokers),
        )
    return services


def _mosquitto_comment(number: int, brokers: int) -> list[str]:
    if brokers == 1:
        return [
            "The device broker, on every interface: mutual TLS only. Its configuration and",
            "ACL are f2pipe's (deploy/mosquitto), its image adds the plugin refusing",
            "retained messages (deploy/mosquitto/Dockerfile); broker.sh reloads the CRL",
            "within seconds of certgen changing it. The probe only opens the TLS port: any",
            "MQTT identity would take its owner's session over.",
        ]
    if number > 1:
        return [
            f"Broker mqtt-{number}: as mosquitto but for its port, configuration, share, ACL",
            "folder and volume.",
        ]
    return [
        f"Device broker mqtt-1 of {brokers} (F2PIPE_MQTT_BROKERS), on every interface:",
        "mutual TLS only. Its configuration is f2pipe's (deploy/mosquitto), its image adds",
        "the plugin refusing retained messages. Its ACL, its folder of the broker-acls",
        "volume, names the controllers the metadata assigns to it; broker.sh waits for",
        "that file, and reloads it and the CRL within seconds of a change. The probe only",
        "opens the TLS port: any MQTT identity would take its owner's session over.",
    ]


def _kafka(images: Images, settings: Settings) -> dict[str, Commented]:
    """The Kafka node, or each node of the cluster: the same image, security and probe."""
    names = node_names(settings)
    services: dict[str, Commented] = {}
    for node, name in enumerate(names, 1):
        port = node_ports(settings)[node - 1][0]
        services[name] = Commented(
            {
                "image": images.kafka,
                "user": "appuser",
                "environment": {
                    # One id for every node of a cluster.
                    "CLUSTER_ID": env("KAFKA_CLUSTER_ID"),
                    **image_environment(server_properties(settings, env(BROKER_PASSWORD), node)),
                    # Not KAFKA_*: the image would make it a broker property. For the probe.
                    BROKER_PASSWORD: env(BROKER_PASSWORD),
                },
                "volumes": [
                    "./deploy/kafka/setup.sh:/etc/f2pipe/setup.sh:ro",
                    f"{name}:/var/lib/kafka/data",
                ],
                "ports": [f"127.0.0.1:{port}:{port}"],
                "healthcheck": probe(
                    ["CMD", "bash", "/etc/f2pipe/setup.sh", "probe", f"127.0.0.1:{INTERNAL_PORT}"],
                    timeout="20s",
                ),
                "restart": "unless-stopped",
            },
            _kafka_comment(node, len(names)),
        )
    return services


def _kafka_comment(node: int, nodes: int) -> list[str]:
    if nodes == 1:
        return [
            "Single-node KRaft, the Kafka version of deploy/kafka/pom.xml; no ZooKeeper.",
            "INTERNAL for the containers, EXTERNAL for tools on the host (status, dlq);",
            "SCRAM-SHA-512 users with ACLs only (deploy/kafka/setup.sh), as the local stack.",
        ]
    if node > 1:
        return [f"Node {node} of the cluster: as kafka-1 but for its id, name, port and volume."]
    return [
        f"A {nodes}-node KRaft cluster (F2PIPE_KAFKA_BROKERS), the Kafka version of",
        "deploy/kafka/pom.xml; no ZooKeeper. Each node is broker and controller, the quorum",
        "is all of them, so one may be lost. Topics: the local stack's replicas and",
        "min.insync.replicas. INTERNAL for the containers, EXTERNAL for tools on the host",
        "(status, dlq); SCRAM-SHA-512 users with ACLs only (deploy/kafka/setup.sh).",
    ]


def observability(images: Images) -> dict[str, Commented]:
    return {
        "prometheus": Commented(
            {
                "image": images.prometheus,
                "profiles": ["observability"],
                "user": USERS["prometheus"],
                "group_add": [str(F2PIPE_GROUP)],
                "command": [
                    "--config.file=/etc/prometheus/prometheus.yml",
                    "--storage.tsdb.path=/prometheus",
                    "--storage.tsdb.retention.time=15d",
                ],
                "volumes": [
                    "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
                    "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro",
                    share("prometheus", _PROMETHEUS_PKI),
                    "prometheus:/prometheus",
                ],
                "ports": ["127.0.0.1:9090:9090"],
                "healthcheck": probe(
                    ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9090/-/healthy"]
                ),
                "restart": "unless-stopped",
            },
            [
                "--- observability (docker compose --profile observability up) ---",
                "Scrapes the four services (certgen over HTTPS, checked against the CA).",
            ],
        ),
        "grafana": Commented(
            {
                "image": images.grafana,
                "profiles": ["observability"],
                "user": USERS["grafana"],
                "environment": {
                    "GF_SECURITY_ADMIN_PASSWORD": env("GRAFANA_ADMIN_PASSWORD"),
                    "GF_USERS_ALLOW_SIGN_UP": "false",
                    "GF_ANALYTICS_REPORTING_ENABLED": "false",
                    "TIMESCALE_PASSWORD": env("TIMESCALE_PASSWORD"),
                    "POSTGRES_PASSWORD": env("POSTGRES_PASSWORD"),
                },
                "volumes": [
                    "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro",
                    "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro",
                    "grafana:/var/lib/grafana",
                ],
                "ports": ["127.0.0.1:3000:3000"],
                "healthcheck": probe(
                    ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:3000/api/health"]
                ),
                "depends_on": healthy("prometheus", "timescaledb"),
                "restart": "unless-stopped",
            },
        ),
    }
