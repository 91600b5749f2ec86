"""The sink (``f2pipe sink``): ``processed-iot-data`` into ``decoded_data``, exactly once.

Pure part: :func:`parse_reading` turns one record value into a row or the
reason it cannot be one, and :func:`encode_copy` turns rows into PostgreSQL's
binary COPY format. :class:`Writer` owns the database side, :class:`Sink` the
consumer loop, signals and the ops endpoints.

Guarantees (SPEC sections 5 and 7):

- One transaction per batch. It first tries a plain binary ``COPY`` straight
  into ``decoded_data`` (the fast, common case: nothing in the batch is
  stored yet). If any row of the batch is already stored, that COPY fails
  as a whole with a unique violation and is rolled back to a savepoint;
  the batch then goes through a temporary staging table and
  ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``. Either way a reading is
  stored once and the first write wins; ``rows in batch - rows inserted``
  is counted as duplicates ignored.
- ``latest_readings`` is updated in the same transaction from the stored
  rows, never moving backwards in time.
- Kafka offsets are committed (synchronously, the exact offsets of the
  batch) only after the database transaction committed and every dead
  letter of the batch was acknowledged by Kafka. A crash anywhere before
  that re-delivers the batch, which the idempotent write absorbs.
- A record that cannot be parsed is dead-lettered at once; a row the
  database rejects (a constraint, a value it cannot store) is isolated by
  bisecting the batch inside the transaction (savepoints) and dead-lettered
  with ``sink_rejected``; the rest of the batch lands.
- Database down: the partitions are paused, the batch is kept, the write is
  retried with jittered exponential backoff, then consumption resumes.
  Kafka down: the loop waits (consume returns nothing, commits are retried).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import operator
import os
import random
import signal
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import repeat
from types import FrameType
from typing import Annotated, Any, Literal, NoReturn, cast

import msgspec
import orjson
import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import Counter, Gauge, Histogram
from psycopg import errors as pgerrors

from f2pipe.core.reasons import Reason
from f2pipe.errors import DatabaseUnavailable
from f2pipe.runtime.gctune import quiet_gc
from f2pipe.runtime.kafka import admin_config, consume_available, consumer_config, producer_config
from f2pipe.runtime.logs import setup_logging
from f2pipe.runtime.metrics import DEAD_LETTERS
from f2pipe.runtime.opsserver import OpsServer
from f2pipe.settings import Settings, get_settings

log = logging.getLogger(__name__)

# --- metrics (one place; names are part of the ops contract) -----------------------

# Records taken from the processed topic (rows, unparseable ones included).
CONSUMED = Counter("f2pipe_sink_records_consumed", "records consumed from Kafka")
# Rows newly stored in decoded_data.
ROWS_WRITTEN = Counter("f2pipe_sink_rows_written", "rows stored in decoded_data")
# Rows of a batch that were already stored (redelivery or replay): rows in batch - inserted.
DUPLICATES = Counter("f2pipe_sink_duplicates_ignored", "rows already stored, ignored")
# Records not stored: unparseable, or refused by the database.
REJECTED = Counter("f2pipe_sink_rejected_rows", "records that could not be stored", ["cause"])
# Rows per written batch.
BATCH_ROWS = Histogram(
    "f2pipe_sink_batch_rows",
    "rows per batch",
    buckets=(1, 10, 100, 1000, 5000, 10000, 20000, 50000, 100000, 200000),
)
# Age of a batch (first record received -> write starts).
BATCH_AGE = Histogram(
    "f2pipe_sink_batch_age_seconds",
    "batch age when written",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
# Database write latency per batch (transaction start -> commit).
WRITE_SECONDS = Histogram(
    "f2pipe_sink_write_seconds",
    "database write time per batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# Batches that conflicted with stored rows and took the staging path.
FALLBACKS = Counter("f2pipe_sink_idempotent_fallbacks", "batches written via staging")
# Records behind the head of each partition, after the last commit.
LAG = Gauge("f2pipe_sink_consumer_lag", "records not yet committed", ["partition"])
# Partitions of the processed topic this sink currently owns.
ASSIGNED = Gauge("f2pipe_sink_assigned_partitions", "partitions assigned to this sink")
# Failed write attempts because the database was unavailable.
DB_RETRIES = Counter("f2pipe_sink_db_retries", "write attempts retried after a database error")

# --- pure part: record value -> row ---------------------------------------------------

# A row of decoded_data: (microseconds since 2000-01-01 UTC, device_id, datapoint_id, value).
Row = tuple[int, int, int, float]

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_INT4_MAX = 2**31 - 1
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_COPY_TRAILER = b"\xff\xff"
# field count, then (length, value) for timestamptz (int64 us), int4, int4, float8.
_PACK_ROW = struct.Struct("!hiqiiiiid").pack
_COPY_DIRECT = (
    "COPY decoded_data (timestamp, device_id, datapoint_id, value) FROM STDIN (FORMAT BINARY)"
)
_COPY_STAGING = (
    "COPY sink_staging (timestamp, device_id, datapoint_id, value) FROM STDIN (FORMAT BINARY)"
)
_INSERT_STAGED = (
    "INSERT INTO decoded_data (timestamp, device_id, datapoint_id, value)"
    " SELECT timestamp, device_id, datapoint_id, value FROM sink_staging"
    " ON CONFLICT DO NOTHING"
)


def _ts_micros(ts: str) -> int:
    # No cache: readings of one message go to different partitions (their keys
    # differ), so equal timestamps rarely meet in one consumer's stream.
    dt = datetime.fromisoformat(ts)
    if dt.tzinfo is None:
        raise ValueError(f"timestamp without UTC offset: {ts!r}")
    return (dt - _PG_EPOCH) // _ONE_US


def parse_reading(value: bytes | None) -> Row | str:
    """One ``processed-iot-data`` value (SPEC section 4) -> a row, or why it is not one.

    Accepts exactly ``{"v":1,"ts":<ISO-8601 with offset>,"device_id":<1..2^31-1>,
    "datapoint_id":<1..2^31-1>,"value":<finite number>}`` (extra keys ignored).
    Never raises; the string returned is the ``dlq.detail`` of a ``sink_rejected``.
    """
    if value is None:
        return "empty record value"
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return f"invalid JSON: {exc}"
    if type(obj) is not dict:
        return "value is not a JSON object"
    try:
        version = obj["v"]
        ts = obj["ts"]
        device_id = obj["device_id"]
        datapoint_id = obj["datapoint_id"]
        number = obj["value"]
    except KeyError as exc:
        return f"missing field {exc.args[0]}"
    if type(version) is not int or version != 1:
        return f"unsupported version {version!r}"
    if type(device_id) is not int or not 0 < device_id <= _INT4_MAX:
        return f"device_id out of range: {device_id!r}"
    if type(datapoint_id) is not int or not 0 < datapoint_id <= _INT4_MAX:
        return f"datapoint_id out of range: {datapoint_id!r}"
    kind = type(number)
    if kind is float:
        if not math.isfinite(number):  # orjson refuses NaN/inf; kept for other producers
            return f"value is not finite: {number!r}"
    elif kind is int:
        try:
            number = float(number)
        except OverflowError:
            return "value out of range of double precision"
    else:
        return f"value is not a number: {number!r}"
    if type(ts) is not str:
        return f"ts is not a string: {ts!r}"
    try:
        micros = _ts_micros(ts)
    except (ValueError, OverflowError) as exc:
        return f"invalid ts: {exc}"
    return (micros, device_id, datapoint_id, number)


_Int4Id = Annotated[int, msgspec.Meta(ge=1, le=_INT4_MAX)]


class _Reading(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The exact shape of a processed value, for :func:`parse_batch`'s decoder.

    msgspec checks the types and ranges in C while it decodes: ``v`` is the
    integer 1, the ids are integers in 1..2^31-1 (JSON ``true`` or ``5.0``
    are refused, as by :func:`parse_reading`), ``value`` is a number that is
    finite as a double (an integer is converted, as by :func:`parse_reading`).
    Unknown keys are refused here, not skipped: msgspec skips an unknown
    key's value without the checks orjson makes (invalid UTF-8, numbers
    beyond the double range), so such a value would be accepted here and
    refused by :func:`parse_reading`. The processor writes no extra keys; a
    value that has any takes the per-record path. ``ts`` stays a string,
    parsed by ``datetime.fromisoformat`` as in :func:`parse_reading`.
    ``gc=False``: the fields are a str, ints and a float, which form no cycles.
    """

    v: Literal[1]
    ts: str
    device_id: _Int4Id
    datapoint_id: _Int4Id
    value: float


