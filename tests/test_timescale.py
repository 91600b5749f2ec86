"""The TimescaleDB path: hypertable, policies, aggregate, and writes into compressed chunks.

Runs only against a PostgreSQL with the extension installed and preloaded, named
by ``F2PIPE_TIMESCALE_ADMIN_DSN`` (e.g. ``postgresql://postgres@127.0.0.1:45432/postgres``);
the local stack and CI run plain PostgreSQL, where this module is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from conftest import unique
from f2pipe.metadata.database import create_database, migrate
from f2pipe.sink.stage import Row
from f2pipe.sink.writer import Writer

ADMIN = os.environ.get("F2PIPE_TIMESCALE_ADMIN_DSN", "")
pytestmark = [
    pytest.mark.servers,
    pytest.mark.skipif(not ADMIN, reason="F2PIPE_TIMESCALE_ADMIN_DSN names no TimescaleDB"),
]

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
OLD = datetime.now(UTC).replace(microsecond=0) - timedelta(days=30)


def row(at: datetime, device_id: int, datapoint_id: int, value: float) -> Row:
    return ((at - EPOCH) // timedelta(microseconds=1), device_id, datapoint_id, value)


@pytest.fixture
def ts_db() -> Iterator[str]:
    name = unique("f2ts")
    create_database(ADMIN, name)
    dsn = ADMIN.rsplit("/", 1)[0] + "/" + name
    migrate(dsn)
    migrate(dsn)  # idempotent with the extension too
    yield dsn
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_migrations_make_a_compressed_hypertable_with_policies(ts_db: str) -> None:
    with psycopg.connect(ts_db) as conn:
        hypertable = conn.execute(
            "SELECT compression_enabled FROM timescaledb_information.hypertables"
            " WHERE hypertable_name = 'decoded_data'"
        ).fetchone()
        segments = conn.execute(
            "SELECT attname FROM timescaledb_information.compression_settings"
            " WHERE hypertable_name = 'decoded_data' AND segmentby_column_index IS NOT NULL"
            " ORDER BY segmentby_column_index"
        ).fetchall()
        jobs = {
            r[0].split(" [")[0]: r[1]
            for r in conn.execute(
                "SELECT application_name, config FROM timescaledb_information.jobs"
                " WHERE job_id >= 1000"
            )
        }
        aggregate = conn.execute(
            "SELECT 1 FROM timescaledb_information.continuous_aggregates"
            " WHERE view_name = 'decoded_data_hourly'"
        ).fetchone()
    assert hypertable == (True,)
    assert segments == [("device_id",), ("datapoint_id",)]
    assert jobs["Columnstore Policy"]["compress_after"] == "7 days"
    assert jobs["Retention Policy"]["drop_after"] == "5 years"
    assert "Refresh Continuous Aggregate Policy" in jobs
    assert aggregate is not None


def test_sink_writes_into_compressed_chunks_first_write_wins(ts_db: str) -> None:
    first = [row(OLD + timedelta(seconds=i), 9, 1, float(i)) for i in range(100)]
    with Writer(ts_db) as writer:
        assert writer.write(first).inserted == 100
    with psycopg.connect(ts_db, autocommit=True) as conn:
        compressed = conn.execute(
            "SELECT count(compress_chunk(c)) FROM show_chunks('decoded_data') c"
        ).fetchone()
        assert compressed == (1,)
    # Redelivered readings (some with other values) and new ones, into the compressed chunk.
    again = [row(OLD + timedelta(seconds=i), 9, 1, float(i) + 1000) for i in range(50)]
    again += [row(OLD + timedelta(seconds=i), 9, 1, float(i)) for i in range(100, 130)]
    with Writer(ts_db) as writer:
        result = writer.write(again)
    assert result.inserted == 30
    with psycopg.connect(ts_db, autocommit=True) as conn:
        rows = set(
            conn.execute("SELECT timestamp, device_id, datapoint_id, value FROM decoded_data")
        )
        conn.execute("CALL refresh_continuous_aggregate('decoded_data_hourly', NULL, NULL)")
        hourly = conn.execute("SELECT sum(samples) FROM decoded_data_hourly").fetchone()
    assert rows == {(OLD + timedelta(seconds=i), 9, 1, float(i)) for i in range(130)}
    assert hourly == (130,)


def test_policies_run(ts_db: str) -> None:
    with Writer(ts_db) as writer:
        writer.write([row(OLD + timedelta(minutes=i), 3, 2, float(i)) for i in range(60)])
        # Inside the refresh policy's window (from 3 h to 1 h ago).
        recent = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
        writer.write([row(recent + timedelta(minutes=i), 3, 2, float(i)) for i in range(40)])
    with psycopg.connect(ts_db, autocommit=True) as conn:
        # Job ids from 1000 on are the policies (this database has no others).
        jobs = [
            r[0]
            for r in conn.execute(
                "SELECT job_id FROM timescaledb_information.jobs WHERE job_id >= 1000"
            )
        ]
        for job in jobs:
            conn.execute("CALL run_job(%s)", (job,))
        chunks = conn.execute(
            "SELECT is_compressed FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'decoded_data' ORDER BY range_start"
        ).fetchall()
        hourly = conn.execute("SELECT sum(samples) FROM decoded_data_hourly").fetchone()
    assert len(jobs) == 3
    # The 30-day-old chunk is compressed by the policy, the recent one is not.
    assert chunks == [(True,), (False,)]
    assert hourly == (40,)  # the refresh policy materialised the recent hour bucket
