"""The alert rules and the dashboard against the metrics f2pipe really exports.

``promtool`` (Debian's ``prometheus`` package, installed here as the stack
installs its servers) checks the Prometheus configuration and runs the rules'
unit tests in ``deploy/prometheus/alerts_test.yml``. Every ``f2pipe_*`` name
in the rules and in the Grafana dashboard must be a metric some service
registers.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from f2pipe.connector.metrics import HotMetrics
from f2pipe.operations.stack import Paths
from f2pipe.operations.stack.install import Program, ensure_programs
from f2pipe.runtime.brokerstats import BrokerMonitor

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "f2pipe.json"
# The modules that register each service's metrics when imported.
METRIC_MODULES = (
    "f2pipe.runtime.metrics",
    "f2pipe.runtime.kafka",
    "f2pipe.connector.metrics",
    "f2pipe.processor.metrics",
    "f2pipe.sink.metrics",
    "f2pipe.pki.api",
)
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "info": ("_info",),
    "unknown": ("",),
}


def exported_names() -> set[str]:
    for module in METRIC_MODULES:
        importlib.import_module(module)
    # Collectors a service registers when it starts: the connector's counters, the broker's.
    started = [HotMetrics(lambda: 0), BrokerMonitor("127.0.0.1", 1, None)]
    families = [*REGISTRY.collect(), *(f for c in started for f in c.collect())]
    return {f.name + suffix for f in families for suffix in SUFFIXES[f.type]}


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bf2pipe_[a-z0-9_]*[a-z0-9]", text))


@pytest.fixture(scope="module")
def promtool(tmp_path_factory: pytest.TempPathFactory) -> str:
    program = Program("promtool", "prometheus")
    ensure_programs([program], Paths(tmp_path_factory.mktemp("state")), install=True)
    found = program.find()
    assert found is not None
    return found


def run_promtool(promtool: str, *args: str) -> str:
    """promtool's output in deploy/prometheus; the test fails with it on a non-zero exit."""
    out = subprocess.run(
        [promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_prometheus_config_and_rules_are_valid(promtool: str) -> None:
    assert "10 rules found" in run_promtool(promtool, "check", "config", "prometheus.yml")


def test_every_alert_fires_on_its_case_and_not_on_a_healthy_series(promtool: str) -> None:
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", "alerts_test.yml")


def test_rules_name_only_metrics_that_exist() -> None:
    names = referenced((PROMETHEUS / "alerts.yml").read_text())
    assert "f2pipe_broker_dropped_messages_total" in names
    assert names - exported_names() == set()


def test_dashboard_queries_use_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target.get("expr", "")
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert queries
    names = set().union(*(referenced(query) for query in queries))
    assert names
    assert names - exported_names() == set()


def test_every_metric_is_named_f2pipe() -> None:
    # Only f2pipe's own and the client library's process/platform collectors.
    foreign = {
        name
        for name in exported_names()
        if not name.startswith(("f2pipe_", "process_", "python_", "python_gc_"))
    }
    assert foreign == set()
