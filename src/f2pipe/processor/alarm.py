"""The dead-letter ratio alarm (pure): is a bad deploy dead-lettering everything?

A device that sends garbage is normal and must never halt the pipeline; a
ratio of dead letters far above usual over a whole window is a sign that the
metadata or a template is broken. :class:`DeadLetterAlarm` only judges: the
runner reports its verdict as a metric and a log line on each change.
"""

from __future__ import annotations

import time
from collections import deque

__all__ = ["DeadLetterAlarm"]


class DeadLetterAlarm:
    """Dead letters / consumed over a sliding time window; raised above a ratio.

    The alarm is raised while the window holds at least ``min_messages`` records
    and more than ``ratio`` of them were dead letters.
    """

    def __init__(self, ratio: float, window_s: float, min_messages: int) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.min_messages = min_messages
        self._batches: deque[tuple[float, int, int]] = deque()
        self._consumed = 0
        self._dead = 0
        self.current = 0.0
        """Dead letters / consumed in the window after the last :meth:`observe`."""
        self.active = False
        """Whether the alarm is raised."""

    def observe(self, consumed: int, dead: int, now: float | None = None) -> bool:
        """Add one batch (at ``now``, monotonic seconds); return whether the alarm is raised."""
        now = time.monotonic() if now is None else now
        self._batches.append((now, consumed, dead))
        self._consumed += consumed
        self._dead += dead
        while self._batches and self._batches[0][0] < now - self.window_s:
            _, c, d = self._batches.popleft()
            self._consumed -= c
            self._dead -= d
        self.current = self._dead / self._consumed if self._consumed else 0.0
        self.active = self._consumed >= self.min_messages and self.current > self.ratio
        return self.active
