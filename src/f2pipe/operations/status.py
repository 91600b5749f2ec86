"""``f2pipe status`` and the live view of ``f2pipe run``: the pipeline at a glance.

What is shown (SPEC section 8): each server and service up or down (servers
by their stack probe, services by ``/healthz`` and ``/readyz``), throughput
(rates from two ``/metrics`` scrapes ``interval`` seconds apart), consumer lag
per stage (committed offsets of ``settings.processor_group`` and
``settings.sink_group`` against the high watermarks, read with the Kafka
AdminClient), and dead letters by stage and reason (from the services'
counters). The live view adds the latest decoded readings with device names,
labels and units (``latest_readings_named``).

The processor's dead-letter alarm (too large a share of its input
dead-lettered) is shown as an alarm, not as a failure: what devices send must
not read as an outage. So is a CRL or CA less than a week from expiry. The
broker's own statistics (queued messages, and messages it acknowledged to
devices but dropped at its queue bound) come from certgen's ``f2pipe_broker_*``
metrics, which its ``svc-monitor`` connection keeps current, or from one
``$SYS`` read when certgen cannot say. With several MQTT brokers
(``F2PIPE_MQTT_BROKERS``) every broker is listed (``brokers``): reachable or
not, connected clients, queued and dropped messages (certgen's monitor labels
each broker), and the connectors of its group.
``f2pipe status`` exits 1 when a server or service is down, when a stage's
lag keeps growing (see :func:`growing`) or when the broker dropped messages,
else 0. ``--json`` prints the same report as one JSON object.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from f2pipe.errors import ConfigError
from f2pipe.operations import services as svc
from f2pipe.operations import stack
from f2pipe.operations.stack import security
from f2pipe.pki.expiry import expiry_warnings
from f2pipe.runtime import brokerstats, mqttbrokers, tls
from f2pipe.settings import Settings

# Counters turned into rates: label in the report -> (service, metric family).
THROUGHPUT = {
    "mqtt_received": ("connector", "f2pipe_connector_received"),
    "kafka_acked": ("connector", "f2pipe_connector_acked"),
    "frames_consumed": ("processor", "f2pipe_processor_consumed"),
    "readings_produced": ("processor", "f2pipe_processor_produced"),
    "sink_consumed": ("sink", "f2pipe_sink_records_consumed"),
    "readings_landed": ("sink", "f2pipe_sink_rows_written"),
}
# The counter that shows a stage is consuming at all (for the lag verdict).
STAGE_INPUT = {"processor": "frames_consumed", "sink": "sink_consumed"}
# Lag that rises at every sample is "growing" once it is this large, or at any size
# while the stage consumes nothing: at a few records a second it rises by chance.
LAG_FLOOR = 1000
# Services counting dead letters, all in the shared family (f2pipe.runtime.metrics.DEAD_LETTERS):
# f2pipe_dead_letters_total{stage, reason}.
DEAD_LETTERS = ("connector", "processor", "sink")
DEAD_LETTER_FAMILY = "f2pipe_dead_letters"
LAG_SAMPLES = 3
# A stage whose oldest unconsumed record is this old is an alarm (retention: 7 days).
LAG_AGE_ALARM_S = 3600
# Gauges of a stage with several replicas that read as the worst replica's, not the sum.
WORST_OF = frozenset(
    {
        "f2pipe_consumer_lag_seconds",
        "f2pipe_processor_dead_letter_ratio",
        "f2pipe_processor_dead_letter_alarm",
    }
)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 2.0, cafile: Path | None = None) -> Samples | None:
    """Every sample of a Prometheus text endpoint, keyed by (name, sorted labels); None if down.

    An HTTPS endpoint is trusted when its certificate chains to ``cafile``."""
    context = None if cafile is None else ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
            text = response.read().decode()
    except OSError:
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def total(samples: Samples | None, family: str, **labels: str) -> float:
    """Sum of a counter family's samples (``_total`` or bare) matching ``labels``."""
    if not samples:
        return 0.0
    names = {family, f"{family}_total"}
    return sum(
        value
        for (name, found), value in samples.items()
        if name in names and all((k, v) in found for k, v in labels.items())
    )


