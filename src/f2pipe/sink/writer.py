"""The sink's database side: batches into ``decoded_data`` and ``latest_readings``.

Guarantees (SPEC sections 5 and 7), one transaction per batch:

- It first tries a plain binary ``COPY`` straight into ``decoded_data`` (the
  fast, common case: nothing in the batch is stored yet). If any row of the
  batch is already stored, that COPY fails as a whole with a unique violation
  and is rolled back to a savepoint; the batch then goes through a temporary
  staging table and ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``. Either
  way a reading is stored once and the first write wins; ``rows in batch -
  rows inserted`` is what the runner counts as duplicates ignored.
- ``latest_readings`` is updated in the same transaction from the stored
  rows, never moving backwards in time.
- A row the database refuses (a constraint, a value it cannot store) is
  isolated by bisecting the batch inside the transaction (savepoints) and
  reported in :attr:`WriteResult.rejected`; the rest of the batch lands.
- Any failure that is not the data's fault raises
  :class:`~f2pipe.errors.DatabaseUnavailable` and commits nothing.
- Every wait is bounded: connecting (``connect_timeout``, TCP keepalives and
  ``tcp_user_timeout`` against a silent peer), a lock (``lock_timeout``) and
  a statement (``statement_timeout``), as session settings. A timeout is a
  :class:`~f2pipe.errors.DatabaseUnavailable` like any other, counted in
  :data:`~f2pipe.sink.metrics.DB_TIMEOUTS`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, NoReturn

import psycopg
from psycopg import errors as pgerrors
from psycopg.copy import QueuedLibpqWriter

from f2pipe.errors import DatabaseUnavailable
from f2pipe.settings import Settings
from f2pipe.sink.metrics import DB_TIMEOUTS
from f2pipe.sink.stage import (
    COPY_HEADER,
    COPY_TRAILER,
    Row,
    encode_copy,
    encode_rows,
    newest_per_key,
)

__all__ = ["COPY_DIRECT", "Timeouts", "WriteResult", "Writer"]

log = logging.getLogger(__name__)

# The fast path's statement: the batch straight into the table.
COPY_DIRECT = (
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


_REJECTIONS = (pgerrors.DataError, pgerrors.IntegrityError)


@dataclass
class WriteResult:
    """What one batch write did: rows inserted, and the rows the database refused."""

    inserted: int
    rejected: list[tuple[int, str]]  # (index into the batch, the database's message)
    fallback: bool = False  # some rows were stored already: the staging path ran


@dataclass(frozen=True)
class Timeouts:
    """How long a writer waits for the database, in seconds (see the module docstring)."""

    connect_s: float = 5.0
    lock_s: float = 10.0
    statement_s: float = 60.0  # also how long sent data may go unacknowledged (TCP)

    @classmethod
    def from_settings(cls, settings: Settings, batch_age_s: float) -> Timeouts:
        """The sink's settings; the COPY that streams a batch also runs while it fills up."""
        return cls(
            settings.sink_connect_timeout_s,
            settings.sink_lock_timeout_s,
            settings.sink_statement_timeout_s + batch_age_s,
        )

    def __post_init__(self) -> None:
        for name in ("connect_s", "lock_s", "statement_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


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

    def __init__(
        self,
        dsn: str,
        *,
        direct_copy: bool = True,
        announce: bool = True,
        timeouts: Timeouts | None = None,
    ) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._direct_copy = direct_copy
        self._connected_once = not announce
        self.timeouts = timeouts or Timeouts()
        self._stream: ExitStack | None = None  # the open direct COPY of the current batch
        self._streamed = 0  # rows sent into it
        self._stream_failed = False
        self._copy: Any = None  # psycopg Copy of the open stream
        self._held = False  # see hold()
        self._pending: list[bytes] = []  # rows encoded while held, not sent yet
        self._pending_rows = 0
        # True while finish (on its thread) has every row of the batch in the table
        # and takes no more locks there: only latest_readings and the commit to go.
        self.rows_in_table = False

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            t = self.timeouts
            try:
                conn = psycopg.connect(
                    self._dsn,
                    connect_timeout=max(1, round(t.connect_s)),
                    # A peer that vanished without a reset would otherwise be waited
                    # for forever: probes after 10 s idle, dead after 3 more unanswered.
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                    tcp_user_timeout=round(t.statement_s * 1000),
                )
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, false),"
                    " set_config('statement_timeout', %s, false)",
                    (f"{round(t.lock_s * 1000)}ms", f"{round(t.statement_s * 1000)}ms"),
                )
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
        self._held = False
        self._pending, self._pending_rows = [], 0
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- streaming --

    def stream(self, rows: Sequence[Row]) -> None:
        """Send ``rows`` (the next rows of the current batch) to the server. Never raises.

        While the writer is held (:meth:`hold`) the rows are only encoded and
        kept. A failure only disables streaming for this batch: :meth:`finish`
        then writes the whole batch through :meth:`write`.
        """
        if self._stream_failed or not self._direct_copy or not rows:
            return
        data = encode_rows(rows)
        if self._held:
            self._pending.append(data)
            self._pending_rows += len(rows)
            return
        self._send([data], len(rows))

    def hold(self) -> None:
        """Keep this batch's rows out of the table until :meth:`release` (or :meth:`finish`).

        For as long as the previous batch's transaction may still take a lock
        in ``decoded_data`` (until its :attr:`rows_in_table` or its end): rows
        streamed meanwhile are encoded and kept here, and this connection
        holds no lock at all (no transaction is open). Two batches in flight
        at once can then never wait for each other.
        """
        if self._stream is None:
            self._held = True

    def release(self) -> None:
        """End :meth:`hold`: send the rows kept meanwhile into the COPY. Never raises."""
        if not self._held:
            return
        self._held = False
        pending, rows = self._pending, self._pending_rows
        self._pending, self._pending_rows = [], 0
        if pending and not self._stream_failed:
            self._send(pending, rows)

    def _send(self, chunks: list[bytes], rows: int) -> None:
        try:
            if self._stream is None:
                conn = self.connection()
                conn.execute("SAVEPOINT f2pipe_direct")
                stack = ExitStack()
                cursor = stack.enter_context(conn.cursor())
                # Written from a thread of psycopg's: the loop never waits on the
                # socket (a backlog sent on release, a server slower than the parse).
                writer = QueuedLibpqWriter(cursor)
                self._copy = stack.enter_context(cursor.copy(COPY_DIRECT, writer=writer))
                self._stream = stack
                self._copy.write(COPY_HEADER)
            for data in chunks:
                self._copy.write(data)
            self._streamed += rows
        except (psycopg.Error, DatabaseUnavailable) as exc:
            _count_timeout(exc)
            log.debug("streaming COPY failed; the batch will be written whole", exc_info=exc)
            self._abandon_stream()

    def finish(self, rows: Sequence[Row]) -> WriteResult:
        """Commit the current batch (``rows``: all of its rows, in stream order).

        Releases the writer first if it was held: the caller says by finishing
        that nothing written before this batch is outstanding.
        """
        self.release()
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
                self._copy.write(COPY_TRAILER)
                stream.close()  # ends the COPY; raises what the server refused
                conn.execute("RELEASE SAVEPOINT f2pipe_direct")
                self.rows_in_table = True
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
        finally:
            self.rows_in_table = False
        return result

    def abandon(self) -> None:
        """Give up the open stream (its batch changed); the next finish writes whole."""
        if self._stream is not None or self._pending:
            self._abandon_stream()

    def _abandon_stream(self) -> None:
        self._stream_failed = True
        self._pending, self._pending_rows = [], 0
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
        timed_out = _count_timeout(exc)
        if conn.broken or (isinstance(exc, psycopg.OperationalError) and not timed_out):
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
                with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_DIRECT) as cp:
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


def _count_timeout(exc: BaseException) -> bool:
    """Count ``exc`` (or what it was raised from) if a timeout ended the wait."""
    cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) else exc
    if isinstance(cause, pgerrors.LockNotAvailable):
        DB_TIMEOUTS.labels(kind="lock").inc()
        return True
    if isinstance(cause, pgerrors.QueryCanceled):
        DB_TIMEOUTS.labels(kind="statement").inc()
        return True
    return False


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
