"""Helpers for the processor and dead-letter tests: topics, fleet rows, a processor process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from f2pipe.core.frames import encode_modbus_response
from f2pipe.runtime.kafka import client_config
from f2pipe.settings import get_settings

BOOTSTRAP = os.environ.get("F2PIPE_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def kafka_config(**extra: Any) -> dict[str, Any]:
    """The shared stack's Kafka as the operator (``admin.env``, via conftest), plus ``extra``."""
    return {**client_config(get_settings()), **extra}


def kafka_env() -> dict[str, str]:
    """The operator's ``F2PIPE_KAFKA_*`` variables, for a child process with a clean environment."""
    return {k: v for k, v in os.environ.items() if k.startswith("F2PIPE_KAFKA_")}


VENV_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"

# Where a stage is killed by the test-only fault hook (tests/faults/sitecustomize.py):
# between the step that makes its output durable and the step that says so.
COMMIT_POINTS = {
    # after Kafka acknowledged a round of records, before their PUBACKs
    "connector": "f2pipe.connector.runner:Connector.send_pubacks",
    # after the batch's outputs were flushed to Kafka, before its input offsets
    "processor": "f2pipe.processor.delivery:Delivery.commit_offsets",
    # after the database commit, before the offset commit
    "sink": "f2pipe.sink.settle:Settler.commit_offsets",
}
FAULTS = Path(__file__).resolve().parent / "faults"


def killed_at_commit_point(env: Mapping[str, str], stage: str, call: int) -> dict[str, str]:
    """``env`` for ``stage``'s process, which then SIGKILLs itself at the ``call``-th
    call of its commit point, through the fault hook, before the call runs."""
    return {
        **env,
        "F2PIPE_TEST_KILL_AT": f"{COMMIT_POINTS[stage]}:{call}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(FAULTS), env.get("PYTHONPATH", "")) if p),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_topics(names: Iterable[str], partitions: int = 1) -> None:
    admin = AdminClient(kafka_config())
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
    )
    for future in futures.values():
        future.result(30)


def delete_topics(names: Iterable[str]) -> None:
    admin = AdminClient(kafka_config())
    for future in admin.delete_topics(list(names)).values():
        with contextlib.suppress(Exception):  # best-effort cleanup
            future.result(30)


@dataclass
class Topics:
    raw: str
    processed: str
    dead: str
    group: str

    def env(self) -> dict[str, str]:
        return {
            "F2PIPE_TOPIC_RAW": self.raw,
            "F2PIPE_TOPIC_PROCESSED": self.processed,
            "F2PIPE_TOPIC_DEAD_LETTER": self.dead,
            "F2PIPE_PROCESSOR_GROUP": self.group,
        }


class Publisher:
    """Publishes raw records as the connector would (key = MAC, ``mqtt.topic`` header)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.producer = Producer(kafka_config(**{"linger.ms": 1}))

    def send(
        self,
        mqtt_topic: str,
        payload: bytes,
        mac: str | None = None,
        ingest: datetime | Literal["now"] | None = "now",
    ) -> None:
        """One raw record; ``ingest`` is its ``ingest.ts`` (None: no such header)."""
        parts = mqtt_topic.split("/")
        key = (mac or (parts[1][3:] if len(parts) > 1 else "")).encode()
        headers = [
            ("mqtt.topic", mqtt_topic.encode()),
            ("mqtt.qos", b"1"),
            ("mqtt.retain", b"0"),
        ]
        if ingest is not None:
            ms = time.time() * 1000 if ingest == "now" else ingest.timestamp() * 1000
            headers.append(("ingest.ts", b"%d" % ms))
        self.producer.produce(self.topic, payload, key, headers=headers)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


@dataclass
class Record:
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    partition: int
    offset: int

    def json(self) -> Any:
        return orjson.loads(self.value or b"")


@dataclass
class TopicReader:
    """Reads a topic from the beginning with assigned partitions (no group state)."""

    topic: str
    partitions: int = 1
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.consumer = Consumer(
            {
                **kafka_config(),
                "group.id": "unused",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        self.consumer.assign([TopicPartition(self.topic, p, 0) for p in range(self.partitions)])

    def poll(self) -> list[Record]:
        for msg in self.consumer.consume(num_messages=10000, timeout=0.2):
            if msg.error() is not None:
                continue
            headers = {k: v or b"" for k, v in (msg.headers() or [])}
            self.records.append(
                Record(msg.key(), msg.value(), headers, msg.partition(), msg.offset())
            )
        return self.records

    def close(self) -> None:
        self.consumer.close()


def processor_env(dsn: str, topics: Topics, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("F2PIPE_")}
    env.update(
        {
            # The shared stack's Redis as the operator (secured: no default user).
            "F2PIPE_REDIS_URL": get_settings().redis_url,
            "F2PIPE_METADATA_DSN": dsn,
            "F2PIPE_KAFKA_BOOTSTRAP": BOOTSTRAP,
            "F2PIPE_PROCESSOR_PORT": str(free_port()),
            "F2PIPE_PROCESSOR_POLL_TIMEOUT_S": "0.05",
            "F2PIPE_PROCESSOR_SESSION_TIMEOUT_S": "6",
            **topics.env(),
        }
    )
    env.update(extra)
    if env["F2PIPE_KAFKA_BOOTSTRAP"] == BOOTSTRAP:  # the shared Kafka: the operator's credentials
        env = {**kafka_env(), **env}
    return env


class ProcessorProcess:
    """``f2pipe processor`` as a child process, so tests can SIGKILL it."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def port(self) -> int:
        return int(self.env["F2PIPE_PROCESSOR_PORT"])

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "f2pipe"), "processor"], env=self.env, stdout=log, stderr=log
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