def by_label(samples: Samples | None, family: str, label: str) -> dict[str, float]:
    """A counter family summed per value of ``label``."""
    out: dict[str, float] = {}
    if not samples:
        return out
    names = {family, f"{family}_total"}
    for (name, found), value in samples.items():
        if name in names:
            key = dict(found).get(label, "")
            out[key] = out.get(key, 0.0) + value
    return out


def consumer_lag(admin: Any, group: str, topic: str, timeout: float = 5.0) -> int | None:
    """Records of ``topic`` not yet committed by ``group``; None when Kafka cannot say."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

    try:
        metadata = admin.list_topics(topic, timeout=timeout)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            return None
        parts = [TopicPartition(topic, p) for p in info.partitions]
        committed_future = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, parts)], request_timeout=timeout
        )[group]
        committed = {
            tp.partition: tp.offset
            for tp in committed_future.result(timeout=timeout).topic_partitions
        }
        ends: dict[str, dict[int, int]] = {}
        for kind, spec in (
            ("high", OffsetSpec.latest()),  # type: ignore[no-untyped-call]
            ("low", OffsetSpec.earliest()),  # type: ignore[no-untyped-call]
        ):
            futures = admin.list_offsets({tp: spec for tp in parts}, request_timeout=timeout)
            ends[kind] = {
                tp.partition: f.result(timeout=timeout).offset for tp, f in futures.items()
            }
    except Exception:  # Kafka down or restarting: "unknown", never a crash of the report
        return None
    lag = 0
    for partition, high in ends["high"].items():
        done = committed.get(partition, -1)
        start = done if done >= 0 else ends["low"].get(partition, 0)
        lag += max(0, high - start)
    return lag


@dataclass
class Health:
    name: str
    kind: str  # "server" or "service"
    up: bool
    ready: bool | None = None
    pid: int | None = None
    rss_mb: float | None = None
    detail: str = ""


@dataclass
class Snapshot:
    """One look at the pipeline: health, the raw counters and the lag per stage."""

    taken: float
    health: list[Health]
    counters: dict[str, float]
    dead_letters: dict[str, float]  # "<stage>/<reason>" -> count since the service started
    lag: dict[str, int | None]
    alarms: list[str] = field(default_factory=list)
    broker: dict[str, int | None] = field(default_factory=dict)
    lag_seconds: dict[str, float | None] = field(default_factory=dict)
    offset_resets: dict[str, int] = field(default_factory=dict)
    brokers: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Report:
    """Two snapshots folded into rates and a lag trend; what ``status`` prints."""

    health: list[Health]
    rates: dict[str, float]
    lag: dict[str, int | None]
    lag_growing: dict[str, bool]
    dead_letters: dict[str, float]
    interval_s: float
    problems: list[str] = field(default_factory=list)
    # Shown, but no reason for a non-zero exit: bad input must not read as an outage.
    alarms: list[str] = field(default_factory=list)
    # brokerstats.BrokerStats as a dict: dropped_messages, queued_messages, ...
    broker: dict[str, int | None] = field(default_factory=dict)
    # Per stage: the age of its oldest unconsumed record, and offsets reset past retention.
    lag_seconds: dict[str, float | None] = field(default_factory=dict)
    offset_resets: dict[str, int] = field(default_factory=dict)
    # Per broker name: url, up, the $SYS statistics (as ``broker``) and its connectors.
    brokers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


class Observer:
    """Takes snapshots of one pipeline (one Kafka admin client, reused)."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka.admin import AdminClient

        from f2pipe.runtime.kafka import admin_config

        # The operator's credentials when this state folder runs the servers secured.
        settings = security.admin_settings(settings)
        self.settings = settings
        self.servers = stack.servers(settings)  # every node of a Kafka cluster
        self.services = svc.services(settings, past_count=True)
        # log_level 2: a stopped broker would otherwise print every refused connection.
        self.admin = AdminClient(admin_config(settings, log_level=2))

    def health(self) -> list[Health]:
        out = []
        for server in self.servers:
            pid = server.pid()
            up = server.healthy()
            if pid is None and not up and server.foreign_port() is not None:
                # Another state folder's server (its credentials are not ours to read):
                # its port answering is all this folder can know of it.
                up = True
            if pid is None and up:
                detail = "up (not started by this state folder)"
            else:
                detail = "" if up else server.last_error
            out.append(Health(server.name, "server", up, None, pid, _rss_mb(pid), detail))
        for service in self.services:
            pid = service.pid()
            up = service.healthy()
            ready = service.ready() if up else False
            detail = "" if up else service.last_error
            if up and not ready:
                detail = "/readyz: not ready"
            out.append(Health(service.label, "service", up, ready, pid, _rss_mb(pid), detail))
        return out

    def lag(self) -> dict[str, int | None]:
        s = self.settings
        return {
            "processor": consumer_lag(self.admin, s.processor_group, s.topic_raw),
            "sink": consumer_lag(self.admin, s.sink_group, s.topic_processed),
        }

    def broker(
        self, certgen: Samples | None, broker: mqttbrokers.Broker | None = None
    ) -> dict[str, int | None]:
        """A broker's statistics (default mqtt-1): from certgen's monitor, else from one
        ``$SYS`` read."""
        first = mqttbrokers.brokers(self.settings)[0]
        # certgen's monitor labels each broker when there are several.
        label = {} if self.settings.mqtt_brokers == 1 else {"broker": (broker or first).name}
        if certgen and total(certgen, "f2pipe_broker_up", **label) == 1:
            return {
                name: int(total(certgen, f"f2pipe_broker_{name}", **label))
                for name in brokerstats.SYS_TOPICS.values()
            }
        s = self.settings
        host, port = (s.mqtt_host, s.mqtt_port) if broker is None else (broker.host, broker.port)
        try:
            context = tls.service_context(s.pki_dir, brokerstats.MONITOR_IDENTITY)
        except ConfigError:  # no monitor identity: the broker cannot be asked
            return {}
        return brokerstats.read_once(host, port, context, timeout=8).as_dict()

    def brokers(self, certgen: Samples | None) -> dict[str, dict[str, Any]]:
        """Every broker: its URL, whether it accepts connections, its statistics
        (:meth:`broker`) and the labels of its connector group."""
        out: dict[str, dict[str, Any]] = {}
        for broker in mqttbrokers.brokers(self.settings):
            up = _accepts(broker.host, broker.port)
            stats = self.broker(certgen, broker) if up else {}
            connectors = [
                s.label
                for s in self.services
                if isinstance(s, svc.Connector) and s.broker == broker.number
            ]
            out[broker.name] = {"url": broker.url, "up": up, **stats, "connectors": connectors}
        return out

    def snapshot(self, with_health: bool = True) -> Snapshot:
        # One set of samples per stage: its replicas' counters added up.
        scraped: dict[str, Samples | None] = {}
        for service in self.services:
            if service.port() is not None:
                samples = scrape(service.url("/metrics"), cafile=service.cafile())
                scraped[service.name] = _added(scraped.get(service.name), samples)
        counters = {
            label: total(scraped.get(name), family) for label, (name, family) in THROUGHPUT.items()
        }
        dead: dict[str, float] = {}
        family = DEAD_LETTER_FAMILY
        for name in DEAD_LETTERS:
            samples = scraped.get(name)
            if not samples:
                continue
            for (sample, labels), value in samples.items():
                if sample not in (family, f"{family}_total") or not value:
                    continue
                found = dict(labels)
                key = f"{found.get('stage', name)}/{found.get('reason', '?')}"
                dead[key] = dead.get(key, 0.0) + value
        alarms = []
        processor = scraped.get("processor")
        if total(processor, "f2pipe_processor_dead_letter_alarm") > 0:
            ratio = total(processor, "f2pipe_processor_dead_letter_ratio")
            alarms.append(f"dead-letter ratio {ratio:.0%} is above the alarm threshold")
        alarms += expiry_warnings(self.settings.state_dir)
        ages: dict[str, float | None] = {}
        resets: dict[str, int] = {}
        for stage in STAGE_INPUT:
            samples = scraped.get(stage)
            ages[stage] = total(samples, "f2pipe_consumer_lag_seconds") if samples else None
            resets[stage] = int(total(samples, "f2pipe_offset_resets", stage=stage))
            if (ages[stage] or 0) >= LAG_AGE_ALARM_S:
                alarms.append(
                    f"{stage} is {ages[stage]:,.0f} s behind (the data topics keep 7 days)"
                )
        brokers = self.brokers(scraped.get("certgen"))
        first = brokers.get(mqttbrokers.DEFAULT_BROKER, {})
        return Snapshot(
            time.monotonic(),
            self.health() if with_health else [],
            counters,
            dead,
            self.lag(),
            alarms,
            {name: first.get(name) for name in brokerstats.SYS_TOPICS.values() if name in first},
            ages,
            resets,
            brokers,
        )


