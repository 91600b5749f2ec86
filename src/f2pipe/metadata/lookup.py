"""What a metadata lookup answers, apart from how it is found (pure).

The processor's stage takes any function of ``(mac, connector, kind, index)``
returning a :data:`Resolution`; :class:`~f2pipe.metadata.resolver.Resolver`
is the one that asks Redis and PostgreSQL. Keeping the answer's types here
lets the stage import them without loading a database client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from zoneinfo import ZoneInfo

from f2pipe.core.decode import CompiledTemplate
from f2pipe.core.reasons import Reason

__all__ = ["SKIPPED", "Resolution", "Resolved"]


class _Skipped:
    """Verdict for a component that is deliberately not decoded (counted, not dead-lettered)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED: Final = _Skipped()


@dataclass(frozen=True, slots=True)
class Resolved:
    """Everything needed to decode one message of a wired component."""

    device_id: int
    tz: ZoneInfo
    template: CompiledTemplate


# A wired component, a dead-letter reason (unknown_device, unmapped_sensor), or SKIPPED.
Resolution = Resolved | Reason | _Skipped
