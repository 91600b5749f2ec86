"""Dead-letter records (SPEC section 4): the one shape of a rejection and its headers.

A stage that cannot turn a record into its output says why with a
:class:`Rejected` (a reason from the closed set of SPEC section 7 and a
one-line detail for operators). The runner turns it into a dead letter: the
record's own key, value and headers, minus any ``dlq.*`` headers of an earlier
dead-lettering, plus ``dlq.stage``, ``dlq.reason``, ``dlq.detail``,
``dlq.source`` and ``dlq.ts``. Replay strips the ``dlq.*`` headers again with
:func:`original_headers`. Pure: the caller passes the clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from f2pipe.core.reasons import Reason
from f2pipe.core.records import Header, Headers

__all__ = [
    "DETAIL_LIMIT",
    "PREFIX",
    "Rejected",
    "dead_letter_headers",
    "original_headers",
]

PREFIX: Final = "dlq."
# dlq.detail is cut to this many bytes: a detail names the fault, it does not carry data.
DETAIL_LIMIT: Final = 1000


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a record becomes a dead letter: the reason and a one-line detail."""

    reason: Reason
    detail: str


def original_headers(headers: Iterable[Header] | None) -> Headers:
    """``headers`` without any ``dlq.*`` ones, in their order."""
    return [(name, value) for name, value in headers or () if not name.startswith(PREFIX)]


def dead_letter_headers(
    headers: Iterable[Header] | None,
    stage: str,
    rejected: Rejected,
    source: bytes,
    ts_ms: int,
) -> Headers:
    """The headers of a dead letter: the record's own (without ``dlq.*``) plus the
    ``dlq.*`` ones of SPEC section 4. ``source`` is ``topic/partition/offset`` for a
    Kafka record or ``mqtt/<topic>``; ``ts_ms`` the time of the dead-lettering."""
    out = original_headers(headers)
    out += [
        ("dlq.stage", stage.encode()),
        ("dlq.reason", rejected.reason.value.encode()),
        ("dlq.detail", rejected.detail.encode("utf-8", "replace")[:DETAIL_LIMIT]),
        ("dlq.source", source),
        ("dlq.ts", b"%d" % ts_ms),
    ]
    return out
