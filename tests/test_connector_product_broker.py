"""The connector and simulator against the product's own broker configuration.

The broker here is configured by
:func:`f2pipe.operations.stack.mosquitto.ensure_config` exactly as the stack
runs it (mTLS only, CN as username and client id, the ACL, the CRL), on a free
port with its own state folder. Device certificates come from the
product CA.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import unique, wait_until
from f2pipe.operations.stack.mosquitto import ensure_config
from f2pipe.pki.ca import cert_pem, key_pem, write_private, write_public
from f2pipe.pki.local import load_ca
from f2pipe.settings import Settings, load_settings
from f2pipe.testing.servers import (
    ConnectorProcess,
    assert_all_delivered,
    create_topics,
    free_port,
    ledger_entries,
    port_open,
    read_topic,
)
from f2pipe.tools.simulator import demo_fleet, run_load

DEV_KAFKA = load_settings().kafka_bootstrap  # the stack's Kafka


@pytest.fixture(scope="module")
def product_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    state = tmp_path_factory.mktemp("state")
    settings = load_settings(state_dir=state, mqtt_port=free_port(), mqtt_tls=True)
    conf = ensure_config(settings)
    ca = load_ca(settings)
    devices = settings.pki_dir / "devices"
    devices.mkdir(exist_ok=True)
    for sensor in demo_fleet():
        issued = ca.issue_device(sensor.mac)
        assert issued.private_key is not None
        write_private(devices / f"f2-{sensor.mac}.key", key_pem(issued.private_key))
        write_public(devices / f"f2-{sensor.mac}.pem", cert_pem(issued.certificate))
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)])
    try:
        wait_until(lambda: port_open(settings.mqtt_port), 10, what="broker listening")
        yield settings
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.servers
def test_connector_under_the_product_acl(product_broker: Settings, tmp_path: Path) -> None:
    raw, dlq = unique("raw"), unique("dlq")
    create_topics(DEV_KAFKA, raw, dlq)
    conn = ConnectorProcess(
        {
            "F2PIPE_STATE_DIR": str(product_broker.state_dir),
            "F2PIPE_MQTT_PORT": str(product_broker.mqtt_port),
            "F2PIPE_KAFKA_BOOTSTRAP": DEV_KAFKA,
            "F2PIPE_TOPIC_RAW": raw,
            "F2PIPE_TOPIC_DEAD_LETTER": dlq,
        },
        log=tmp_path / "connector.log",
    )
    conn.start()  # as svc-connector, with the certificate the stack issues
    try:
        ledger = io.StringIO()
        summary = asyncio.run(run_load(product_broker, demo_fleet(), 2000, ledger=ledger))
        assert summary.acknowledged == 2000
        entries = ledger_entries(ledger.getvalue().splitlines())
        records = read_topic(DEV_KAFKA, raw, 2000)
        assert_all_delivered(entries, records)
    finally:
        assert conn.terminate() == 0
