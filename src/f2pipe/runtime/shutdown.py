"""Stopping a service: the first signal asks it to finish, a second leaves at once.

Every long-running command (connector, processor, sink, simulator) installs
:func:`stop_on_signals`. A handler only calls ``stop`` (which sets a flag); the
service then finishes what it holds (flush, commit), closes its clients and
returns from its loop. A second SIGINT or SIGTERM means "now": the process exits
with 130 without cleanup, which loses nothing: what was not committed is
consumed again by the next start, and what was not acknowledged to the broker
is redelivered to the persistent session.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType

__all__ = ["EXIT_INTERRUPTED", "stop_on_signals"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def stop_on_signals(stop: Callable[[], None]) -> None:
    """Call ``stop`` on the first SIGINT or SIGTERM; exit at once on the second.

    Must be called from the main thread (Python delivers signals there).
    """
    received = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        if received > 1:
            os._exit(EXIT_INTERRUPTED)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
