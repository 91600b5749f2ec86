"""Metrics that more than one stage reports, registered once per process.

Each stage keeps its own metrics beside its code; a family shared by several
stages lives here, so that importing two stages into one process (tests, tools)
never registers it twice.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Info

from f2pipe._version import package_version, python_version

# Records sent to the dead-letter topic, by stage (connector, processor, sink) and reason.
DEAD_LETTERS = Counter(
    "f2pipe_dead_letters", "records sent to the dead-letter topic", ["stage", "reason"]
)
# Consumer-group rebalances a replica went through, by stage (processor, sink) and kind:
# partitions assigned, revoked, or lost (taken away without a revocation).
REBALANCES = Counter(
    "f2pipe_rebalances", "consumer-group rebalance callbacks of this replica", ["stage", "kind"]
)

_build_info: Info | None = None


def register_build_info() -> None:
    """Export ``f2pipe_build_info{version,python} 1`` from this process's /metrics.

    Every service calls it (importing this module does, for the stages);
    calling it again does nothing.
    """
    global _build_info
    if _build_info is None:
        # The running f2pipe and Python versions, as labels of a constant 1.
        _build_info = Info("f2pipe_build", "f2pipe and Python versions", registry=REGISTRY)
        _build_info.info({"version": package_version(), "python": python_version()})


register_build_info()
