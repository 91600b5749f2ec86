"""The f2pipe services ``f2pipe up`` runs in the background, and how each is probed.

Certgen, the connector, the processor, the sink and the simulator each run as
``python -m f2pipe.cli <arguments>``. They are
:class:`~f2pipe.operations.stack.Server` subclasses, so they share the stack's
pid files (``<state>/run/<service>.pid`` with the kernel start time), port
checks and health waits; logs go to ``<state>/log/<service>.log``. Every
service is started with the caller's settings written out as ``F2PIPE_*``
variables (:func:`settings_env`), so a service runs the pipeline those settings
describe whatever the caller's environment says. The admin token and the CA
passphrase (:data:`CERTGEN_SECRETS`) reach certgen only.

A service is healthy when its ``/healthz`` answers 200 and ready when its
``/readyz`` does; the simulator has no ops port, so it is healthy while it runs.

Replicas: ``F2PIPE_CONNECTOR_REPLICAS``, ``F2PIPE_PROCESSOR_REPLICAS`` and
``F2PIPE_SINK_REPLICAS`` run that many processes of a stage. Replica ``n`` > 1
is ``<service>-<n>``: its own pid file and log under that name, its ops port
:data:`REPLICA_PORT_STEP` ``* (n - 1)`` above the stage's, the stage's
credentials and consumer group. Connectors are MQTT sessions: replica ``n`` is
the identity ``svc-connector-<n>`` (certificate issued by
:func:`ensure_connector_identities`), and when several run they all subscribe
through one ``$share`` group (``F2PIPE_CONNECTOR_SHARE_GROUP``, else
:data:`SHARE_GROUP`). The broker queues a share of the messages for a
connector's session while it is away, so a killed connector replica is replaced
under its own number, never by a new one, and ``up`` refuses to run fewer
connectors than have identities (:func:`check_connector_count`). A replica
beyond the configured count that is still running is listed too when asked
(:func:`services`), so that ``down`` stops it and ``status`` shows it.

Brokers: with ``F2PIPE_MQTT_BROKERS=N`` each broker ``mqtt-b`` has a connector
group of its own, ``F2PIPE_CONNECTOR_REPLICAS`` connectors reading only that
broker. mqtt-1's are the connectors above; mqtt-b's (b > 1) are labelled
``connector-mqtt-<b>``, ``connector-mqtt-<b>-2``... (identities
``svc-connector-mqtt-<b>``...), serve their ops ports
:data:`BROKER_PORT_STEP` ``* (b - 1)`` above the replica's and share a
``$share`` group on their broker when several. The processors and sinks do
not change: every group writes the one raw topic.
"""

from __future__ import annotations

import re
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from pydantic import SecretStr

from f2pipe.errors import StackError
from f2pipe.operations.stack import LOOPBACK, Paths, Program, Server, port_accepts, security
from f2pipe.operations.stack.supervise import PidFile
from f2pipe.runtime.mqttbrokers import broker_port
from f2pipe.settings import Settings

#: Settings only certgen may hold: with them, anyone issues any identity.
CERTGEN_SECRETS = frozenset(
    {"admin_token", "admin_token_file", "ca_passphrase", "ca_passphrase_file"}
)

#: Variables of the operator's credentials a service must not inherit: it gets its own
#: as settings (the Kafka ones are withheld only once Kafka is secured).
CREDENTIAL_FILES = frozenset(
    f"F2PIPE_{name}_FILE" for name in ("METADATA_DSN", "TIMESERIES_DSN", "REDIS_URL")
)


#: Replica n > 1 of a stage serves its ops port (n - 1) times this above the stage's:
#: with the default ports, 9201, 9202 and 9203 for the second replicas, and so on.
REPLICA_PORT_STEP = 100
#: The $share group several connectors split the messages on when none is set.
SHARE_GROUP = "f2pipe-connectors"
#: The connectors of broker mqtt-b (b > 1) serve their ops ports (b - 1) times this above
#: mqtt-1's: with the default port, 9111 for mqtt-2's first connector.
BROKER_PORT_STEP = 10


def connector_ops_port(settings: Settings, broker: int) -> int:
    """The ops port of the first connector of broker ``mqtt-<broker>``."""
    return settings.connector_port + BROKER_PORT_STEP * (broker - 1)