_DECODE_READING = msgspec.json.Decoder(_Reading).decode
# Any value the decoder refuses: malformed JSON or a wrong shape (DecodeError,
# ValidationError), invalid UTF-8 in ``ts`` (UnicodeDecodeError, a ValueError),
# a tombstone (TypeError).
_NOT_A_READING = (msgspec.DecodeError, ValueError, TypeError)


def parse_batch(values: Sequence[bytes | None]) -> list[Row] | None:
    """Rows for ``values`` if every one is a valid reading, else None.

    The common case of :func:`parse_reading` for a whole poll at once:
    msgspec decodes each value into a typed struct and makes the type and
    range checks in C, and each distinct ``ts`` string is parsed once.
    Whenever it returns rows they equal ``[parse_reading(v) for v in values]``;
    it returns None (the caller then parses record by record, which yields
    the reasons) when any value is invalid, or valid in a less common form
    (a key beyond the five of SPEC section 4).
    """
    if not values:
        return []
    try:
        readings = list(map(_DECODE_READING, cast(Sequence[bytes], values)))
    except _NOT_A_READING:
        return None
    stamps = [r.ts for r in readings]
    try:
        # (ts - epoch) // 1 µs, as _ts_micros; a naive ts fails the subtraction.
        # Once per distinct string: the readings of one message share their ts
        # and mostly arrive in the same poll (bench/sink.json: 0.43 -> 0.29 µs
        # per record at three readings per message).
        distinct = list(set(stamps))
        deltas = map(operator.sub, map(datetime.fromisoformat, distinct), repeat(_PG_EPOCH))
        per_stamp = map(operator.floordiv, deltas, repeat(_ONE_US))
        micros_of = dict(zip(distinct, per_stamp, strict=True))
    except (ValueError, TypeError, OverflowError):
        return None
    micros = micros_of.__getitem__
    return [(micros(r.ts), r.device_id, r.datapoint_id, r.value) for r in readings]


def encode_rows(rows: Iterable[Row]) -> bytes:
    """Rows in PostgreSQL's binary COPY row format (no header, no trailer).

    Columns: timestamp, device_id, datapoint_id, value (the order of the COPY statements).
    """
    pack = _PACK_ROW
    return b"".join([pack(4, 8, r[0], 4, r[1], 4, r[2], 8, r[3]) for r in rows])


