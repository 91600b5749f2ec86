"""docker-compose.yml for f2pipe with the official server images (SPEC sections 8 and 10).

Least privilege, container by container:

- The CA key lives only in certgen's volume (``certgen``, mounted by certgen
  and by the one-shots that act as certgen). certgen keeps one share per party
  in the ``shares`` volume (:func:`f2pipe.pki.state.sync_shares`); the broker,
  the connector, the simulator and Prometheus each mount only their own share,
  read-only: the CA certificate, the CRL and their own key.
- Each long-running service runs as a user of its own; the f2pipe services
  and the parties holding a share are in the group ``10001`` (certgen's),
  which may read a share's key. Servers run as their image's own user.
- Each service has its own PostgreSQL role, Redis user
  (:mod:`f2pipe.operations.principals`), with passwords from ``.env``; only
  certgen gets the admin token.
- The broker reloads its CRL by itself when certgen changes it
  (``deploy/mosquitto/broker.sh``), so revocation needs no shared pid.

- Each service has its own Kafka user (SCRAM-SHA-512) holding only its ACLs
  (:mod:`.kafka`).

With several MQTT brokers (``F2PIPE_MQTT_BROKERS=N``, :mod:`.mqtt`) each broker
has its own connector (``connector-mqtt-<n>``: identity, share, Kafka user, ops
port), and the ``broker-acls`` service, with a database role that reads only
which broker each controller belongs to, keeps the brokers' ACLs in step with
the fleet.
"""

from __future__ import annotations

from f2pipe.metadata.fleet.demo import demo_fleet
from f2pipe.operations.deploy.configs import DATABASES, PASSWORD_VARIABLES
from f2pipe.operations.deploy.connectors import (
    acl_service,
    brokers_env,
    connector_container,
    connectors_of,
    mqtt_env,
)
from f2pipe.operations.deploy.containers import (
    PKI,
    SHARES,
    STATE,
    USERS,
    broker_names,
    done,
    dsn,
    env,
    f2pipe_service,
    healthy,
    observability,
    parties,
    probe,
    readyz,
    servers,
    share,
)
from f2pipe.operations.deploy.identities import (
    kafka_secret,
    kafka_services,
    service_dsn,
    service_principal,
)
from f2pipe.operations.deploy.images import Images
from f2pipe.operations.deploy.kafka import (
    ADMIN_PASSWORD,
    BROKER_PASSWORD,
    internal_bootstrap,
    node_names,
    password_variable,
)
from f2pipe.operations.deploy.mqtt import (
    ACL_SERVICE,
    broker_service,
    connector_service,
    several,
)
from f2pipe.operations.deploy.yamltext import Commented, document
from f2pipe.operations.principals import (
    deployment_principals,
    principal,
)
from f2pipe.settings import Settings

__all__ = ["render_compose", "shares_command"]


def shares_command(settings: Settings) -> list[str]:
    """certgen-init: the PKI, and a share folder for every party."""
    return ["deploy", "shares", *parties(settings)]