def settings_env(settings: Settings, without: frozenset[str] = frozenset()) -> dict[str, str]:
    """``settings`` as the ``F2PIPE_*`` variables that reproduce it in a child process,
    leaving out the fields named in ``without``."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        if name in without:
            continue
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"F2PIPE_{name.upper()}"] = str(value)
    return env


def http_ok(url: str, timeout: float = 1.0, cafile: Path | None = None) -> tuple[bool, str]:
    """(True, "") when ``url`` answers 200, else (False, why); HTTPS trusts ``cafile``."""
    context = None if cafile is None else ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except OSError as exc:
        return False, str(getattr(exc, "reason", exc))


def _probe_host(host: str) -> str:
    # A service bound to every address is reached over loopback.
    return LOOPBACK if host in ("0.0.0.0", "", "::") else host  # noqa: S104 - compared, not bound


class Service(Server):
    """One f2pipe process (``python -m f2pipe.cli <arguments>``) run in the background."""

    arguments: ClassVar[tuple[str, ...]]
    port_field: ClassVar[str] = ""  # the settings field holding its ops port ("": none)
    replicas_field: ClassVar[str] = ""  # the settings field holding its replica count ("": 1)
    #: Settings it is not given, nor inherits: only certgen holds the admin token and CA key.
    not_given: ClassVar[frozenset[str]] = CERTGEN_SECRETS
    start_timeout = 60.0
    stop_timeout = 40.0  # connector and sink flush and commit before they exit

    def __init__(self, settings: Settings, paths: Paths, replica: int = 1, broker: int = 1) -> None:
        self.replica = replica
        self.broker = broker  # connectors: the number of the broker it reads (mqtt-<broker>)
        self.stage_port = int(getattr(settings, self.port_field)) if self.port_field else 0
        super().__init__(self.replica_settings(settings), paths)
        if self.label != self.name:
            self.pidfile = PidFile(paths.run / f"{self.label}.pid")
            self.log_file = paths.log / f"{self.label}.log"

    @property
    def label(self) -> str:
        """What it is shown and filed under: ``processor``, then ``processor-2``..."""
        return self.name if self.replica == 1 else f"{self.name}-{self.replica}"

    @classmethod
    def replicas(cls, settings: Settings) -> int:
        """How many of it ``settings`` run."""
        return int(getattr(settings, cls.replicas_field)) if cls.replicas_field else 1

    def replica_settings(self, settings: Settings) -> Settings:
        """The settings this replica runs with: replica n > 1 has its own ops port."""
        if self.replica == 1 or not self.port_field:
            return settings
        port = int(getattr(settings, self.port_field)) + REPLICA_PORT_STEP * (self.replica - 1)
        return settings.model_copy(update={self.port_field: port})

    def port(self) -> int | None:
        return int(getattr(self.settings, self.port_field)) if self.port_field else None

    def host(self) -> str:
        return _probe_host(self.settings.ops_host)

    def ports(self) -> dict[int, str]:
        port = self.port()
        variable = f"F2PIPE_{self.port_field.upper()}"
        if port is not None and port != self.stage_port:
            variable += f" ({self.label}: + {port - self.stage_port})"
        return {} if port is None else {port: variable}

    def programs(self) -> list[Program]:
        return []

    def command(self) -> list[str]:
        return [sys.executable, "-m", "f2pipe.cli", *self.argv()]

    def argv(self) -> list[str]:
        return list(self.arguments)

    def environment(self) -> dict[str, str]:
        without = self.not_given | security.withheld_fields(self.paths)
        env = settings_env(self.settings, without=without)
        env.update(security.service_env(self.settings, self.paths, self.name))
        return env

    def withheld(self) -> frozenset[str]:
        # Nor inherited from the caller: each service's credentials are its own, never the
        # operator's files.
        return frozenset(f"F2PIPE_{name.upper()}" for name in self.not_given) | CREDENTIAL_FILES

    def workdir(self) -> Path:
        return self.paths.state

    def describe(self) -> str:
        port = self.port()
        return "" if port is None else f"http://{self.host()}:{port}"

    def url(self, path: str) -> str:
        return f"http://{self.host()}:{self.port()}{path}"

    def cafile(self) -> Path | None:
        """The CA its HTTPS endpoints are checked against (None: plain HTTP)."""
        return None

    def get(self, path: str) -> tuple[bool, str]:
        """:func:`http_ok` for the endpoint ``path``, over HTTPS against :meth:`cafile`."""
        cafile = self.cafile()
        # A TLS handshake may take longer than the plain probe's second.
        return http_ok(self.url(path), timeout=1.0 if cafile is None else 2.0, cafile=cafile)

    def healthy(self) -> bool:
        if self.port() is None:
            alive = self.pid() is not None
            self.last_error = "" if alive else "not running"
            return alive
        ok, why = self.get("/healthz")
        self.last_error = "" if ok else f"/healthz: {why}"
        return ok

    def ready(self) -> bool:
        """``/readyz`` answers 200 (its dependencies are reachable)."""
        if self.port() is None:
            return self.healthy()
        return self.get("/readyz")[0]


class Certgen(Service):
    name = "certgen"
    arguments = ("certgen", "serve")
    port_field = "certgen_port"
    not_given = frozenset()

    def host(self) -> str:
        return _probe_host(self.settings.certgen_host)

    def tls(self) -> bool:
        """HTTPS: when asked (``F2PIPE_CERTGEN_TLS``) or on a secured stack."""
        return self.settings.certgen_tls or security.stack_secured(self.paths)

    def url(self, path: str) -> str:
        scheme = "https" if self.tls() else "http"
        return f"{scheme}://{self.host()}:{self.port()}{path}"

    def cafile(self) -> Path | None:
        """f2pipe's CA when certgen serves HTTPS and this machine holds it."""
        if not self.tls():
            return None
        ca = security.ca_file(self.settings)
        return ca if ca.is_file() else None

    def healthy(self) -> bool:
        if self.tls() and self.cafile() is None:
            # A CA of its own elsewhere: a TCP accept is what we can check.
            alive = port_accepts(int(self.port() or 0))
            self.last_error = "" if alive else "port does not accept connections"
            return alive
        return super().healthy()


