"""The MQTT brokers of a deployment: their services, shares, ACL folders and addresses.

One broker (``mosquitto``) whose ACL is f2pipe's pattern file, or with
``F2PIPE_MQTT_BROKERS=N`` the local stack's brokers mqtt-1 to mqtt-N
(:mod:`f2pipe.runtime.mqttbrokers`): services ``mosquitto``, ``mosquitto-2``...,
each listening on the port the stack gives it (``F2PIPE_MQTT_PORT + 2 (n - 1)``)
with its own configuration (``deploy/mosquitto/mosquitto-<n>.conf``),
persistence volume and share (``broker-<n>``, holding the broker certificate,
which names every broker's host). Each broker reads only its own connector
group (``connector-mqtt-<n>``, identity ``svc-connector-mqtt-<n>``).

With several brokers each broker's ACL names its controllers one by one, so it
follows the fleet: the ``broker-acls`` service (``f2pipe fleet sync-acls``,
:mod:`f2pipe.operations.aclsync`) writes ``mqtt-<n>/acl`` into the
``broker-acls`` volume, and broker n mounts its folder read-only at
:data:`BROKER_ACL` and reloads the file when it changes.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from f2pipe.runtime.mqttbrokers import broker_port
from f2pipe.settings import Settings

__all__ = [
    "ACL_SERVICE",
    "ACL_SYNC_SECONDS",
    "BROKER_ACL",
    "broker_conf_file",
    "broker_hosts",
    "broker_port",
    "broker_service",
    "broker_share",
    "connector_service",
    "several",
]

#: The service (and its volume) writing the brokers' ACLs when there are several.
ACL_SERVICE = "broker-acls"
#: Seconds between two reads of the metadata by that service.
ACL_SYNC_SECONDS = 10
#: Where a broker of several mounts its ACL folder (read-only).
BROKER_ACL = PurePosixPath("/mosquitto/acl")


def several(settings: Settings) -> bool:
    """Whether ``settings`` run several brokers (ACLs that follow the fleet)."""
    return settings.mqtt_brokers > 1


def broker_service(number: int) -> str:
    """Broker mqtt-<number>'s compose service: ``mosquitto``, ``mosquitto-2``..."""
    return "mosquitto" if number == 1 else f"mosquitto-{number}"


def broker_conf_file(number: int) -> str:
    """Its configuration in ``deploy/mosquitto``: ``mosquitto.conf``, ``mosquitto-2.conf``..."""
    return f"{broker_service(number)}.conf"


def broker_share(number: int) -> str:
    """Its share of the PKI: ``broker``, ``broker-2``..."""
    return "broker" if number == 1 else f"broker-{number}"


def connector_service(number: int) -> str:
    """The connector of broker mqtt-<number>: ``connector``, ``connector-mqtt-2``..."""
    return "connector" if number == 1 else f"connector-mqtt-{number}"


def broker_hosts(settings: Settings) -> str:
    """``F2PIPE_MQTT_BROKER_HOSTS`` for the containers: every broker past the first by its
    service name (the first is ``F2PIPE_MQTT_HOST``)."""
    return ",".join(f"mqtt-{n}={broker_service(n)}" for n in range(2, settings.mqtt_brokers + 1))
