"""When the sink writes, what it holds meanwhile, and how it waits between retries.

:class:`CommitPolicy` is data (a frozen dataclass with named presets) that
says when the open batch is written and its offsets committed; :class:`Batch`
is the open batch itself, the records consumed and not yet committed;
:func:`retry_backoff` is the sink's schedule for retrying the database and
offset commits. No client: the runner (:mod:`.runner`) owns the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from f2pipe.runtime.backoff import Backoff
from f2pipe.settings import Settings
from f2pipe.sink.stage import Row

if TYPE_CHECKING:
    from confluent_kafka import Message

__all__ = [
    "LOW_LATENCY",
    "RETRY_BASE_S",
    "THROUGHPUT",
    "Batch",
    "CommitPolicy",
    "retry_backoff",
]


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

# The first retry of the database or of an offset commit comes within this many seconds.
RETRY_BASE_S: Final = 0.1


def retry_backoff(cap_s: float) -> Backoff:
    """The sink's retry schedule: from :data:`RETRY_BASE_S`, doubling up to ``cap_s``.

    Jittered as every backoff of the package (:class:`f2pipe.runtime.backoff.Backoff`).
    The caller resets it when a new episode of retries begins.
    """
    return Backoff(base=RETRY_BASE_S, cap=cap_s)


@dataclass
class Batch:
    """Records consumed and not yet committed, in consumption order."""

    rows: list[Row] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)  # parallel to rows
    unparsed: list[tuple[Message, str]] = field(default_factory=list)  # (record, dlq.detail)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # last offset seen
    started: float = 0.0  # monotonic time of the first record
    records: int = 0
    write_seconds: float = 0.0  # the database write that stored it (0 when none ran)

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
