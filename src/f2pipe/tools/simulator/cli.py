"""``f2pipe simulate``: live telemetry from a fleet, or a counted load with a ledger."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path

from f2pipe.runtime.gctune import quiet_gc
from f2pipe.runtime.logs import setup_logging
from f2pipe.runtime.shutdown import stop_on_signals
from f2pipe.settings import get_settings
from f2pipe.tools.simulator.fleet import demo_fleet, generated_fleet
from f2pipe.tools.simulator.live import Live
from f2pipe.tools.simulator.load import run_load
from f2pipe.tools.simulator.messages import Summary
from f2pipe.tools.simulator.provisioning import (
    broker_addresses,
    provision_certificates,
    provision_fleet,
)

__all__ = ["configure", "main"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, help="load mode: publish exactly this many messages")
    parser.add_argument("--rate", type=float, help="load mode: messages per second (default: max)")
    parser.add_argument("--window", type=int, default=20000, help="max unacknowledged messages")
    parser.add_argument(
        "--devices", type=int, help="simulate N generated controllers instead of the demo fleet"
    )
    parser.add_argument(
        "--interval", type=float, default=30.0, help="live mode: seconds per sensor"
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=60.0,
        help="live mode: mean seconds between status changes per controller (0: none)",
    )
    parser.add_argument("--faults", type=float, default=0.0, help="fraction of faulty messages")
    parser.add_argument(
        "--give-up",
        type=float,
        default=120.0,
        help="load mode: seconds a lost connection keeps retrying before its messages are "
        "abandoned (uncounted)",
    )
    parser.add_argument(
        "--ledger", type=Path, help="load mode: write acknowledged messages (JSONL)"
    )
    parser.add_argument("--seed", type=int, help="random seed (reproducible values and faults)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--provision",
        action="store_true",
        help="first register the simulated controllers and sensors in the metadata",
    )
    parser.add_argument(
        "--provision-certs",
        action="store_true",
        help="first obtain missing device certificates from certgen (CSR, admin token)",
    )
    parser.add_argument("--log-level", default="WARNING")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    setup_logging("simulator", args.log_level)
    settings = get_settings()
    if not 1 <= args.window <= 65535:
        # 65,535 is the packet-id space of one connection, so no single one overflows it.
        print("--window must be between 1 and 65535", file=sys.stderr)
        return 2
    sensors = generated_fleet(args.devices) if args.devices else demo_fleet()
    if args.provision:
        provision_fleet(settings, sensors)
    if args.provision_certs:
        provision_certificates(settings, dict.fromkeys(s.mac for s in sensors))
    addresses = broker_addresses(settings, dict.fromkeys(s.mac for s in sensors))
    # Up to the window of messages waits for its PUBACK.
    quiet_gc(50_000)
    if args.count is None:
        live = Live(
            settings, sensors, args.interval, asyncio.Event(), args.status_interval, addresses
        )
        stop_on_signals(live.request_stop)
        summary = asyncio.run(live.run())
    else:
        ledger = args.ledger.open("w") if args.ledger else None
        try:
            with contextlib.ExitStack() as stack:
                progress = None
                if sys.stderr.isatty() and not args.json:
                    # A live bar for a person at a terminal; logs stay quiet and structured.
                    from rich.console import Console
                    from rich.progress import Progress

                    bar = stack.enter_context(Progress(console=Console(stderr=True)))
                    task = bar.add_task("acknowledged by the broker", total=args.count)

                    def progress(summary: Summary) -> None:
                        bar.update(task, completed=summary.acknowledged)

                summary = asyncio.run(
                    run_load(
                        settings,
                        sensors,
                        args.count,
                        rate=args.rate,
                        window=args.window,
                        fault_fraction=args.faults,
                        ledger=ledger,
                        seed=args.seed,
                        progress=progress,
                        give_up=args.give_up,
                        addresses=addresses,
                    )
                )
        finally:
            if ledger is not None:
                ledger.close()
    out = summary.as_dict()
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"published {out['published']}, acknowledged {out['acknowledged']}, "
            f"{out['elapsed_s']} s, {out['rate_per_s']} msg/s"
        )
    return 0 if summary.acknowledged == summary.published else 1
