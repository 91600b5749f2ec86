"""Support for the test suite and the benchmarks, shipped with the package.

:mod:`.servers` starts private servers (Mosquitto, a single-node Kafka, the
connector) on free loopback ports with their own data folders, makes a
throwaway PKI, and reads topics back; :mod:`.hosts` gives servers hosts of
their own on one machine (network namespaces, addresses and names). Nothing
here is used by the pipeline itself; it exists so that ``tests/`` and
``bench/`` exercise the real servers the same way, and so that a benchmark
needs only the installed package.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Call ``probe`` until it returns a truthy value and return that; raise
    ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