def encode_copy(rows: Iterable[Row]) -> bytes:
    """Rows as one complete binary COPY stream (header, rows, trailer)."""
    return _COPY_HEADER + encode_rows(rows) + _COPY_TRAILER


def row_timestamp(row: Row) -> datetime:
    """The row's timestamp as an aware UTC datetime."""
    return _PG_EPOCH + timedelta(microseconds=row[0])


def newest_per_key(rows: Iterable[Row]) -> dict[tuple[int, int], Row]:
    """(device_id, datapoint_id) -> a row with the newest timestamp among ``rows``.

    Which of several rows with the same key and timestamp is returned is
    unspecified: only the timestamp matters when the value comes from
    decoded_data, and a batch stored whole cannot hold two such rows.
    """
    # A stable sort by time, then last one wins: C loops instead of a Python one.
    return {(row[1], row[2]): row for row in sorted(rows, key=_BY_TIME)}


_BY_TIME = operator.itemgetter(0)


# --- database side ------------------------------------------------------------------

_REJECTIONS = (pgerrors.DataError, pgerrors.IntegrityError)


@dataclass
class WriteResult:
    """What one batch write did: rows inserted, and the rows the database refused."""

    inserted: int
    rejected: list[tuple[int, str]]  # (index into the batch, the database's message)
    fallback: bool = False  # some rows were stored already: the staging path ran


