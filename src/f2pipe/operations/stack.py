"""The local stack: PostgreSQL 15, Redis 7, Kafka 4 (KRaft) and Mosquitto 2 on loopback.

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
- Mosquitto's pid is also written to ``<state>/mosquitto/mosquitto.pid`` so the
  certificate authority can send it SIGHUP to reload the CRL.
"""

from __future__ import annotations

import abc
import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote, urlsplit

from f2pipe.errors import ConfigError, StackError
from f2pipe.operations.broker import ensure_config, raise_fd_limit
from f2pipe.settings import Settings, load_settings

if TYPE_CHECKING:
    import psycopg

LOOPBACK = "127.0.0.1"
_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
_CHECKOUT = Path(__file__).resolve().parents[3]
KAFKA_POM = _CHECKOUT / "deploy" / "kafka" / "pom.xml"

DAY_MS = 24 * 3600 * 1000
DATA_RETENTION_MS = 7 * DAY_MS
DEAD_LETTER_RETENTION_MS = 30 * DAY_MS


# --------------------------------------------------------------------------- shared helpers
@dataclass(frozen=True)
class Paths:
    """Where the stack keeps things; everything is under the one state folder."""

    state: Path

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def log(self) -> Path:
        return self.state / "log"

    def make(self) -> None:
        for folder in (self.state, self.run, self.log):
            folder.mkdir(parents=True, exist_ok=True)


def _start_time(pid: int) -> str | None:
    """The process's kernel start time (clock ticks since boot), None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may contain spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


# Every server or service this process started, kept until it exits: so it is reaped
# (a killed child never lingers as a zombie that still holds its pid) and so its Popen
# is never dropped while it runs, which Python reports as a leak.
_CHILDREN: list[subprocess.Popen[bytes]] = []


def reap() -> None:
    """Collect the exit status of children that ended; cheap, never blocks."""
    _CHILDREN[:] = [child for child in _CHILDREN if child.poll() is None]


class PidFile:
    """``<pid> <start time>`` of a process we started; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, pid: int) -> None:
        started = _start_time(pid)
        if started is None:
            raise StackError(f"process {pid} exited right after it was started")
        self.path.write_text(f"{pid} {started}\n")

    def live_pid(self) -> int | None:
        """The recorded pid if that very process is still running, else None."""
        try:
            pid_text, started = self.path.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        return pid if _start_time(pid) == started else None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def port_in_use(port: int) -> bool:
    """True when something listens on (or holds) ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR so that our own recent connections in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to ``127.0.0.1:port`` succeeds."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _tail(path: Path) -> str:
    """The last non-empty line of a log, for a one-line error."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    last = next((line for line in reversed(lines) if line), "")
    return f": {last[:200]}" if last else ""


# --------------------------------------------------------------------------- programs
@dataclass(frozen=True)
class Program:
    """A program a server needs, and the Debian package that provides it."""

    name: str
    package: str
    path: str = ""  # absolute path when it is not looked up on PATH

    def find(self) -> str | None:
        if self.path:
            return self.path if os.access(self.path, os.X_OK) else None
        # /usr/sbin holds mosquitto, and is not on a normal user's PATH.
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        return shutil.which(self.name, path=search)


def _is_debian() -> bool:
    return Path("/etc/debian_version").is_file() and shutil.which("apt-get") is not None


def ensure_programs(programs: Sequence[Program], paths: Paths, install: bool) -> None:
    """Install missing programs' packages (root on Debian) or raise naming what to install."""
    missing = list(dict.fromkeys(p for p in programs if p.find() is None))
    if not missing:
        return
    names = ", ".join(p.name for p in missing)
    packages = list(dict.fromkeys(p.package for p in missing))
    if not (install and _running_as_root() and _is_debian()):
        prefix = "" if _running_as_root() else "sudo "
        hint = "" if install else " (automatic install is off: F2PIPE_STACK_INSTALL=false)"
        raise StackError(
            f"missing {names}; install with: {prefix}apt-get install -y {' '.join(packages)}"
            f" (Debian package names){hint}"
        )
    _apt_install(packages, paths.log / "apt.log")
    still = [p.name for p in missing if p.find() is None]
    if still:
        raise StackError(f"{', '.join(still)} still missing after apt-get install (see apt.log)")


