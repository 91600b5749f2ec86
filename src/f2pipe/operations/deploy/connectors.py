"""The f2pipe containers that follow the MQTT brokers: each broker's connector, broker-acls.

One connector per broker (:mod:`.mqtt`): ``connector`` reads mqtt-1,
``connector-mqtt-<n>`` reads broker n with its own MQTT identity, share, Kafka
user and ops port, as the local stack runs each broker's connector group. With
several brokers, ``broker-acls`` (``f2pipe fleet sync-acls``) writes their ACLs
from the metadata, and the services that talk to brokers other than through a
connector (certgen, the simulator) are told where every broker is.
"""

from __future__ import annotations

from pathlib import Path

from f2pipe.operations.aclsync import acl_files
from f2pipe.operations.deploy.containers import (
    PKI,
    STATE,
    done,
    f2pipe_service,
    healthy,
    probe,
    readyz,
    share,
)
from f2pipe.operations.deploy.identities import kafka_secret, service_dsn, service_principal
from f2pipe.operations.deploy.images import Images
from f2pipe.operations.deploy.mqtt import (
    ACL_SERVICE,
    ACL_SYNC_SECONDS,
    broker_hosts,
    broker_port,
    broker_service,
    connector_service,
    several,
)
from f2pipe.operations.deploy.yamltext import Commented
from f2pipe.operations.principals import ACL_SYNC
from f2pipe.operations.services import connector_ops_port
from f2pipe.runtime.mqttbrokers import broker_names
from f2pipe.settings import Settings

__all__ = ["acl_service", "brokers_env", "connector_container", "connectors_of", "mqtt_env"]


def mqtt_env(settings: Settings) -> dict[str, str]:
    """Broker mqtt-1 as the containers reach it."""
    return {"F2PIPE_MQTT_HOST": "mosquitto", "F2PIPE_MQTT_PORT": str(settings.mqtt_port)}


def brokers_env(settings: Settings) -> dict[str, str]:
    """What a service needs to know of several brokers: their count and hosts (none for one)."""
    if not several(settings):
        return {}
    return {
        "F2PIPE_MQTT_BROKERS": str(settings.mqtt_brokers),
        "F2PIPE_MQTT_BROKER_HOSTS": broker_hosts(settings),
    }


def connectors_of(settings: Settings) -> list[str]:
    """The connector services: ``connector``, then ``connector-mqtt-2``... (several brokers)."""
    return [connector_service(n) for n in range(1, settings.mqtt_brokers + 1)]


def connector_container(
    images: Images, settings: Settings, number: int, kafka: dict[str, str]
) -> Commented:
    """The connector of broker mqtt-<number>, as the local stack runs its group's first."""
    service, port = connector_service(number), connector_ops_port(settings, number)
    ops = {"F2PIPE_OPS_HOST": "0.0.0.0"}  # noqa: S104 (probes and Prometheus)
    mqtt = {
        "F2PIPE_MQTT_HOST": broker_service(number),
        "F2PIPE_MQTT_PORT": str(broker_port(settings, number)),
    }
    own: dict[str, str] = {}
    comment: list[str] = []
    if number > 1:
        identity = service_principal(service).mqtt_identity or ""
        own = {
            "F2PIPE_CONNECTOR_IDENTITY": identity,
            "F2PIPE_CONNECTOR_CLIENT_ID": identity,
            "F2PIPE_CONNECTOR_PORT": str(port),
        }
        comment = [
            f"Broker mqtt-{number}'s connector: its own identity, share, Kafka user and port."
        ]
    return Commented(
        f2pipe_service(
            images,
            "connector",
            ["connector"],
            secrets=[kafka_secret(service)],
            environment={"F2PIPE_STATE_DIR": STATE, **kafka, **mqtt, **own, **ops},
            volumes=[share(f"svc-{service}", PKI)],
            ports=[f"127.0.0.1:{port}:{port}"],
            healthcheck=readyz(port),
            depends_on={**healthy(broker_service(number)), **done("kafka-setup")},
            restart="unless-stopped",
        ),
        comment,
    )


def acl_service(images: Images, settings: Settings, connectors: int) -> dict[str, Commented]:
    """With several brokers, the service writing their ACLs from the metadata."""
    if not several(settings):
        return {}
    # Healthy once every broker has an ACL file (at first one that admits no device).
    files = ", ".join(
        f"'{path}'" for path in acl_files(Path(STATE), broker_names(settings)).values()
    )
    check = f"import os, sys; sys.exit(not all(map(os.path.isfile, [{files}])))"
    command = ["fleet", "sync-acls", "--out", STATE, "--every", str(ACL_SYNC_SECONDS)]
    return {
        ACL_SERVICE: Commented(
            f2pipe_service(
                images,
                ACL_SERVICE,
                [*command, "--connectors", str(connectors)],
                environment={
                    "F2PIPE_METADATA_DSN": service_dsn(ACL_SYNC.service),
                    "F2PIPE_MQTT_BROKERS": str(settings.mqtt_brokers),
                },
                volumes=[f"{ACL_SERVICE}:{STATE}"],
                healthcheck=probe(["CMD", "python", "-c", check]),
                depends_on=done("db-roles"),
                restart="unless-stopped",
            ),
            [
                "Each broker's ACL from the metadata (fleet sync-acls): mqtt-<n>/acl in its",
                "volume names the controllers assigned to broker n; rewritten (atomically) only",
                f"when that changes, read every {ACL_SYNC_SECONDS} s as a role that may read only",
                "devices.mac_address and devices.broker. Until the first read, every broker's",
                "ACL admits no device.",
            ],
        )
    }