class Writer:
    """Writes batches into ``decoded_data`` over one connection (re-opened after failure).

    Two ways in, both ending in one committed transaction per batch:

    - streaming: :meth:`stream` sends rows into an open ``COPY decoded_data``
      as they are consumed, so the server ingests while the client parses
      the next records; :meth:`finish` ends the COPY and commits.
    - :meth:`write`: the whole batch at once (retries, and batches whose stream failed).

    If the direct COPY meets a stored row (unique violation) or a row the
    database refuses, the transaction rolls back to the savepoint before the
    COPY and the batch goes through the idempotent staging path, bisected
    around refused rows. Not thread-safe. :meth:`finish` and :meth:`write`
    raise :class:`DatabaseUnavailable` for any failure that is not the data's
    fault; nothing of the batch is then committed (or, if the connection
    broke during COMMIT, the outcome is unknown, which the idempotent retry absorbs).
    """

    def __init__(self, dsn: str, *, direct_copy: bool = True, announce: bool = True) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._direct_copy = direct_copy
        self._connected_once = not announce
        self._stream: ExitStack | None = None  # the open direct COPY of the current batch
        self._streamed = 0  # rows sent into it
        self._stream_failed = False
        self._copy: Any = None  # psycopg Copy of the open stream

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                conn = psycopg.connect(self._dsn, connect_timeout=5)
                # Per session, outside any batch (a batch's rollback would drop it).
                conn.execute(_CREATE_LATEST_TABLE)
                conn.commit()
            except psycopg.Error as exc:
                raise DatabaseUnavailable(f"cannot connect: {exc}".strip()) from exc
            self._conn = conn
            if not self._connected_once:
                self._connected_once = True
                self._describe_storage(self._conn)
        return self._conn

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stream = None
        self._streamed = 0
        self._stream_failed = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- streaming --

    def stream(self, rows: Sequence[Row]) -> None:
        """Send ``rows`` (the next rows of the current batch) to the server. Never raises.

        A failure only disables streaming for this batch: :meth:`finish` then
        writes the whole batch through :meth:`write`.
        """
        if self._stream_failed or not self._direct_copy or not rows:
            return
        try:
            if self._stream is None:
                conn = self.connection()
                conn.execute("SAVEPOINT f2pipe_direct")
                stack = ExitStack()
                cursor = stack.enter_context(conn.cursor())
                self._copy = stack.enter_context(cursor.copy(_COPY_DIRECT))
                self._stream = stack
                self._copy.write(_COPY_HEADER)
            self._copy.write(encode_rows(rows))
            self._streamed += len(rows)
        except (psycopg.Error, DatabaseUnavailable) as exc:
            log.debug("streaming COPY failed; the batch will be written whole", exc_info=exc)
            self._abandon_stream()

    def finish(self, rows: Sequence[Row]) -> WriteResult:
        """Commit the current batch (``rows``: all of its rows, in stream order)."""
        stream, streamed = self._stream, self._streamed
        self._stream, self._streamed = None, 0
        failed, self._stream_failed = self._stream_failed, False
        if stream is None or failed or streamed != len(rows):
            if stream is not None:
                # End the COPY before rolling back: the open COPY holds the
                # connection, and a rollback under it would wait forever.
                self._discard(stream)
            return self.write(rows)
        conn = self.connection()
        try:
            try:
                self._copy.write(_COPY_TRAILER)
                stream.close()  # ends the COPY; raises what the server refused
                conn.execute("RELEASE SAVEPOINT f2pipe_direct")
                result = WriteResult(len(rows), [])
                self._update_latest(conn, rows, stored_equals_batch=True)
            except _REJECTIONS as exc:
                conn.execute("ROLLBACK TO SAVEPOINT f2pipe_direct")
                # A stored row: straight to staging. A refused row: bisect, direct first.
                conflict = isinstance(exc, pgerrors.UniqueViolation)
                result = self._insert(conn, rows, 0, direct_first=not conflict)
                self._update_latest(conn, self._accepted(rows, result))
            conn.commit()
        except psycopg.Error as exc:
            self._fail(conn, exc)
        return result

    def abandon(self) -> None:
        """Give up the open stream (its batch changed); the next finish writes whole."""
        if self._stream is not None:
            self._abandon_stream()

    def _abandon_stream(self) -> None:
        self._stream_failed = True
        stream, self._stream = self._stream, None
        if stream is None:
            self._rollback_quietly()
        else:
            self._discard(stream)

    def _discard(self, stream: Any) -> None:
        """Fail the open COPY (the server drops its rows), then roll the transaction back."""
        with contextlib.suppress(Exception):
            stream.__exit__(RuntimeError, RuntimeError("abandoned"), None)
        self._rollback_quietly()

    def _rollback_quietly(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self.close()

    # -- whole batch --

    def write(self, rows: Sequence[Row]) -> WriteResult:
        """Store ``rows`` idempotently in one transaction; update ``latest_readings``."""
        conn = self.connection()
        try:
            with conn.transaction():
                result = self._insert(conn, rows, 0, direct_first=self._direct_copy)
                self._update_latest(
                    conn,
                    self._accepted(rows, result),
                    stored_equals_batch=not result.fallback and not result.rejected,
                )
        except psycopg.Error as exc:
            self._fail(conn, exc)
        return result

    def _fail(self, conn: psycopg.Connection[Any], exc: psycopg.Error) -> NoReturn:
        if isinstance(exc, psycopg.OperationalError) or conn.broken:
            self.close()
        else:
            self._rollback_quietly()
        raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}".strip()) from exc

    @staticmethod
    def _accepted(rows: Sequence[Row], result: WriteResult) -> Sequence[Row]:
        if not result.rejected:
            return rows
        refused = {index for index, _ in result.rejected}
        return [row for i, row in enumerate(rows) if i not in refused]

    def _insert(
        self, conn: psycopg.Connection[Any], rows: Sequence[Row], base: int, direct_first: bool
    ) -> WriteResult:
        # Bisect under savepoints: a refused row costs O(log n) sub-writes, and
        # every accepted row still lands in this one transaction.
        try:
            with conn.transaction():
                inserted, fallback = self._copy_idempotent(conn, rows, direct_first)
                return WriteResult(inserted, [], fallback)
        except _REJECTIONS as exc:
            if len(rows) == 1:
                detail = (exc.diag.message_primary or str(exc)).strip()
                return WriteResult(0, [(base, f"{type(exc).__name__}: {detail}")])
        mid = len(rows) // 2
        left = self._insert(conn, rows[:mid], base, direct_first)
        right = self._insert(conn, rows[mid:], base + mid, direct_first)
        return WriteResult(
            left.inserted + right.inserted,
            left.rejected + right.rejected,
            left.fallback or right.fallback,
        )

    def _copy_idempotent(
        self, conn: psycopg.Connection[Any], rows: Sequence[Row], direct_first: bool
    ) -> tuple[int, bool]:
        data = encode_copy(rows)
        if direct_first:
            try:
                with conn.transaction(), conn.cursor() as cur, cur.copy(_COPY_DIRECT) as cp:
                    cp.write(data)
                return len(rows), False
            except pgerrors.UniqueViolation:
                pass  # some row is stored already: take the idempotent path
        with conn.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS sink_staging"
                " (LIKE decoded_data INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            cur.execute("TRUNCATE sink_staging")
            with cur.copy(_COPY_STAGING) as cp:
                cp.write(data)
            cur.execute(_INSERT_STAGED)
            return max(cur.rowcount, 0), True

    def _update_latest(
        self,
        conn: psycopg.Connection[Any],
        rows: Sequence[Row],
        stored_equals_batch: bool = False,
    ) -> None:
        if not rows:
            return
        # The newest row per key goes in by binary COPY into a session table and
        # is upserted from there: parameters as arrays cost about 1 µs of client
        # CPU per batch row (psycopg dumps array elements in Python, plus a
        # datetime per key), the COPY about 0.2 µs.
        newest = newest_per_key(rows).values()
        with conn.cursor() as cur:
            with cur.copy(_COPY_LATEST) as copy:
                copy.write(encode_copy(newest))
            if stored_equals_batch:
                # Every row of the batch was newly stored: its values are the stored ones.
                cur.execute(_UPSERT_LATEST_FROM_BATCH)
            else:
                # Some readings were stored before, maybe with other values: the first
                # write wins in decoded_data, so take the values from there.
                cur.execute(_UPSERT_LATEST_FROM_STORED)

    @staticmethod
    def _describe_storage(conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
        ).fetchone()
        conn.rollback()
        if row and row[0]:
            log.info("writing to TimescaleDB: decoded_data is a hypertable")
        else:
            log.info(
                "TimescaleDB extension absent: writing to a plain PostgreSQL table decoded_data"
            )


