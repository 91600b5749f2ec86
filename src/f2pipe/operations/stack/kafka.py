"""Apache Kafka 4, single-node KRaft, and the pipeline's topics.

The broker runs from the jars :mod:`.install` fetches (no Debian package);
its configuration and log4j2 setup are rewritten under ``<state>/kafka`` on
every ``up``. Once healthy, the raw, processed and dead-letter topics are
created with their partition counts and retention (SPEC section 3); existing
topics are kept as they are.

Secured (``F2PIPE_STACK_SECURED``, the default) the broker listens with
SASL_SSL only: SCRAM-SHA-512 users for the operator and each service, ACLs
enforced by the KRaft authorizer (:mod:`f2pipe.operations.principals`), its
certificate from f2pipe's CA. Users and ACLs are set again after every start.
"""

from __future__ import annotations

import base64
import subprocess
import time
import uuid
from typing import Any

from f2pipe.errors import StackError
from f2pipe.operations.principals import ADMIN, KAFKA_BROKER_USER
from f2pipe.operations.stack import rights, security
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


#: Broker properties of a one-node cluster, the local stack's and the compose file's:
#: internal topics cannot have more replicas than there are brokers.
SINGLE_NODE: dict[str, str] = {
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    # A group starts at once instead of waiting 3 s for more members to join.
    "group.initial.rebalance.delay.ms": "0",
}

#: How a secured broker authorizes, the local stack's and the compose file's: the
#: broker's own user and the operator are super users, everyone else holds only ACLs.
AUTHORIZER: dict[str, str] = {
    "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
    "super.users": f"User:{KAFKA_BROKER_USER};User:{ADMIN}",
    "allow.everyone.if.no.acl.found": "false",
}

#: A SCRAM listener's JAAS: the users live in the cluster metadata, not here.
SCRAM_JAAS = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


def broker_jaas(secret: str) -> str:
    """A PLAIN listener's JAAS: the broker's own user, logging in and accepted with ``secret``."""
    user = KAFKA_BROKER_USER
    return (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{user}" password="{secret}" user_{user}="{secret}";'
    )


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
        security.mark(self.paths, self.name, self.settings.stack_secured)
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
        }
        if security.is_secured(self.paths, self.name):
            properties |= self._secured_properties()
        properties |= {
            "log.dirs": str(self.home / "data"),
            # Topics are created explicitly with their partition counts and retention.
            "auto.create.topics.enable": "false",
            "num.partitions": str(self.settings.data_topic_partitions),
            **SINGLE_NODE,
        }
        text = "# Written by `f2pipe stack` on every `up`; edits are overwritten.\n"
        text += "".join(f"{key}={value}\n" for key, value in properties.items())
        # 0600: when secured it holds the broker's own password.
        security.write_private_text(self.home / "server.properties", text)
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

    def _secured_properties(self) -> dict[str, str]:
        """SASL_SSL only (SPEC section 10): SCRAM-SHA-512 for clients, ACLs enforced.

        The broker reaches its own controller and itself as :data:`KAFKA_BROKER_USER`
        with PLAIN over TLS (SCRAM users live in the metadata the controller serves,
        so they cannot authenticate the link that serves it); that user and the
        operator are super users, everyone else holds only the ACLs of
        :mod:`f2pipe.operations.principals`.
        """
        port, controller = self.settings.kafka_port(), self.settings.kafka_controller_port
        cert, key = security.server_tls(self.settings, self.home, "f2pipe kafka", None)
        ca = security.ca_file(self.settings)
        keystore = self.home / "keystore.pem"
        security.write_private_text(keystore, key.read_text() + cert.read_text())
        plain = broker_jaas(security.password(self.paths, f"kafka-{KAFKA_BROKER_USER}"))
        return {
            "listeners": f"CLIENT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller}",
            "advertised.listeners": f"CLIENT://{LOOPBACK}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "CLIENT",
            "listener.security.protocol.map": "CLIENT:SASL_SSL,CONTROLLER:SASL_SSL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512,PLAIN",
            "listener.name.client.sasl.enabled.mechanisms": "SCRAM-SHA-512,PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.client.scram-sha-512.sasl.jaas.config": SCRAM_JAAS,
            "listener.name.client.plain.sasl.jaas.config": plain,
            "listener.name.controller.plain.sasl.jaas.config": plain,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(ca),
            "ssl.enabled.protocols": "TLSv1.3,TLSv1.2",
            **AUTHORIZER,
        }

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

        update = security.PLAIN_KAFKA
        if security.is_secured(self.paths, self.name):
            # The stack acts as the broker's own super user, which exists from the start.
            update = security.kafka_settings(self.settings, self.paths, KAFKA_BROKER_USER, "PLAIN")
        settings = self.settings.model_copy(update=update)
        # log_level 2: librdkafka would print every refused connection while the JVM starts.
        return AdminClient(admin_config(settings, log_level=2))

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
        admin = self._admin()
        if security.is_secured(self.paths, self.name):
            rights.kafka_users_and_acls(admin, self.settings, self.paths)
        create_topics(admin, topic_plan(self.settings), deadline=time.monotonic() + 60)


def topic_plan(settings: Settings) -> dict[str, tuple[int, int]]:
    """Topic -> (partitions, retention ms): what ``stack up`` and a deployment create (SPEC 4)."""
    return {
        settings.topic_raw: (settings.data_topic_partitions, DATA_RETENTION_MS),
        settings.topic_processed: (settings.data_topic_partitions, DATA_RETENTION_MS),
        settings.topic_dead_letter: (settings.dead_letter_partitions, DEAD_LETTER_RETENTION_MS),
    }


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
