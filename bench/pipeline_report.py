"""The whole-pipeline benchmark's report: one run's figures, the scaling step, Markdown.

A run is the pipeline with a given number of processors and sinks: its best
sustained attempt, the latency at a quarter of that rate, the ledger check, and
the CPU per frame of every process (each replica on its own line). The scaling
step compares the run with two of each against the run with one.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg

from f2pipe.operations import stack

# A second replica's figures within this fraction of the first run's count as the same.
FLAT = 0.15


def run_report(
    replicas: int,
    best: dict[str, Any],
    attempts: list[dict[str, Any]],
    latency: dict[str, Any],
    check: tuple[int, int, int],
    peak: dict[str, float | None],
) -> dict[str, Any]:
    """One run's section of the report, from its best sustained attempt."""
    expected, lost, wrong = check
    frames = max(best["frames"], 1)
    per_frame = {name: seconds / frames * 1e6 for name, seconds in best["cpu_s"].items()}
    total = sum(per_frame.values())
    cores = os.cpu_count() or 1
    rates = best["stage_rates_per_s"]
    return {
        "processors": replicas,
        "sinks": replicas,
        "target_frames_per_s": best["target_frames_per_s"],
        "frames_per_s": best["frames_per_s"],
        "readings_per_s": best["readings_per_s"],
        "sustained": best["sustained"],
        "load_average_1m": best["load_average_1m"],
        "lost": lost,
        "wrong": wrong,
        "ledger_readings": expected,
        "latency_ms": latency,
        "connections": best["connections"],
        "stages": {
            "connector": {
                "msgs_per_s": rates.get("kafka_acked", 0.0),
                "cpu_us_per_msg": best["connector_cpu_us_per_msg"],
            },
            "processor": {
                "frames_per_s": rates.get("frames_consumed", 0.0),
                "cpu_us_per_frame": best["processor_cpu_us_per_frame"],
                "replicas": best["replicas"]["processor"],
            },
            "sink": {
                "rows_per_s": rates.get("readings_landed", 0.0),
                "cpu_us_per_row": best["sink_cpu_us_per_row"],
                "replicas": best["replicas"]["sink"],
            },
        },
        "cpu_share": best["cpu_share_of_2_cores"],
        "cpu_us_per_frame": {name: round(us, 1) for name, us in per_frame.items()},
        # Every process on the box, load generator included, per frame: what the cores
        # allow if nothing else limits the rate.
        "budget": {
            "cpu_us_per_frame_total": round(total, 1),
            "cores": cores,
            "frames_per_s_if_cpu_bound": round(cores * 1e6 / total) if total else 0,
        },
        "peak_rss_mb": peak,
        "attempts": attempts,
    }


def _stage_us(run: dict[str, Any], stage: str) -> float:
    """CPU per frame of every process of ``stage`` together (``processor`` and ``processor-2``)."""
    return float(
        sum(us for name, us in run["cpu_us_per_frame"].items() if name.split("-")[0] == stage)
    )


