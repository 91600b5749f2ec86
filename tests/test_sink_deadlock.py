"""The sink cannot deadlock (SPEC section 7, "No deadlock").

Two batches overlap in the sink: one commits on a background thread while the
next is consumed. Here a processor's redelivery puts copies of the tail of
batch A at the head of batch B, while A's backend lags (another transaction
holds one of A's keys) or A fails late in its commit, so B could reach the
table before A is done with it. Then: every database wait is bounded (lock
and statement timeouts, counted, retried without loss), and a sink that
cannot progress answers /readyz with 503. The sink runs in process against
the local PostgreSQL and a topic of one partition on the local Kafka (no
server is stopped); every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from conftest import wait_until
from f2pipe.errors import DatabaseUnavailable
from f2pipe.runtime.kafka import client_config, consumer_config
from f2pipe.runtime.opsserver import OpsServer
from f2pipe.settings import get_settings
from f2pipe.sink.batching import CommitPolicy
from f2pipe.sink.progress import Progress
from f2pipe.sink.runner import Sink
from f2pipe.sink.stage import Row, parse_batch
from f2pipe.sink.writer import Timeouts, Writer
from test_sink_service import (
    Topics,
    count,
    expected_rows,
    produce,
    readings,
    sink_settings,
    sink_topics,
    stored,
)

pytestmark = pytest.mark.servers

BATCH = 2000  # two COPY buffers' worth (PostgreSQL flushes a COPY's rows every 1000)


@pytest.fixture
def topics() -> Iterator[Topics]:
    """One partition: every batch follows the one before it through one consumer."""
    with sink_topics("sink-dl", 1) as names:
        yield names


@contextlib.contextmanager
def running(sink: Sink) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        sink.stop()
        thread.join(30)


def consumed() -> float:
    return REGISTRY.get_sample_value("f2pipe_sink_records_consumed_total") or 0.0


def waiting_for(dsn: str, holder: psycopg.Connection[tuple[object, ...]] | int) -> int:
    """The backend waiting for ``holder``'s transaction (a connection or a pid; 0: none).

    Asked on a connection of its own: inside a transaction, pg_stat_activity is a
    snapshot taken at its first read.
    """
    pid = holder if isinstance(holder, int) else holder.info.backend_pid
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,)
        ).fetchone()
    return int(row[0]) if row else 0


def copies_into_the_table_unfinished(dsn: str, blocked: int) -> int:
    """COPYs into decoded_data, other than the blocked one, still waiting for rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_progress_copy c"
            " WHERE c.relid = 'decoded_data'::regclass AND c.datname = current_database()"
            " AND c.pid <> %s AND c.tuples_processed < %s",
            (blocked, BATCH),
        ).fetchone()
    return int(row[0]) if row else 0


def test_duplicates_straddling_two_pipelined_batches_do_not_deadlock(
    fresh_db: str, topics: Topics
) -> None:
    # A: readings 0..1999; B: copies of A's last 10, then 1990 new readings.
    originals = readings(0, 2 * BATCH - 10)
    records = originals[:BATCH] + originals[BATCH - 10 : BATCH] + originals[BATCH:]
    produce(topics.processed, records)
    settings = sink_settings(fresh_db, topics)
    # Batches by size only: A is exactly the first BATCH records, B the next.
    sink = Sink(settings, CommitPolicy(BATCH, 600, flush_when_caught_up=False))
    before = consumed()
    # Another writer holds one key of A's second COPY buffer, so A's backend stops
    # there while B is consumed, as a backend lagging behind its client would.
    held = readings(1500, 1)
    with psycopg.connect(fresh_db) as other:
        timestamp, device, datapoint, value = next(iter(expected_rows(held)))
        other.execute(
            "INSERT INTO decoded_data VALUES (%s, %s, %s, %s)",
            (timestamp, device, datapoint, value),
        )
        with running(sink) as thread:
            blocked = wait_until(
                lambda: waiting_for(fresh_db, other), timeout=60, what="A waiting for our row"
            )
            wait_until(
                lambda: consumed() - before == len(records),
                timeout=60,
                what="B consumed while A commits",
            )
            # Whatever the sink sent of B has reached the server.
            wait_until(
                lambda: copies_into_the_table_unfinished(fresh_db, blocked) == 0,
                timeout=30,
                what="B's rows at the server",
            )
            other.rollback()  # A goes on: the sink must now store both batches
            wait_until(lambda: count(fresh_db) == len(originals), timeout=30, what="A and B stored")
            wait_until(
                lambda: committed(topics) == len(records),
                timeout=30,
                what="offsets committed",
            )
        assert not thread.is_alive()
    assert stored(fresh_db) == expected_rows(originals)


