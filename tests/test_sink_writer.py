"""The sink's database side against the real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from f2pipe.metadata.database import seed_demo
from f2pipe.sink.stage import Row
from f2pipe.sink.writer import Writer

pytestmark = pytest.mark.servers

T0 = datetime(2026, 3, 1, tzinfo=UTC)
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@pytest.fixture
def writer(fresh_db: str) -> Iterator[Writer]:
    with Writer(fresh_db) as w:
        yield w


def row(seconds: int, device_id: int, datapoint_id: int, value: float) -> Row:
    return (
        (T0 + timedelta(seconds=seconds) - EPOCH) // timedelta(microseconds=1),
        device_id,
        datapoint_id,
        value,
    )


def stored(dsn: str) -> set[tuple[datetime, int, int, float]]:
    with psycopg.connect(dsn) as conn:
        return set(conn.execute("SELECT * FROM decoded_data").fetchall())


def latest(dsn: str) -> dict[tuple[int, int], tuple[datetime, float]]:
    with psycopg.connect(dsn) as conn:
        return {
            (d, p): (ts, v)
            for d, p, ts, v in conn.execute(
                "SELECT device_id, datapoint_id, timestamp, value FROM latest_readings"
            )
        }


@pytest.mark.parametrize("streamed", [False, True])
def test_first_write_wins_and_duplicates_are_counted(
    fresh_db: str, writer: Writer, streamed: bool
) -> None:
    first = [row(i, 7, 1, float(i)) for i in range(100)]
    assert writer.write(first).inserted == 100
    # Redelivery: 50 old readings (10 of them with other values) and 20 new ones.
    again = [row(i, 7, 1, float(i) + (1000 if i < 10 else 0)) for i in range(50)]
    again += [row(i, 7, 1, float(i)) for i in range(100, 120)]
    if streamed:
        writer.stream(again[:30])
        writer.stream(again[30:])
        result = writer.finish(again)
    else:
        result = writer.write(again)
    assert result.inserted == 20
    assert result.fallback
    assert not result.rejected
    expected = {(T0 + timedelta(seconds=i), 7, 1, float(i)) for i in range(120)}
    assert stored(fresh_db) == expected
    assert latest(fresh_db) == {(7, 1): (T0 + timedelta(seconds=119), 119.0)}


def test_latest_readings_never_move_backwards(fresh_db: str, writer: Writer) -> None:
    writer.write([row(60, 1, 1, 6.0), row(10, 1, 2, 1.0)])
    writer.write([row(30, 1, 1, 3.0), row(20, 1, 2, 2.0)])  # late for (1,1), newer for (1,2)
    assert latest(fresh_db) == {
        (1, 1): (T0 + timedelta(seconds=60), 6.0),
        (1, 2): (T0 + timedelta(seconds=20), 2.0),
    }
    # The same timestamp redelivered with another value: decoded_data and latest keep the first.
    writer.write([row(60, 1, 1, -5.0)])
    assert latest(fresh_db)[(1, 1)] == (T0 + timedelta(seconds=60), 6.0)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_refused_row_is_isolated_and_the_rest_lands(
    fresh_db: str, writer: Writer, streamed: bool
) -> None:
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE decoded_data ADD CONSTRAINT plausible CHECK (value < 1e12)")
    rows = [row(i, 1 + i % 50, 1, float(i)) for i in range(5000)]
    rows[3333] = row(3333, 1 + 3333 % 50, 1, 1e15)
    rows[4000] = row(4000, 1 + 4000 % 50, 1, 2e15)
    if streamed:
        writer.stream(rows)
        result = writer.finish(rows)
    else:
        result = writer.write(rows)
    assert [i for i, _ in result.rejected] == [3333, 4000]
    assert "plausible" in result.rejected[0][1]
    assert result.inserted == 4998
    expected = {(T0 + timedelta(seconds=i), 1 + i % 50, 1, float(i)) for i in range(5000)}
    expected -= {(T0 + timedelta(seconds=i), 1 + i % 50, 1, float(i)) for i in (3333, 4000)}
    assert stored(fresh_db) == expected


def test_readings_view_names_devices_datapoints_and_units(
    fresh_db: str, writer: Writer, tmp_path: object
) -> None:
    from pathlib import Path

    seed_demo(fresh_db, Path(str(tmp_path)))
    with psycopg.connect(fresh_db) as conn:
        found = conn.execute(
            "SELECT d.device_id, p.datapoint_id FROM devices d"
            " JOIN datapoints p USING (device_template_id)"
            " WHERE d.name = 'Living Room Env Sensor' AND p.label = 'Temperature'"
        ).fetchone()
    assert found is not None
    device_id, datapoint_id = found
    writer.write([row(0, device_id, datapoint_id, 21.5)])
    with psycopg.connect(fresh_db) as conn:
        view = conn.execute(
            "SELECT device_name, datapoint_label, value, unit FROM readings"
        ).fetchall()
        named = conn.execute(
            "SELECT device_name, datapoint_label, value, unit FROM latest_readings_named"
        ).fetchall()
    assert view == [("Living Room Env Sensor", "Temperature", 21.5, "°C")]
    assert named == view


def test_a_lost_connection_is_reported_as_unavailable_and_recovers(
    fresh_db: str, writer: Writer
) -> None:
    from f2pipe.errors import DatabaseUnavailable

    writer.write([row(0, 1, 1, 1.0)])
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    with pytest.raises(DatabaseUnavailable):
        writer.write([row(1, 1, 1, 2.0)])
    assert writer.write([row(1, 1, 1, 2.0)]).inserted == 1  # reconnects
    assert len(stored(fresh_db)) == 2


@pytest.mark.timeout(60)
def test_a_batch_that_outgrew_its_stream_is_written_whole(fresh_db: str, writer: Writer) -> None:
    # Rows added while the stream was held back (database backpressure) are not in
    # the open COPY: finish must end that COPY before it rolls back and writes whole.
    rows = [row(i, 4, 1, float(i)) for i in range(100)]
    writer.stream(rows[:30])
    assert writer.finish(rows).inserted == 100
    assert stored(fresh_db) == {(T0 + timedelta(seconds=i), 4, 1, float(i)) for i in range(100)}