def scaling(one: dict[str, Any], two: dict[str, Any], same_rate: dict[str, Any]) -> dict[str, Any]:
    """The step from one processor and one sink to two of each, with a plain verdict.

    ``same_rate``: the two-replica attempt at the one-replica run's sustained rate,
    where CPU per frame is compared at equal load.
    """
    throughput = two["frames_per_s"] / one["frames_per_s"] if one["frames_per_s"] else 0.0
    rate = same_rate["frames_per_s"]
    frames = max(same_rate["frames"], 1)
    per_frame: dict[str, dict[str, float]] = {}
    for stage in ("processor", "sink"):
        before = _stage_us(one, stage)
        after = sum(
            seconds / frames * 1e6
            for name, seconds in same_rate["cpu_s"].items()
            if name.split("-")[0] == stage
        )
        per_frame[stage] = {
            "one_us": round(before, 1),
            "two_us": round(after, 1),
            "ratio": round(after / before, 3) if before else 0.0,
            # What the second replica costs on its own at this rate, in cores.
            "added_cores": round((after - before) * rate / 1e6, 3),
        }
    total_one = one["budget"]["cpu_us_per_frame_total"]
    total_two = sum(same_rate["cpu_s"].values()) / frames * 1e6
    per_frame["all"] = {
        "one_us": total_one,
        "two_us": round(total_two, 1),
        "ratio": round(total_two / total_one, 3) if total_one else 0.0,
        "added_cores": round((total_two - total_one) * rate / 1e6, 3),
    }
    # Best sustained against best sustained; the equal-rate attempt is told apart, since on
    # a shared box the load generator alone can miss a rate by a few per cent.
    holds = throughput >= 1 - FLAT
    flat = all(abs(v["ratio"] - 1) <= FLAT for v in per_frame.values())
    proc, sink, every = per_frame["processor"], per_frame["sink"], per_frame["all"]
    if flat:
        cost = (
            f"the CPU per frame stays flat (within {FLAT:.0%}): the replicas split the work"
            " without adding to its cost, so the model's cores follow the per-frame costs"
            " at any replica count"
        )
    else:
        cost = (
            "a second replica of a stage adds CPU of its own:"
            f" {proc['added_cores']} cores for the processors and"
            f" {sink['added_cores']} for the sinks at {rate:,.0f} frames/s; the model counts"
            " that per replica on top of the per-frame costs"
        )
    verdict = (
        f"Two processors and two sinks sustained {two['frames_per_s']:,.0f} frames/s against"
        f" {one['frames_per_s']:,.0f} with one of each (x{throughput:.2f}). At the one-replica"
        f" run's rate the two-replica run {'held' if same_rate['sustained'] else 'did not hold'}"
        f" it, and CPU per frame went from {proc['one_us']} to {proc['two_us']} us for the"
        f" processors, {sink['one_us']} to {sink['two_us']} us for the sinks and"
        f" {every['one_us']} to {every['two_us']} us for every process together."
        f" On {os.cpu_count()} cores a second replica adds no core, so the step cannot raise"
        f" the rate; it shows that throughput {'holds' if holds else 'does not hold'} and"
        f" that {cost}."
    )
    return {
        "throughput_ratio": round(throughput, 3),
        "same_rate": {
            "target_frames_per_s": same_rate["target_frames_per_s"],
            "frames_per_s": same_rate["frames_per_s"],
            "sustained": same_rate["sustained"],
        },
        "cpu_us_per_frame": per_frame,
        "per_frame_cost_flat": flat,
        "throughput_holds": holds,
        "verdict": verdict,
    }


# --------------------------------------------------------------------------- context
def _first_line(command: list[str]) -> str:
    with contextlib.suppress(OSError):
        out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    return "?"


