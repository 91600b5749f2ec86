"""Redis 7: the lookup cache of the local stack, append-only file in ``<state>/redis``."""

from __future__ import annotations

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