def _apt_install(packages: list[str], log: Path) -> None:
    print(f"installing {' '.join(packages)} with apt-get ...", file=sys.stderr)
    if "postgresql-15" in packages and not Path("/etc/postgresql-common").exists():
        # The postgresql package creates and starts a system cluster on 5432 unless told
        # not to, which would take the port our own cluster needs.
        _apt(["postgresql-common"], log)
        conf = Path("/etc/postgresql-common/createcluster.conf")
        conf.parent.mkdir(parents=True, exist_ok=True)
        with conf.open("a") as out:
            out.write("\ncreate_main_cluster = false\n")
    _apt(packages, log)


def _apt(packages: list[str], log: Path) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    with log.open("ab") as out:
        if subprocess.run(command, stdout=out, stderr=out, env=env, check=False).returncode == 0:
            return
        # Most often the package lists were never downloaded (fresh container): update once.
        subprocess.run(["apt-get", "update"], stdout=out, stderr=out, env=env, check=False)
        if subprocess.run(command, stdout=out, stderr=out, env=env, check=False).returncode == 0:
            return
    raise StackError(f"apt-get install {' '.join(packages)} failed{_tail(log)} (full log: {log})")


# --------------------------------------------------------------------------- servers
class Server(abc.ABC):
    """One local server: what it needs, how it starts, how it is probed and stopped.

    Subclasses set ``name`` and implement :meth:`ports`, :meth:`programs`,
    :meth:`command` and :meth:`healthy`; :meth:`prepare` and :meth:`after_healthy`
    are idempotent one-time set-up steps.
    """

    name: ClassVar[str]
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    start_timeout: ClassVar[float] = 60.0
    stop_timeout: ClassVar[float] = 60.0

    def __init__(self, settings: Settings, paths: Paths) -> None:
        self.settings = settings
        self.paths = paths
        self.pidfile = PidFile(paths.run / f"{self.name}.pid")
        self.log_file = paths.log / f"{self.name}.log"
        self.last_error = ""
        self._proc: subprocess.Popen[bytes] | None = None

    # -- what subclasses describe
    @abc.abstractmethod
    def ports(self) -> dict[int, str]:
        """Each port this server listens on, mapped to the variable that sets it."""

    @abc.abstractmethod
    def programs(self) -> list[Program]:
        """Programs that must be installed before :meth:`prepare`."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The foreground command that runs the server."""

    @abc.abstractmethod
    def healthy(self) -> bool:
        """One quick probe; sets ``last_error`` when it fails."""

    def prepare(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Create data folders and configuration; idempotent."""

    def after_healthy(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Create what must exist inside the running server (database, topics)."""

    def run_as(self) -> pwd.struct_passwd | None:
        """The account to run as (None: the caller's)."""
        return None

    def environment(self) -> dict[str, str]:
        """Variables set for the process on top of the caller's environment."""
        return {}

    def describe(self) -> str:
        return ", ".join(f"{LOOPBACK}:{port}" for port in self.ports())

    def workdir(self) -> Path:
        """The server's own folder under the state folder (its working directory)."""
        return self.paths.state / self.name

    # -- shared behaviour
    def pid(self) -> int | None:
        reap()
        return self.pidfile.live_pid()

    def foreign_port(self) -> int | None:
        """A port of ours that some other process holds, if any."""
        return next((port for port in self.ports() if port_in_use(port)), None)

    def check_ports(self) -> None:
        port = self.foreign_port()
        if port is not None:
            variable = self.ports()[port]
            raise StackError(
                f"port {port} for {self.name} is already in use by another process; "
                f"stop that process or choose another port with {variable}"
            )

    def start(self) -> None:
        """Start the server in the background and record its pid (does not wait)."""
        user = self.run_as()
        env = {**os.environ, **self.environment()}
        if user is not None:
            env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
        with self.log_file.open("ab") as out:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir(),
                env=env,
                # Its own session: a Ctrl-C in the terminal that ran `up` must not reach it.
                start_new_session=True,
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [],
            )
        _CHILDREN.append(self._proc)
        self.pidfile.write(self._proc.pid)
        self.on_started(self._proc.pid)

    def on_started(self, pid: int) -> None:  # noqa: B027 - optional hook
        """Hook after the pid is recorded."""

    def on_stopped(self) -> None:  # noqa: B027 - optional hook
        """Hook after the process is gone."""

    def wait_healthy(self) -> None:
        """Block until :meth:`healthy`; raise StackError if it dies or times out."""
        deadline = time.monotonic() + self.start_timeout
        while not self.healthy():
            if self._proc is not None and self._proc.poll() is not None:
                raise StackError(
                    f"{self.name} exited with code {self._proc.returncode} while starting"
                    f"{self.failure_hint()}"
                )
            if self.pid() is None and self._proc is None:
                raise StackError(f"{self.name} is not running (log: {self.log_file})")
            if time.monotonic() > deadline:
                raise StackError(
                    f"{self.name} not healthy after {self.start_timeout:.0f}s: {self.last_error}"
                    f" (log: {self.log_file})"
                )
            time.sleep(0.2)

    def failure_hint(self) -> str:
        """The last line the server logged, and where its log is."""
        return f"{_tail(self.log_file)} (log: {self.log_file})"

    def stop(self) -> bool:
        """Stop the process recorded in our pid file; False if it was not running."""
        pid = self.pid()
        if pid is None:
            self.pidfile.remove()
            return False
        os.kill(pid, self.stop_signal)
        if not self._wait_gone(pid, self.stop_timeout):
            os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 10.0)
        self.pidfile.remove()
        self.on_stopped()
        return True

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reap()  # our own children must not linger as zombies
            if _start_time(pid) is None:
                return True
            time.sleep(0.1)
        return False


