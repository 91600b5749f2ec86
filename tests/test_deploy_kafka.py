"""The compose file's Kafka, run for real: its settings, users, ACLs and topics.

No container engine runs here, so the kafka service's environment is turned
back into broker properties by the apache/kafka image's own rule (``KAFKA_``
dropped, ``___`` -> ``-``, ``__`` -> ``_``, ``_`` -> ``.``, lower case) and run
with the same Kafka version's jars; ``deploy/kafka/setup.sh`` then runs with
the same tools the image ships (``kafka-configs.sh``... as thin wrappers over
the jars' classes). Only the ports and the data folder differ. What the
services can then do is asked of the broker with their own credentials.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import wait_until
from f2pipe.operations.stack.install import kafka_libs, kafka_libs_current, kafka_version
from f2pipe.operations.stack.kafka import kafka_cluster_id
from f2pipe.testing.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
LIBS = kafka_libs(kafka_version())

pytestmark = [
    pytest.mark.servers,
    pytest.mark.skipif(not kafka_libs_current(LIBS), reason="the Kafka jars are not cached"),
]

# What the image's scripts run (Kafka 4.1's bin/*.sh).
TOOLS = {
    "kafka-configs.sh": "kafka.admin.ConfigCommand",
    "kafka-acls.sh": "org.apache.kafka.tools.AclCommand",
    "kafka-topics.sh": "org.apache.kafka.tools.TopicCommand",
    "kafka-broker-api-versions.sh": "org.apache.kafka.tools.BrokerApiVersionsCommand",
}
PASSWORDS = {
    "BROKER_KAFKA_PASSWORD": "broker-Secret-1",
    "ADMIN_KAFKA_PASSWORD": "admin-Secret-2",
    "CONNECTOR_KAFKA_PASSWORD": "connector-Secret-3",
    "PROCESSOR_KAFKA_PASSWORD": "processor-Secret-4",
    "SINK_KAFKA_PASSWORD": "sink-Secret-5",
}


def _property(variable: str) -> str:
    name = variable.removeprefix("KAFKA_").lower()
    return name.replace("___", "-").replace("__", "\0").replace("_", ".").replace("\0", "_")


def _interpolate(text: str) -> str:
    return re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", lambda m: PASSWORDS[m.group(1)], text)


class Broker:
    def __init__(self, folder: Path) -> None:
        compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
        self.service = compose["services"]["kafka"]
        self.setup = compose["services"]["kafka-setup"]
        self.internal, self.external, self.controller = free_port(), free_port(), free_port()
        ports = {"19092": self.internal, "9092": self.external, "9093": self.controller}
        lines = []
        for variable, value in self.service["environment"].items():
            if not variable.startswith("KAFKA_"):
                continue
            value = _interpolate(str(value)).replace("kafka:", "127.0.0.1:")
            value = re.sub(r":(19092|9092|9093)\b", lambda m: f":{ports[m.group(1)]}", value)
            lines.append(f"{_property(variable)}={value}")
        lines.append(f"log.dirs={folder / 'data'}")
        self.properties = folder / "server.properties"
        self.properties.write_text("\n".join(lines) + "\n")
        self.tools = folder / "bin"
        self.tools.mkdir()
        for script, main in TOOLS.items():
            path = self.tools / script
            path.write_text(f'#!/bin/sh\nexec java -Xmx256m -cp "{LIBS}/*" {main} "$@"\n')
            path.chmod(0o755)
        self.log = folder / "kafka.log"
        self.process: subprocess.Popen[bytes] | None = None

    def java(self, *args: str) -> list[str]:
        return ["java", "-Xmx384m", "-cp", f"{LIBS}/*", *args]

    def start(self) -> None:
        subprocess.run(
            self.java("kafka.tools.StorageTool", "format", "-t", kafka_cluster_id(),
                      "-c", str(self.properties)),
            check=True, capture_output=True,
        )  # fmt: skip
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.java("kafka.Kafka", str(self.properties)), stdout=out, stderr=out
            )

    def script(
        self, *args: str, path: Path = ROOT / "deploy/kafka/setup.sh"
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **PASSWORDS, "KAFKA_TOOLS": str(self.tools)}
        return subprocess.run(
            ["bash", str(path), *args],
            env=env, capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    server = Broker(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _client(broker: Broker, user: str, secret: str) -> dict[str, object]:
    return {
        "bootstrap.servers": f"127.0.0.1:{broker.internal}",
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": user,
        "sasl.password": secret,
        "log_level": 0,
    }


def _produce(broker: Broker, user: str, secret: str, topic: str) -> str | None:
    """None when the record is acknowledged, else the error's name."""
    from confluent_kafka import Producer

    outcome: list[str | None] = []
    producer = Producer({**_client(broker, user, secret), "message.timeout.ms": 15000})
    producer.produce(
        topic, b"v", key=b"k", on_delivery=lambda err, _m: outcome.append(err and err.name())
    )
    producer.flush(30)
    assert outcome, "no delivery report"
    return outcome[0]