class Connector(Service):
    """A connector of broker ``mqtt-<broker>``'s group (see the module docstring)."""

    name = "connector"
    arguments = ("connector",)
    port_field = "connector_port"
    replicas_field = "connector_replicas"

    @property
    def label(self) -> str:
        """``connector``, ``connector-2``... on mqtt-1; ``connector-mqtt-2``,
        ``connector-mqtt-2-2``... on the others."""
        group = self.name if self.broker == 1 else f"{self.name}-mqtt-{self.broker}"
        return group if self.replica == 1 else f"{group}-{self.replica}"

    def replica_settings(self, settings: Settings) -> Settings:
        """Replica n > 1 is the MQTT identity and client id ``<the first's>-<n>``; several
        connectors subscribe through one ``$share`` group. The group of broker
        ``mqtt-<b>`` (b > 1) reads that broker as ``<the first's>-mqtt-<b>[-<n>]`` and
        serves its ops port :data:`BROKER_PORT_STEP` ``* (b - 1)`` above its replica's."""
        update: dict[str, object] = {}
        if settings.connector_replicas > 1 and not settings.connector_share_group:
            update["connector_share_group"] = SHARE_GROUP
        suffix = self.label.removeprefix(self.name)
        if suffix:
            update["connector_identity"] = f"{settings.connector_identity}{suffix}"
            update["connector_client_id"] = f"{settings.connector_client_id}{suffix}"
        if self.broker > 1:  # also a stray past F2PIPE_MQTT_BROKERS, to be stopped or shown
            update["mqtt_port"] = broker_port(settings, self.broker)
            update["connector_port"] = connector_ops_port(settings, self.broker)
        return super().replica_settings(settings.model_copy(update=update))

    def describe(self) -> str:
        return super().describe() + (f" reads mqtt-{self.broker}" if self.broker > 1 else "")


class Processor(Service):
    name = "processor"
    arguments = ("processor",)
    port_field = "processor_port"
    replicas_field = "processor_replicas"


class Sink(Service):
    name = "sink"
    arguments = ("sink",)
    port_field = "sink_port"
    replicas_field = "sink_replicas"


class Simulator(Service):
    """The demo fleet publishing live telemetry over mTLS (no ops port: alive = running)."""

    name = "simulator"
    arguments = ("simulate",)
    stop_timeout = 10.0

    def argv(self) -> list[str]:
        return ["simulate", "--interval", str(self.settings.simulator_interval_s)]


SERVICES: tuple[type[Service], ...] = (Certgen, Connector, Processor, Sink, Simulator)
NAMES = tuple(cls.name for cls in SERVICES)


