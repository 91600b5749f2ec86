"""Apache Kafka 4 in KRaft mode, one node or three (:mod:`.kafka_cluster`), and the topics.

The broker runs from the jars :mod:`.install` fetches (no Debian package);
its configuration and log4j2 setup are rewritten under ``<state>/kafka`` on
every ``up``. Once healthy, the raw, processed and dead-letter topics are
created with their partition counts, retention and replicas (SPEC sections 4
and 10); existing topics are kept as they are, unless they have fewer replicas
or a lower ``min.insync.replicas`` than the cluster's topics need: then nothing
is created and the error names the topic and the fix.

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
from pathlib import Path
from typing import Any, ClassVar

from f2pipe.errors import StackError
from f2pipe.operations.principals import ADMIN, KAFKA_BROKER_USER
from f2pipe.operations.stack import kafka_cluster, rights, security
from f2pipe.operations.stack.install import (
    Program,
    check_java,
    fetch_kafka_libs,
    kafka_libs,
    kafka_libs_current,
    kafka_version,
)
from f2pipe.operations.stack.server import Server
from f2pipe.operations.stack.supervise import Paths, address_of, log_tail, port_accepts
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
    """Apache Kafka 4 in KRaft mode, jars from Maven Central cached outside the clone.

    Node 1 of the cluster, or the only one; :class:`KafkaNode2` and :class:`KafkaNode3`
    are the others (``<state>/kafka-2`` and so on, each with its ports, pid and log).
    """

    name = "kafka"
    node: ClassVar[int] = 1
    start_timeout = 120.0  # a cold JVM on a shared 2-core box

    def __init__(self, settings: Settings, paths: Paths) -> None:
        super().__init__(settings, paths)
        self.home = paths.state / self.name
        self.version = kafka_version()
        self.libs = kafka_libs(self.version)
        self.port, self.controller_port = kafka_cluster.node_ports(settings)[self.node - 1]
        self._log_start = 0  # where this start's lines begin in the (appended) broker log

    def ports(self) -> dict[int, str]:
        return {
            self.port: "F2PIPE_KAFKA_BOOTSTRAP",
            self.controller_port: "F2PIPE_KAFKA_CONTROLLER_PORT",
        }

    def programs(self) -> list[Program]:
        needed = [Program("java", "default-jre-headless")]
        if not kafka_libs_current(self.libs):
            needed.append(Program("mvn", "maven"))
        return needed

    def host(self) -> str:
        return kafka_cluster.node_host(self.settings, self.node)

    def _listener_hosts(self) -> tuple[str, str]:
        """(the name clients reach it by, the address it binds), as listeners write them."""
        host = self.host()
        return kafka_cluster.bracketed(host), kafka_cluster.bracketed(address_of(host))

    def describe(self) -> str:
        of = self.settings.kafka_brokers
        cluster = f", node {self.node} of {of}" if of > 1 else ""
        return f"{self.host()}:{self.port} Kafka {self.version} (KRaft{cluster})"

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
        # One id for every node of a cluster; raises if the state holds the other kind.
        shared_id = kafka_cluster.cluster_id(self.paths, self.settings, kafka_cluster_id())
        self.home.mkdir(exist_ok=True)
        # The nodes of a cluster are secured together, under node 1's name.
        security.mark(self.paths, Kafka.name, self.settings.stack_secured)
        self._write_config()
        if (self.home / "data" / "meta.properties").is_file():
            return
        format_log = self.paths.log / f"{self.name}-format.log"
        with format_log.open("ab") as out:
            # A static voter set (controller.quorum.voters) is formatted without --standalone.
            result = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "--ignore-formatted",
                           "-t", shared_id or kafka_cluster_id(),
                           "-c", str(self.home / "server.properties")),
                stdout=out, stderr=out, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"formatting Kafka storage failed{log_tail(format_log)}")

    def _write_config(self) -> None:
        port, controller = self.port, self.controller_port
        host, bind = self._listener_hosts()
        properties = {
            "process.roles": "broker,controller",
            "node.id": str(self.node),
            "controller.quorum.voters": kafka_cluster.voters(self.settings),
            "listeners": f"PLAINTEXT://{bind}:{port},CONTROLLER://{bind}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{host}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        }
        if security.is_secured(self.paths, Kafka.name):
            properties |= self._secured_properties()
        properties |= {
            "log.dirs": str(self.home / "data"),
            # Topics are created explicitly with their partition counts and retention.
            "auto.create.topics.enable": "false",
            "num.partitions": str(self.settings.data_topic_partitions),
            **(kafka_cluster.CLUSTER if self.settings.kafka_brokers > 1 else SINGLE_NODE),
        }
        text = "# Written by `f2pipe stack` on every `up`; edits are overwritten.\n"
        text += "".join(f"{key}={value}\n" for key, value in properties.items())
        # 0600: when secured it holds the broker's own password.
        security.write_private_text(self.home / "server.properties", text)
        log = self.paths.log / f"{self.name}.log"
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
        port, controller = self.port, self.controller_port
        host, bind = self._listener_hosts()
        cert, key = security.server_tls(self.settings, self.home, "f2pipe kafka", None, self.host())
        ca = security.ca_file(self.settings)
        keystore = self.home / "keystore.pem"
        security.write_private_text(keystore, key.read_text() + cert.read_text())
        plain = broker_jaas(security.password(self.paths, f"kafka-{KAFKA_BROKER_USER}"))
        return {
            # Clients reach it by the bootstrap's name, which its certificate carries.
            "listeners": f"CLIENT://{bind}:{port},CONTROLLER://{bind}:{controller}",
            "advertised.listeners": f"CLIENT://{host}:{port}",
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
        self.log_file = self.paths.log / f"{self.name}.out"
        log = self.paths.log / f"{self.name}.log"
        self._log_start = log.stat().st_size if log.is_file() else 0
        super().start()

    def failure_hint(self) -> str:
        out, log = self.paths.log / f"{self.name}.out", self.paths.log / f"{self.name}.log"
        cause = _last_error(log, self._log_start)
        return f"{cause or log_tail(out) or log_tail(log)} (logs: {out}, {log})"

    def _admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        from f2pipe.runtime.kafka import admin_config

        update = security.PLAIN_KAFKA
        if security.is_secured(self.paths, Kafka.name):
            # The stack acts as the broker's own super user, which exists from the start.
            update = security.kafka_settings(self.settings, self.paths, KAFKA_BROKER_USER, "PLAIN")
        if self.settings.kafka_brokers > 1:  # this node, which must answer for itself
            update = {**update, "kafka_bootstrap": f"{self._listener_hosts()[0]}:{self.port}"}
        settings = self.settings.model_copy(update=update)
        # log_level 2: librdkafka would print every refused connection while the JVM starts.
        return AdminClient(admin_config(settings, log_level=2))

    def healthy(self) -> bool:
        if not port_accepts(self.port, host=self.host()):
            self.last_error = f"port {self.port} does not accept connections"
            return False
        try:
            metadata = self._admin().list_topics(timeout=3)
        except Exception as exc:  # KafkaException while the controller elects itself
            self.last_error = str(exc)
            return False
        if self.settings.kafka_brokers > 1 and self.node not in metadata.brokers:
            self.last_error = f"broker {self.node} is not registered with the controllers yet"
            return False
        return bool(metadata.brokers)

    def after_healthy(self) -> None:
        if self.node != self.settings.kafka_brokers:
            return  # a cluster's users, ACLs and topics wait for its last node
        admin = self._admin()
        if security.is_secured(self.paths, Kafka.name):
            rights.kafka_users_and_acls(admin, self.settings, self.paths)
        replicas, min_insync = kafka_cluster.replication(self.settings)
        plan, deadline = topic_plan(self.settings), time.monotonic() + 60
        create_topics(admin, plan, deadline, replicas=replicas, min_insync=min_insync)


class KafkaNode2(Kafka):
    """The cluster's second node."""

    name = "kafka-2"
    node = 2