def _oneshots(images: Images, settings: Settings) -> dict[str, Commented]:
    owner = {
        "F2PIPE_METADATA_DSN": dsn("f2pipe", "POSTGRES_PASSWORD", "postgres"),
        "F2PIPE_TIMESERIES_DSN": dsn("f2pipe", "TIMESCALE_PASSWORD", "timescaledb"),
    }
    macs = " ".join(c.mac for c in demo_fleet().controllers)
    devices = f"{SHARES}/simulator/devices"
    with_roles = [
        who.service
        for who in deployment_principals(settings.mqtt_brokers)
        if who.pg_role is not None
    ]
    role_passwords = {s: PASSWORD_VARIABLES[("postgres", s)] for s in with_roles}

    def passwords(database: str) -> str:
        return "".join(
            f'-v {s}_password="${variable}" '
            for s, variable in role_passwords.items()
            if DATABASES[s] == database
        )

    roles = (
        "set -eu\n"
        'PGPASSWORD="$POSTGRES_PASSWORD" psql -h postgres -U f2pipe -d f2pipe -q '
        f"{passwords('metadata')}-f /etc/f2pipe/metadata-roles.sql\n"
        'PGPASSWORD="$TIMESCALE_PASSWORD" psql -h timescaledb -U f2pipe -d f2pipe -q '
        f"{passwords('timeseries')}-f /etc/f2pipe/timeseries-roles.sql\n"
    )
    return {
        "certgen-init": Commented(
            f2pipe_service(
                images,
                "certgen",
                shares_command(settings),
                build=True,
                restart="no",
                environment={
                    "F2PIPE_STATE_DIR": STATE,
                    "F2PIPE_BROKER_NAMES": ",".join(broker_names(settings)),
                },
                volumes=[f"certgen:{STATE}", f"shares:{SHARES}"],
            ),
            [
                "The CA, the broker's, certgen's and the services' certificates, in certgen's",
                "volume, and one share per party (deploy shares).",
            ],
        ),
        "db-migrate": Commented(
            f2pipe_service(
                images,
                "db-migrate",
                ["db", "migrate"],
                restart="no",
                environment=owner,
                depends_on=healthy("postgres", "timescaledb"),
            ),
        ),
        "db-roles": Commented(
            {
                "image": images.postgres,
                "user": USERS["db-roles"],
                "restart": "no",
                "entrypoint": ["sh", "-c"],
                "command": [roles],
                "environment": {
                    "POSTGRES_PASSWORD": env("POSTGRES_PASSWORD"),
                    "TIMESCALE_PASSWORD": env("TIMESCALE_PASSWORD"),
                    **{variable: env(variable) for variable in role_passwords.values()},
                },
                "volumes": ["./deploy/postgres:/etc/f2pipe:ro"],
                "depends_on": done("db-migrate"),
            },
            ["Each service's role and grants (deploy/postgres, from the principals)."],
        ),
        "db-seed": Commented(
            f2pipe_service(
                images,
                "db-seed",
                ["db", "seed-demo"],
                restart="no",
                environment={**owner, "F2PIPE_STATE_DIR": STATE},
                volumes=[f"claiming-codes:{STATE}"],
                depends_on=done("db-migrate"),
            ),
            ["The demo fleet; its claiming codes stay in this service's own volume."],
        ),
        "simulator-certs": Commented(
            f2pipe_service(
                images,
                "certgen",
                [
                    "set -eu\n"
                    f"out={devices}\n"
                    'mkdir -p "$out"\n'
                    f"for mac in {macs}; do\n"
                    '    [ -f "$out/f2-$mac.pem" ] ||\n'
                    '        f2pipe certgen issue-device "$mac" --out "$out"\n'
                    "done\n"
                    'chmod 0640 "$out"/*.key\n'
                ],
                entrypoint=["sh", "-c"],
                restart="no",
                environment={
                    "F2PIPE_STATE_DIR": STATE,
                    "F2PIPE_METADATA_DSN": service_dsn("certgen"),
                    # Each controller's broker file names the broker's compose host.
                    **(
                        {**mqtt_env(settings), **brokers_env(settings)} if several(settings) else {}
                    ),
                },
                volumes=[f"certgen:{STATE}", f"shares:{SHARES}"],
                depends_on=done("certgen-init", "db-seed", "db-roles"),
            ),
            ["The demo controllers' certificates, issued by certgen into the simulator's share."],
        ),
        "kafka-setup": Commented(
            {
                "image": images.kafka,
                "user": "appuser",
                "restart": "no",
                "command": ["bash", "/etc/f2pipe/setup.sh", "apply", internal_bootstrap(settings)],
                "environment": {
                    name: env(name)
                    for name in (
                        BROKER_PASSWORD,
                        ADMIN_PASSWORD,
                        *(password_variable(s) for s in kafka_services(settings)),
                    )
                },
                "volumes": ["./deploy/kafka/setup.sh:/etc/f2pipe/setup.sh:ro"],
                "depends_on": healthy(*node_names(settings)),
            },
            [
                "The operator's and the services' SCRAM users, their ACLs and the three topics",
                "with their partitions and retention (deploy/kafka/setup.sh).",
            ],
        ),
    }