class Postgres(Server):
    """PostgreSQL 15 from the Debian package, data in ``<state>/pg``, trust auth on loopback."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown; SIGTERM would wait for clients to leave
    BIN = Path("/usr/lib/postgresql/15/bin")
    MAX_CONNECTIONS = 200
    # The same in docker-compose.yml's postgres command (its timescaledb image sizes
    # shared_buffers itself, with timescaledb-tune, at initdb). README "Sink performance".
    SHARED_BUFFERS = "1GB"

    def __init__(self, settings: Settings, paths: Paths) -> None:
        super().__init__(settings, paths)
        dsn = urlsplit(settings.metadata_dsn)
        self.port = settings.pg_port()
        self.user = unquote(dsn.username or "postgres")
        self.database = unquote(dsn.path.lstrip("/")) or "postgres"
        self.data = paths.state / "pg"

    def ports(self) -> dict[int, str]:
        return {self.port: "F2PIPE_METADATA_DSN"}

    def programs(self) -> list[Program]:
        return [
            Program("postgres (PostgreSQL 15)", "postgresql-15", str(self.BIN / "postgres")),
            Program("initdb (PostgreSQL 15)", "postgresql-15", str(self.BIN / "initdb")),
        ]

    def run_as(self) -> pwd.struct_passwd | None:
        if not _running_as_root():
            return None
        account = _user("postgres")
        if account is None:
            raise StackError("user postgres is missing; reinstall: apt-get install postgresql-15")
        return account

    def describe(self) -> str:
        return f"{LOOPBACK}:{self.port} database {self.database}"

    def workdir(self) -> Path:
        return self.data

    def prepare(self) -> None:
        if (self.data / "PG_VERSION").is_file():
            return
        account = self.run_as()
        # initdb into a scratch folder renamed on success, so an interrupted initdb
        # never leaves a half-made cluster that the next `up` would refuse.
        scratch = self.data.with_name("pg.initdb")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        if account is not None:
            self._check_reachable(account)
            os.chown(scratch, account.pw_uid, account.pw_gid)
        init_log = self.paths.log / "postgres-initdb.log"
        with init_log.open("ab") as out:
            result = subprocess.run(
                [str(self.BIN / "initdb"), "-D", str(scratch), "-U", self.user,
                 "--auth=trust", "--encoding=UTF8", "--no-locale"],
                stdout=out, stderr=out, cwd=scratch, check=False,
                user=None if account is None else account.pw_uid,
                group=None if account is None else account.pw_gid,
                extra_groups=None if account is None else [],
            )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"initdb failed{_tail(init_log)} (log: {init_log})")
        # Explicit rather than initdb's defaults: trust, and only over loopback.
        hba = scratch / "pg_hba.conf"
        hba.write_text(
            "# Written by `f2pipe stack`: trust on loopback only; nothing else may connect.\n"
            "host all all 127.0.0.1/32 trust\n"
            "host all all ::1/128 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        if account is not None:
            os.chown(hba, account.pw_uid, account.pw_gid)
        try:
            if self.data.exists():
                self.data.rmdir()  # an empty leftover; anything else is not ours to delete
        except OSError:
            raise StackError(
                f"{self.data} holds files but no PostgreSQL cluster; move it away and run up again"
            ) from None
        scratch.rename(self.data)

    def _check_reachable(self, account: pwd.struct_passwd) -> None:
        # The postgres account must be able to walk down to its data folder.
        for folder in reversed(self.data.parents):
            mode = folder.stat()
            if folder.owner() != account.pw_name and not mode.st_mode & 0o001:
                raise StackError(
                    f"user postgres cannot enter {folder}; run `chmod o+x {folder}` or set "
                    "F2PIPE_STATE_DIR to a folder it can reach"
                )

    def command(self) -> list[str]:
        return [
            str(self.BIN / "postgres"), "-D", str(self.data),
            "-c", f"listen_addresses={LOOPBACK}",
            "-c", f"port={self.port}",
            # TCP only: a socket path under a deep state folder can exceed the 107-byte limit.
            "-c", "unix_socket_directories=",
            "-c", f"max_connections={self.MAX_CONNECTIONS}",
            # The default 128MB fills with the sink's dirty pages in seconds, and the
            # COPY backend then writes out every page it evicts itself.
            "-c", f"shared_buffers={self.SHARED_BUFFERS}",
        ]  # fmt: skip

    def _connect(self, dbname: str) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        return psycopg.connect(
            host=LOOPBACK, port=self.port, user=self.user, dbname=dbname,
            connect_timeout=2, autocommit=True,
        )  # fmt: skip

    def healthy(self) -> bool:
        if not port_accepts(self.port):
            self.last_error = f"port {self.port} does not accept connections"
            return False
        try:
            with self._connect("postgres") as conn:
                conn.execute("SELECT 1")
        except Exception as exc:  # any failure means "not yet"; the last one is reported
            self.last_error = str(exc).strip().replace("\n", " ")
            return False
        return True

    def after_healthy(self) -> None:
        from psycopg import sql

        with self._connect("postgres") as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if found is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))


class Redis(Server):
    """Redis 7 from the Debian package, append-only file in ``<state>/redis``."""

    name = "redis"
    start_timeout = 30.0

    def ports(self) -> dict[int, str]:
        return {self.settings.redis_port(): "F2PIPE_REDIS_URL"}

    def programs(self) -> list[Program]:
        return [Program("redis-server", "redis-server")]

    def prepare(self) -> None:
        (self.paths.state / self.name).mkdir(exist_ok=True)

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--bind", LOOPBACK,
            "--port", str(self.settings.redis_port()),
            "--dir", str(self.paths.state / self.name),
            "--appendonly", "yes",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",
        ]  # fmt: skip

    def healthy(self) -> bool:
        import redis

        client = redis.Redis(
            host=LOOPBACK, port=self.settings.redis_port(), socket_connect_timeout=1,
            socket_timeout=1,
        )  # fmt: skip
        try:
            return bool(client.ping())
        except Exception as exc:  # not up yet (refused, loading the AOF, ...)
            self.last_error = str(exc)
            return False
        finally:
            client.close()


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
        if not _libs_current(self.libs):
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
        _check_java()
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
                           "-t", _kafka_cluster_id(), "-c", str(self.home / "server.properties")),
                stdout=out, stderr=out, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"formatting Kafka storage failed{_tail(format_log)}")

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
        return f"{_tail(out) or _tail(log)} (logs: {out}, {log})"

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


def _java_version_text() -> str:
    """What ``java -version`` would say, read from the JDK's release file when possible."""
    java = shutil.which("java")
    if java is not None:
        # bin/java -> <java home>/bin/java; the release file avoids starting a JVM (seconds).
        release = Path(java).resolve().parent.parent / "release"
        with contextlib.suppress(OSError):
            found = re.search(r'JAVA_VERSION="([^"]+)"', release.read_text())
            if found:
                return f'version "{found.group(1)}"'
    result = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    return result.stderr


