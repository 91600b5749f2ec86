"""The pipeline on separate hosts, as close as one machine allows (issue #14, item 5).

PostgreSQL, Redis, Kafka, Mosquitto and certgen each run in a network
namespace of their own with its own address and name (``pg.f2h.test``...);
the connector, the processor, the sink, the devices and the test itself run in
a sixth, ``svc.f2h.test`` (:mod:`f2pipe.testing.hosts`). Every link crosses
the bridge between them and is secured with the server's name checked:
PostgreSQL scram-sha-256 over TLS with ``sslmode=verify-full``, Redis an ACL
user over TLS, Kafka SASL_SSL SCRAM-SHA-512 (librdkafka checks the broker's
name), MQTT mutual TLS, certgen HTTPS.

The test builds the namespaces, then runs :mod:`hosts_inside` inside the
services' namespace (where the names resolve) as a pytest run of its own, and
reports its outcome. Without the right to build namespaces it is skipped with
one line saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from f2pipe.testing.hosts import DOMAIN, HostNetwork, NetworkRefused, host_network

pytestmark = [pytest.mark.servers, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
#: The processes started through LAUNCH_PREFIX, each on its host; the rest run on "svc".
SERVERS = {
    "postgres": "pg", "redis": "redis", "kafka": "kafka", "mosquitto": "mqtt", "certgen": "cert",
}  # fmt: skip


def alias(host: str) -> str:
    """A second name of ``host``'s address that its certificate does not carry: only a
    real name check tells it from the right one."""
    return f"other-{host}.{DOMAIN}"


def layout(network: HostNetwork) -> dict[str, object]:
    """What the inside run needs to know: each server's namespace and name."""
    return {
        "namespaces": {server: network.namespace(host) for server, host in SERVERS.items()},
        "names": {server: network.name(host) for server, host in SERVERS.items()},
        "services": network.name("svc"),
        "aliases": {server: alias(host) for server, host in SERVERS.items()},
    }


def test_the_pipeline_across_separate_hosts(tmp_path: Path) -> None:
    hosts = [*SERVERS.values(), "svc"]
    try:
        with host_network(hosts, aliases={alias(host): host for host in hosts}) as network:
            env = {**os.environ, "F2PIPE_HOSTS_LAYOUT": json.dumps(layout(network))}
            report = tmp_path / "inside.json"
            env["F2PIPE_HOSTS_REPORT"] = str(report)
            began = time.monotonic()
            result = subprocess.run(
                [*network.run_in("svc"), sys.executable, "-m", "pytest", "-q", "-x",
                 "-p", "no:cacheprovider", "--rootdir", str(HERE.parent),
                 str(HERE / "hosts_inside.py")],
                env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=540,
                check=False,
            )  # fmt: skip
            took = time.monotonic() - began
    except NetworkRefused as refused:
        pytest.skip(f"separate hosts need network namespaces: {refused}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    measured = json.loads(report.read_text())
    print(f"separate hosts: {took:.0f} s, {json.dumps(measured)}")
    assert measured["vector_rows"] > 0
    assert measured["dead_letters"] > 0
    assert measured["crash_rows"] > 0
