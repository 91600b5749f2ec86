"""The compose file's Redis users and PostgreSQL roles, run on the real servers.

``deploy/redis/redis.sh`` starts a private Redis here exactly as in its
container (the script's arguments go to redis-server, so only the port and the
folder differ); ``deploy/postgres/*-roles.sql`` runs with psql against a fresh
migrated database, inside one transaction that is rolled back at the end, so
the shared server's roles are untouched.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import wait_until
from f2pipe.operations.principals import PRINCIPALS, REDIS_CACHE_PATTERN
from f2pipe.testing.servers import free_port, port_open

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.servers


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "REDIS_PASSWORD": "admin-secret",
        "PROCESSOR_REDIS_PASSWORD": "processor-secret",
    }
    process = subprocess.Popen(
        ["sh", str(ROOT / "deploy/redis/redis.sh"), "--port", str(port), "--dir", str(tmp_path),
         "--bind", "127.0.0.1", "--save", ""],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: port_open(port), timeout=20, what="redis to listen")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_redis_holds_the_processor_to_its_cache_keys(redis_port: int) -> None:
    import redis

    processor = next(p for p in PRINCIPALS if p.redis_user)
    with (
        redis.Redis(port=redis_port, socket_timeout=5) as nobody,
        pytest.raises(redis.AuthenticationError),
    ):
        nobody.ping()  # the default user is off
    with redis.Redis(
        port=redis_port, username=processor.redis_user, password="processor-secret"
    ) as cache:
        key = REDIS_CACHE_PATTERN.replace("*", "aabbccddee01")
        assert cache.set(key, b"x")
        assert cache.get(key) == b"x"
        with pytest.raises(redis.exceptions.NoPermissionError):
            cache.set("elsewhere", b"x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            cache.flushall()
    with redis.Redis(port=redis_port, username="f2pipe-admin", password="admin-secret") as admin:
        assert admin.get("elsewhere") is None
        assert admin.dbsize() == 1


def test_the_roles_get_exactly_their_grants(fresh_db: str) -> None:
    def privilege(role: str, table: str, what: str) -> str:
        return f"SELECT has_table_privilege('{role}', '{table}', '{what}')"

    checks = [
        privilege("f2pipe_processor", "devices", "SELECT"),
        privilege("f2pipe_processor", "devices", "UPDATE"),
        privilege("f2pipe_certgen", "certificates", "UPDATE"),
        privilege("f2pipe_certgen", "decoded_data", "SELECT"),
        privilege("f2pipe_sink", "decoded_data", "INSERT"),
        privilege("f2pipe_sink", "devices", "SELECT"),
        "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'f2pipe_sink'",
    ]
    # Both scripts on one database here (the compose file runs each on its own server).
    command = ["psql", fresh_db, "-X", "-q", "-t", "-A", "-1", "-v", "ON_ERROR_STOP=1"]
    for service in ("certgen", "processor", "sink"):
        command += ["-v", f"{service}_password=secret-{service}"]
    for name in ("metadata", "timeseries"):
        command += ["-f", str(ROOT / f"deploy/postgres/{name}-roles.sql")]
    for check in checks:
        command += ["-c", check]
    command += ["-c", "ROLLBACK"]  # leave the server's roles as they were
    out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.split() if line in ("t", "f")]
    assert answers == ["t", "f", "t", "f", "t", "f", "t"]
    roles = {p.pg_role for p in PRINCIPALS if p.pg_role}
    text = "".join(
        (ROOT / f"deploy/postgres/{n}-roles.sql").read_text() for n in ("metadata", "timeseries")
    )
    assert all(f"'{role}'" in text for role in roles)