def _check_java() -> None:
    match = re.search(r'version "(\d+)', _java_version_text())
    major = int(match.group(1)) if match else 0
    if major < 17:
        raise StackError(
            f"Kafka 4 needs Java 17 or newer, found {match.group(1) if match else 'none'}; "
            "install it with: apt-get install -y default-jre-headless"
        )


def _kafka_cluster_id() -> str:
    """A random cluster id in Kafka's form: 16 random bytes, URL-safe base64, no padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):  # Kafka's command-line tools would read it as an option
            return text


def kafka_version() -> str:
    """The Kafka version the broker pom pins."""
    try:
        pom = KAFKA_POM.read_text()
    except OSError:
        raise StackError(f"{KAFKA_POM} is missing; run f2pipe from its checkout") from None
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    if match is None:
        raise StackError(f"{KAFKA_POM} does not set <kafka.version>")
    return match.group(1).strip()


def kafka_libs(version: str) -> Path:
    """``~/.cache/f2pipe/kafka-<version>/libs``: outside the clone, shared by checkouts."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "f2pipe" / f"kafka-{version}" / "libs"


def _pom_digest() -> str:
    return hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()


def _libs_current(libs: Path) -> bool:
    stamp = libs / ".pom-sha256"
    return stamp.is_file() and stamp.read_text().strip() == _pom_digest()


