"""Metrics that more than one stage reports, registered once per process.

Each stage keeps its own metrics beside its code; a family shared by several
stages lives here, so that importing two stages into one process (tests, tools)
never registers it twice.
"""

from __future__ import annotations

from prometheus_client import Counter

# Records sent to the dead-letter topic, by stage (connector, processor, sink) and reason.
DEAD_LETTERS = Counter(
    "f2pipe_dead_letters", "records sent to the dead-letter topic", ["stage", "reason"]
)