def test_the_compose_kafka_holds_each_service_to_its_acls(broker: Broker) -> None:
    assert broker.service["healthcheck"]["test"][1:3] == ["bash", "/etc/f2pipe/setup.sh"]
    probe = [
        str(a).replace("19092", str(broker.internal))
        for a in broker.service["healthcheck"]["test"][3:]
    ]
    wait_until(
        lambda: broker.script(*probe).returncode == 0, timeout=180, interval=2,
        what="the broker's own health probe",
    )  # fmt: skip
    command = [str(a) for a in broker.setup["command"]]
    assert command[:3] == ["bash", "/etc/f2pipe/setup.sh", "apply"]
    done = broker.script("apply", f"127.0.0.1:{broker.internal}")
    assert done.returncode == 0, done.stderr[-2000:]

    secret = PASSWORDS["CONNECTOR_KAFKA_PASSWORD"]
    assert _produce(broker, "f2pipe-connector", secret, "raw-iot-data") is None
    assert _produce(broker, "f2pipe-connector", secret, "iot-dead-letter") is None
    refused = _produce(broker, "f2pipe-connector", secret, "processed-iot-data")
    assert refused == "TOPIC_AUTHORIZATION_FAILED"
    sink = PASSWORDS["SINK_KAFKA_PASSWORD"]
    assert _produce(broker, "f2pipe-sink", sink, "raw-iot-data") == "TOPIC_AUTHORIZATION_FAILED"
    assert _produce(broker, "f2pipe-connector", "wrong", "raw-iot-data") is not None

    from confluent_kafka.admin import AdminClient

    # The operator, from the host's listener (SCRAM only), sees the three topics as planned.
    admin_config = {
        **_client(broker, "f2pipe-admin", PASSWORDS["ADMIN_KAFKA_PASSWORD"]),
        "bootstrap.servers": f"127.0.0.1:{broker.external}",
    }
    topics = AdminClient(admin_config).list_topics(timeout=30).topics
    assert {"raw-iot-data", "processed-iot-data", "iot-dead-letter"} <= set(topics)
    assert len(topics["raw-iot-data"].partitions) == 6
    assert len(topics["iot-dead-letter"].partitions) == 3


def test_a_cluster_setup_refuses_topics_of_one_replica_in_one_line(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The three-node render's setup.sh, run where the one-node topics already exist
    (its users and ACLs are the same), reads the real describe output and stops."""
    from test_deploy_kafka_cluster import render

    wait_until(
        lambda: broker.script("probe", f"127.0.0.1:{broker.internal}").returncode == 0,
        timeout=180, interval=2, what="the broker's own health probe",
    )  # fmt: skip
    assert broker.script("apply", f"127.0.0.1:{broker.internal}").returncode == 0
    assert render(tmp_path / "cluster", monkeypatch, F2PIPE_KAFKA_BROKERS="3") == 0
    refused = broker.script(
        "apply", f"127.0.0.1:{broker.internal}", path=tmp_path / "cluster/deploy/kafka/setup.sh"
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "setup.sh: topic raw-iot-data has 1 replica(s) where 3 are needed; raise its replication"
        " factor with kafka-reassign-partitions, or delete it to have it created again (its"
        " records with it)"
    ]