# --- fleet rows ----------------------------------------------------------------------


class Fleet:
    """Inserts the metadata rows tests need (SPEC section 3), one statement per change."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        row = self.conn.execute(
            "INSERT INTO device_types (name, is_controller, is_sensor) VALUES"
            " ('test controller', true, false), ('test sensor', false, true)"
            " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING device_type_id"
        ).fetchall()
        self.controller_type, self.sensor_type = row[0][0], row[1][0]
        self.controller_template = self.template("test controller template", "none", [])
        self._templates = 0

    def template(self, name: str, frame_check: str, datapoints: Sequence[Mapping[str, Any]]) -> int:
        """Create a template; return its id. ``datapoints``: SPEC section 3 columns."""
        with self.conn.transaction():
            tpl = self.conn.execute(
                "INSERT INTO device_templates (name, device_type_id, frame_check)"
                " VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name"
                " RETURNING device_template_id",
                (name, self.sensor_type, frame_check),
            ).fetchone()
            assert tpl is not None
            for dp in datapoints:
                self.conn.execute(
                    "INSERT INTO datapoints (device_template_id, label, data_encoding,"
                    " byte_offset, byte_length, byte_order, decimals, unit, json_field)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (device_template_id, label) DO NOTHING",
                    (
                        tpl[0],
                        dp["label"],
                        dp["data_encoding"],
                        dp["byte_offset"],
                        dp["byte_length"],
                        dp.get("byte_order", "ABCD"),
                        dp.get("decimals", 0),
                        dp.get("unit"),
                        dp.get("json_field"),
                    ),
                )
        return int(tpl[0])

    def datapoint_ids(self, template_id: int) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT label, datapoint_id FROM datapoints WHERE device_template_id = %s",
            (template_id,),
        ).fetchall()
        return {label: dp for label, dp in rows}

    def controller(self, mac: str, timezone: str = "UTC") -> int:
        row = self.conn.execute(
            "INSERT INTO devices (name, device_template_id, mac_address, timezone)"
            " VALUES (%s, %s, %s, %s) RETURNING device_id",
            (f"controller {mac}", self.controller_template, mac, timezone),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def sensor(self, name: str, template_id: int) -> int:
        row = self.conn.execute(
            "INSERT INTO devices (name, device_template_id) VALUES (%s, %s) RETURNING device_id",
            (name, template_id),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def wire(self, mac: str, connector: int, position: int, sensor_id: int) -> None:
        """Put ``sensor_id`` on pin ``position`` of connector ``connector`` (moving it)."""
        with self.conn.transaction():
            row = self.conn.execute(
                "INSERT INTO connectors (controller_id, connector_number)"
                " SELECT device_id, %s FROM devices WHERE mac_address = %s"
                " ON CONFLICT (controller_id, connector_number) DO UPDATE"
                " SET connector_number = EXCLUDED.connector_number RETURNING connector_id",
                (connector, mac),
            ).fetchone()
            assert row is not None
            self.conn.execute("DELETE FROM pins WHERE device_id = %s", (sensor_id,))
            self.conn.execute(
                "INSERT INTO pins (connector_id, position, device_id) VALUES (%s, %s, %s)"
                " ON CONFLICT (connector_id, position)"
                " DO UPDATE SET device_id = EXCLUDED.device_id",
                (row[0], position, sensor_id),
            )

    def env_sensors(self, macs: Iterable[str]) -> None:
        """Register each controller in ``macs`` with its own sensor of the ``env`` template
        (:data:`ENV_DATAPOINTS`) on pin 1 of connector J1, where :func:`env_payload` goes."""
        template = self.template("env", "modbus_crc", ENV_DATAPOINTS)
        for mac in macs:
            self.controller(mac)
            self.wire(mac, 1, 1, self.sensor(f"s-{mac}", template))

    def close(self) -> None:
        self.conn.close()


def wire_env_fleet(dsn: str, macs: Iterable[str]) -> None:
    """:meth:`Fleet.env_sensors` on a connection of its own."""
    fleet = Fleet(dsn)
    fleet.env_sensors(macs)
    fleet.close()


def env_frame(temp_centi: int, hum_centi: int, co2: int, addr: int = 1) -> str:
    """A valid Environmental Sensor frame (3 registers) with its Modbus CRC, as hex pairs."""
    data = b"".join(v.to_bytes(2, "big", signed=v < 0) for v in (temp_centi, hum_centi, co2))
    return encode_modbus_response(addr, 3, data).hex(" ").upper()


ENV_DATAPOINTS = (
    {"label": "Temperature", "data_encoding": "int16", "byte_offset": 0, "byte_length": 2,
     "decimals": 2},
    {"label": "Humidity", "data_encoding": "uint16", "byte_offset": 2, "byte_length": 2,
     "decimals": 2},
    {"label": "CO2", "data_encoding": "uint16", "byte_offset": 4, "byte_length": 2},
)  # fmt: skip


def env_payload(seq: int, second: int | None = None) -> bytes:
    """A telemetry payload whose readings are a function of ``seq`` (distinct timestamps)."""
    second = seq if second is None else second
    ts = f"2024-07-15 {(second // 3600) % 24:02d}:{(second // 60) % 60:02d}:{second % 60:02d}"
    frame = env_frame(seq % 30000, (seq * 7) % 10000, seq % 5000)
    return orjson.dumps({"timestamp": ts + f".{seq % 1000000:06d}", "data": frame})
