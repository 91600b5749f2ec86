"""``f2pipe bench``: the whole-pipeline benchmark (``bench/pipeline_bench.py``).

The benchmark reuses the stage benchmarks in the checkout's ``bench/`` (they are
not part of the installed package), so it runs from a checkout only.
Arguments after ``bench`` are passed through (``f2pipe bench --duration 90``,
``--devices 2000``; ``--duration 20`` for a quick look, not a report).
The script logs each phase with its time; this command says where it starts and
how long the whole took, on stderr (``--help`` of the script prints neither).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from f2pipe.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "pipeline_bench.py"


def _run(args: argparse.Namespace) -> int:
    if not SCRIPT.is_file():
        raise ConfigError(
            "needs an f2pipe checkout: it runs bench/pipeline_bench.py, "
            "which the installed package does not include"
        )
    talk = not {"-h", "--help"} & set(args.rest)
    began = time.monotonic()
    if talk:
        print(
            "bench: starting its own servers and a simulated fleet, then measuring with one "
            "processor and one sink, then two of each; the phases follow; report.json and "
            "report.md go to bench/ (or --out)",
            file=sys.stderr,
            flush=True,
        )
    code = subprocess.run([sys.executable, str(SCRIPT), *args.rest], check=False).returncode
    if talk:
        minutes, seconds = divmod(round(time.monotonic() - began), 60)
        outcome = "done" if code == 0 else f"failed (exit {code})"
        print(f"bench: {outcome} in {minutes} min {seconds} s", file=sys.stderr, flush=True)
    return code


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, help="arguments of bench/pipeline_bench.py (--help)"
    )
    parser.set_defaults(func=_run)