def fetch_kafka_libs(version: str, libs: Path, log: Path) -> None:
    """Copy the broker's jars from Maven Central into ``libs`` unless the pom is unchanged.

    The jars land in a fresh folder that then replaces ``libs`` in one rename, so
    a broker started from the old folder keeps running and no stale jar remains.
    """
    if _libs_current(libs):
        return
    fresh = libs.with_name("libs.new")
    shutil.rmtree(fresh, ignore_errors=True)
    print(f"fetching Kafka {version} jars from Maven Central into {libs} ...", file=sys.stderr)
    with log.open("ab") as out:
        result = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
             f"-DoutputDirectory={fresh}"],
            stdout=out, stderr=out, check=False,
        )  # fmt: skip
    if result.returncode != 0 or not any(fresh.glob("kafka_*.jar")):
        raise StackError(
            f"mvn could not fetch the Kafka jars (log: {log}); check access to Maven Central"
        )
    (fresh / ".pom-sha256").write_text(_pom_digest() + "\n")
    old = libs.with_name("libs.old")
    shutil.rmtree(old, ignore_errors=True)
    if libs.exists():
        libs.rename(old)
    fresh.rename(libs)
    shutil.rmtree(old, ignore_errors=True)


class Mosquitto(Server):
    """Mosquitto 2 from the Debian package, with the configuration f2pipe writes."""

    name = "mosquitto"
    start_timeout = 30.0

    def __init__(self, settings: Settings, paths: Paths) -> None:
        super().__init__(settings, paths)
        self.home = paths.state / "mosquitto"
        # The contract with the certificate authority, which sends SIGHUP to reload the CRL.
        self.broker_pidfile = self.home / "mosquitto.pid"
        self.config: Path | None = None

    def ports(self) -> dict[int, str]:
        return {self.settings.mqtt_port: "F2PIPE_MQTT_PORT"}

    def programs(self) -> list[Program]:
        return [Program("mosquitto", "mosquitto"), Program("mosquitto_pub", "mosquitto-clients")]

    def prepare(self) -> None:
        self.home.mkdir(exist_ok=True)
        self.config = ensure_config(self.settings)
        # Children inherit the limit: thousands of device connections need descriptors.
        raise_fd_limit(self.settings)

    def command(self) -> list[str]:
        assert self.config is not None, "prepare() writes the configuration first"
        mosquitto = Program("mosquitto", "mosquitto").find() or "mosquitto"
        return [mosquitto, "-c", str(self.config)]

    def on_started(self, pid: int) -> None:
        self.broker_pidfile.write_text(f"{pid}\n")

    def on_stopped(self) -> None:
        self.broker_pidfile.unlink(missing_ok=True)

    def healthy(self) -> bool:
        # A TCP accept proves the listener is bound; an MQTT handshake would need a client
        # certificate, and any identity's CONNECT would take over that identity's session.
        if port_accepts(self.settings.mqtt_port):
            return True
        self.last_error = f"port {self.settings.mqtt_port} does not accept connections"
        return False


