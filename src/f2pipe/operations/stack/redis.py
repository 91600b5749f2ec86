"""Redis 7: the lookup cache of the local stack, append-only file in ``<state>/redis``.

Secured (``F2PIPE_STACK_SECURED``, the default), the default user is off and
every client logs in as an ACL user of ``<state>/redis/users.acl`` (0600),
rewritten at each start from :mod:`f2pipe.operations.principals`: the
operator, and the processor limited to the lookup cache's keys.
"""

from __future__ import annotations

from f2pipe.operations.principals import ADMIN
from f2pipe.operations.stack import rights, security
from f2pipe.operations.stack.install import Program
from f2pipe.operations.stack.server import Server
from f2pipe.operations.stack.supervise import LOOPBACK


class Redis(Server):
    """Redis 7 from the Debian package, append-only file in ``<state>/redis``."""

    name = "redis"
    start_timeout = 30.0

    def ports(self) -> dict[int, str]:
        return {self.settings.redis_port(): "F2PIPE_REDIS_URL"}

    def programs(self) -> list[Program]:
        return [Program("redis-server", "redis-server")]

    def _acl_file(self) -> str:
        return str(self.paths.state / self.name / "users.acl")

    def prepare(self) -> None:
        (self.paths.state / self.name).mkdir(exist_ok=True)
        secured = self.settings.stack_secured
        if secured:
            acl = rights.redis_acl(self.settings, self.paths)
            security.write_private_text(self.paths.state / self.name / "users.acl", acl)
        security.mark(self.paths, self.name, secured)

    def command(self) -> list[str]:
        acl = ["--aclfile", self._acl_file()] if security.is_secured(self.paths, self.name) else []
        return [
            "redis-server",
            "--bind", LOOPBACK,
            "--port", str(self.settings.redis_port()),
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
        client = redis.Redis(
            host=LOOPBACK, port=self.settings.redis_port(), socket_connect_timeout=1,
            socket_timeout=1, username=ADMIN if secured else None,
            password=security.password(self.paths, f"redis-{ADMIN}") if secured else None,
        )  # fmt: skip
        try:
            return bool(client.ping())
        except Exception as exc:  # not up yet (refused, loading the AOF, ...)
            self.last_error = str(exc)
            return False
        finally:
            client.close()
