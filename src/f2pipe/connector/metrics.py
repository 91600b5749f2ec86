"""The connector's metrics, each name with its meaning.

Dead letters are counted in the family all stages share,
``f2pipe_dead_letters_total{stage="connector", reason=...}``; the connector's
reasons are exported at 0 from the start, for alerting. Per-message counters
live in :class:`HotMetrics` as plain integers, exported when Prometheus scrapes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from f2pipe.core.reasons import Reason
from f2pipe.runtime.metrics import DEAD_LETTERS

__all__ = [
    "DELIVERY_ERRORS",
    "HOT_METRICS",
    "LATENCY_BUCKETS",
    "RECONNECTS",
    "HotMetrics",
    "count_dead_letter",
    "register",
]

for _reason in (Reason.INVALID_TOPIC, Reason.PAYLOAD_TOO_LARGE):
    DEAD_LETTERS.labels(stage="connector", reason=_reason.value)
DELIVERY_ERRORS = Counter(
    "f2pipe_connector_delivery_errors", "Kafka delivery reports with an error (record retried)"
)
RECONNECTS = Counter("f2pipe_connector_reconnects", "MQTT connection attempts after a loss")
# Exported by HotMetrics:
HOT_METRICS = {
    "f2pipe_connector_received": "MQTT messages received from the broker",
    "f2pipe_connector_redelivered": "received messages flagged DUP (redelivered by the broker)",
    "f2pipe_connector_produced": "records Kafka acknowledged (raw + dead letters)",
    "f2pipe_connector_acked": "MQTT PUBACKs sent after Kafka acknowledged the record",
    "f2pipe_connector_in_flight": "messages received and not yet acknowledged (gauge)",
    "f2pipe_connector_produce_seconds": "time from MQTT receipt to Kafka acknowledgement",
}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def count_dead_letter(reason: Reason) -> None:
    DEAD_LETTERS.labels(stage="connector", reason=reason.value).inc()


class HotMetrics(Collector):
    """Per-message counters as plain integers, exported when Prometheus scrapes.

    A prometheus_client metric takes a lock on every update; at tens of
    thousands of messages per second, five of them per message cost more than
    the rest of the receive path. Only the loop thread writes these fields;
    the scrape thread reads them (an int read is atomic under the GIL).
    """

    def __init__(self, in_flight: Callable[[], int]) -> None:
        self.received = 0
        self.redelivered = 0
        self.produced = 0
        self.acked = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self._in_flight = in_flight

    def observe_latency(self, seconds: float, count: int = 1) -> None:
        """``count`` messages took ``seconds`` each."""
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += count
        self.latency_sum += seconds * count

    def collect(self) -> Iterator[Metric]:
        doc = HOT_METRICS
        for field_name in ("received", "redelivered", "produced", "acked"):
            name = f"f2pipe_connector_{field_name}"
            yield CounterMetricFamily(name, doc[name], value=getattr(self, field_name))
        name = "f2pipe_connector_in_flight"
        yield GaugeMetricFamily(name, doc[name], value=self._in_flight())
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.latency_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        name = "f2pipe_connector_produce_seconds"
        yield HistogramMetricFamily(name, doc[name], buckets=buckets, sum_value=self.latency_sum)


_active: list[Collector] = []


def register(stats: Collector) -> None:
    """Export ``stats``, replacing an earlier connector's in this process (one per process
    in production; tests may build several)."""
    while _active:
        REGISTRY.unregister(_active.pop())
    REGISTRY.register(stats)
    _active.append(stats)