# The newest row per key of the batch being written; emptied by every commit.
_CREATE_LATEST_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS sink_latest (timestamp timestamptz NOT NULL,"
    " device_id int4 NOT NULL, datapoint_id int4 NOT NULL, value float8)"
    " ON COMMIT DELETE ROWS"
)
_COPY_LATEST = (
    "COPY sink_latest (timestamp, device_id, datapoint_id, value) FROM STDIN (FORMAT BINARY)"
)
# Rows upserted in key order, so concurrent writers lock latest_readings rows in one order.
_UPSERT_LATEST_FROM_BATCH = (
    "INSERT INTO latest_readings AS l (device_id, datapoint_id, timestamp, value)"
    " SELECT device_id, datapoint_id, timestamp, value FROM sink_latest"
    " ORDER BY device_id, datapoint_id"
    " ON CONFLICT (device_id, datapoint_id) DO UPDATE"
    " SET timestamp = EXCLUDED.timestamp, value = EXCLUDED.value, updated_at = now()"
    " WHERE EXCLUDED.timestamp >= l.timestamp"  # never backwards in time
)
_UPSERT_LATEST_FROM_STORED = (
    "INSERT INTO latest_readings AS l (device_id, datapoint_id, timestamp, value)"
    " SELECT d.device_id, d.datapoint_id, d.timestamp, d.value"
    " FROM sink_latest k JOIN decoded_data d ON d.timestamp = k.timestamp"
    " AND d.device_id = k.device_id AND d.datapoint_id = k.datapoint_id"
    " ORDER BY d.device_id, d.datapoint_id"
    " ON CONFLICT (device_id, datapoint_id) DO UPDATE"
    " SET timestamp = EXCLUDED.timestamp, value = EXCLUDED.value, updated_at = now()"
    " WHERE EXCLUDED.timestamp >= l.timestamp"  # never backwards in time
)


# --- the consumer loop ---------------------------------------------------------------


@dataclass(frozen=True)
class CommitPolicy:
    """When a batch is written and its offsets committed.

    At ``max_rows`` or ``max_age_s``, whichever comes first; and, with
    ``flush_when_caught_up``, as soon as a poll drained what Kafka had
    delivered while no earlier batch is still committing.
    """

    max_rows: int
    max_age_s: float
    flush_when_caught_up: bool = True

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")
        if not 0 < self.max_age_s <= 600:
            raise ValueError(f"max_age_s must be in (0, 600], got {self.max_age_s}")

    @classmethod
    def from_settings(cls, settings: Settings) -> CommitPolicy:
        return cls(
            settings.sink_batch_rows,
            settings.sink_batch_age_ms / 1000,
            settings.sink_flush_when_caught_up,
        )


