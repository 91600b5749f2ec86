"""Garbage-collector settings for the services' message paths.

Each stage allocates a few containers per message (tuples, dicts of parsed
JSON, Kafka message objects, header lists) that live until their batch or
round is acknowledged, none of them in a reference cycle: reference counting
frees them. With the interpreter's default thresholds (700, 10, 10) the
cyclic collector runs every few hundred allocations and walks every pending
message each time; profiles put 2-3 µs per message (the connector and the
simulator) and up to 30 % of the sink's CPU there.
"""

from __future__ import annotations

import gc


def quiet_gc(young: int, middle: int = 20, old: int = 20) -> None:
    """Freeze what is alive now; collect generation 0 after ``young`` net allocations.

    The threshold counts allocations minus deallocations, so it is reached only
    when containers really accumulate (a batch in progress counts, its freed
    temporaries do not).

    Call once, after start-up: the objects alive then (modules, classes,
    clients) live as long as the process and leave every collection. Cycles,
    which still occur (exceptions, library internals), are collected as
    before, only later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, middle, old)