SERVERS: tuple[type[Server], ...] = (Postgres, Redis, Kafka, Mosquitto)
NAMES = tuple(cls.name for cls in SERVERS)


# --------------------------------------------------------------------------- commands
def _check_settings(settings: Settings) -> None:
    """The stack serves loopback only, on distinct ports; say which variable is wrong."""
    hosts = {
        "F2PIPE_METADATA_DSN": urlsplit(settings.metadata_dsn).hostname or LOOPBACK,
        "F2PIPE_REDIS_URL": urlsplit(settings.redis_url).hostname or LOOPBACK,
        "F2PIPE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap.split(",")[0].rpartition(":")[0],
        "F2PIPE_MQTT_HOST": settings.mqtt_host,
    }
    for variable, host in hosts.items():
        if host.strip("[]") not in _LOOPBACK_NAMES:
            raise ConfigError(
                f"{variable} points at {host}; `f2pipe stack` runs servers on {LOOPBACK} only"
            )
    if urlsplit(settings.redis_url).scheme != "redis":
        raise ConfigError("F2PIPE_REDIS_URL must be redis://127.0.0.1:PORT/DB for the local stack")
    ports = {
        "F2PIPE_METADATA_DSN": settings.pg_port(),
        "F2PIPE_REDIS_URL": settings.redis_port(),
        "F2PIPE_KAFKA_BOOTSTRAP": settings.kafka_port(),
        "F2PIPE_KAFKA_CONTROLLER_PORT": settings.kafka_controller_port,
        "F2PIPE_MQTT_PORT": settings.mqtt_port,
    }
    seen: dict[int, str] = {}
    for variable, port in ports.items():
        if port in seen:
            raise ConfigError(f"{variable} and {seen[port]} both use port {port}; change one")
        seen[port] = variable


def _servers(settings: Settings, names: Sequence[str]) -> list[Server]:
    paths = Paths(settings.state_dir)
    chosen = set(names) or set(NAMES)
    return [cls(settings, paths) for cls in SERVERS if cls.name in chosen]


