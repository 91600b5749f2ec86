"""Whether the sink is making progress, for ``/readyz``.

The loop reports what happens to its batches (:meth:`Progress.flushed`,
:meth:`Progress.failed`, :meth:`Progress.settled`); the ops server's thread
asks :meth:`Progress.stalled`. A sink that cannot progress (its oldest
unwritten batch has waited too long, or the database failed several times in
a row) is not ready, with a reason, until a batch is written again. No
client: the runner owns the I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["Progress"]

log = logging.getLogger(__name__)


class Progress:
    """What the sink's loop has written lately, read from another thread.

    At most one batch is waiting for its write at a time (the runner settles
    a batch before it hands the next one to the database), so the oldest
    unwritten batch is the one flushed last and not yet settled.
    """

    def __init__(
        self,
        stall_s: float,
        max_failures: int = 3,  # write attempts in a row
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stall_s <= 0 or max_failures < 1:
            raise ValueError("stall_s must be > 0 and max_failures >= 1")
        self.stall_s = stall_s
        self.max_failures = max_failures
        self._clock = clock
        self._waiting_since: float | None = None  # when the unwritten batch was flushed
        self._failures = 0  # database failures since the last batch written
        self._last_error = ""
        self._reported = False  # the last answer was "stalled"

    def flushed(self) -> None:
        """A batch was handed to the database."""
        self._waiting_since = self._clock()

    def failed(self, error: str) -> None:
        """A write failed for a reason of the database (the batch is kept and retried)."""
        self._last_error = error
        self._failures += 1

    def settled(self) -> None:
        """The batch is written (its database transaction committed)."""
        self._waiting_since = None
        self._failures = 0

    def stalled(self) -> str | None:
        """Why the sink cannot progress now, or None if it can.

        Logs when the answer turns (a warning with the reason, then the recovery).
        """
        reason = self._reason()
        if bool(reason) != self._reported:
            self._reported = bool(reason)
            if reason:
                log.warning("not ready: the sink cannot progress", extra={"reason": reason})
            else:
                log.info("the sink progresses again: ready")
        return reason

    def _reason(self) -> str | None:
        since, failures = self._waiting_since, self._failures
        if failures >= self.max_failures:
            return f"database failed {failures} times in a row: {self._last_error[:200]}"
        if since is not None:
            waited = self._clock() - since
            if waited > self.stall_s:
                return f"oldest unwritten batch has waited {waited:.0f} s for the database"
        return None