def versions(dsn: str) -> dict[str, str]:
    import confluent_kafka

    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    mosquitto = stack.Program("mosquitto", "mosquitto").find() or "mosquitto"
    return {
        "f2pipe": metadata.version("f2pipe"),
        "python": platform.python_version(),
        "postgresql": str(row[0]) if row else "?",
        "kafka": stack.kafka_version(),
        "mosquitto": _first_line([mosquitto, "-h"]),
        "redis": _first_line(["redis-server", "--version"]),
        "confluent_kafka": metadata.version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "psycopg": psycopg.__version__,
    }


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_mb": memory,
        "kernel": platform.release(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- markdown
def _run_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    """(measure, value) of one run, in the order of the comparison table."""
    lat = run["latency_ms"]
    stages = run["stages"]
    conn = run["connections"]
    processors = stages["processor"]["replicas"]
    return [
        ("sustained frames/s", f"{run['frames_per_s']:,.0f}"),
        ("load average (1 min) at the end of that attempt", f"{run['load_average_1m']:.2f}"),
        ("sustained readings/s", f"{run['readings_per_s']:,.0f}"),
        ("readings in the ledger", f"{run['ledger_readings']:,}"),
        ("lost / wrong readings", f"{run['lost']} / {run['wrong']}"),
        (
            "latency p50 / p95 / p99 at 25 % load (ms)",
            f"{lat['p50']} / {lat['p95']} / {lat['p99']}",
        ),
        (
            "broker connections while publishing / reconnects",
            f"{conn['broker_median']:,} / {conn['reconnects']}",
        ),
        ("time to connect the fleet (s)", f"{conn['connect_s']}"),
        (
            "CPU per connection to connect the fleet, broker / simulator (ms)",
            " / ".join(str(v) for v in conn["handshake_cpu_ms_per_connection"].values()),
        ),
        ("connector msgs/s", f"{stages['connector']['msgs_per_s']:,.0f}"),
        ("connector CPU us per msg", f"{stages['connector']['cpu_us_per_msg']}"),
        (
            "processors: CPU us per frame, all together",
            f"{stages['processor']['cpu_us_per_frame']}",
        ),
        (
            "processors: share of the frames each consumed",
            " / ".join(f"{v['share_of_input']:.0%}" for v in processors.values()),
        ),
        ("sinks: rows/s", f"{stages['sink']['rows_per_s']:,.0f}"),
        ("sinks: CPU us per row, all together", f"{stages['sink']['cpu_us_per_row']}"),
        (
            "sinks: share of the records each consumed",
            " / ".join(f"{v['share_of_input']:.0%}" for v in stages["sink"]["replicas"].values()),
        ),
        ("CPU us per frame, every process", f"{run['budget']['cpu_us_per_frame_total']}"),
    ]


def _cpu_table(run: dict[str, Any]) -> list[str]:
    lines = [
        "| process | CPU share | CPU us per frame | peak RSS MB |",
        "| --- | --- | --- | --- |",
    ]
    for name, share in run["cpu_share"].items():
        per = run["cpu_us_per_frame"].get(name, "")
        peak = run["peak_rss_mb"].get(name) or "-"
        lines.append(f"| {name} | {share:.0%} | {per} | {peak} |")
    budget = run["budget"]
    lines += [
        f"| all | | {budget['cpu_us_per_frame_total']} | |",
        "",
        f"At {budget['cpu_us_per_frame_total']} us of CPU per frame, {budget['cores']} cores"
        f" allow at most {budget['frames_per_s_if_cpu_bound']:,} frames/s.",
    ]
    return lines


def _secured(flags: dict[str, bool]) -> str:
    on = [name for name, secured in flags.items() if secured]
    return ", ".join(on) if on else "none"


def _loads(values: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in values)


def _count(n: int, what: str) -> str:
    words = {1: "one", 2: "two"}
    return f"{words.get(n, n)} {what}{'' if n == 1 else 's'}"


def markdown(report: dict[str, Any]) -> str:
    fleet = report["fleet"]
    ceil = report["ceilings"]
    one, two = report["runs"]
    lines = [
        "# f2pipe benchmark: the whole pipeline on one box",
        "",
        f"Run {report['when']} on {report['machine']['cpus']} cores"
        f" ({report['machine']['cpu_model']}), {report['machine']['memory_mb']} MB; load average"
        f" (1 / 5 / 15 min) {_loads(report['machine']['load_average_at_start'])} at the start,"
        f" {_loads(report['machine']['load_average'])} at the end; the load generator runs on"
        " the same box.",
        "",
        f"The load comes from {fleet['controllers']:,} simulated controllers, each on its own"
        f" mTLS connection (the broker held {fleet['broker_connections']:,} connections"
        " while they published, the connector's one included), one Environmental Sensor each,"
        " registered in the metadata with a certificate from the stack's CA. Each run is"
        f" sustained for at least {report['duration_s']:.0f} s. CPU is counted from the"
        " moment every controller is connected: the TLS handshakes are shown apart, per"
        " connection (the simulator's share includes its own start-up). Registering the"
        f" controllers took {fleet['provision_s']['metadata_s']} s (the fleet importer) and"
        f" their certificates {fleet['provision_s']['certificates_s']} s. Secured servers:"
        f" {_secured(report['secured'])} (each service with a password of its own; PostgreSQL"
        " and Kafka over TLS).",
        "",
        "| measure | 1 processor, 1 sink | 2 processors, 2 sinks |",
        "| --- | --- | --- |",
    ]
    for (label, value_one), (_, value_two) in zip(_run_rows(one), _run_rows(two), strict=True):
        lines.append(f"| {label} | {value_one} | {value_two} |")
    lines += [
        "",
        f"Scaling step: {report['scaling']['verdict']}",
        "",
        "| ceiling (same run) | value |",
        "| --- | --- |",
        f"| bare MQTT subscriber msgs/s | {ceil['mqtt_subscriber_msgs_per_s']:,.0f} |",
        f"| binary COPY rows/s | {ceil['copy_rows_per_s']:,.0f} |",
        f"| COPY + ON CONFLICT rows/s | {ceil['copy_upsert_rows_per_s']:,.0f} |",
    ]
    for run in (one, two):
        lines += [
            "",
            f"CPU with {_count(run['processors'], 'processor')} and"
            f" {_count(run['sinks'], 'sink')}, sustained phase (PostgreSQL with its backends;"
            " simulator: the load generator), and peak memory (PostgreSQL: the postmaster):",
            "",
            *_cpu_table(run),
        ]
    lines += ["", "Versions:", ""]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"
