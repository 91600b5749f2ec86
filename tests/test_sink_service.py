"""``f2pipe sink`` as a process against the real Kafka and PostgreSQL.

Each test creates its own topics and consumer group, runs the sink as a
subprocess (so it can be SIGKILLed), and checks the rows of decoded_data as a
set of (timestamp, device_id, datapoint_id, value) against what was produced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import unique, wait_until
from f2pipe.metadata.database import migrate
from f2pipe.runtime.kafka import admin_config, client_config, producer_config
from f2pipe.settings import Settings, get_settings, load_settings
from f2pipe.sink.batching import Batch, CommitPolicy
from f2pipe.sink.runner import Sink
from f2pipe.sink.writer import WriteResult

pytestmark = pytest.mark.servers

ROOT = Path(__file__).resolve().parents[1]
F2PIPE = ROOT / ".venv" / "bin" / "f2pipe"
T0 = datetime(2026, 5, 1, tzinfo=UTC)
Expected = set[tuple[datetime, int, int, float]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Topics:
    processed: str
    dead_letter: str
    group: str


@contextlib.contextmanager
def sink_topics(prefix: str, partitions: int) -> Iterator[Topics]:
    """A processed topic of ``partitions`` partitions, a one-partition dead-letter topic
    and a group, all named afresh from ``prefix``; the topics are deleted afterwards."""
    admin = AdminClient(admin_config(get_settings()))
    names = Topics(unique(f"{prefix}-in"), unique(f"{prefix}-dlq"), unique(f"{prefix}-group"))
    futures = admin.create_topics(
        [NewTopic(names.processed, partitions, 1), NewTopic(names.dead_letter, 1, 1)]
    )
    for fut in futures.values():
        fut.result(30)
    yield names
    for fut in admin.delete_topics([names.processed, names.dead_letter]).values():
        with contextlib.suppress(Exception):  # cleanup only
            fut.result(30)


def sink_settings(dsn: str, topics: Topics, **extra: object) -> Settings:
    """An in-process sink's settings: ``dsn`` for both databases and ``topics``."""
    return load_settings(
        timeseries_dsn=dsn,
        metadata_dsn=dsn,
        topic_processed=topics.processed,
        topic_dead_letter=topics.dead_letter,
        sink_group=topics.group,
        **extra,
    )


@pytest.fixture
def topics() -> Iterator[Topics]:
    with sink_topics("sink", 3) as names:
        yield names


