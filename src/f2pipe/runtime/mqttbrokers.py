"""The MQTT brokers the devices are spread over (SPEC section 10): names and addresses.

Mosquitto is single-threaded and not clustered, so a fleet larger than one
broker serves is split: ``F2PIPE_MQTT_BROKERS=N`` names brokers ``mqtt-1`` to
``mqtt-N``. Broker ``mqtt-n`` listens on ``F2PIPE_MQTT_HOST`` at
``F2PIPE_MQTT_PORT`` + :data:`PORT_STEP` ``* (n - 1)`` (with the default port:
8883, 8885, 8887...; the Kafka cluster's + 2 and + 4 are taken from Kafka's own
ports, and the stage replicas' + 100 steps from the ops ports, so neither
meets these). Where each broker runs on a host of its own (a container each in
the compose render), ``F2PIPE_MQTT_BROKER_HOSTS`` names the host the services
reach it on, still at its port. Where devices reach a broker from outside (certgen names it in
each certificate answer) is ``F2PIPE_MQTT_BROKER_URLS``, else the same host
and port. A controller belongs to the broker its metadata names
(``devices.broker``); a controller without one belongs to
:data:`DEFAULT_BROKER`.

Each broker has its own group of connectors: on ``mqtt-1`` the identities
``svc-connector``, ``svc-connector-2``...; on ``mqtt-n`` (n > 1)
``svc-connector-mqtt-n``, ``svc-connector-mqtt-n-2``... (:func:`connector_broker`
reads the broker back from an identity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from f2pipe._settings_values import broker_hosts, broker_urls
from f2pipe.errors import ConfigError
from f2pipe.settings import Settings

__all__ = [
    "DEFAULT_BROKER",
    "PORT_STEP",
    "Broker",
    "broker_named",
    "broker_names",
    "broker_port",
    "brokers",
    "connector_broker",
    "device_broker_file",
    "unknown_broker",
]

DEFAULT_BROKER = "mqtt-1"
#: Broker mqtt-n listens this many ports times (n - 1) above F2PIPE_MQTT_PORT.
PORT_STEP = 2

_NAME = re.compile(r"mqtt-([1-9][0-9]?)")
_CONNECTOR_OF = re.compile(r"svc-connector-(mqtt-[1-9][0-9]?)(?:-[0-9]+)?")


@dataclass(frozen=True)
class Broker:
    """One broker: ``mqtt-<number>`` at ``host:port``."""

    number: int
    host: str
    port: int
    tls: bool = True
    public_url: str | None = None  # F2PIPE_MQTT_BROKER_URLS: where devices reach it

    @property
    def name(self) -> str:
        return f"mqtt-{self.number}"

    @property
    def url(self) -> str:
        """Where a device connects: its ``F2PIPE_MQTT_BROKER_URLS`` entry, else
        ``mqtts://host:port`` (``mqtt://`` without TLS)."""
        if self.public_url is not None:
            return self.public_url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def settings(self, settings: Settings) -> Settings:
        """``settings`` with this broker as the MQTT broker (host and port)."""
        if (settings.mqtt_host, settings.mqtt_port) == (self.host, self.port):
            return settings
        return settings.model_copy(update={"mqtt_host": self.host, "mqtt_port": self.port})


def broker_port(settings: Settings, number: int) -> int:
    """Broker ``mqtt-<number>``'s port: ``F2PIPE_MQTT_PORT`` + :data:`PORT_STEP` ``* (n - 1)``."""
    return settings.mqtt_port + PORT_STEP * (number - 1)


def brokers(settings: Settings) -> list[Broker]:
    """Every broker ``settings`` name, ``mqtt-1`` first; ConfigError when
    ``F2PIPE_MQTT_BROKER_URLS`` or ``F2PIPE_MQTT_BROKER_HOSTS`` names a broker past
    ``F2PIPE_MQTT_BROKERS``."""
    urls = broker_urls(settings.mqtt_broker_urls)
    hosts = broker_hosts(settings.mqtt_broker_hosts)
    found = [
        Broker(
            n,
            hosts.pop(f"mqtt-{n}", settings.mqtt_host),
            broker_port(settings, n),
            settings.mqtt_tls,
            urls.pop(f"mqtt-{n}", None),
        )
        for n in range(1, settings.mqtt_brokers + 1)
    ]
    for variable, extra in (("URLS", urls), ("HOSTS", hosts)):
        if extra:
            raise ConfigError(
                f"F2PIPE_MQTT_BROKER_{variable} names {', '.join(extra)}, but"
                f" F2PIPE_MQTT_BROKERS={settings.mqtt_brokers}: raise the count or drop the entry"
            )
    return found


def broker_names(settings: Settings) -> list[str]:
    return [broker.name for broker in brokers(settings)]


def unknown_broker(settings: Settings, name: str) -> str | None:
    """Why ``name`` is no broker of ``settings`` (naming the known ones), or None."""
    known = broker_names(settings)
    if name in known:
        return None
    return (
        f"unknown broker {name!r}: F2PIPE_MQTT_BROKERS={settings.mqtt_brokers} runs"
        f" {', '.join(known)}"
    )


def broker_named(settings: Settings, name: str | None) -> Broker:
    """The broker called ``name`` (None: the default one); ConfigError naming the known ones."""
    match = _NAME.fullmatch(name or DEFAULT_BROKER)
    why = unknown_broker(settings, name or DEFAULT_BROKER)
    if match is None or why is not None:
        raise ConfigError(f"{why}; raise F2PIPE_MQTT_BROKERS or assign another broker")
    return brokers(settings)[int(match[1]) - 1]


def device_broker_file(settings: Settings, mac: str) -> Path:
    """Where a local device identity keeps its broker's URL, beside its certificate:
    ``<state>/pki/devices/f2-<mac>.broker`` (from certgen's answer, or the metadata)."""
    return settings.pki_dir / "devices" / f"f2-{mac}.broker"


def connector_broker(identity: str) -> str:
    """The broker whose connector group ``identity`` belongs to (``mqtt-1`` unless it says)."""
    match = _CONNECTOR_OF.fullmatch(identity)
    return DEFAULT_BROKER if match is None else match[1]
