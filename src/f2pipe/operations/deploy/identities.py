"""Who each f2pipe container is: its principal, its database DSN and its Kafka secret.

The rights behind these names come from :mod:`f2pipe.operations.principals`;
with several MQTT brokers, ``connector-mqtt-<n>`` is broker n's connector and
``broker-acls`` logs in as the ``aclsync`` role (:mod:`.mqtt`).
"""

from __future__ import annotations

from f2pipe.operations.deploy.configs import DATABASES, PASSWORD_VARIABLES
from f2pipe.operations.deploy.containers import dsn
from f2pipe.operations.deploy.mqtt import connector_service
from f2pipe.operations.principals import ACL_SYNC, Principal, broker_connector, principal
from f2pipe.settings import Settings

__all__ = [
    "DATABASE_HOSTS",
    "KAFKA_SERVICES",
    "kafka_secret",
    "kafka_services",
    "service_dsn",
    "service_principal",
]

#: The services with a Kafka user of their own (with several brokers, each broker's connector).
KAFKA_SERVICES = ("connector", "processor", "sink")


def kafka_services(settings: Settings) -> list[str]:
    more = [connector_service(n) for n in range(2, settings.mqtt_brokers + 1)]
    return [KAFKA_SERVICES[0], *more, *KAFKA_SERVICES[1:]]


def kafka_secret(service: str) -> str:
    return f"{service.replace('-', '_')}_kafka_password"


def service_principal(service: str) -> Principal:
    """The principal of a compose service: ``connector-mqtt-<n>`` is broker n's connector."""
    if service.startswith("connector-mqtt-"):
        return broker_connector(int(service.rpartition("-")[2]))
    return ACL_SYNC if service == ACL_SYNC.service else principal(service)


#: The server holding each database, by its compose name.
DATABASE_HOSTS = {"metadata": "postgres", "timeseries": "timescaledb"}


def service_dsn(service: str) -> str:
    """``service``'s DSN as its own role (:mod:`f2pipe.operations.principals`) on its database."""
    role = service_principal(service).pg_role
    assert role is not None, service
    host = DATABASE_HOSTS[DATABASES[service]]
    return dsn(role, PASSWORD_VARIABLES[("postgres", service)], host)
