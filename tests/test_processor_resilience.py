"""The processor loses nothing when Redis, PostgreSQL or the processor itself goes away.

Redis and PostgreSQL here are dedicated servers started for the test on free
ports (the shared development servers are never stopped).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import unique, wait_until
from f2pipe.metadata.database import migrate
from pipeline_helpers import (
    Fleet,
    ProcessorProcess,
    Publisher,
    TopicReader,
    Topics,
    create_topics,
    delete_topics,
    env_payload,
    free_port,
    processor_env,
    wire_env_fleet,
)

pytestmark = [pytest.mark.servers, pytest.mark.slow]


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self._ping, 10, what="redis up")

    def _ping(self) -> bool:
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False
        )
        return result.stdout.strip() == b"PONG"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class PostgresServer:
    """A throw-away cluster owned by ``postgres`` (the server refuses to run as root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="f2pg-", dir="/tmp"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres(
            "pg_ctl", "-D", str(self.data), "-w", "-l", str(self.dir / "log"),
            "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
            "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def remove(self) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", "pg_ctl", "-D", str(self.data), "-m",
             "immediate", "stop"],
            capture_output=True, check=False,
        )  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def topics() -> Iterator[Topics]:
    names = Topics(unique("raw"), unique("processed"), unique("dead"), unique("grp"))
    create_topics([names.raw], partitions=4)
    create_topics([names.processed, names.dead], partitions=1)
    yield names
    delete_topics([names.raw, names.processed, names.dead])


def _metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Stream:
    """Publishes ``count`` telemetry messages round-robin over ``macs`` in a thread."""

    def __init__(self, raw: str, macs: list[str], count: int, rate: float) -> None:
        self.macs, self.count, self.rate = macs, count, rate
        self.publisher = Publisher(raw)
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stopped = threading.Event()
        self.thread.start()

    def _run(self) -> None:
        for seq in range(1, self.count + 1):
            if self.stopped.wait(1.0 / self.rate):
                break
            mac = self.macs[seq % len(self.macs)]
            self.publisher.send(f"tele/f2-{mac}/sensor-mode/J1/sensor-1", env_payload(seq))
            self.publisher.producer.poll(0)
            self.sent = seq
        self.publisher.flush()

    def join(self) -> None:
        self.thread.join(120)
        assert not self.thread.is_alive()


def test_redis_stop_postgres_restart_and_kill9_lose_and_misroute_nothing(
    topics: Topics, tmp_path: Path
) -> None:
    redis_server, pg = RedisServer(), PostgresServer()
    proc: ProcessorProcess | None = None
    try:
        migrate(pg.dsn)
        macs = [f"c0ffee0000{i:02x}" for i in range(6)]
        wire_env_fleet(pg.dsn, macs)
        env = processor_env(pg.dsn, topics, F2PIPE_REDIS_URL=redis_server.url)
        proc = ProcessorProcess(env, tmp_path / "processor.log")
        out, dead = TopicReader(topics.processed), TopicReader(topics.dead)
        total = 1500
        stream = Stream(topics.raw, macs, total, rate=100)

        def progressed(by: int) -> bool:
            return len(out.poll()) >= 3 * min(stream.sent, total) - by and stream.sent > 0

        wait_until(lambda: len(out.poll()) >= 150, 30, what="first readings")
        # 1. Redis goes away, then the metadata changes so the caches must refill.
        redis_server.stop()
        fleet = Fleet(pg.dsn)
        extra = fleet.controller("c0ffee0000ff")
        assert extra > 0
        before = len(out.poll())
        wait_until(lambda: len(out.poll()) >= before + 150, 30, what="progress without Redis")
        # 2. PostgreSQL restarts: the processor pauses, then carries on.
        fleet.close()
        pg.stop()
        wait_until(lambda: _metric(proc.port, "f2pipe_processor_paused") == 1, 15, what="pause")
        pg.start()
        before = len(out.poll())
        wait_until(lambda: len(out.poll()) >= before + 150, 30, what="progress after PG restart")
        # 3. The processor dies without warning and comes back (Redis still down).
        proc.kill()
        proc.start()
        before = len(out.poll())
        wait_until(lambda: len(out.poll()) >= before + 150, 30, what="progress after kill -9")
        redis_server.start()
        stream.join()
        wait_until(lambda: progressed(0), 60, what="every message decoded")
    finally:
        if proc is not None:
            proc.stop()
        redis_server.stop()
        pg.remove()

    keys = {(v["device_id"], v["datapoint_id"], v["ts"]) for v in (r.json() for r in out.records)}
    assert len(keys) == 3 * total  # every message yielded its three readings
    assert dead.poll() == []  # none mis-dead-lettered


def test_two_processors_split_the_partitions_and_produce_every_reading(
    fresh_db: str, topics: Topics, tmp_path: Path
) -> None:
    macs = [f"5ca1e00000{i:02x}" for i in range(16)]
    wire_env_fleet(fresh_db, macs)
    procs = [
        ProcessorProcess(processor_env(fresh_db, topics), tmp_path / f"p{i}.log") for i in (1, 2)
    ]
    out = TopicReader(topics.processed)
    try:
        wait_until(
            lambda: (
                [_metric(p.port, "f2pipe_processor_assigned_partitions") for p in procs]
                in ([2.0, 2.0], [1.0, 3.0], [3.0, 1.0])
            ),
            60,
            what="both processors own partitions",
        )
        stream = Stream(topics.raw, macs, 800, rate=400)
        stream.join()
        wait_until(lambda: len(out.poll()) >= 3 * 800, 60, what="every reading")
        consumed = [_metric(p.port, "f2pipe_processor_consumed_total") for p in procs]
    finally:
        for p in procs:
            p.stop()
    keys = {(v["device_id"], v["datapoint_id"], v["ts"]) for v in (r.json() for r in out.records)}
    assert len(keys) == 3 * 800
    assert all(c > 0 for c in consumed), consumed
    assert sum(consumed) >= 800
