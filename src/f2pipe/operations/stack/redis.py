"""Redis 7: the lookup cache of the local stack, append-only file in ``<state>/redis``.

Secured (``F2PIPE_STACK_SECURED``, the default), the default user is off and
every client logs in as an ACL user of ``<state>/redis/users.acl`` (0600),
rewritten at each start from :mod:`f2pipe.operations.principals`: the
operator, and the processor limited to the lookup cache's keys.

It listens on the host of ``F2PIPE_REDIS_URL``: on loopback in plain TCP, on
any other address of this machine over TLS only (``rediss://``, SPEC section
10), with a server certificate from f2pipe's CA naming that host; clients
check it against the CA and the name (no client certificates).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from f2pipe.operations.principals import ADMIN
from f2pipe.operations.stack import rights, security
from f2pipe.operations.stack.install import Program
from f2pipe.operations.stack.server import Server
from f2pipe.operations.stack.supervise import LOOPBACK, address_of, is_loopback


class Redis(Server):
    """Redis 7 from the Debian package, append-only file in ``<state>/redis``."""

    name = "redis"
    start_timeout = 30.0

    def host(self) -> str:
        return urlsplit(self.settings.redis_url).hostname or LOOPBACK

    def tls(self) -> bool:
        """TLS only: the server is reached on an address other than loopback."""
        return not is_loopback(self.host())

    def ports(self) -> dict[int, str]:
        return {self.settings.redis_port(): "F2PIPE_REDIS_URL"}

    def programs(self) -> list[Program]:
        return [Program("redis-server", "redis-server")]

    def _acl_file(self) -> str:
        return str(self.paths.state / self.name / "users.acl")

    def prepare(self) -> None:
        home = self.paths.state / self.name
        home.mkdir(exist_ok=True)
        secured = self.settings.stack_secured
        if secured:
            acl = rights.redis_acl(self.settings, self.paths)
            security.write_private_text(home / "users.acl", acl)
        if self.tls():
            security.server_tls(self.settings, home, "f2pipe redis", None, self.host())
        security.mark(self.paths, self.name, secured)

    def command(self) -> list[str]:
        acl = ["--aclfile", self._acl_file()] if security.is_secured(self.paths, self.name) else []
        port = ["--port", str(self.settings.redis_port())]
        if self.tls():
            home = self.paths.state / self.name
            port = [
                "--port", "0", "--tls-port", str(self.settings.redis_port()),
                "--tls-cert-file", str(home / "server.crt"),
                "--tls-key-file", str(home / "server.key"),
                "--tls-ca-cert-file", str(security.ca_file(self.settings)),
                "--tls-auth-clients", "no",
                "--tls-protocols", "TLSv1.2 TLSv1.3",
            ]  # fmt: skip
        return [
            "redis-server",
            "--bind", address_of(self.host()),
            *port,
            "--dir", str(self.paths.state / self.name),
            "--appendonly", "yes",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",
            *acl,
        ]  # fmt: skip

    def healthy(self) -> bool:
        import redis

        secured = security.is_secured(self.paths, self.name)
        tls: dict[str, Any] = {}
        if self.tls():
            tls = {"ssl": True, "ssl_ca_certs": str(security.ca_file(self.settings))}
        client = redis.Redis(
            host=self.host(), port=self.settings.redis_port(), socket_connect_timeout=1,
            socket_timeout=1, username=ADMIN if secured else None,
            password=security.password(self.paths, f"redis-{ADMIN}") if secured else None,
            **tls,
        )  # fmt: skip
        try:
            return bool(client.ping())
        except Exception as exc:  # not up yet (refused, loading the AOF, ...)
            self.last_error = str(exc)
            return False
        finally:
            client.close()
