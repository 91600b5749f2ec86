"""Statements of a fleet import: one entry's, or a few thousand entries' at once.

A bulk statement takes its rows as one array per column (``unnest``) and runs
in a savepoint. When the database refuses it, :func:`bulk` narrows the rows
down by halves to the one entry the database refuses and raises
:class:`Refused` naming it, so a bulk import reports a refusal as precisely as
one statement per entry would, at the price of one statement per halving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import psycopg

from f2pipe.errors import FleetError
from f2pipe.metadata.fleet.document import Fleet, Loc

__all__ = ["CHUNK", "Conn", "Progress", "ProgressReport", "Refused", "Row", "bulk", "run"]

Conn = psycopg.Connection[tuple[Any, ...]]
CHUNK = 5000  # rows per bulk statement: progress moves, and no statement grows without bound

Row = tuple[Loc, tuple[Any, ...]]
"""One entry's row for a bulk statement: where it is in the document, and its values."""

ProgressReport = Callable[[int, int], None]
"""Told ``(entries done, entries in the document)`` as an import goes."""


class Refused(FleetError):
    """A database refusal during the import, tied to the entry that caused it.

    Never escapes: the importer turns it into a FleetError naming the line.
    """

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def _refusal(exc: psycopg.Error) -> str:
    diag = exc.diag
    what = diag.message_primary or str(exc)
    if diag.constraint_name:
        what += f" (constraint {diag.constraint_name})"
    return f"database refused it: {what}"


def run(conn: Conn, loc: Loc, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Run one statement for the entry at ``loc``; a refusal becomes Refused naming it."""
    try:
        with conn.transaction():  # a savepoint, so the refusal names this entry alone
            cur = conn.execute(query.encode(), params)
            return cur.fetchall() if cur.description else []
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
        raise Refused(loc, _refusal(exc)) from None


@dataclass
class Progress:
    """Entries done of the document's total, told to ``report`` as they advance."""

    fleet: Fleet
    report: ProgressReport | None = None
    done: int = 0

    def __post_init__(self) -> None:
        f = self.fleet
        kinds = (f.device_types, f.templates, f.controllers, f.sensors, f.wiring)
        self.total = sum(len(entries) for entries in kinds)

    def advance(self, n: int) -> None:
        self.done += n
        if self.report is not None and n:
            self.report(self.done, self.total)


def _columns(rows: Sequence[Row]) -> list[list[Any]]:
    """The rows' values as one list per column: the arrays a bulk statement unnests."""
    return [list(column) for column in zip(*(values for _, values in rows), strict=True)]


def bulk(
    conn: Conn, rows: Sequence[Row], query: str, progress: Progress, count: bool = True
) -> list[tuple[Any, ...]]:
    """Run ``query`` over ``rows`` (as column arrays), a chunk per statement; its results.

    Nothing runs for no rows (a statement trigger would bump the change version
    for nothing). A refused chunk is narrowed down to the entry that caused it:
    raises Refused naming that entry. ``count`` says whether the rows are
    entries of the document (progress) or side rows, such as connectors.
    """
    results: list[tuple[Any, ...]] = []
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        try:
            with conn.transaction():  # a savepoint: a refusal leaves the import usable
                cur = conn.execute(query.encode(), _columns(chunk))
                results += cur.fetchall() if cur.description else []
        except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
            _narrow(conn, chunk, query, exc)
        if count:
            progress.advance(len(chunk))
    return results


def _narrow(conn: Conn, rows: Sequence[Row], query: str, failure: psycopg.Error) -> NoReturn:
    """Find which of ``rows``, refused together, the database refuses; raise Refused for it.

    Halves are tried in savepoints: a refused half is narrowed further; a half
    that passes stays written (the import fails anyway), so a conflict between
    the halves shows in the second one. Each step costs one statement.
    """
    while len(rows) > 1:
        first, second = rows[: len(rows) // 2], rows[len(rows) // 2 :]
        try:
            with conn.transaction():
                conn.execute(query.encode(), _columns(first))
        except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
            rows, failure = first, exc
            continue
        rows = second
    run(conn, rows[0][0], query, _columns(rows))
    raise Refused(rows[0][0], _refusal(failure))  # refused with the others, not alone