def _accepts(host: str, port: int, timeout: float = 2.0) -> bool:
    """Does ``host:port`` accept a TCP connection (the broker's listener is up)?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _added(first: Samples | None, second: Samples | None) -> Samples | None:
    """Two replicas' samples as one stage's: counts add up; a lag age or a ratio is the
    worse of the two."""
    if not first or not second:
        return first or second
    out = dict(first)
    for key, value in second.items():
        mine = out.get(key, 0.0)
        out[key] = max(mine, value) if key[0] in WORST_OF else mine + value
    return out


def rates(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Per-second rates of each counter; a restarted service (counter reset) reads 0."""
    span = max(after.taken - before.taken, 1e-6)
    return {
        key: max(0.0, after.counters[key] - before.counters.get(key, 0.0)) / span
        for key in after.counters
    }


def growing(history: Iterable[dict[str, int | None]], rates: dict[str, float]) -> dict[str, bool]:
    """Per stage: its lag rose at every sample and is either large or not being consumed."""
    samples = list(history)
    out: dict[str, bool] = {}
    for stage, counter in STAGE_INPUT.items():
        values = [s.get(stage) for s in samples]
        known = [v for v in values if v is not None]
        rising = len(known) == len(values) >= 2 and all(b > a for a, b in itertools.pairwise(known))
        out[stage] = rising and (known[-1] >= LAG_FLOOR or rates.get(counter, 0.0) == 0.0)
    return out