class KafkaNode3(Kafka):
    """The cluster's third node."""

    name = "kafka-3"
    node = 3


def kafka_nodes(settings: Settings) -> tuple[type[Kafka], ...]:
    """The Kafka servers of the stack: one, or the cluster's three."""
    return (Kafka, KafkaNode2, KafkaNode3) if settings.kafka_brokers > 1 else (Kafka,)


def _last_error(log: Path, start: int) -> str:
    """``": <the last ERROR line>"`` of a broker's log from byte ``start``, "" if none: a
    broker that gives up logs the cause, then the shutdown that follows it."""
    try:
        with log.open("rb") as handle:
            handle.seek(start)
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    last = next((line for line in reversed(lines) if "] ERROR " in line), "")
    return f": {last[:300]}" if last else ""


def topic_plan(settings: Settings) -> dict[str, tuple[int, int]]:
    """Topic -> (partitions, retention ms): what ``stack up`` and a deployment create (SPEC 4)."""
    return {
        settings.topic_raw: (settings.data_topic_partitions, DATA_RETENTION_MS),
        settings.topic_processed: (settings.data_topic_partitions, DATA_RETENTION_MS),
        settings.topic_dead_letter: (settings.dead_letter_partitions, DEAD_LETTER_RETENTION_MS),
    }