def committed(topics: Topics) -> int:
    """The offset the sinks' group committed on the processed topic's one partition."""
    consumer = Consumer({**client_config(get_settings()), "group.id": topics.group})
    try:
        (tp,) = consumer.committed([TopicPartition(topics.processed, 0)], timeout=10)
    finally:
        consumer.close()
    return max(tp.offset, 0)


def test_a_batch_retried_after_failing_late_in_its_commit_does_not_wait_for_the_next(
    fresh_db: str, topics: Topics
) -> None:
    # A fails after its rows are all in the table (latest_readings is locked
    # elsewhere), when B, holding copies of A's tail, may already be streaming:
    # A's retry must not wait for B, whose transaction waits for the loop.
    settings = sink_settings(
        fresh_db,
        topics,
        sink_lock_timeout_s=3,
        sink_backoff_max_ms=300,
    )
    sink = Sink(settings, CommitPolicy(BATCH, 2, flush_when_caught_up=False))
    originals = readings(0, BATCH + 990)
    a, b = originals[:BATCH], originals[BATCH - 10 : BATCH] + originals[BATCH:]
    lock_timeouts = timeouts_counted("lock")
    with running(sink), psycopg.connect(fresh_db) as other:
        other.execute("LOCK TABLE latest_readings IN SHARE MODE")
        produce(topics.processed, a)
        first = wait_until(
            lambda: waiting_for(fresh_db, other), timeout=60, what="A's rows in, A waiting"
        )
        produce(topics.processed, b)
        wait_until(lambda: waiting_for(fresh_db, first), timeout=30, what="B streaming")
        wait_until(
            lambda: timeouts_counted("lock") >= lock_timeouts + 2, timeout=30, what="A retried"
        )
        other.rollback()
        wait_until(lambda: count(fresh_db) == len(originals), timeout=30, what="A and B stored")
        wait_until(lambda: committed(topics) == len(a) + len(b), timeout=30, what="offsets")
    assert stored(fresh_db) == expected_rows(originals)


# --- the writer: a held batch stays out of the table; every wait is bounded ---------------


def rows_of(records: list[tuple[bytes, bytes]]) -> list[Row]:
    rows = parse_batch([value for _, value in records])
    assert rows is not None
    return rows


def timeouts_counted(kind: str) -> float:
    return REGISTRY.get_sample_value("f2pipe_sink_db_timeouts_total", {"kind": kind}) or 0.0


def test_a_held_writer_keeps_its_rows_and_locks_out_of_the_table(fresh_db: str) -> None:
    records = readings(0, 3000)
    rows = rows_of(records)
    with Writer(fresh_db) as writer, psycopg.connect(fresh_db, autocommit=True) as other:
        writer.hold()
        writer.stream(rows[:1000])
        writer.stream(rows[1000:2000])
        # Nothing of it in the table, no transaction open: an exclusive lock is free.
        other.execute("SET lock_timeout = '1s'")
        with other.transaction():
            other.execute("LOCK TABLE decoded_data IN ACCESS EXCLUSIVE MODE")
        assert count(fresh_db) == 0
        writer.release()
        writer.stream(rows[2000:])
        result = writer.finish(rows)
    assert (result.inserted, result.fallback) == (3000, False)  # still the direct COPY
    assert stored(fresh_db) == expected_rows(records)


def test_a_write_waiting_for_a_lock_gives_up_after_the_lock_timeout(fresh_db: str) -> None:
    rows = rows_of(readings(0, 100))
    before = timeouts_counted("lock")
    with (
        Writer(fresh_db, timeouts=Timeouts(lock_s=0.3)) as writer,
        psycopg.connect(fresh_db) as other,
    ):
        other.execute("LOCK TABLE decoded_data IN SHARE MODE")  # no inserts meanwhile
        writer.stream(rows)
        with pytest.raises(DatabaseUnavailable, match="LockNotAvailable"):
            writer.finish(rows)
        # Twice: opening the streaming COPY, then the whole write that replaces it.
        assert timeouts_counted("lock") == before + 2
        other.rollback()
        assert writer.write(rows).inserted == 100  # the same connection, retried
    assert count(fresh_db) == 100


def test_a_statement_running_too_long_is_cancelled_by_the_statement_timeout(
    fresh_db: str,
) -> None:
    rows = rows_of(readings(0, 100))
    before = timeouts_counted("statement")
    with (
        Writer(fresh_db, timeouts=Timeouts(lock_s=30, statement_s=0.3)) as writer,
        psycopg.connect(fresh_db) as other,
    ):
        other.execute("LOCK TABLE decoded_data IN SHARE MODE")
        with pytest.raises(DatabaseUnavailable, match="QueryCanceled"):
            writer.write(rows)
        assert timeouts_counted("statement") == before + 1
        other.rollback()
        assert writer.write(rows).inserted == 100
    assert count(fresh_db) == 100


# --- the sink: a write that cannot finish is retried, and the sink says it is stuck -------