def problems(
    health: list[Health],
    lag_growing: dict[str, bool],
    broker: dict[str, int | None],
    offset_resets: dict[str, int] | None = None,
    brokers: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    found = [f"{h.name} is down ({h.detail})" for h in health if not h.up]
    found += [
        f"broker {name} at {entry.get('url')} is unreachable: start it (`f2pipe up`) or"
        " check F2PIPE_MQTT_HOST, F2PIPE_MQTT_PORT and F2PIPE_MQTT_BROKERS"
        for name, entry in (brokers or {}).items()
        if not entry.get("up")
    ]
    for name, entry in (brokers or {}).items():
        if name != mqttbrokers.DEFAULT_BROKER and (dropped := entry.get("dropped_messages")):
            found.append(
                f"broker {name} dropped {dropped:,} messages since it started: its queue"
                " reached F2PIPE_BROKER_MAX_QUEUED_BYTES while its connectors were down"
            )
    found += [f"{stage} lag keeps growing" for stage, grows in lag_growing.items() if grows]
    found += [
        f"{stage} reset {count} partition offsets past Kafka's retention: records between"
        " were never consumed (its log says which: committed offset out of range)"
        for stage, count in (offset_resets or {}).items()
        if count
    ]
    if dropped := broker.get("dropped_messages"):
        found.append(
            f"the broker dropped {dropped:,} messages since it started: its queue reached"
            " F2PIPE_BROKER_MAX_QUEUED_BYTES while Kafka or the connectors were down"
        )
    return found


def report(settings: Settings, interval: float = 2.0) -> Report:
    """Scrape, wait ``interval`` s (sampling the lag on the way), scrape again; fold."""
    observer = Observer(settings)
    first = observer.snapshot(with_health=False)
    lags = [first.lag]
    for _ in range(LAG_SAMPLES - 2):
        time.sleep(interval / (LAG_SAMPLES - 1))
        lags.append(observer.lag())
    time.sleep(interval / (LAG_SAMPLES - 1))
    last = observer.snapshot()
    lags.append(last.lag)
    return fold(first, last, lags, interval)


def fold(
    before: Snapshot, after: Snapshot, lags: list[dict[str, int | None]], interval: float
) -> Report:
    """``after`` with the rates since ``before`` and the trend of ``lags`` (oldest first)."""
    per_s = rates(before, after)
    trend = growing(lags, per_s)
    return Report(
        health=after.health,
        rates=per_s,
        lag=after.lag,
        lag_growing=trend,
        dead_letters=after.dead_letters,
        interval_s=interval,
        problems=problems(after.health, trend, after.broker, after.offset_resets, after.brokers),
        alarms=after.alarms,
        broker=after.broker,
        lag_seconds=after.lag_seconds,
        offset_resets=after.offset_resets,
        brokers=after.brokers,
    )
