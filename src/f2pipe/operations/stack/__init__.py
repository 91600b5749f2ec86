"""The local stack: PostgreSQL 15 or newer, Redis 7, Kafka 4 (KRaft) and Mosquitto 2.

``f2pipe stack up [SERVER...]`` starts what is not running yet and returns once
every server answers its health probe (and the database and topics exist);
``down`` stops what ``up`` started; ``status`` prints each server up or down and
exits non-zero if any is down.

Contracts:

- All state lives under ``settings.state_dir``: ``pg/``, ``redis/``, ``kafka/``,
  ``mosquitto/`` (data and generated configuration), ``log/`` and ``run/``.
- A server is *ours* when ``<state>/run/<name>.pid`` names a live process whose
  kernel start time equals the one recorded next to the pid, so a recycled pid
  is never mistaken for ours and ``down`` never signals a foreign process.
- ``up`` checks every port and every program before it starts anything; if a
  later step fails it stops what this invocation started, so a failed ``up``
  leaves nothing half-started. Errors are :class:`~f2pipe.errors.StackError`
  (or ``ConfigError``) with a one-line message naming the cause and the fix.
- Run as root, PostgreSQL runs as the ``postgres`` user (it refuses root) and
  missing Debian packages are installed with apt-get unless
  ``F2PIPE_STACK_INSTALL=false``; otherwise the error says what to install.
- Each server listens on the host its client setting names (the DSN's, the
  Redis URL's, the bootstrap's, ``F2PIPE_MQTT_HOST``): loopback by default,
  else an address of this machine, secured only, and with that host in its
  certificate; Redis then speaks TLS only (``rediss://``) and PostgreSQL also
  admits TLS clients of the networks the address is on (``samenet``). A
  server in :data:`~.server.LAUNCH_PREFIX` is started through that command
  (``ip netns exec NAME`` in the separate-hosts test), so its host is that
  namespace's address.
- Mosquitto's pid is also written to ``<state>/mosquitto/mosquitto.pid`` so the
  certificate authority can send it SIGHUP to reload the CRL. With
  ``F2PIPE_MQTT_BROKERS=N`` brokers ``mosquitto-2``... ``mosquitto-N`` run beside
  it, each in ``<state>/mosquitto-<n>/`` on its own port.

The modules, one job each:

- :mod:`.supervise`: state paths, pid files, reaping, locks, port probes;
- :mod:`.install`: Debian packages, Java, the Kafka jars from Maven Central;
- :mod:`.server`: the :class:`Server` base every supervised process derives from;
- :mod:`.postgres`, :mod:`.redis`, :mod:`.kafka` (with topic creation),
  :mod:`.mosquitto` (with the broker's configuration and ACL): one server each;
  :mod:`.kafka_cluster`: Kafka as three nodes (``F2PIPE_KAFKA_BROKERS=3``);
  :mod:`.mqtt_shards`: several MQTT brokers and their per-device ACLs;
- :mod:`.commands`: ``up``, ``down``, ``status`` and the ``f2pipe stack`` parser.
"""

from f2pipe.operations.stack.commands import (
    NAMES,
    SERVERS,
    configure,
    down,
    servers,
    status,
    up,
)
from f2pipe.operations.stack.install import Program, ensure_programs, kafka_libs, kafka_version
from f2pipe.operations.stack.kafka import (
    DATA_RETENTION_MS,
    DAY_MS,
    DEAD_LETTER_RETENTION_MS,
    Kafka,
    KafkaNode2,
    KafkaNode3,
    create_topics,
    kafka_nodes,
)
from f2pipe.operations.stack.mosquitto import Mosquitto
from f2pipe.operations.stack.postgres import Postgres
from f2pipe.operations.stack.redis import Redis
from f2pipe.operations.stack.server import Server
from f2pipe.operations.stack.supervise import (
    LOOPBACK,
    Paths,
    PidFile,
    locked,
    port_accepts,
    port_in_use,
    reap,
)

__all__ = [
    "DATA_RETENTION_MS",
    "DAY_MS",
    "DEAD_LETTER_RETENTION_MS",
    "LOOPBACK",
    "NAMES",
    "SERVERS",
    "Kafka",
    "KafkaNode2",
    "KafkaNode3",
    "Mosquitto",
    "Paths",
    "PidFile",
    "Postgres",
    "Program",
    "Redis",
    "Server",
    "configure",
    "create_topics",
    "down",
    "ensure_programs",
    "kafka_libs",
    "kafka_nodes",
    "kafka_version",
    "locked",
    "port_accepts",
    "port_in_use",
    "reap",
    "servers",
    "status",
    "up",
]