def create_topics(
    admin: Any,
    wanted: dict[str, tuple[int, int]],
    deadline: float,
    replicas: int = 1,
    min_insync: int = 1,
) -> None:
    """Create each missing topic ``name -> (partitions, retention ms)``; existing ones are kept.

    With ``replicas`` > 1 the topics get ``min.insync.replicas=min_insync``. Raises
    StackError, before creating anything, when the cluster has fewer brokers than
    ``replicas`` or an existing topic has fewer replicas or a lower minimum.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    config = {"min.insync.replicas": str(min_insync)} if replicas > 1 else {}
    while True:
        metadata = admin.list_topics(timeout=5)
        check_replicas(metadata, wanted, replicas)
        existing = set(metadata.topics)
        if replicas > 1:
            check_min_insync(admin, [name for name in wanted if name in existing], min_insync)
        new = [
            NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=replicas,
                config={"cleanup.policy": "delete", "retention.ms": str(retention), **config},
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


def check_replicas(metadata: Any, wanted: dict[str, tuple[int, int]], replicas: int) -> None:
    """StackError naming the first of ``wanted`` that the cluster cannot give ``replicas``."""
    brokers = len(metadata.brokers)
    for name in wanted:
        topic = metadata.topics.get(name)
        have = len(topic.partitions[0].replicas) if topic is not None and topic.partitions else None
        if have is None and brokers < replicas:
            raise StackError(
                f"topic {name} needs {replicas} replicas but the cluster has {brokers} "
                f"broker(s); start all {replicas} brokers (F2PIPE_KAFKA_BROKERS={replicas})"
            )
        if have is not None and have < replicas:
            raise StackError(
                f"topic {name} has {have} replica(s) where {replicas} are needed; raise its "
                "replication factor with kafka-reassign-partitions, or delete it to have it "
                "created again (its records with it)"
            )


def check_min_insync(admin: Any, names: list[str], min_insync: int) -> None:
    """StackError naming the first topic of ``names`` whose writes need fewer replicas."""
    from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

    resources = [ConfigResource("topic", name) for name in names]
    for resource, future in admin.describe_configs(resources).items() if resources else ():
        have = int(future.result(timeout=15)["min.insync.replicas"].value)
        if have < min_insync:
            raise StackError(
                f"topic {resource.name} has min.insync.replicas={have} where {min_insync} are "
                f"needed; set it with kafka-configs --alter --entity-type topics --entity-name "
                f"{resource.name} --add-config min.insync.replicas={min_insync}"
            )


def kafka_cluster_id() -> str:
    """A random cluster id in Kafka's form: 16 random bytes, URL-safe base64, no padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):  # Kafka's command-line tools would read it as an option
            return text
