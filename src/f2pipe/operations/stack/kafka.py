"""Apache Kafka 4, single-node KRaft, and the pipeline's topics.

The broker runs from the jars :mod:`.install` fetches (no Debian package);
its configuration and log4j2 setup are rewritten under ``<state>/kafka`` on
every ``up``. Once healthy, the raw, processed and dead-letter topics are
created with their partition counts and retention (SPEC section 3); existing
topics are kept as they are.
"""

from __future__ import annotations

import base64
import subprocess
import time
import uuid
from typing import Any

from f2pipe.errors import StackError
from f2pipe.operations.stack.install import (
    Program,
    check_java,
    fetch_kafka_libs,
    kafka_libs,
    kafka_libs_current,
    kafka_version,
)
from f2pipe.operations.stack.server import Server
from f2pipe.operations.stack.supervise import LOOPBACK, Paths, log_tail, port_accepts
from f2pipe.settings import Settings

DAY_MS = 24 * 3600 * 1000
DATA_RETENTION_MS = 7 * DAY_MS
DEAD_LETTER_RETENTION_MS = 30 * DAY_MS


class Kafka(Server):
    """Apache Kafka 4, single-node KRaft, jars from Maven Central cached outside the clone."""

    name = "kafka"
    start_timeout = 120.0  # a cold JVM on a shared 2-core box

    def __init__(self, settings: Settings, paths: Paths) -> None:
        super().__init__(settings, paths)
        self.home = paths.state / "kafka"
        self.version = kafka_version()
        self.libs = kafka_libs(self.version)

    def ports(self) -> dict[int, str]:
        return {
            self.settings.kafka_port(): "F2PIPE_KAFKA_BOOTSTRAP",
            self.settings.kafka_controller_port: "F2PIPE_KAFKA_CONTROLLER_PORT",
        }

    def programs(self) -> list[Program]:
        needed = [Program("java", "default-jre-headless")]
        if not kafka_libs_current(self.libs):
            needed.append(Program("mvn", "maven"))
        return needed

    def describe(self) -> str:
        return f"{LOOPBACK}:{self.settings.kafka_port()} Kafka {self.version} (KRaft)"

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.paths.log}",
            "-Djava.awt.headless=true",
            "-cp", f"{self.libs}/*",
            *args,
        ]  # fmt: skip

    def prepare(self) -> None:
        check_java()
        fetch_kafka_libs(self.version, self.libs, self.paths.log / "mvn.log")
        self.home.mkdir(exist_ok=True)
        self._write_config()
        if (self.home / "data" / "meta.properties").is_file():
            return
        format_log = self.paths.log / "kafka-format.log"
        with format_log.open("ab") as out:
            # A static voter set (controller.quorum.voters) is formatted without --standalone.
            result = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "--ignore-formatted",
                           "-t", kafka_cluster_id(), "-c", str(self.home / "server.properties")),
                stdout=out, stderr=out, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"formatting Kafka storage failed{log_tail(format_log)}")

    def _write_config(self) -> None:
        port, controller = self.settings.kafka_port(), self.settings.kafka_controller_port
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{LOOPBACK}:{controller}",
            "listeners": f"PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.home / "data"),
            # Topics are created explicitly with their partition counts and retention.
            "auto.create.topics.enable": "false",
            "num.partitions": str(self.settings.data_topic_partitions),
            # One node: internal topics cannot have more replicas than that.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        text = "# Written by `f2pipe stack` on every `up`; edits are overwritten.\n"
        text += "".join(f"{key}={value}\n" for key, value in properties.items())
        (self.home / "server.properties").write_text(text)
        log = self.paths.log / "kafka.log"
        (self.home / "log4j2.properties").write_text(
            "# Written by `f2pipe stack`: the broker logs to one rolling file under the state.\n"
            "status = warn\n"
            "appender.file.type = RollingFile\n"
            "appender.file.name = file\n"
            f"appender.file.fileName = {log}\n"
            f"appender.file.filePattern = {log}.%i\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "appender.file.policies.type = Policies\n"
            "appender.file.policies.size.type = SizeBasedTriggeringPolicy\n"
            "appender.file.policies.size.size = 50MB\n"
            "appender.file.strategy.type = DefaultRolloverStrategy\n"
            "appender.file.strategy.max = 3\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = file\n"
        )

    def command(self) -> list[str]:
        java = self._java("kafka.Kafka", str(self.home / "server.properties"))
        heap = [f"-Xmx{self.settings.kafka_heap}", "-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError"]
        return [java[0], *heap, *java[1:]]

    def start(self) -> None:
        # kafka.Kafka writes its own log through log4j2; stdout only catches JVM failures.
        self.log_file = self.paths.log / "kafka.out"
        super().start()

    def failure_hint(self) -> str:
        out, log = self.paths.log / "kafka.out", self.paths.log / "kafka.log"
        return f"{log_tail(out) or log_tail(log)} (logs: {out}, {log})"

    def _admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        from f2pipe.runtime.kafka import admin_config

        # log_level 2: librdkafka would print every refused connection while the JVM starts.
        return AdminClient(admin_config(self.settings, log_level=2))

    def healthy(self) -> bool:
        if not port_accepts(self.settings.kafka_port()):
            self.last_error = f"port {self.settings.kafka_port()} does not accept connections"
            return False
        try:
            metadata = self._admin().list_topics(timeout=3)
        except Exception as exc:  # KafkaException while the controller elects itself
            self.last_error = str(exc)
            return False
        return bool(metadata.brokers)

    def after_healthy(self) -> None:
        s = self.settings
        wanted = {
            s.topic_raw: (s.data_topic_partitions, DATA_RETENTION_MS),
            s.topic_processed: (s.data_topic_partitions, DATA_RETENTION_MS),
            s.topic_dead_letter: (s.dead_letter_partitions, DEAD_LETTER_RETENTION_MS),
        }
        create_topics(self._admin(), wanted, deadline=time.monotonic() + 60)


def create_topics(admin: Any, wanted: dict[str, tuple[int, int]], deadline: float) -> None:
    """Create each missing topic ``name -> (partitions, retention ms)``; existing ones are kept."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    while True:
        existing = set(admin.list_topics(timeout=5).topics)
        new = [
            NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=1,
                config={"cleanup.policy": "delete", "retention.ms": str(retention)},
            )
            for name, (partitions, retention) in wanted.items()
            if name not in existing
        ]
        if not new:
            return
        failure = ""
        for name, future in admin.create_topics(new, request_timeout=15).items():
            try:
                future.result()
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    failure = f"creating topic {name}: {error.str()}"
        if not failure:
            return
        if time.monotonic() > deadline:
            raise StackError(failure)
        time.sleep(0.5)  # the controller may still be settling right after start


def kafka_cluster_id() -> str:
    """A random cluster id in Kafka's form: 16 random bytes, URL-safe base64, no padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):  # Kafka's command-line tools would read it as an option
            return text