def _pipeline(images: Images, settings: Settings, connectors: int) -> dict[str, Commented]:
    # Probes and Prometheus reach the ops endpoints from outside the container.
    ops = {"F2PIPE_OPS_HOST": "0.0.0.0"}  # noqa: S104
    mqtt = mqtt_env(settings)

    def kafka(service: str) -> dict[str, str]:
        return {
            "F2PIPE_KAFKA_BOOTSTRAP": internal_bootstrap(settings),
            "F2PIPE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "F2PIPE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "F2PIPE_KAFKA_SASL_USERNAME": service_principal(service).kafka_user or "",
            # A compose secret (a file), so the password is not in the container's environment.
            "F2PIPE_KAFKA_SASL_PASSWORD_FILE": f"/run/secrets/{kafka_secret(service)}",
        }

    certgen_url = f"https://certgen:{settings.certgen_port}"
    port = settings.certgen_port
    certgen_probe = (
        "import ssl, urllib.request as u; "
        f"u.urlopen('https://127.0.0.1:{port}/readyz', timeout=3, "
        f"context=ssl.create_default_context(cafile='{PKI}/ca.pem'))"
    )
    processor_redis = PASSWORD_VARIABLES[("redis", "processor")]
    return {
        "certgen": Commented(
            f2pipe_service(
                images,
                "certgen",
                ["certgen", "serve"],
                environment={
                    "F2PIPE_STATE_DIR": STATE,
                    "F2PIPE_METADATA_DSN": service_dsn("certgen"),
                    "F2PIPE_ADMIN_TOKEN_FILE": "/run/secrets/admin_token",
                    "F2PIPE_CERTGEN_HOST": "0.0.0.0",  # noqa: S104 (HTTPS only)
                    "F2PIPE_CERTGEN_TLS": "true",
                    "F2PIPE_CERTGEN_URL": certgen_url,
                    "F2PIPE_BROKER_NAMES": ",".join(broker_names(settings)),
                    **mqtt,
                    **brokers_env(settings),
                    # What certgen tells each device (the compose host names when empty).
                    **(
                        {"F2PIPE_MQTT_BROKER_URLS": "${F2PIPE_MQTT_BROKER_URLS:-}"}
                        if several(settings)
                        else {}
                    ),
                },
                secrets=["admin_token"],
                volumes=[f"certgen:{STATE}", f"shares:{SHARES}"],
                ports=[f"127.0.0.1:{port}:{port}"],
                healthcheck=probe(["CMD", "python", "-c", certgen_probe]),
                depends_on=done("certgen-init", "db-roles"),
                restart="unless-stopped",
            ),
            [
                "The certificate API over HTTPS (F2PIPE_CERTGEN_TLS): the only holder of the CA",
                "key and the admin token. It rewrites the CRL in every share at a revocation.",
            ],
        ),
        **{
            connector_service(n): connector_container(
                images, settings, n, kafka(connector_service(n))
            )
            for n in range(1, settings.mqtt_brokers + 1)
        },
        **acl_service(images, settings, connectors),
        "processor": Commented(
            f2pipe_service(
                images,
                "processor",
                ["processor"],
                secrets=[kafka_secret("processor")],
                environment={
                    "F2PIPE_METADATA_DSN": service_dsn("processor"),
                    "F2PIPE_REDIS_URL": f"redis://{principal('processor').redis_user}:"
                    f"{env(processor_redis)}@redis:6379/0",
                    **kafka("processor"),
                    **ops,
                },
                ports=[f"127.0.0.1:{settings.processor_port}:{settings.processor_port}"],
                healthcheck=readyz(settings.processor_port),
                depends_on={**healthy("redis"), **done("kafka-setup", "db-seed", "db-roles")},
                restart="unless-stopped",
            ),
        ),
        "sink": Commented(
            f2pipe_service(
                images,
                "sink",
                ["sink"],
                secrets=[kafka_secret("sink")],
                environment={
                    "F2PIPE_TIMESERIES_DSN": service_dsn("sink"),
                    **kafka("sink"),
                    **ops,
                },
                ports=[f"127.0.0.1:{settings.sink_port}:{settings.sink_port}"],
                healthcheck=readyz(settings.sink_port),
                depends_on=done("kafka-setup", "db-roles"),
                restart="unless-stopped",
            ),
        ),
        "simulator": Commented(
            f2pipe_service(
                images,
                "simulator",
                ["simulate"],
                environment={"F2PIPE_STATE_DIR": STATE, **mqtt, **brokers_env(settings)},
                volumes=[share("simulator", PKI)],
                depends_on={
                    **done("simulator-certs"),
                    **healthy("certgen", *connectors_of(settings), "processor", "sink"),
                },
                restart="unless-stopped",
            ),
            [
                "The demo fleet's four controllers, one reading per sensor every 30 s, over mTLS.",
                "A load source: no ops port, and nothing waits for it.",
            ],
        ),
    }


_HEADER = [
    "Written by `f2pipe deploy render --target compose .`; changes are overwritten.",
    "f2pipe with the official server images: the same servers, configuration and rights",
    "as the local stack (SPEC sections 8 and 10).",
    "",
    "  cp .env.example .env   # then set every secret in it",
    "  docker compose up -d --wait",
    "  docker compose --profile observability up -d --wait    # plus Prometheus and Grafana",
    "",
    "Needs Docker Engine 26+ and Compose 2.23+ (volume subpaths). Start order: the servers",
    "become healthy; one-shot services make the PKI and the shares, the schema, the roles,",
    "the demo fleet and the topics; then certgen, the broker, connector, processor, sink and",
    "the simulator. Ports are published on loopback, except the broker's device port.",
]


def render_compose(settings: Settings, images: Images, connectors: int = 1) -> str:
    """The compose file's text (deterministic: the same settings give the same bytes);
    ``connectors`` identities of each broker's connector group are admitted by the
    brokers' ACLs (several brokers: passed to broker-acls)."""
    services = {
        **servers(images, settings),
        **_oneshots(images, settings),
        **_pipeline(images, settings, connectors),
        **observability(images),
    }
    return document(
        _HEADER,
        {
            "name": Commented("f2pipe"),
            "services": Commented(services),
            "secrets": Commented(
                {
                    "admin_token": {"environment": "F2PIPE_ADMIN_TOKEN"},
                    **{
                        kafka_secret(s): {"environment": password_variable(s)}
                        for s in kafka_services(settings)
                    },
                },
                [
                    "Read from .env by name; each is mounted only into the service it belongs",
                    "to: the admin token into certgen, a Kafka password into its service.",
                ],
            ),
            "volumes": Commented(
                {
                    name: None
                    for name in (
                        "certgen",
                        "shares",
                        "claiming-codes",
                        "metadata",
                        "timeseries",
                        "cache",
                        *node_names(settings),
                        *(broker_service(n) for n in range(1, settings.mqtt_brokers + 1)),
                        *([ACL_SERVICE] if several(settings) else []),
                        "prometheus",
                        "grafana",
                    )
                },
                ["certgen: the CA and its key; shares: one folder per party, kept by certgen."],
            ),
        },
    )
