"""PostgreSQL 15 or newer: the metadata and time-series database of the local stack.

Data in ``<state>/pg`` (or where :mod:`.pgcluster` places it), listening on
the host of ``F2PIPE_METADATA_DSN`` (loopback by default; another address of
this machine only secured, see :mod:`.commands`). Secured (the default),
scram-sha-256 passwords over TLS and one role per service (:mod:`.rights`);
``F2PIPE_STACK_SECURED=false``: trust. Run as root, the server and initdb run
as the ``postgres`` user (PostgreSQL refuses root). The major, TimescaleDB's
preload and the data folder's place are chosen in :mod:`.pgcluster`.
Once healthy, the database named by ``F2PIPE_METADATA_DSN`` is created if missing
and, secured, the services' login roles with their generated passwords.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from f2pipe.errors import StackError
from f2pipe.operations.stack import pgcluster, rights, security
from f2pipe.operations.stack.install import Program
from f2pipe.operations.stack.server import Server
from f2pipe.operations.stack.supervise import (
    LOOPBACK,
    Paths,
    address_of,
    is_loopback,
    log_tail,
    port_accepts,
    running_as_root,
    user_account,
)
from f2pipe.settings import Settings

if TYPE_CHECKING:
    import psycopg


class Postgres(Server):
    """PostgreSQL from the Debian packages, data in ``<state>/pg``, on the DSN's host."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown; SIGTERM would wait for clients to leave
    MAX_CONNECTIONS = 200
    # The same in docker-compose.yml's postgres command (its timescaledb image sizes
    # shared_buffers itself, with timescaledb-tune, at initdb). README "Sink performance".
    SHARED_BUFFERS = "1GB"

    def __init__(self, settings: Settings, paths: Paths) -> None:
        super().__init__(settings, paths)
        dsn = urlsplit(settings.metadata_dsn)
        self.port = settings.pg_port()
        self.user = security.pg_user(settings)
        self.database = unquote(dsn.path.lstrip("/")) or "postgres"
        self.data = pgcluster.data_folder(paths.state, self._account())

    def _account(self) -> pwd.struct_passwd | None:
        return user_account("postgres") if running_as_root() else None

    def release(self) -> pgcluster.Release | None:
        """The installed major that runs this cluster (None: not installed)."""
        return pgcluster.choose(self.data)

    def _release(self) -> pgcluster.Release:
        release = self.release()
        if release is None:
            raise StackError(f"no PostgreSQL {pgcluster.MIN_MAJOR} or newer is installed")
        return release

    def _bin(self) -> Path:
        return self._release().bin

    def _locate(self, program: str) -> str | None:
        release = self.release()
        return None if release is None else str(release.bin / program)

    def ports(self) -> dict[int, str]:
        return {self.port: "F2PIPE_METADATA_DSN"}

    def programs(self) -> list[Program]:
        made_by = pgcluster.cluster_major(self.data)
        if made_by is None:  # the distribution's default major, 15 or newer
            version, package = f"PostgreSQL {pgcluster.MIN_MAJOR} or newer", "postgresql"
        else:  # only the major that made the cluster can open it
            version, package = f"PostgreSQL {made_by}, its cluster's", f"postgresql-{made_by}"
        return [
            Program(f"{name} ({version})", package, locate=functools.partial(self._locate, name))
            for name in ("postgres", "initdb")
        ]

    def run_as(self) -> pwd.struct_passwd | None:
        if not running_as_root():
            return None
        account = user_account("postgres")
        if account is None:
            raise StackError("user postgres is missing; reinstall: apt-get install postgresql")
        return account

    def host(self) -> str:
        return urlsplit(self.settings.metadata_dsn).hostname or LOOPBACK

    def describe(self) -> str:
        return f"{self.host()}:{self.port} database {self.database}"

    def workdir(self) -> Path:
        return self.data

    def prepare(self) -> None:
        account = self.run_as()
        # Placed again now that the postgres account surely exists (apt-get may just have
        # made it): a folder it cannot reach moves the cluster to one it can.
        self.data = pgcluster.data_folder(self.paths.state, account)
        if account is not None and self.data != self.paths.state / "pg":
            pgcluster.make_outside(self.paths.state, self.data, account)  # also records it
        if (self.data / "PG_VERSION").is_file():
            return
        # initdb into a scratch folder renamed on success, so an interrupted initdb
        # never leaves a half-made cluster that the next `up` would refuse.
        scratch = self.data.with_name("pg.initdb")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        if account is not None:
            os.chown(scratch, account.pw_uid, account.pw_gid)
        init_log = self.paths.log / "postgres-initdb.log"
        with init_log.open("ab") as out:
            result = subprocess.run(
                [str(self._bin() / "initdb"), "-D", str(scratch), "-U", self.user,
                 "--auth=trust", "--encoding=UTF8", "--no-locale"],
                stdout=out, stderr=out, cwd=scratch, check=False,
                user=None if account is None else account.pw_uid,
                group=None if account is None else account.pw_gid,
                extra_groups=None if account is None else [],
            )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"initdb failed{log_tail(init_log)} (log: {init_log})")
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

    def command(self) -> list[str]:
        return [
            str(self._bin() / "postgres"), "-D", str(self.data),
            "-c", f"listen_addresses={address_of(self.host())}",
            "-c", f"port={self.port}",
            # TCP only: a socket path under a deep state folder can exceed the 107-byte limit.
            "-c", "unix_socket_directories=",
            "-c", f"max_connections={self.MAX_CONNECTIONS}",
            # The default 128MB fills with the sink's dirty pages in seconds, and the
            # COPY backend then writes out every page it evicts itself.
            "-c", f"shared_buffers={self.SHARED_BUFFERS}",
            *pgcluster.server_options(self._release()),
        ]  # fmt: skip

    def _connect(self, dbname: str) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        secured = security.is_secured(self.paths, self.name)
        host = self.host()
        # Off loopback the server's name is checked too (SPEC section 10).
        loopback = is_loopback(host)
        return psycopg.connect(
            host=host, port=self.port, user=self.user, dbname=dbname,
            connect_timeout=2, autocommit=True,
            password=security.pg_admin_password(self.paths) if secured else None,
            sslmode=("require" if loopback else "verify-full") if secured else "prefer",
            sslrootcert=None if loopback else str(security.ca_file(self.settings)),
        )  # fmt: skip

    def healthy(self) -> bool:
        if not port_accepts(self.port, host=self.host()):
            self.last_error = f"port {self.port} does not accept connections"
            return False
        try:
            with self._connect("postgres") as conn:
                conn.execute("SELECT 1")
        except Exception as exc:  # any failure means "not yet"; the last one is reported
            self.last_error = str(exc).strip().replace("\n", " ")
            if "password authentication failed" in self.last_error:
                # The password file changed while the server ran: it is applied at a start.
                self.last_error = (
                    f"PostgreSQL refuses the password in {security.secrets_dir(self.paths)}"
                    "/postgres-admin.password; restart it to apply that file "
                    "(f2pipe stack down postgres, then f2pipe stack up)"
                )
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
            if security.is_secured(self.paths, self.name):
                rights.create_roles(conn, self.settings, self.paths)

    def start(self) -> None:
        # Authentication and TLS are set before every start, so the mode always follows
        # F2PIPE_STACK_SECURED and a cluster made by an older f2pipe is secured too.
        postgres = Path(self.command()[0])
        rights.secure_postgres(self.settings, self.paths, self.data, postgres, self.run_as())
        super().start()