def services(
    settings: Settings, names: Sequence[str] = (), past_count: bool = False
) -> list[Service]:
    """The services named (default all), each replica its own; raises StackError when
    a replica would share an ops port with another service or its port is past 65535.

    ``past_count``: also a replica beyond the configured count while it runs (the
    count was lowered since it started), so that ``down`` stops it and ``status``
    shows it.
    """
    paths = Paths(settings.state_dir)
    kinds = [cls for cls in SERVICES if cls.name in (set(names) or set(NAMES))]
    found = [
        cls(settings, paths, n, broker)
        for cls in kinds
        for broker in range(1, (settings.mqtt_brokers if cls is Connector else 1) + 1)
        for n in range(1, cls.replicas(settings) + 1)
    ]
    _check_ports(found)
    labels = {service.label for service in found}
    for cls in kinds if past_count else []:
        for pidfile in sorted(paths.run.glob(f"{cls.name}-*.pid")):
            place = _STRAY.fullmatch(pidfile.stem.removeprefix(cls.name))
            if pidfile.stem in labels or place is None:
                continue
            broker = int(place["broker"] or 1)
            if cls is not Connector and broker > 1:
                continue
            stray = cls(settings, paths, int(place["replica"] or 1), broker)
            if stray.pid() is not None:
                found.append(stray)
    return found


# What follows a stage's name in a replica's label: -<n>, -mqtt-<b> or -mqtt-<b>-<n>.
_STRAY = re.compile(r"(?:-mqtt-(?P<broker>[0-9]+))?(?:-(?P<replica>[0-9]+))?")


def _check_ports(found: Sequence[Service]) -> None:
    owners: dict[int, Service] = {}
    for service in found:
        port = service.port()
        if port is None:
            continue
        if port > 65535:
            raise StackError(
                f"{service.label}'s ops port would be {port}, past 65535: lower"
                f" F2PIPE_{service.replicas_field.upper()} or F2PIPE_{service.port_field.upper()}"
            )
        other = owners.setdefault(port, service)
        if other is not service and (other.label != other.name or service.label != service.name):
            raise StackError(
                f"{other.label} and {service.label} would both serve port {port} (replica n"
                f" listens {REPLICA_PORT_STEP} x (n - 1) above its stage's port, the"
                f" connectors of broker mqtt-b {BROKER_PORT_STEP} x (b - 1) above): set"
                f" F2PIPE_{other.port_field.upper()} and F2PIPE_{service.port_field.upper()}"
                " further apart, or lower the replica or broker count"
            )


def check_connector_count(settings: Settings) -> None:
    """Raise StackError when a connector replica past ``F2PIPE_CONNECTOR_REPLICAS`` has a
    certificate: its MQTT session may be in the connectors' ``$share`` group, where the
    broker goes on queuing a share of the messages for it, and without that connector
    they would wait there until the session expires, then be dropped."""
    from f2pipe.pki.state import connector_identities

    # svc-connector-2 (mqtt-1's second), svc-connector-mqtt-2-3 (mqtt-2's third)...
    replica = re.compile(rf"{re.escape(settings.connector_identity)}(?:-mqtt-[0-9]+)?-([0-9]+)")
    numbers = {
        name: int(found[1])
        for name in connector_identities(settings)
        if (found := replica.fullmatch(name))
    }
    past = [name for name, number in numbers.items() if number > settings.connector_replicas]
    if past:
        count = max(numbers[name] for name in past)
        raise StackError(
            f"F2PIPE_CONNECTOR_REPLICAS={settings.connector_replicas} leaves out"
            f" {', '.join(past)}, whose MQTT session may hold messages of the shared"
            f" subscription: set F2PIPE_CONNECTOR_REPLICAS={count}"
        )


def ensure_connector_identities(settings: Settings) -> list[str]:
    """Issue the MQTT certificate of every connector replica that has none; return the
    identities issued (the broker's ACL gives them the connector's rights once it has
    re-read it). Nothing to do over plain MQTT or with one connector. Raises CertError."""
    if not settings.mqtt_tls or settings.connector_replicas * settings.mqtt_brokers < 2:
        return []
    from f2pipe.pki.ca import pki_paths
    from f2pipe.pki.state import ensure_pki

    names = [
        connector.settings.connector_identity
        for connector in services(settings, ["connector"])
        if connector.label != connector.name
    ]
    with security.PKI_LOCK:
        created = set(ensure_pki(settings, names).created)
    return [name for name in names if str(pki_paths(settings).service_cert(name)) in created]