@contextlib.contextmanager
def locked(paths: Paths, name: str = "stack") -> Iterator[None]:
    """One `up` or `down` of ``name`` at a time per state folder.

    flock locks belong to an open file, so a process holding ``services`` may
    still take ``stack`` (a different file) without deadlocking on itself.
    """
    paths.make()
    with (paths.run / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def up(settings: Settings, names: Sequence[str] = (), record: Path | None = None) -> list[str]:
    """Start every chosen server that is not running and wait until all are healthy.

    Returns the names this call started (also written to ``record``, one per
    line). On any failure, stops those it started and raises.
    """
    _check_settings(settings)
    servers = _servers(settings, names)
    paths = Paths(settings.state_dir)
    with locked(paths):
        todo = [server for server in servers if server.pid() is None]
        for server in todo:
            server.check_ports()
        ensure_programs([p for s in todo for p in s.programs()], paths, settings.stack_install)
        started: list[Server] = []
        try:
            started = _launch(todo)
            for server in servers:
                server.wait_healthy()
                server.after_healthy()
        except BaseException:
            for server in reversed(started):
                server.stop()
            raise
        if record is not None:
            record.write_text("".join(f"{s.name}\n" for s in started))
        for server in servers:
            verb = "started" if server in started else "running"
            print(f"{server.name:<10} {verb:<8} {server.describe()}")
        return [server.name for server in started]


def _launch(servers: list[Server]) -> list[Server]:
    """Prepare and start ``servers`` side by side; all of them, or none left running.

    initdb and Kafka's storage format each take seconds, so they overlap. If any
    fails, the others are allowed to finish and then stopped, and the first
    error is raised.
    """

    def launch(server: Server) -> Server:
        server.pidfile.remove()  # stale: its process is gone
        server.prepare()
        server.start()
        return server

    pool = ThreadPoolExecutor(max_workers=max(1, len(servers)))
    futures = [pool.submit(launch, server) for server in servers]
    try:
        pool.shutdown(wait=True)
        failure = next((f.exception() for f in futures if f.exception() is not None), None)
    except BaseException as interrupted:  # Ctrl-C: let each launch end, then undo them all
        pool.shutdown(wait=True)
        failure = interrupted
    started = [f.result() for f in futures if f.exception() is None]
    if failure is not None:
        for server in reversed(started):
            server.stop()
        raise failure
    return started


def down(settings: Settings, names: Sequence[str] = ()) -> list[str]:
    """Stop the chosen servers we started (reverse order); returns the names stopped."""
    servers = _servers(settings, names)
    stopped = []
    with locked(Paths(settings.state_dir)):
        for server in reversed(servers):
            if server.stop():
                stopped.append(server.name)
                print(f"{server.name:<10} stopped")
            else:
                print(f"{server.name:<10} was not running")
    return stopped


def status(settings: Settings, names: Sequence[str] = ()) -> bool:
    """Print each server up or down; True when all are up (ours and healthy)."""
    all_up = True
    for server in _servers(settings, names):
        pid = server.pid()
        if pid is not None and server.healthy():
            line = f"up       {server.describe()} (pid {pid})"
        elif pid is not None:
            line = f"down     pid {pid} runs but is not healthy: {server.last_error}"
        else:
            port = server.foreign_port()
            held = f" (port {port} is held by another process)" if port is not None else ""
            line = f"down{held}"
        all_up = all_up and line.startswith("up")
        print(f"{server.name:<10} {line}")
    return all_up


def _names(values: Sequence[str]) -> list[str]:
    for value in values:
        if value not in NAMES:
            raise StackError(f"unknown server {value!r}; choose from {', '.join(NAMES)}")
    return list(values)


def _run_up(args: argparse.Namespace) -> int:
    up(load_settings(), _names(args.servers), args.record)
    return 0


def _run_down(args: argparse.Namespace) -> int:
    names = _names(args.servers)
    if args.record is not None:
        try:
            names = _names(args.record.read_text().split())
        except FileNotFoundError:
            names = []
        if not names:
            print("nothing to stop: the record lists no server")
            return 0
    down(load_settings(), names)
    return 0


def _run_status(args: argparse.Namespace) -> int:
    return 0 if status(load_settings(), _names(args.servers)) else 1


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``up``, ``down`` and ``status`` to the ``f2pipe stack`` parser."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    server_help = f"servers to act on (default: all of {', '.join(NAMES)})"

    start = actions.add_parser("up", help="start what is not running and wait until healthy")
    start.add_argument("servers", nargs="*", metavar="SERVER", help=server_help)
    start.add_argument(
        "--record", type=Path, metavar="FILE",
        help="write the names of the servers this call started to FILE, for `down --record`",
    )  # fmt: skip
    start.set_defaults(func=_run_up)

    stop = actions.add_parser("down", help="stop the servers `up` started")
    stop.add_argument("servers", nargs="*", metavar="SERVER", help=server_help)
    stop.add_argument(
        "--record", type=Path, metavar="FILE",
        help="stop only the servers listed in FILE (written by `up --record`)",
    )  # fmt: skip
    stop.set_defaults(func=_run_down)

    show = actions.add_parser("status", help="print each server up or down; exit 1 if any is down")
    show.add_argument("servers", nargs="*", metavar="SERVER", help=server_help)
    show.set_defaults(func=_run_status)