def readings(start: int, count: int, devices: int = 40) -> list[tuple[bytes, bytes]]:
    """``count`` processor records (key, value); reading i is unique by (ts, device, datapoint)."""
    out = []
    for i in range(start, start + count):
        device, datapoint = 1 + i % devices, 1 + (i // devices) % 3
        ts = T0 + timedelta(seconds=i // (devices * 3))
        value = orjson.dumps(
            {
                "v": 1,
                "ts": ts.isoformat(),
                "device_id": device,
                "datapoint_id": datapoint,
                "value": i / 4,
            }
        )
        out.append((f"{device}:{datapoint}".encode(), value))
    return out


def expected_rows(records: list[tuple[bytes, bytes]]) -> Expected:
    rows: Expected = set()
    for _, raw in records:
        r = orjson.loads(raw)
        rows.add(
            (datetime.fromisoformat(r["ts"]), r["device_id"], r["datapoint_id"], float(r["value"]))
        )
    return rows


def produce(
    topic: str, records: list[tuple[bytes, bytes]], headers: list[tuple[str, bytes]] | None = None
) -> None:
    producer = Producer(producer_config(get_settings()))
    for key, value in records:
        producer.produce(topic, value, key, headers=headers)
        producer.poll(0)
    assert producer.flush(60) == 0


def stored(dsn: str) -> Expected:
    with psycopg.connect(dsn, connect_timeout=3) as conn:
        return set(conn.execute("SELECT * FROM decoded_data").fetchall())


def count(dsn: str) -> int:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            row = conn.execute("SELECT count(*) FROM decoded_data").fetchone()
            return int(row[0]) if row else 0
    except psycopg.OperationalError:
        return -1


class SinkProcess:
    """One ``f2pipe sink`` subprocess with its own ops port; logs kept for failures."""

    def __init__(self, dsn: str, topics: Topics, tmp: Path, **env: str) -> None:
        self.port = free_port()
        self.log_path = tmp / f"sink-{self.port}.log"
        environ = dict(os.environ)
        environ.update(
            F2PIPE_TIMESERIES_DSN=dsn,
            F2PIPE_METADATA_DSN=dsn,
            F2PIPE_TOPIC_PROCESSED=topics.processed,
            F2PIPE_TOPIC_DEAD_LETTER=topics.dead_letter,
            F2PIPE_SINK_GROUP=topics.group,
            F2PIPE_SINK_PORT=str(self.port),
            F2PIPE_SINK_BACKOFF_MAX_MS="1000",
        )
        environ.update(env)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(F2PIPE), "sink"], env=environ, stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_until(self.healthy, timeout=60, what="sink /healthz")

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def healthy(self) -> bool:
        assert self.proc.poll() is None, self.logs()
        return self._get("/healthz")[0] == 200

    def ready(self) -> bool:
        return self._get("/readyz")[0] == 200

    def metric(self, name: str, labels: str = "") -> float:
        """The value of ``name{labels}`` (0 if absent) from /metrics."""
        _, text = self._get("/metrics")
        want = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._log.close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self._log.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[list[SinkProcess]]:
    started: list[SinkProcess] = []
    yield started
    for sink in started:
        if sink.proc.poll() is None:
            sink.kill()


def start(sinks: list[SinkProcess], dsn: str, topics: Topics, tmp: Path, **env: str) -> SinkProcess:
    sink = SinkProcess(dsn, topics, tmp, **env)
    sinks.append(sink)
    return sink


def dead_letters(
    topic: str, expect: int
) -> list[tuple[bytes | None, bytes | None, dict[str, bytes]]]:
    consumer = Consumer(
        {
            **client_config(get_settings()),
            "group.id": unique("dlq-read"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    found: list[tuple[bytes | None, bytes | None, dict[str, bytes]]] = []
    deadline = time.monotonic() + 60
    while len(found) < expect and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        found.append((msg.key(), msg.value(), dict(msg.headers() or [])))
    consumer.close()
    return found


def high_watermarks(topic: str, partitions: int) -> int:
    consumer = Consumer({**client_config(get_settings()), "group.id": unique("wm")})
    total = 0
    for p in range(partitions):
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        total += high
    consumer.close()
    return total


def reset_group(topics: Topics) -> None:
    """Move the (idle) group's committed offsets back to the start of every partition."""
    admin = AdminClient(admin_config(get_settings()))
    request = ConsumerGroupTopicPartitions(
        topics.group, [TopicPartition(topics.processed, p, 0) for p in range(3)]
    )
    for fut in admin.alter_consumer_group_offsets([request]).values():
        fut.result(30)


# --- tests ------------------------------------------------------------------------------


def test_redelivery_after_a_group_reset_stores_each_reading_once(
    fresh_db: str, topics: Topics, sinks: list[SinkProcess], tmp_path: Path
) -> None:
    records = readings(0, 3000)
    produce(topics.processed, records)
    sink = start(sinks, fresh_db, topics, tmp_path)
    wait_until(lambda: count(fresh_db) == 3000, timeout=120, what="first delivery stored")
    assert stored(fresh_db) == expected_rows(records)
    wait_until(lambda: sink.metric("f2pipe_sink_rows_written_total") == 3000, timeout=30)
    assert sink.metric("f2pipe_sink_duplicates_ignored_total") == 0
    wait_until(sink.ready, timeout=30, what="/readyz")

    # A replay while running: 500 readings again, 100 of them with another value.
    replay = records[:400] + [
        (key, orjson.dumps({**orjson.loads(value), "value": -1.0}))
        for key, value in records[400:500]
    ]
    produce(topics.processed, replay)
    wait_until(
        lambda: sink.metric("f2pipe_sink_duplicates_ignored_total") == 500,
        timeout=120,
        what="500 duplicates ignored",
    )
    assert sink.terminate() == 0

    # A consumer group reset: all 3500 records are delivered again to a new sink process.
    reset_group(topics)
    again = start(sinks, fresh_db, topics, tmp_path)
    wait_until(
        lambda: again.metric("f2pipe_sink_duplicates_ignored_total") == 3500,
        timeout=120,
        what="3500 duplicates ignored after the reset",
    )
    assert again.metric("f2pipe_sink_rows_written_total") == 0
    assert stored(fresh_db) == expected_rows(records)  # first write won
    with psycopg.connect(fresh_db) as conn:
        wrong = conn.execute(
            "SELECT count(*) FROM latest_readings l JOIN decoded_data d"
            " USING (device_id, datapoint_id, timestamp) WHERE d.value IS DISTINCT FROM l.value"
        ).fetchone()
        keys = conn.execute("SELECT count(*) FROM latest_readings").fetchone()
    assert wrong == (0,)
    assert keys == (120,)
    assert again.terminate() == 0


def test_kill_9_mid_stream_then_restart_stores_exactly_the_expected_rows(
    fresh_db: str, topics: Topics, sinks: list[SinkProcess], tmp_path: Path
) -> None:
    records = readings(0, 60000)
    produce(topics.processed, records)
    small = {"F2PIPE_SINK_BATCH_ROWS": "1000", "F2PIPE_SINK_BATCH_AGE_MS": "200"}
    sink = start(sinks, fresh_db, topics, tmp_path, **small)
    wait_until(lambda: count(fresh_db) >= 5000, timeout=120, what="some rows stored")
    sink.kill()
    partial = count(fresh_db)
    assert 0 < partial < 60000, "the kill should land mid-stream"
    start(sinks, fresh_db, topics, tmp_path, **small)
    wait_until(lambda: count(fresh_db) == 60000, timeout=180, what="all rows after restart")
    assert stored(fresh_db) == expected_rows(records)


def test_a_poisoned_record_is_dead_lettered_and_the_rest_lands(
    fresh_db: str, topics: Topics, sinks: list[SinkProcess], tmp_path: Path
) -> None:
    # A constraint the database enforces and the sink cannot know about.
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE decoded_data ADD CONSTRAINT plausible CHECK (value < 1e12)")
    good = readings(0, 6000)
    refused = (
        b"9:1",
        orjson.dumps(
            {"v": 1, "ts": T0.isoformat(), "device_id": 9, "datapoint_id": 1, "value": 1e15}
        ),
    )
    garbage = (b"9:2", b'{"v":1,"ts":')
    records = [*good[:2500], refused, *good[2500:4000], garbage, *good[4000:]]
    produce(topics.processed, records, headers=[("trace", b"t-1")])
    sink = start(
        sinks,
        fresh_db,
        topics,
        tmp_path,
        F2PIPE_SINK_BATCH_ROWS="20000",
        F2PIPE_SINK_BATCH_AGE_MS="3000",
    )
    letters = dead_letters(topics.dead_letter, 2)
    assert len(letters) == 2, sink.logs()
    by_key = {key: (value, headers) for key, value, headers in letters}
    for key, value in (refused, garbage):
        got_value, headers = by_key[key]
        assert got_value == value
        assert headers["trace"] == b"t-1"
        assert headers["dlq.stage"] == b"sink"
        assert headers["dlq.reason"] == b"sink_rejected"
        topic, partition, offset = headers["dlq.source"].decode().rsplit("/", 2)
        assert topic == topics.processed
        assert int(partition) in range(3)
        assert int(offset) >= 0
        assert int(headers["dlq.ts"]) > 0
    assert b"plausible" in by_key[b"9:1"][1]["dlq.detail"]
    assert b"invalid JSON" in by_key[b"9:2"][1]["dlq.detail"]
    wait_until(lambda: count(fresh_db) == 6000, timeout=60, what="all good rows")
    assert stored(fresh_db) == expected_rows(good)
    wait_until(
        lambda: (
            sink.metric("f2pipe_dead_letters_total", 'reason="sink_rejected",stage="sink"') == 2
        ),
        timeout=30,
        what="dead-letter metric",
    )
    assert sink.metric("f2pipe_sink_rejected_rows_total", 'cause="database"') == 1
    assert sink.metric("f2pipe_sink_rejected_rows_total", 'cause="parse"') == 1
    assert sink.terminate() == 0


# --- a PostgreSQL of our own, to restart --------------------------------------------------


@dataclass
class OwnPostgres:
    data: Path
    port: int
    bin: Path

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/f2pipe"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.data.parent / "pg.log"),
                "-w",
                "-t",
                "60",
                *args,
            ],
            check=True,
            capture_output=True,
        )


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL cluster for one test (initdb into a temp dir, user postgres, free port)."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not installed")
    base = Path(tempfile.mkdtemp(prefix="f2pipe-pg-"))
    shutil.chown(base, "postgres", "postgres")
    data = base / "data"
    subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    server = OwnPostgres(data, free_port(), bin_dir)
    server.ctl("-o", f"-p {server.port} -k {base} -c listen_addresses=127.0.0.1", "start")
    try:
        with psycopg.connect(server.dsn.rsplit("/", 1)[0] + "/postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE f2pipe")
        migrate(server.dsn)
        yield server
    finally:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_restart_mid_stream_loses_and_duplicates_nothing(
    own_postgres: OwnPostgres, topics: Topics, sinks: list[SinkProcess], tmp_path: Path
) -> None:
    dsn = own_postgres.dsn
    first, second = readings(0, 20000), readings(20000, 20000)
    small = {"F2PIPE_SINK_BATCH_ROWS": "1000", "F2PIPE_SINK_BATCH_AGE_MS": "200"}
    sink = start(sinks, dsn, topics, tmp_path, **small)
    produce(topics.processed, first)
    wait_until(lambda: count(dsn) >= 2000, timeout=120, what="some rows stored")

    own_postgres.ctl("-m", "fast", "stop")
    produce(topics.processed, second)  # arrives while the database is down
    wait_until(
        lambda: sink.metric("f2pipe_sink_db_retries_total") >= 2,
        timeout=60,
        what="the sink noticing the outage",
    )
    assert not sink.ready()
    own_postgres.ctl(
        "-o",
        f"-p {own_postgres.port} -k {own_postgres.data.parent} -c listen_addresses=127.0.0.1",
        "start",
    )

    wait_until(lambda: count(dsn) == 40000, timeout=180, what="all rows after the restart")
    assert stored(dsn) == expected_rows(first + second)
    wait_until(sink.ready, timeout=30, what="/readyz after the restart")
    assert high_watermarks(topics.dead_letter, 1) == 0
    assert sink.proc.poll() is None
    assert sink.terminate() == 0


def test_sigterm_writes_the_open_batch_and_commits_it(
    fresh_db: str, topics: Topics, sinks: list[SinkProcess], tmp_path: Path
) -> None:
    records = readings(0, 500)
    # A batch that neither fills nor ages during the test: only shutdown writes it.
    sink = start(
        sinks,
        fresh_db,
        topics,
        tmp_path,
        F2PIPE_SINK_BATCH_ROWS="100000",
        F2PIPE_SINK_BATCH_AGE_MS="600000",
        F2PIPE_SINK_FLUSH_WHEN_CAUGHT_UP="false",
    )
    produce(topics.processed, records)
    wait_until(
        lambda: sink.metric("f2pipe_sink_records_consumed_total") == 500,
        timeout=60,
        what="records consumed",
    )
    assert count(fresh_db) == 0
    assert sink.terminate() == 0
    assert stored(fresh_db) == expected_rows(records)
    consumer = Consumer({**client_config(get_settings()), "group.id": topics.group})
    committed = consumer.committed(
        [TopicPartition(topics.processed, p) for p in range(3)], timeout=10
    )
    consumer.close()
    assert sum(max(tp.offset, 0) for tp in committed) == 500
    assert "stopping: writing the open batch" in sink.logs()


def test_a_caught_up_sink_writes_without_waiting_for_the_batch_age(
    fresh_db: str, topics: Topics, sinks: list[SinkProcess], tmp_path: Path
) -> None:
    # A batch age no test waits for: only the caught-up flush can write these.
    sink = start(
        sinks,
        fresh_db,
        topics,
        tmp_path,
        F2PIPE_SINK_BATCH_ROWS="100000",
        F2PIPE_SINK_BATCH_AGE_MS="600000",
    )
    wait_until(
        lambda: sink.metric("f2pipe_sink_assigned_partitions") == 3,
        timeout=60,
        what="partitions assigned",
    )
    written: list[tuple[bytes, bytes]] = []
    for start_at in (0, 5, 10):  # three trickles, each committed on its own
        trickle = readings(start_at, 5)
        produce(topics.processed, trickle)
        written += trickle
        stored_now = _count_is(fresh_db, len(written))
        wait_until(stored_now, timeout=30, what="trickle stored")
    assert stored(fresh_db) == expected_rows(written)
    wait_until(
        lambda: (
            sink.metric("f2pipe_sink_consumer_lag", 'partition="0"') == 0
            and committed_total(topics) == 15
        ),
        timeout=30,
        what="offsets committed",
    )
    assert sink.metric("f2pipe_sink_batch_rows_count") >= 3


def _count_is(dsn: str, want: int) -> Callable[[], bool]:
    return lambda: count(dsn) == want


def committed_total(topics: Topics) -> int:
    """Offsets committed by the sinks' group over the processed topic's partitions."""
    consumer = Consumer({**client_config(get_settings()), "group.id": topics.group})
    try:
        committed = consumer.committed(
            [TopicPartition(topics.processed, p) for p in range(3)], timeout=10
        )
    finally:
        consumer.close()
    return sum(max(tp.offset, 0) for tp in committed)


def test_a_second_sink_joining_and_the_first_leaving_loses_and_duplicates_nothing(
    fresh_db: str, topics: Topics, sinks: list[SinkProcess], tmp_path: Path
) -> None:
    records = readings(0, 30000)
    small = {"F2PIPE_SINK_BATCH_ROWS": "1000", "F2PIPE_SINK_BATCH_AGE_MS": "200"}
    first = start(sinks, fresh_db, topics, tmp_path, **small)
    produce(topics.processed, records[:15000])
    wait_until(lambda: count(fresh_db) >= 3000, timeout=120, what="some rows stored")
    second = start(sinks, fresh_db, topics, tmp_path, **small)  # partitions move
    wait_until(
        lambda: (
            second.metric("f2pipe_sink_assigned_partitions") > 0
            and first.metric("f2pipe_sink_assigned_partitions") > 0
        ),
        timeout=120,
        what="partitions shared by both sinks",
    )
    produce(topics.processed, records[15000:])
    try:
        wait_until(
            lambda: second.metric("f2pipe_sink_records_consumed_total") > 0,
            timeout=120,
            what="the second sink taking partitions",
        )
        assert first.terminate() == 0  # the rest moves to the second sink
        wait_until(lambda: count(fresh_db) == 30000, timeout=180, what="all rows")
    except (pytest.fail.Exception, AssertionError):
        print(first.logs(), second.logs(), count(fresh_db), sep="\n")
        raise
    assert stored(fresh_db) == expected_rows(records)
    assert second.terminate() == 0


def test_a_killed_sinks_partitions_move_within_its_session_timeout(
    fresh_db: str, topics: Topics, sinks: list[SinkProcess], tmp_path: Path
) -> None:
    records = readings(0, 6000)
    produce(topics.processed, records)
    fast = {"F2PIPE_SINK_SESSION_TIMEOUT_S": "6", "F2PIPE_SINK_BATCH_AGE_MS": "200"}
    first = start(sinks, fresh_db, topics, tmp_path, **fast)
    second = start(sinks, fresh_db, topics, tmp_path, **fast)
    owned = "f2pipe_sink_assigned_partitions"
    wait_until(
        lambda: first.metric(owned) > 0 and second.metric(owned) > 0,
        timeout=120,
        what="partitions shared by both sinks",
    )
    first.kill()  # no leaving: its partitions wait for its session to end
    # Kafka's default session (45 s) would hold them past this deadline.
    wait_until(
        lambda: second.metric(owned) == 3,  # the topics fixture has 3 partitions
        timeout=25,
        what="the survivor to own every partition",
    )
    produce(topics.processed, readings(6000, 3000))
    wait_until(lambda: count(fresh_db) == 9000, timeout=120, what="every row")
    assert stored(fresh_db) == expected_rows(records + readings(6000, 3000))


def test_the_sink_reports_each_settled_batch_in_order(fresh_db: str, topics: Topics) -> None:
    # In process: what bench/sink_bench.py measures through the public hook.
    settled: list[tuple[Batch, WriteResult]] = []
    settings = sink_settings(fresh_db, topics)
    sink = Sink(settings, CommitPolicy(500, 0.2), on_settled=lambda b, r: settled.append((b, r)))
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(sink.assigned) == 3, timeout=60, what="partitions assigned")
        assert {partition for _, partition in sink.assigned} == {0, 1, 2}
        records = readings(0, 2000)
        produce(topics.processed, records)
        wait_until(
            lambda: sum(len(batch) for batch, _ in settled) == 2000,
            timeout=60,
            what="every record settled",
        )
    finally:
        sink.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert count(fresh_db) == 2000  # reported only after the database commit
    assert sum(result.inserted for _, result in settled) == 2000
    assert all(len(batch) <= 500 for batch, _ in settled)
    assert all(batch.write_seconds > 0 for batch, _ in settled)
    starts = [batch.started for batch, _ in settled]
    assert starts == sorted(starts)  # settled strictly in order
    assert committed_total(topics) == 2000
