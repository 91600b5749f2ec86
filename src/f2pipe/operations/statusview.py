"""``f2pipe status`` on a terminal and the live view of ``f2pipe run``.

:mod:`f2pipe.operations.status` gathers the facts; this module renders them
with rich (tables side by side where the terminal is wide enough), and
:func:`live` redraws them until Ctrl-C, with the latest readings by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

from f2pipe.operations.status import LAG_SAMPLES, Observer, Report, fold, report
from f2pipe.settings import Settings, load_settings


def tables(rep: Report, readings: list[tuple[Any, ...]] | None = None) -> Any:
    from rich.columns import Columns
    from rich.console import Group
    from rich.table import Table

    health = Table(title="services and servers", title_justify="left", expand=False)
    for column in ("name", "state", "pid", "rss MB", "detail"):
        health.add_column(column)
    for h in rep.health:
        state = "[green]up[/]" if h.up else "[red]down[/]"
        if h.up and h.ready is False:
            state = "[yellow]up, not ready[/]"
        rss = "" if h.rss_mb is None else f"{h.rss_mb:.0f}"
        health.add_row(h.name, state, str(h.pid or ""), rss, h.detail)

    flow = Table(title=f"throughput (per s, over {rep.interval_s:.0f} s)", title_justify="left")
    flow.add_column("counter")
    flow.add_column("rate", justify="right")
    for key, value in rep.rates.items():
        flow.add_row(key.replace("_", " "), f"{value:,.1f}")

    lag = Table(title="consumer lag", title_justify="left")
    lag.add_column("stage")
    lag.add_column("records", justify="right")
    lag.add_column("trend")
    for stage, behind in rep.lag.items():
        trend = "[red]growing[/]" if rep.lag_growing.get(stage) else ""
        if (age := rep.lag_seconds.get(stage)) is not None:
            trend = f"{age:,.0f} s behind {trend}".strip()
        lag.add_row(stage, "?" if behind is None else f"{behind:,}", trend)

    if rep.broker and len(rep.brokers) < 2:
        dropped = rep.broker.get("dropped_messages")
        queued = rep.broker.get("queued_messages") or 0
        note = f"[red]{dropped:,} dropped[/]" if dropped else ""
        lag.add_row("broker queue", f"{queued:,}", note)

    brokers = Table(title="MQTT brokers", title_justify="left")
    for column in ("broker", "state", "clients", "queued", "dropped", "connectors"):
        brokers.add_column(column, justify="right" if column in ("clients", "queued") else "left")
    for name, entry in rep.brokers.items():
        dropped = entry.get("dropped_messages")
        brokers.add_row(
            f"{name} {entry.get('url', '')}",
            "[green]up[/]" if entry.get("up") else "[red]unreachable[/]",
            _count(entry.get("connected_clients")),
            _count(entry.get("queued_messages")),
            f"[red]{dropped:,}[/]" if dropped else _count(dropped),
            ", ".join(entry.get("connectors", [])),
        )

    dead = Table(title="dead letters by reason (since start)", title_justify="left")
    dead.add_column("stage/reason")
    dead.add_column("count", justify="right")
    for key, value in sorted(rep.dead_letters.items()):
        dead.add_row(key, f"{value:,.0f}")
    if not rep.dead_letters:
        dead.add_row("none", "0")

    # Side by side where the terminal is wide enough, so the view fits one screen.
    parts: list[Any] = [Columns([health, flow]), Columns([lag, dead])]
    if len(rep.brokers) > 1:  # one broker: its queue is a row of the lag table
        parts.append(brokers)
    if readings is not None:
        latest = Table(title="latest readings", title_justify="left")
        for column in ("time (UTC)", "device", "datapoint", "value", "unit"):
            latest.add_column(column, justify="right" if column == "value" else "left")
        for ts, device, label, value, unit in readings:
            shown = "" if value is None else f"{value:g}"
            latest.add_row(f"{ts:%H:%M:%S.%f}"[:-3], device or "?", label or "?", shown, unit or "")
        parts.append(latest)
    if rep.problems:
        parts.append("[red]" + "; ".join(rep.problems) + "[/]")
    if rep.alarms:
        parts.append("[yellow]alarm: " + "; ".join(rep.alarms) + "[/]")
    return Group(*parts)


def _count(value: object) -> str:
    return "?" if value is None else f"{value:,}"


def latest_readings(settings: Settings, limit: int = 10) -> list[tuple[Any, ...]] | None:
    """The newest value per datapoint with names, labels and units; None if unreachable."""
    import psycopg

    try:
        with psycopg.connect(settings.timeseries_dsn, connect_timeout=2) as conn:
            rows = conn.execute(
                "SELECT timestamp AT TIME ZONE 'UTC', device_name, datapoint_label, value, unit"
                " FROM latest_readings_named ORDER BY timestamp DESC LIMIT %s",
                (limit,),
            ).fetchall()
    except psycopg.Error:
        return None
    return [tuple(row) for row in rows]


def live(settings: Settings, refresh: float = 2.0, readings_every: float = 5.0) -> None:
    """Redraw the picture every ``refresh`` s until KeyboardInterrupt.

    On a terminal the view is redrawn in place; otherwise (a pipe, a log file)
    each picture is printed after the previous one.
    """
    from rich.console import Console
    from rich.live import Live

    console = Console()
    observer = Observer(settings)
    previous = observer.snapshot()
    lags = [previous.lag]
    readings = latest_readings(settings)
    readings_at = time.monotonic()
    with contextlib.ExitStack() as stack_:
        view = stack_.enter_context(Live(console=console)) if console.is_terminal else None
        while True:
            time.sleep(refresh)
            current = observer.snapshot()
            lags = [*lags, current.lag][-LAG_SAMPLES:]
            if time.monotonic() - readings_at >= readings_every:
                readings = latest_readings(settings) or readings
                readings_at = time.monotonic()
            rep = fold(previous, current, lags, current.taken - previous.taken)
            if view is not None:
                view.update(tables(rep, readings))
            else:
                console.print(tables(rep, readings))
            previous = current


def _run(args: argparse.Namespace) -> int:
    rep = report(load_settings(), args.interval)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        from rich.console import Console

        Console().print(tables(rep))
    return 0 if rep.ok else 1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--interval", type=float, default=2.0,
        help="seconds between the two scrapes that give the rates (default 2)",
    )  # fmt: skip
    parser.set_defaults(func=_run)
