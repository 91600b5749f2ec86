"""Private servers for tests and benchmarks: Mosquitto, Kafka, the connector, a PKI.

Each server here is started as a real process on free loopback ports with its
own data directory, and stopped by whoever started it. Waits poll with a
deadline (:func:`wait_until`) and raise ``TimeoutError`` naming what they
waited for.

The Kafka here is plaintext on purpose: tests that need a broker to restart
or lose use it, while the secured stack's own tests (SASL_SSL, ACLs) run
against ``f2pipe stack up``'s servers. A connector pointed at it is given
none of the operator's Kafka credentials from the environment.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from f2pipe.connector.stage import topic_mac
from f2pipe.operations.stack.install import kafka_libs, kafka_version
from f2pipe.operations.stack.kafka import kafka_cluster_id
from f2pipe.operations.stack.supervise import port_accepts
from f2pipe.settings import load_settings
from f2pipe.testing import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    return port_accepts(port, timeout=0.2)


# --- Mosquitto ---


@dataclass
class Mosquitto:
    """A Mosquitto process with persistence, configured as the product needs it."""

    workdir: Path
    port: int = field(default_factory=free_port)
    extra: str = ""
    tls: str = ""  # listener TLS options (TestPki.mosquitto_tls); empty: plain, anonymous
    proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        return (
            f"listener {self.port} 127.0.0.1\n"
            + self.tls
            + f"allow_anonymous {'false' if self.tls else 'true'}\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 60\n"
            # The delivery guarantee needs the broker to keep every queued message of an
            # offline persistent session (the default keeps 1000 and drops the rest).
            "max_queued_messages 0\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 0\n"
            "max_packet_size 262144\n"
            "sys_interval 1\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n" + self.extra
        )

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Started as root, mosquitto drops to its own user, which must write here.
        self.workdir.chmod(0o777)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)])
        wait_until(lambda: port_open(self.port), 10, what="mosquitto listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


# --- Kafka ---


@dataclass
class KafkaServer:
    """A single-node KRaft Kafka from the locally cached distribution (small heap)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            "-Xmx384m",
            "-Xms128m",
            "-cp",
            str(kafka_libs(kafka_version()) / "*"),
            *args,
        ]

    def format(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        props = self.workdir / "server.properties"
        props.write_text(
            "process.roles=broker,controller\nnode.id=1\n"
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}\n"
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}\n"
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}\n"
            "controller.listener.names=CONTROLLER\n"
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            f"log.dirs={self.workdir}/data\n"
            "num.partitions=1\noffsets.topic.replication.factor=1\n"
            "transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n"
            "group.initial.rebalance.delay.ms=0\nauto.create.topics.enable=false\n"
        )
        cluster = kafka_cluster_id()
        subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(props)),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        with (self.workdir / "kafka.log").open("ab") as log:
            self.proc = subprocess.Popen(
                self._java("kafka.Kafka", str(self.workdir / "server.properties")),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: port_open(self.port), 60, 0.2, what="kafka listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@contextmanager
def running_kafka(workdir: Path) -> Iterator[KafkaServer]:
    """A :class:`KafkaServer` in ``workdir``, formatted and started; stopped on exit (and
    resumed first, in case its user left it stopped with SIGSTOP)."""
    server = KafkaServer(workdir)
    server.format()
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()


def kafka_client(bootstrap: str, **extra: Any) -> dict[str, Any]:
    """A client configuration for ``bootstrap``: clear text for a Kafka of the test's own,
    the operator's settings (the environment: ``admin.env`` on a secured stack) for the
    stack's Kafka."""
    from f2pipe.runtime.kafka import client_config
    from f2pipe.settings import load_settings

    settings = load_settings()
    if bootstrap == settings.kafka_bootstrap:
        return {**client_config(settings), **extra}
    return {"bootstrap.servers": bootstrap, **extra}


def create_topics(bootstrap: str, *names: str, partitions: int = 3) -> None:
    admin = AdminClient(kafka_client(bootstrap))
    futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    for future in futures.values():
        future.result(30)


def read_topic(
    bootstrap: str, topic: str, expect: int, timeout: float = 60.0, partitions: int = 3
) -> list[Any]:
    """Every record of ``topic`` from the start, once at least ``expect`` have arrived."""
    consumer = Consumer(
        kafka_client(
            bootstrap,
            **{
                "group.id": f"verify-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            },
        )
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(10000, 0.5)
            records.extend(m for m in batch if m.error() is None)
            if len(records) >= expect:
                # Pick up stragglers (duplicates) already in the log.
                records.extend(m for m in consumer.consume(100000, 1.0) if m.error() is None)
                break
    finally:
        consumer.close()
    return records


# --- connector process ---

#: The variables of a Kafka client's security, which a plaintext test Kafka must not get.
KAFKA_SECURITY = frozenset(
    f"F2PIPE_KAFKA_{name}"
    for name in (
        "SECURITY_PROTOCOL", "SASL_MECHANISM", "SASL_USERNAME", "SASL_PASSWORD",
        "SASL_PASSWORD_FILE", "SSL_CA_LOCATION", "SSL_CERTIFICATE_LOCATION", "SSL_KEY_LOCATION",
    )
)  # fmt: skip


@dataclass
class ConnectorProcess:
    """``f2pipe connector`` as a subprocess, so a test can SIGKILL it."""

    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    args: list[str] = field(default_factory=list)

    def start(self) -> None:
        env = {**os.environ, **self.env, "F2PIPE_CONNECTOR_PORT": str(self.port)}
        # The stack's Kafka is where this environment's settings point (its variable, or
        # the default when the stack runs on the default port and nothing set it).
        stack_kafka = load_settings().kafka_bootstrap
        if self.env.get("F2PIPE_KAFKA_BOOTSTRAP", stack_kafka) != stack_kafka:
            # A Kafka of the test's own (KafkaServer: plaintext) takes none of the
            # credentials a secured stack's admin.env put in this environment.
            env = {k: v for k, v in env.items() if k in self.env or k not in KAFKA_SECURITY}
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "f2pipe.cli", "connector", *self.args],
                env=env,
                stdout=out,
                stderr=out,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        wait_until(self.ready, 30, 0.1, what="connector ready")

    def ready(self) -> bool:
        return self._get("/readyz")[0] == 200

    def _get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` carrying ``labels`` (0 when absent or unreachable)."""
        _code, text = self._get("/metrics")
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                head = line.rsplit(" ", 1)[0]
                if all(label in head for label in wanted):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        code = self.proc.wait(60)
        self.proc = None
        return code


def ledger_entries(lines: Iterator[str] | list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.strip()]


# --- a throwaway PKI for mTLS tests (the product's CA lives in certgen) ---


class TestPki:
    """A CA plus broker, service and device certificates in the product's file layout.

    ``<root>/pki/ca.pem``, ``broker.pem``/``.key``, ``services/svc-<name>.pem``/``.key``,
    ``devices/f2-<mac>.pem``/``.key``. Files are world-readable on purpose: the
    test broker runs as mosquitto's own user.
    """

    __test__ = False  # not a test class despite the name

    def __init__(self, root: Path) -> None:
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = (
            x509,
            hashes,
            serialization,
            ec,
            NameOID,
        )
        self._now = dt.datetime.now(dt.UTC)
        self._dt = dt
        self.root = root
        self.pki = root / "pki"
        (self.pki / "services").mkdir(parents=True, exist_ok=True)
        (self.pki / "devices").mkdir(parents=True, exist_ok=True)
        for d in (root, self.pki, self.pki / "services", self.pki / "devices"):
            d.chmod(0o755)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "f2pipe test CA")])
        self.ca_name = name
        self.ca_cert = (
            self._builder(name, self.ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca = self.pki / "ca.pem"
        self.ca.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        self.ca.chmod(0o644)
        self.broker_cert, self.broker_key = self.issue("broker", self.pki / "broker", server=True)

    def _builder(self, subject: Any, public_key: Any) -> Any:
        x509 = self._x509
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(getattr(self, "ca_name", subject))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - self._dt.timedelta(minutes=5))
            .not_valid_after(self._now + self._dt.timedelta(days=2))
        )

    def issue(self, common_name: str, stem: Path, server: bool = False) -> tuple[Path, Path]:
        x509, ser = self._x509, self._ser
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, common_name)])
        builder = self._builder(subject, key.public_key())
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(self.ca_key, self._hashes.SHA256())
        cert_path, key_path = stem.with_suffix(".pem"), stem.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(ser.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
        )
        cert_path.chmod(0o644)
        key_path.chmod(0o644)
        return cert_path, key_path

    def service(self, name: str) -> tuple[Path, Path]:
        return self.issue(name, self.pki / "services" / name)

    def device(self, mac: str) -> tuple[Path, Path]:
        return self.issue(f"f2-{mac}", self.pki / "devices" / f"f2-{mac}")

    def mosquitto_tls(self) -> str:
        """Listener options for mutual TLS with the certificate CN as the identity."""
        return (
            f"cafile {self.ca}\ncertfile {self.broker_cert}\nkeyfile {self.broker_key}\n"
            "require_certificate true\nuse_identity_as_username true\n"
            "tls_version tlsv1.2\n"
        )


def connector_env(pki: TestPki, mqtt_port: int, identity: str, kafka: str) -> dict[str, str]:
    """Environment of a connector (or bare subscriber) under its own new service identity."""
    pki.service(identity)
    return {
        "F2PIPE_MQTT_TLS": "true",
        "F2PIPE_STATE_DIR": str(pki.root),
        "F2PIPE_CONNECTOR_IDENTITY": identity,
        "F2PIPE_CONNECTOR_CLIENT_ID": identity,
        "F2PIPE_MQTT_HOST": "127.0.0.1",
        "F2PIPE_MQTT_PORT": str(mqtt_port),
        "F2PIPE_KAFKA_BOOTSTRAP": kafka,
    }


def assert_all_delivered(ledger: list[dict[str, Any]], records: list[Any]) -> int:
    """Every ledger message is in ``records`` exactly as published; return the duplicates."""
    seen: collections.Counter[tuple[str, bytes]] = collections.Counter()
    for record in records:
        headers = dict(record.headers() or [])
        topic = headers["mqtt.topic"].decode()
        assert record.key() == topic_mac(topic)
        assert headers["mqtt.qos"] == b"1"
        assert headers["mqtt.retain"] == b"0"
        assert int(headers["ingest.ts"]) > 1_700_000_000_000
        seen[(topic, record.value())] += 1
    missing = [e for e in ledger if (e["topic"], e["payload"].encode()) not in seen]
    assert not missing, f"{len(missing)} acknowledged messages missing, e.g. {missing[:2]}"
    return sum(seen.values()) - len(seen)
