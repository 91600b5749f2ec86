"""The broker's own statistics, read from Mosquitto's ``$SYS`` tree (SPEC section 7).

The broker publishes its counters as retained messages under ``$SYS/broker/``
every ``sys_interval`` seconds; only the ``svc-monitor`` identity may read
them. :class:`BrokerMonitor` keeps one subscription open and serves the latest
values, also as Prometheus metrics (``f2pipe_broker_*``); :func:`read_once`
takes a single reading for a command such as ``f2pipe status``.

``dropped_messages`` counts what the broker threw away since it started:
messages it had acknowledged to a device but could not queue for a
subscriber, because the session's queue reached
``F2PIPE_BROKER_MAX_QUEUED_BYTES``. Each such message is lost to the pipeline,
so any value above zero is an alarm.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MONITOR_IDENTITY = "svc-monitor"

#: ``$SYS`` topic -> field of :class:`BrokerStats`.
SYS_TOPICS: dict[str, str] = {
    "$SYS/broker/publish/messages/dropped": "dropped_messages",
    "$SYS/broker/store/messages/count": "queued_messages",
    "$SYS/broker/store/messages/bytes": "queued_bytes",
    "$SYS/broker/clients/connected": "connected_clients",
}
# Subscribed last: the broker sends retained values in subscription order, so once this
# one arrived every counter that exists has too. Mosquitto publishes a counter only
# after it first changes, so one still missing then is zero.
_UPTIME = "$SYS/broker/uptime"


#: The ``f2pipe_broker_*`` families of one /metrics page, keyed by statistic.
Families = dict[str, GaugeMetricFamily | CounterMetricFamily]


@dataclass(frozen=True)
class BrokerStats:
    """The latest values the broker published; None for one not received yet."""

    dropped_messages: int | None = None
    queued_messages: int | None = None  # messages the broker holds (queued and in flight)
    queued_bytes: int | None = None  # their payload bytes
    connected_clients: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


class BrokerMonitor(Collector):
    """One ``svc-monitor`` connection, reconnecting on its own, holding the latest ``$SYS`` values.

    Register it in a Prometheus registry to export ``f2pipe_broker_up``,
    ``f2pipe_broker_dropped_messages_total``, ``f2pipe_broker_queued_messages``,
    ``f2pipe_broker_queued_bytes`` and ``f2pipe_broker_connected_clients``.
    """

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext | None, reconnect: bool = True
    ) -> None:
        self.host, self.port = host, port
        self._values: dict[str, int] = {}
        self._seen_uptime = False
        self._failed = False  # a connection attempt failed (and no retry follows)
        self._reconnect = reconnect
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.connected = False
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=MONITOR_IDENTITY,
            protocol=mqtt.MQTTv311,
            clean_session=True,
            reconnect_on_failure=reconnect,
        )
        if context is not None:
            self._client.tls_set_context(context)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message

    def start(self) -> None:
        """Connect in the background; values arrive once the broker accepted the subscription."""
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def stats(self) -> BrokerStats:
        with self._lock:
            return self._stats()

    def wait_complete(self, timeout: float) -> BrokerStats:
        """The stats once the broker sent them, or whatever arrived within ``timeout`` s."""
        with self._changed:
            self._changed.wait_for(lambda: self._seen_uptime or self._failed, timeout)
            return self._stats()

    def _stats(self) -> BrokerStats:
        if not self._seen_uptime:
            return BrokerStats(**self._values)
        return BrokerStats(**{name: self._values.get(name, 0) for name in SYS_TOPICS.values()})

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.warning(
                "the broker refused the monitor identity",
                extra={"reason": str(reason), "identity": MONITOR_IDENTITY},
            )
            self._on_connect_fail(client, userdata)
            return
        self.connected = True
        client.subscribe([(topic, 0) for topic in (*SYS_TOPICS, _UPTIME)])

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        with self._changed:
            self._failed = not self._reconnect
            self._changed.notify_all()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        self.connected = False
        with self._lock:  # a restarted broker starts its counters again
            self._values.clear()
            self._seen_uptime = False

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == _UPTIME:
            with self._changed:
                self._seen_uptime = True
                self._changed.notify_all()
            return
        name = SYS_TOPICS.get(message.topic)
        if name is None:
            return
        try:
            value = int(message.payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return
        with self._lock:  # no waiter to wake: wait_complete waits for the uptime
            self._values[name] = value

    def collect(self) -> Iterator[Metric]:
        # Every family always, so /metrics names them all; a value only once the broker sent it.
        families = _families(labelled=False)
        self.add_samples(families, [])
        yield from families.values()

    def add_samples(self, families: Families, labels: list[str]) -> None:
        """Add this broker's values, with ``labels``, to :func:`_families`' families."""
        stats = self.stats()
        families["up"].add_metric(labels, 1.0 if self.connected else 0.0)
        for name in SYS_TOPICS.values():
            value = getattr(stats, name)
            if value is not None:
                families[name].add_metric(labels, float(value))


class BrokerMonitors(Collector):
    """One :class:`BrokerMonitor` per broker (``F2PIPE_MQTT_BROKERS``), exported as the same
    ``f2pipe_broker_*`` families with a ``broker`` label naming each (mqtt-1, ...)."""

    def __init__(self, monitors: dict[str, BrokerMonitor]) -> None:
        self.monitors = monitors

    def start(self) -> None:
        for monitor in self.monitors.values():
            monitor.start()

    def stop(self) -> None:
        for monitor in self.monitors.values():
            monitor.stop()

    def collect(self) -> Iterator[Metric]:
        families = _families(labelled=True)
        for name, monitor in self.monitors.items():
            monitor.add_samples(families, [name])
        yield from families.values()


def _families(labelled: bool) -> Families:
    """The empty ``f2pipe_broker_*`` families, keyed by statistic (``up`` and SYS_TOPICS)."""
    labels = ["broker"] if labelled else []
    gauges = {
        "queued_messages": "Messages the broker holds for its subscribers",
        "queued_bytes": "Payload bytes of the messages the broker holds",
        "connected_clients": "Clients connected to the broker",
    }
    return {
        "up": GaugeMetricFamily(
            "f2pipe_broker_up",
            "1 while the monitor identity is connected to the broker",
            labels=labels,
        ),
        "dropped_messages": CounterMetricFamily(
            "f2pipe_broker_dropped_messages",
            "Messages the broker acknowledged but dropped since it started (queue bound)",
            labels=labels,
        ),
        **{
            name: GaugeMetricFamily(f"f2pipe_broker_{name}", text, labels=labels)
            for name, text in gauges.items()
        },
    }


def read_once(
    host: str, port: int, context: ssl.SSLContext | None, timeout: float = 8.0
) -> BrokerStats:
    """One reading of the broker's statistics; fields not received in ``timeout`` s are None."""
    monitor = BrokerMonitor(host, port, context, reconnect=False)
    monitor.start()
    try:
        return monitor.wait_complete(timeout)
    finally:
        monitor.stop()
