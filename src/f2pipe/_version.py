"""The installed package's version, from its metadata (a wheel, or an editable checkout)."""

from __future__ import annotations

import functools
import platform
from importlib.metadata import PackageNotFoundError, version


@functools.cache
def package_version() -> str:
    """``f2pipe``'s version as installed; ``unknown`` when run from sources never installed."""
    try:
        return version("f2pipe")
    except PackageNotFoundError:
        return "unknown"


def python_version() -> str:
    return platform.python_version()