# Named presets: throughput (the default, from bench/sink.json) and low latency.
THROUGHPUT = CommitPolicy(max_rows=20000, max_age_s=0.5)
LOW_LATENCY = CommitPolicy(max_rows=2000, max_age_s=0.1)


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: attempt n waits U(c/2, c), c = min(cap, base * 2^n)."""

    base_s: float = 0.1
    cap_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError("need 0 < base_s <= cap_s")

    def delays(self) -> Iterator[float]:
        attempt = 0
        while True:
            ceiling = min(self.cap_s, self.base_s * 2**attempt)
            yield random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not secrecy
            attempt = min(attempt + 1, 32)


@dataclass
class Batch:
    """Records consumed and not yet committed, in consumption order."""

    rows: list[Row] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)  # parallel to rows
    unparsed: list[tuple[Message, str]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # last offset seen
    started: float = 0.0  # monotonic time of the first record
    records: int = 0

    def __len__(self) -> int:
        return self.records

    def drop_partitions(self, gone: set[tuple[str, int]]) -> None:
        """Forget records of partitions this consumer no longer owns (they will be re-read)."""
        keep = [
            (row, msg)
            for row, msg in zip(self.rows, self.messages, strict=True)
            if (msg.topic(), msg.partition()) not in gone
        ]
        self.rows = [row for row, _ in keep]
        self.messages = [msg for _, msg in keep]
        self.unparsed = [(m, d) for m, d in self.unparsed if (m.topic(), m.partition()) not in gone]
        self.offsets = {tp: off for tp, off in self.offsets.items() if tp not in gone}
        self.records = len(self.rows) + len(self.unparsed)


class Sink:
    """Consumes ``settings.topic_processed`` and writes it to the time-series database.

    :meth:`run` blocks until :meth:`stop` (or SIGTERM/SIGINT via :func:`main`),
    then writes the open batch, commits, and closes everything.

    Two batches overlap: while one commits on a background thread (its own
    connection), the next is consumed and streamed into a COPY on the other
    connection. Everything that touches Kafka stays on the loop's thread, and
    batches are settled (counted, dead-lettered, offsets committed) strictly
    in order: a batch's offsets are committed only after its own database
    commit and after every earlier batch's.
    """

    def __init__(self, settings: Settings, policy: CommitPolicy | None = None) -> None:
        self.settings = settings
        self.policy = policy or CommitPolicy.from_settings(settings)
        self.backoff = Backoff(cap_s=settings.sink_backoff_max_ms / 1000)
        self._writers = (
            Writer(settings.timeseries_dsn),
            Writer(settings.timeseries_dsn, announce=False),
        )
        self.writer = self._writers[0]  # the open batch streams into this one
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink-commit")
        # The batch committing in the background: (batch, its writer, its outcome).
        self._inflight: tuple[Batch, Writer, Future[WriteResult]] | None = None
        self._retrying: Batch | None = None  # a batch being retried through an outage
        self.consumer = Consumer(
            consumer_config(
                settings,
                settings.sink_group,
                error_cb=self._on_kafka_error,
                # A deep prefetch queue: with the shared default (20,000) the
                # consumer waits on fetches and delivers under half the records
                # per second (bench/sink.json). Bounded in bytes too.
                **{"queued.min.messages": 200_000, "queued.max.messages.kbytes": 131_072},
            )
        )
        self.producer = Producer(producer_config(settings, error_cb=self._on_kafka_error))
        self._admin = AdminClient(admin_config(settings))
        self.batch = Batch()
        self._stopping = False
        self._in_backpressure = False
        self._assigned: set[tuple[str, int]] = set()
        self._delivery_errors: list[str] = []

    # -- lifecycle --

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler: only sets a flag)."""
        self._stopping = True

    def ready(self) -> bool:
        """Both dependencies answer: the database (a fresh connection) and Kafka."""
        with psycopg.connect(self.settings.timeseries_dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        # Its own client: the consumer's handle is busy in the loop's consume().
        self._admin.list_topics(self.settings.topic_processed, timeout=2)
        return True

    def run(self) -> int:
        self.consumer.subscribe(
            [self.settings.topic_processed],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            self._connect_database()
            while not self._stopping:
                self._poll_once()
            if len(self.batch):
                log.info("stopping: writing the open batch", extra={"records": len(self.batch)})
                self._flush()
            self._settle()
        finally:
            self._close()
        return 0

    def _connect_database(self) -> None:
        delays = self.backoff.delays()
        while not self._stopping:
            try:
                self.writer.connection()
                return
            except DatabaseUnavailable as exc:
                log.warning("database unavailable at start", extra={"error": str(exc)[:300]})
                self._sleep(next(delays))

    def _close(self) -> None:
        self._committer.shutdown(wait=True)
        for writer in self._writers:
            writer.close()
        remaining = self.producer.flush(10)
        if remaining:
            log.error("dead letters not acknowledged at exit", extra={"records": remaining})
        self.consumer.close()

    # -- the loop --

    def _poll_once(self) -> None:
        """One poll: settle a finished commit, take records, flush when due.

        A batch is flushed when it is full, when it is ``max_age_s`` old, or
        when the sink has caught up with its input while no commit is in
        flight (the poll drained the client's queue without filling the
        batch): waiting for the age then would only add latency. Under load
        a commit is in flight most of the time, so the batch keeps growing
        while the previous one commits, up to ``max_rows``; at light load a
        record is written within milliseconds of its arrival.
        """
        # At most 0.5 s: the signal handler runs (and the stop flag is seen)
        # only between calls into librdkafka.
        timeout = 0.5
        if self._inflight is not None:
            if self._inflight[2].done():
                self._settle()  # commit its offsets now, not when the next batch is full
            else:
                timeout = 0.02
        batch = self.batch
        room = max(self.policy.max_rows - len(batch), 1)
        if len(batch):
            age = time.monotonic() - batch.started
            timeout = min(timeout, max(0.0, self.policy.max_age_s - age))
        eager = self.policy.flush_when_caught_up and self._inflight is None
        if eager:
            # Nothing committing: wake on the first record rather than after
            # the timeout (consume() waits for all ``room`` records or the
            # timeout), then take whatever else is already queued.
            messages = consume_available(self.consumer, room, 0.0 if len(batch) else timeout)
        else:
            messages = self.consumer.consume(num_messages=room, timeout=timeout)
        if messages:
            self._add(messages)
        batch = self.batch  # a rebalance callback inside consume() may have replaced it
        if len(batch) and (
            len(batch) >= self.policy.max_rows
            or time.monotonic() - batch.started >= self.policy.max_age_s
            or (eager and len(messages) < room and self._inflight is None)
        ):
            self._flush()

    def _add(self, messages: list[Message]) -> None:
        # Per-record Python statements dominate the sink's CPU time, so the
        # common case runs as C-level passes over the whole poll (map, zip).
        batch = self.batch
        if not batch.records:
            batch.started = time.monotonic()
        if any(map(Message.error, messages)):  # rare: events mixed into the poll
            for msg in messages:
                err = msg.error()
                if err is not None:
                    self._on_message_error(err)
            messages = [msg for msg in messages if msg.error() is None]
            if not messages:
                return
        first = len(batch.rows)
        rows = parse_batch(list(map(Message.value, messages)))
        if rows is not None:
            batch.rows += rows
            batch.messages += messages
        else:
            for msg in messages:
                parsed = parse_reading(msg.value())
                if type(parsed) is tuple:
                    batch.rows.append(parsed)
                    batch.messages.append(msg)
                else:
                    batch.unparsed.append((msg, str(parsed)))
        # The last message of each partition in this poll carries its offset
        # (one topic is subscribed, and a partition's records arrive in order).
        last = dict(zip(map(Message.partition, messages), messages, strict=True))
        offsets: dict[Any, Any] = batch.offsets  # message accessors are typed Optional
        for partition, msg in last.items():
            offsets[(msg.topic(), partition)] = msg.offset()
        batch.records += len(messages)
        CONSUMED.inc(len(messages))
        if not self._in_backpressure and len(batch.rows) > first:
            self.writer.stream(batch.rows[first:])

    def _flush(self) -> None:
        """Hand the open batch to the committer; first settle the one before it.

        Blocks only while the previous batch is still committing (or, during
        a database outage, until it is written). If stopping during an outage,
        returns without committing: those records are re-read on the next start.
        """
        batch = self.batch
        BATCH_ROWS.observe(len(batch))
        BATCH_AGE.observe(time.monotonic() - batch.started)
        if not self._settle():
            return
        self.batch = Batch()
        if not batch.rows:  # nothing for the database (only unparseable records)
            self._complete(batch, WriteResult(0, []))
            return
        writer = self.writer
        self.writer = self._writers[1] if writer is self._writers[0] else self._writers[0]
        future = self._committer.submit(self._timed_finish, writer, batch.rows)
        self._inflight = (batch, writer, future)

    def _timed_finish(self, writer: Writer, rows: Sequence[Row]) -> WriteResult:
        started = time.monotonic()
        result = writer.finish(rows)
        WRITE_SECONDS.observe(time.monotonic() - started)
        return result

    def _settle(self) -> bool:
        """Wait for the batch committing in the background, then complete it.

        False only when stopping during a database outage (nothing committed).
        """
        if self._inflight is None:
            return True
        batch, writer, future = self._inflight
        self._inflight = None
        try:
            result = future.result()
        except DatabaseUnavailable as exc:
            written = self._write_with_backpressure(batch, writer, exc)
            if written is None:
                return False
            result = written
        self._complete(batch, result)
        return True

    def _complete(self, batch: Batch, result: WriteResult) -> None:
        """After the database commit: count, dead-letter the rejects, commit offsets."""
        ROWS_WRITTEN.inc(result.inserted)
        DUPLICATES.inc(len(batch.rows) - len(result.rejected) - result.inserted)
        if result.fallback:
            FALLBACKS.inc()
        rejected = [(batch.messages[i], detail, "database") for i, detail in result.rejected]
        rejected += [(msg, detail, "parse") for msg, detail in batch.unparsed]
        if rejected:
            self._dead_letter(rejected)
        self._commit(batch.offsets)

    def _write_with_backpressure(
        self, batch: Batch, writer: Writer, error: DatabaseUnavailable
    ) -> WriteResult | None:
        """Retry ``batch`` until it is written, consumption paused meanwhile.

        None when stopping first (nothing committed). Runs on the loop's
        thread, which keeps serving the consumer between attempts.
        """
        self._retrying = batch
        delays = self.backoff.delays()
        try:
            while True:
                DB_RETRIES.inc()
                if not self._in_backpressure:
                    log.warning(
                        "database unavailable: pausing consumption, keeping the batch",
                        extra={"error": str(error)[:300], "records": len(batch)},
                    )
                    self._pause()
                if self._stopping:
                    log.warning(
                        "stopping during a database outage: batch not written, offsets not"
                        " committed; it will be re-read on restart",
                        extra={"records": len(batch) + len(self.batch)},
                    )
                    return None
                self._wait_paused(next(delays))
                if not batch.rows:  # every partition of it was revoked meanwhile
                    return WriteResult(0, [])
                try:
                    result = self._timed_finish(writer, batch.rows)
                except DatabaseUnavailable as exc:
                    error = exc
                    continue
                if self._in_backpressure:
                    log.info("database available again: resuming consumption")
                    self._resume()
                return result
        finally:
            self._retrying = None

    def _pause(self) -> None:
        self._in_backpressure = True
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(assignment)

    def _resume(self) -> None:
        self._in_backpressure = False
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.resume(assignment)

    def _wait_paused(self, seconds: float) -> None:
        # Keep serving the consumer (group membership, rebalances) while paused.
        # Paused partitions return no records; anything already fetched that
        # does come back is simply added to the kept batch.
        deadline = time.monotonic() + seconds
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            msg = self.consumer.poll(min(left, 0.2))
            if msg is not None:
                self._add([msg])

    def _dead_letter(self, rejected: list[tuple[Message, str, str]]) -> None:
        """Produce the dead letters and wait until Kafka acknowledged every one."""
        now = b"%d" % int(time.time() * 1000)
        for msg, detail, cause in rejected:
            # The record's own headers, minus any dlq.* of an earlier dead-lettering.
            headers = [h for h in msg.headers() or [] if not h[0].startswith("dlq.")]
            headers += [
                ("dlq.stage", b"sink"),
                ("dlq.reason", Reason.SINK_REJECTED.value.encode()),
                ("dlq.detail", detail[:1000].encode()),
                ("dlq.source", f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()),
                ("dlq.ts", now),
            ]
            self._produce(msg.key(), msg.value(), headers)
            REJECTED.labels(cause=cause).inc()
            log.warning(
                "record dead-lettered",
                extra={
                    "reason": Reason.SINK_REJECTED.value,
                    "cause": cause,
                    "detail": detail[:300],
                    "source": f"{msg.topic()}/{msg.partition()}/{msg.offset()}",
                },
            )
        while self.producer.flush(1.0):
            log.warning("waiting for Kafka to acknowledge dead letters")
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            # Not committing: the batch will be re-delivered and tried again.
            raise KafkaException(f"dead letters not delivered: {errors[:3]}")
        DEAD_LETTERS.labels(stage="sink", reason=Reason.SINK_REJECTED.value).inc(len(rejected))

    def _produce(self, key: bytes | None, value: bytes | None, headers: list[Any]) -> None:
        while True:
            try:
                self.producer.produce(
                    self.settings.topic_dead_letter,
                    value,
                    key,
                    headers=headers,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                self.producer.poll(0.5)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(str(err))

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit ``offsets`` (last offset seen + 1) synchronously; wait while Kafka is down."""
        if not offsets:
            return
        tps = [TopicPartition(t, p, off + 1) for (t, p), off in offsets.items()]
        delays = self.backoff.delays()
        while True:
            try:
                self.consumer.commit(offsets=tps, asynchronous=False)
                break
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                retriable = isinstance(err, KafkaError) and err.retriable()
                code = err.code() if isinstance(err, KafkaError) else None
                if code in (
                    KafkaError.ILLEGAL_GENERATION,
                    KafkaError.UNKNOWN_MEMBER_ID,
                    KafkaError.REBALANCE_IN_PROGRESS,
                    KafkaError._NO_OFFSET,
                ):
                    # The partitions moved; the rows are stored, and the new owner
                    # re-reads from the last commit into the idempotent write.
                    log.info("offset commit skipped after a rebalance", extra={"error": str(err)})
                    return
                log.warning(
                    "offset commit failed; retrying",
                    extra={"error": str(exc), "retriable": retriable},
                )
                if self._stopping:
                    # The rows are stored; the next start re-reads them into the
                    # idempotent write. Waiting here would make shutdown hang.
                    log.warning("stopping without an offset commit")
                    return
                self._sleep(next(delays))
        for (t, p), off in offsets.items():
            try:
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                LAG.labels(partition=str(p)).set(max(high - off - 1, 0))

    # -- callbacks --

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(tp.topic, tp.partition) for tp in partitions}
        ASSIGNED.set(len(self._assigned))
        log.info("partitions assigned", extra={"partitions": [tp.partition for tp in partitions]})
        if self._in_backpressure and partitions:
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned -= gone
        ASSIGNED.set(len(self._assigned))
        settled = self._settle_for_rebalance(gone)
        if settled and not self._in_backpressure and self.batch.rows:
            # Hand over cleanly: write what we hold, so the next owner starts after it.
            batch = self.batch
            try:
                result = self.writer.finish(batch.rows)
            except DatabaseUnavailable:
                batch.drop_partitions(gone)
                self.writer.abandon()
            else:
                self.batch = Batch()
                self._complete(batch, result)
        else:
            self.batch.drop_partitions(gone)
            self.writer.abandon()
        log.info("partitions revoked", extra={"partitions": [tp.partition for tp in partitions]})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned -= gone
        ASSIGNED.set(len(self._assigned))
        self._settle_for_rebalance(gone)
        self.batch.drop_partitions(gone)
        self.writer.abandon()
        log.warning("partitions lost", extra={"partitions": [tp.partition for tp in partitions]})

    def _settle_for_rebalance(self, gone: set[tuple[str, int]]) -> bool:
        """Finish the background batch inside a rebalance callback, without retrying.

        On a database error the batch forgets the partitions in ``gone`` (their
        next owner re-reads them) and stays queued for the normal retry.
        Returns whether nothing is left in flight.
        """
        if self._retrying is not None:
            self._retrying.drop_partitions(gone)
        if self._inflight is None:
            return True
        batch, _writer, future = self._inflight
        try:
            result = future.result()  # the thread is done with the batch after this
        except DatabaseUnavailable:
            batch.drop_partitions(gone)
            return False
        self._inflight = None
        self._complete(batch, result)
        return True

    def _on_kafka_error(self, err: KafkaError) -> None:
        log.warning("kafka", extra={"error": str(err)})

    _last_message_error = 0.0

    def _on_message_error(self, err: KafkaError) -> None:
        now = time.monotonic()
        if now - self._last_message_error > 5:  # one line per 5 s, not one per poll
            self._last_message_error = now
            log.warning("consumer error", extra={"error": str(err)})

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))


# --- CLI ---------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-rows", type=int, help="override F2PIPE_SINK_BATCH_ROWS")
    parser.add_argument("--batch-age-ms", type=int, help="override F2PIPE_SINK_BATCH_AGE_MS")
    parser.set_defaults(func=_cmd_sink)


def tune_gc() -> None:
    """The collector's settings for the sink, process-wide (see :mod:`f2pipe.runtime.gctune`).

    Called by ``f2pipe sink`` and the benchmark, not by :class:`Sink`. Every
    poll allocates tens of thousands of containers and the open batch keeps
    its Kafka messages until the commit, so generation 0 is collected only
    every 100,000 net allocations, by when most temporaries of a poll are gone.
    """
    quiet_gc(100_000, 50, 100)


def _cmd_sink(args: argparse.Namespace) -> int:
    setup_logging("sink")
    settings = get_settings()
    policy = CommitPolicy(
        args.batch_rows or settings.sink_batch_rows,
        (args.batch_age_ms or settings.sink_batch_age_ms) / 1000,
        settings.sink_flush_when_caught_up,
    )
    sink = Sink(settings, policy)
    tune_gc()
    _install_signals(sink)
    ops = OpsServer(settings.ops_host, settings.sink_port, sink.ready)
    log.info(
        "sink started",
        extra={
            "topic": settings.topic_processed,
            "group": settings.sink_group,
            "batch_rows": policy.max_rows,
            "batch_age_s": policy.max_age_s,
            "flush_when_caught_up": policy.flush_when_caught_up,
            "ops_port": ops.port,
        },
    )
    try:
        return sink.run()
    finally:
        ops.close()
        log.info("sink stopped")


def _install_signals(sink: Sink) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        if sink._stopping:
            # Second signal: leave at once. Nothing uncommitted is lost: the
            # records are re-read from the last commit by the next start.
            os._exit(130)
        sink.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
