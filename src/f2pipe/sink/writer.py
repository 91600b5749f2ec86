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

from f2pipe.errors import DatabaseUnavailable
from f2pipe.sink.stage import (
    COPY_HEADER,
    COPY_TRAILER,
    Row,
    encode_copy,
    encode_rows,
    newest_per_key,
)

__all__ = ["COPY_DIRECT", "WriteResult", "Writer"]

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
                self._copy = stack.enter_context(cursor.copy(COPY_DIRECT))
                self._stream = stack
                self._copy.write(COPY_HEADER)
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
                self._copy.write(COPY_TRAILER)
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
