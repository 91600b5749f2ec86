"""A fault hook for crash tests; it exists only in the test tree.

A service started with ``PYTHONPATH=tests/faults`` and
``F2PIPE_TEST_KILL_AT=<module>:<qualified name>:<n>`` imports this module at
interpreter start. It wraps that function so that its ``n``-th call kills the
process with SIGKILL before the call runs: a crash exactly at one of the
pipeline's commit points (for example the processor's offset commit after its
outputs were flushed), with no chance to clean up. The product holds no fault
code; without the variable this module does nothing.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from typing import Any

_SPEC = os.environ.pop("F2PIPE_TEST_KILL_AT", "")


def _install(spec: str) -> None:
    module_name, qualname, count = spec.split(":")
    owner: Any = importlib.import_module(module_name)
    *path, attribute = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, attribute)
    calls = 0

    @functools.wraps(original)
    def killing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls >= int(count):
            sys.stderr.write(f"fault hook: SIGKILL at call {calls} of {qualname}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, attribute, killing)


if _SPEC:
    _install(_SPEC)
