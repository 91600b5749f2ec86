"""``f2pipe bench``: the whole-pipeline benchmark (``bench/pipeline_bench.py``).

The benchmark reuses the stage benchmarks in the checkout's ``bench/`` (they are
not part of the installed package), so it runs from a checkout only.
Arguments after ``bench`` are passed through (``f2pipe bench --duration 90``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from f2pipe.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "pipeline_bench.py"


def _run(args: argparse.Namespace) -> int:
    if not SCRIPT.is_file():
        raise ConfigError(f"{SCRIPT} is missing: run `f2pipe bench` from an f2pipe checkout")
    return subprocess.run([sys.executable, str(SCRIPT), *args.rest], check=False).returncode


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, help="arguments of bench/pipeline_bench.py (--help)"
    )
    parser.set_defaults(func=_run)
