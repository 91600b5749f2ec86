"""A progress line for a person waiting on a long command (``dlq list``, ``dlq replay``).

The line goes to a stream of its own (stderr), so what a command prints on
stdout stays exactly what scripts read. It is shown when that stream is a
terminal, or when asked for (``--progress``), and at most once an interval:

- on a terminal one line is redrawn in place (``\\r``, erase to the end);
  when the command's own output goes to the same terminal, its lines are
  written above the progress line (:meth:`Progress.echo`), which stays last;
- elsewhere (a log file, a pipe) each update is a line of its own.

The summary (:meth:`Progress.finish`) is written whether or not progress is shown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

ERASE = "\r\x1b[K"  # back to the start of the row, erase to its end


class Progress:
    """Rate-limited progress lines on ``stream``; the loop's state a test can reach.

    ``enabled`` None: shown when ``stream`` is a terminal. ``clock`` gives
    seconds (monotonic); tests pass their own. Writing never raises for a
    closed or broken stream's sake: progress is worth less than the command.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        output: TextIO | None = None,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.output = sys.stdout if output is None else output  # the command's own lines
        self.tty = _isatty(self.stream)
        self._shared = self.tty and _isatty(self.output)  # both on one terminal
        self.enabled = self.tty if enabled is None else enabled
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.shown = 0  # progress lines written
        self._last: float | None = None
        self._live = False  # a redrawn line is on the terminal's current row
        self._text = ""  # the progress line last shown

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def update(self, line: Callable[[float], str]) -> None:
        """Show ``line(elapsed seconds)`` unless shown less than an interval ago.

        The first update is shown at once, so a person sees the total to wait
        for as soon as it is known.
        """
        if not self.enabled:
            return
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        self.shown += 1
        self._text = line(now - self.started)
        if self.tty:
            self._write(f"{ERASE}{self._text}")
            self._live = True
        else:
            self._write(f"{self._text}\n")

    def echo(self, text: str) -> None:
        """Write the line ``text`` to the command's output, as ``print`` would; on the
        terminal the progress line is on, above it."""
        if not (self._live and self._shared):
            print(text, file=self.output)
            return
        self._write(ERASE)
        print(text, file=self.output, flush=True)
        self._write(self._text)

    def clear(self) -> None:
        """Erase the redrawn line before other output reaches the same terminal."""
        if self._live:
            self._write(ERASE)
            self._live = False

    def finish(self, summary: str) -> None:
        """Replace the progress line by ``summary``, always written, on a line of its own."""
        self.clear()
        self._write(f"{summary}\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def rate(count: int, seconds: float) -> str:
    """``count`` per second, rounded for reading: ``1,234/s``; ``-/s`` before time has passed."""
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "-/s"