def test_a_lock_held_elsewhere_makes_the_sink_not_ready_then_it_writes_everything(
    fresh_db: str, topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    settings = sink_settings(
        fresh_db,
        topics,
        sink_lock_timeout_s=0.3,
        sink_backoff_max_ms=300,
        sink_stall_s=600,  # the failures, not the wait, make it not ready here
    )
    sink = Sink(settings, CommitPolicy(500, 0.2))
    ops = OpsServer("127.0.0.1", 0, sink.ready)
    retries = REGISTRY.get_sample_value("f2pipe_sink_db_retries_total") or 0.0
    lock_timeouts = timeouts_counted("lock")
    records = readings(0, 1200)
    try:
        with running(sink), psycopg.connect(fresh_db) as other:
            wait_until(lambda: readyz(ops) == 200, timeout=60, what="ready at start")
            other.execute("LOCK TABLE decoded_data IN SHARE MODE")
            produce(topics.processed, records)
            wait_until(lambda: readyz(ops) == 503, timeout=30, what="not ready while stuck")
            assert "not ready: database failed 3 times in a row" in readyz_body(ops)
            assert count(fresh_db) == 0
            assert timeouts_counted("lock") >= lock_timeouts + 3
            assert (REGISTRY.get_sample_value("f2pipe_sink_db_retries_total") or 0) >= retries + 3
            other.rollback()
            wait_until(lambda: count(fresh_db) == len(records), timeout=30, what="all rows")
            wait_until(lambda: readyz(ops) == 200, timeout=30, what="ready again")
            wait_until(lambda: committed(topics) == len(records), timeout=30, what="offsets")
    finally:
        ops.close()
    assert stored(fresh_db) == expected_rows(records)
    reasons = [getattr(r, "reason", "") for r in caplog.records if "not ready" in r.getMessage()]
    assert len(reasons) == 1
    assert reasons[0].startswith("database failed 3 times in a row: LockNotAvailable")


def readyz_body(ops: OpsServer) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops.port}/readyz", timeout=5) as r:
            return str(r.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())


def readyz(ops: OpsServer) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops.port}/readyz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


# --- readiness from the loop's progress (pure) ---------------------------------------------


def test_progress_turns_not_ready_when_stalled_or_failing_and_back_when_written() -> None:
    now = [0.0]
    progress = Progress(stall_s=30, max_failures=3, clock=lambda: now[0])
    assert progress.stalled() is None
    progress.flushed()
    now[0] = 29.0
    assert progress.stalled() is None
    now[0] = 31.0
    assert progress.stalled() == "oldest unwritten batch has waited 31 s for the database"
    progress.settled()
    assert progress.stalled() is None
    for _ in range(3):
        progress.failed("OperationalError: connection refused")
    assert progress.stalled() == (
        "database failed 3 times in a row: OperationalError: connection refused"
    )
    progress.settled()
    assert progress.stalled() is None


def test_partitions_paused_in_an_outage_are_fetched_again_when_they_come_back(
    fresh_db: str,
) -> None:
    """The client keeps a partition's pause across assignments: partitions handed to
    another member while the sink waited out the database must be fetched once they
    return, after the outage ended."""
    with sink_topics("sink-bp", 3) as topics:
        settings = sink_settings(
            fresh_db, topics, sink_lock_timeout_s=0.3, sink_backoff_max_ms=300, sink_stall_s=600
        )
        sink = Sink(settings, CommitPolicy(500, 0.2))
        retries = REGISTRY.get_sample_value("f2pipe_sink_db_retries_total") or 0.0
        records = readings(0, 1200)
        joiner = Consumer(consumer_config(get_settings(), topics.group))
        try:
            with running(sink), psycopg.connect(fresh_db) as other:
                other.execute("LOCK TABLE decoded_data IN SHARE MODE")
                produce(topics.processed, records[:600])
                wait_until(
                    lambda: (
                        (REGISTRY.get_sample_value("f2pipe_sink_db_retries_total") or 0)
                        >= retries + 2
                    ),
                    timeout=30,
                    what="the sink waiting out the lock, its partitions paused",
                )
                joiner.subscribe([topics.processed])  # takes some of the paused partitions
                wait_until(
                    lambda: joiner.poll(0.2) is None and bool(joiner.assignment()),
                    timeout=60,
                    what="the second member's partitions",
                )
                other.rollback()  # the outage ends; the sink resumes what it still owns
                wait_until(lambda: count(fresh_db) > 0, timeout=30, what="the kept rows")
                joiner.close()  # its partitions return to the sink
                produce(topics.processed, records[600:])
                wait_until(lambda: count(fresh_db) == len(records), timeout=60, what="every row")
        finally:
            with contextlib.suppress(RuntimeError):  # already closed
                joiner.close()
    assert stored(fresh_db) == expected_rows(records)
