"""Connector throughput against its own ceilings, measured in one run.

Three phases over the same private Mosquitto (mutual TLS, persistence, QoS 1)
and the same publisher (the simulator's load mode, in forked processes):

1. ``publisher``: the publisher alone (no subscriber): the load generator's ceiling.
2. ``bare_subscriber``: ``f2pipe connector --bare``: the connector's own MQTT
   client and receive path, acknowledging each message on receipt, no Kafka.
3. ``connector``: ``f2pipe connector`` into Kafka (idempotent, acks=all); a
   message counts once its PUBACK was sent, i.e. once Kafka acknowledged it.

Each subscriber rate is the growth of the connector's acknowledged counter between
two of its samples inside the stream, over the time between them. CPU time per
message is read from /proc for the broker, the connector (by thread) and the Kafka
broker, and from getrusage for the publishers. Writes ``bench/connector.json``,
including where the time goes: CPU per message of every process in each phase.

Usage: ``.venv/bin/python bench/connector_bench.py [--count N] [--devices D]``
(needs the dev Kafka at 127.0.0.1:9092 and ``mosquitto`` on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from f2pipe.runtime.gctune import quiet_gc
from f2pipe.settings import load_settings
from f2pipe.testing.servers import (
    ConnectorProcess,
    Mosquitto,
    TestPki,
    connector_env,
    create_topics,
)
from f2pipe.tools.simulator import Sensor, generated_fleet, run_load

REPO = Path(__file__).resolve().parents[1]


TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def kafka_pid(bootstrap: str) -> int | None:
    """The pid of the Kafka broker listening on ``bootstrap``'s port (its CPU is part of the
    connector's cost), if it runs on this machine."""
    port = bootstrap.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if b"kafka.Kafka" not in args:
                continue
            props = (entry / "cwd").resolve() / args[args.index(b"kafka.Kafka") + 1].decode()
            listeners = [
                line for line in props.read_text().splitlines() if line.startswith("listeners=")
            ]
        except (OSError, IndexError):
            continue
        if any(f":{port}," in line + "," for line in listeners):
            return int(entry.name)
    return None


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, summed by thread name (librdkafka names its
    threads ``rdk:...``)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def children_cpu() -> float:
    """CPU seconds of the terminated, waited-for child processes (the publishers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _publisher_process(settings: Any, sensors: list[Sensor], count: int, out: Any) -> None:
    quiet_gc(50_000)  # as `f2pipe simulate` does
    summary = asyncio.run(run_load(settings, sensors, count, window=20000))
    out.put((summary.elapsed, summary.acknowledged))


def publish(
    settings: Any, sensors: list[Sensor], count: int, processes: int
) -> tuple[float, float, int]:
    """Publish ``count`` messages from ``processes`` forked publishers (devices split between
    them); return (elapsed s of the slowest, publisher CPU s of all, acknowledged)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    cpu0 = children_cpu()
    share = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    procs = [
        ctx.Process(
            target=_publisher_process, args=(settings, sensors[i::processes], share[i], out)
        )
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    elapsed = max(r[0] for r in results)
    return elapsed, children_cpu() - cpu0, sum(r[1] for r in results)


def phase_publisher(
    settings: Any, sensors: list[Sensor], count: int, broker: Mosquitto, processes: int
) -> dict[str, Any]:
    assert broker.proc is not None
    b0 = proc_cpu(broker.proc.pid)
    elapsed, cpu, acked = publish(settings, sensors, count, processes)
    publisher = round(cpu / acked * 1e6, 1)
    mosquitto = round((proc_cpu(broker.proc.pid) - b0) / acked * 1e6, 1)
    return {
        "messages": acked,
        "elapsed_s": round(elapsed, 3),
        "rate_per_s": round(acked / elapsed, 1),
        "cpu_us_per_msg": {
            "publisher": publisher,
            "mosquitto": mosquitto,
            "total": round(publisher + mosquitto, 1),
        },
    }


def phase_subscriber(
    settings: Any,
    sensors: list[Sensor],
    count: int,
    broker: Mosquitto,
    env: dict[str, str],
    bare: bool,
    log: Path,
    processes: int,
    kafka: str,
) -> dict[str, Any]:
    """Rate = messages the connector acknowledged between two samples of its counter, over
    the time between them: the first sample after acknowledgements began and the last one
    before they were complete (both inside the stream, so the count at each is exact).

    The counter is scraped every 100 ms: each scrape costs the connector CPU, and more
    often would charge the slower phase more per message.

    CPU per message is reported for every process that handles the messages: the
    publishers, Mosquitto, the connector (by thread: ``python`` is the loop thread and
    the metrics server, ``rdk:*`` librdkafka's) and, for the connector, the Kafka broker.
    """
    assert broker.proc is not None
    conn = ConnectorProcess(env, log=log, args=["--bare"] if bare else [])
    conn.start()
    assert conn.proc is not None
    pid = conn.proc.pid
    broker_kafka = kafka_pid(kafka) if not bare else None
    samples: list[tuple[float, float]] = []

    def watcher() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            acked = conn.metric("f2pipe_connector_acked_total")
            samples.append((time.perf_counter(), acked))
            if acked >= count:
                return
            time.sleep(0.1)

    try:
        k0 = proc_cpu(broker_kafka) if broker_kafka else 0.0
        t0, b0 = thread_cpu(pid), proc_cpu(broker.proc.pid)
        thread = threading.Thread(target=watcher, daemon=True)
        thread.start()
        pub_elapsed, pub_cpu, acked = publish(settings, sensors, count, processes)
        thread.join(600)
        if not samples or samples[-1][1] < count:
            raise RuntimeError("connector did not acknowledge every message in time")
        t1, b1 = thread_cpu(pid), proc_cpu(broker.proc.pid)
        k1 = proc_cpu(broker_kafka) if broker_kafka else 0.0
        latency = _latency_summary(conn) if not bare else None
    finally:
        conn.terminate()
    inside = [(t, a) for t, a in samples if 0 < a < count]
    if len(inside) < 2:
        raise RuntimeError("too few samples inside the stream: use more messages")
    (t_first, a_first), (t_last, a_last) = inside[0], inside[-1]

    def per_msg(seconds: float) -> float:
        return round(seconds / count * 1e6, 1)

    threads = {
        name: per_msg(t1[name] - t0.get(name, 0.0))
        for name in sorted(t1)
        if t1[name] - t0.get(name, 0.0) > 0
    }
    subscriber = per_msg(sum(t1.values()) - sum(t0.values()))
    cpu = {
        "publisher": round(pub_cpu / acked * 1e6, 1),
        "mosquitto": per_msg(b1 - b0),
        "subscriber": subscriber,
    }
    if broker_kafka:
        cpu["kafka_broker"] = per_msg(k1 - k0)
    result: dict[str, Any] = {
        "messages": count,
        "rate_per_s": round((a_last - a_first) / (t_last - t_first), 1),
        "rate_measured_over": {"messages": a_last - a_first, "seconds": round(t_last - t_first, 3)},
        "publisher_elapsed_s": round(pub_elapsed, 3),
        "cpu_us_per_msg": {**cpu, "total": round(sum(cpu.values()), 1)},
        "subscriber_cpu_us_per_msg_by_thread": threads,
    }
    if latency:
        result["produce_latency"] = latency
    return result


def where_the_time_goes(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """CPU per message of every process in each phase (medians over the rounds), and what
    the connector costs beyond the bare subscriber.

    On a CPU-bound machine each phase's rate is about cores / its total, so the
    connector's ratio to the bare subscriber is the ratio of their totals, and the
    difference is what the Kafka hand-off costs.
    """

    def med(phase: str, key: str) -> float:
        values = [r[phase]["cpu_us_per_msg"].get(key) for r in rounds]
        found = [v for v in values if v is not None]
        return round(float(statistics.median(found)), 1) if found else 0.0

    def thread(phase: str, prefix: str) -> float:
        values = [
            sum(v for k, v in r[phase]["subscriber_cpu_us_per_msg_by_thread"].items()
                if k.startswith(prefix))
            for r in rounds
        ]  # fmt: skip
        return round(float(statistics.median(values)), 1)

    phases: dict[str, dict[str, float]] = {
        "publisher_alone": {k: med("publisher", k) for k in ("publisher", "mosquitto", "total")},
        "bare_subscriber": {
            k: med("bare_subscriber", k) for k in ("publisher", "mosquitto", "subscriber", "total")
        },
        "connector": {
            "publisher": med("connector", "publisher"),
            "mosquitto": med("connector", "mosquitto"),
            "connector_loop_thread": thread("connector", "python"),
            "connector_librdkafka_threads": thread("connector", "rdk:"),
            "kafka_broker": med("connector", "kafka_broker"),
            "total": med("connector", "total"),
        },
    }
    bare, conn = phases["bare_subscriber"], phases["connector"]
    return {
        "cpu_us_per_msg": phases,
        "connector_beyond_bare_subscriber_us_per_msg": {
            "loop_thread": round(conn["connector_loop_thread"] - bare["subscriber"], 1),
            "librdkafka_threads": conn["connector_librdkafka_threads"],
            "kafka_broker": conn["kafka_broker"],
            "total": round(conn["total"] - bare["total"], 1),
        },
        "cpu_model_ratio": {
            # cores / total per phase: what the rates' ratios tend to on a busy machine
            "publisher_over_bare_subscriber": round(
                bare["total"] / phases["publisher_alone"]["total"], 2
            )
            if phases["publisher_alone"]["total"]
            else None,
            "connector_over_bare_subscriber": round(bare["total"] / conn["total"], 3)
            if conn["total"]
            else None,
        },
        "notes": [
            "Every process's CPU is read from /proc (the publishers from getrusage of the "
            "forked children); the Kafka broker's includes whatever else used it meanwhile.",
            "Connector loop thread: MQTT receive path (as the bare subscriber), then per "
            "message a topic-cache lookup, a record and header list, and producer.produce; "
            "per round of about linger_ms, one check of the producer's queue and one "
            "write of all PUBACKs. No per-record delivery report (only failures report).",
            "librdkafka threads: batching, lz4, the produce requests; Kafka broker: one "
            "produce request per partition per round.",
        ],
    }


def _latency_summary(conn: ConnectorProcess) -> dict[str, float]:
    """Mean and bucket counts of the receive-to-Kafka-ack histogram."""
    total = conn.metric("f2pipe_connector_produce_seconds_sum")
    n = conn.metric("f2pipe_connector_produce_seconds_count")
    return {"mean_ms": round(total / n * 1000, 2) if n else 0.0, "count": n}


def versions() -> dict[str, str]:
    import confluent_kafka

    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "python": platform.python_version(),
        "mqtt5": metadata.version("mqtt5"),
        "paho-mqtt": metadata.version("paho-mqtt"),
        "confluent-kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0],
        "mosquitto": mosq.strip(),
    }


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=60000, help="messages per phase")
    parser.add_argument("--devices", type=int, default=8, help="publishing connections")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three phases")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "connector.json")
    parser.add_argument(
        "--kafka", default="127.0.0.1:9092", help="Kafka bootstrap (default: the dev stack's)"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="f2pipe-bench-"))
    workdir.chmod(0o755)
    broker: Mosquitto | None = None
    try:
        pki = TestPki(workdir / "state")
        sensors = generated_fleet(args.devices)
        for sensor in sensors:
            pki.device(sensor.mac)
        broker = Mosquitto(workdir / "mosquitto", tls=pki.mosquitto_tls())
        broker.start()
        settings = load_settings(mqtt_tls=True, mqtt_port=broker.port, state_dir=pki.root)
        raw, dlq = f"bench-raw-{os.getpid()}-{int(time.time())}", f"bench-dlq-{os.getpid()}"
        create_topics(args.kafka, raw, dlq, partitions=6)
        identity = f"svc-connector-bench-{os.getpid()}"
        env = connector_env(pki, broker.port, identity, args.kafka)
        env |= {"F2PIPE_TOPIC_RAW": raw, "F2PIPE_TOPIC_DEAD_LETTER": dlq}
        load_before = list(os.getloadavg())
        # Warm-up: TLS handshakes, broker allocations, page cache.
        publish(settings, sensors, min(5000, args.count), args.publishers)
        rounds: list[dict[str, Any]] = []
        for n in range(args.rounds):
            # Phases interleave round by round, so a burst of load from elsewhere on a
            # shared machine hits all three alike rather than one of them.
            round_: dict[str, Any] = {}
            round_["publisher"] = phase_publisher(
                settings, sensors, args.count, broker, args.publishers
            )
            for phase, bare_only in (("bare_subscriber", True), ("connector", False)):
                # A new session per phase, so nothing of an earlier phase is redelivered.
                name = f"{identity}-{n}-{phase}".replace("_", "-")
                pki.service(name)
                env_phase = {
                    **env,
                    "F2PIPE_CONNECTOR_IDENTITY": name,
                    "F2PIPE_CONNECTOR_CLIENT_ID": name,
                }
                round_[phase] = phase_subscriber(
                    settings,
                    sensors,
                    args.count,
                    broker,
                    env_phase,
                    bare_only,
                    workdir / f"{name}.log",
                    args.publishers,
                    args.kafka,
                )
            for phase, result in round_.items():
                print(f"round {n + 1} {phase}: {result}", flush=True)
            rounds.append(round_)

        def median(phase: str) -> float:
            return float(statistics.median(r[phase]["rate_per_s"] for r in rounds))

        pub, bare, conn = median("publisher"), median("bare_subscriber"), median("connector")
        results = {
            "median_rate_per_s": {"publisher": pub, "bare_subscriber": bare, "connector": conn},
            "best_rate_per_s": {
                phase: max(r[phase]["rate_per_s"] for r in rounds)
                for phase in ("publisher", "bare_subscriber", "connector")
            },
            "rounds": rounds,
        }
        settings_now = load_settings()
        report = {
            "benchmark": "connector",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "setup": {
                "mqtt": "mutual TLS 1.2+, QoS 1, MQTT 3.1.1 publisher, MQTT 5 subscriber",
                "kafka": f"acks=all, idempotent, 6 partitions, broker {args.kafka}",
                "publishing_connections": args.devices,
                "publisher_processes": args.publishers,
                "messages_per_phase": args.count,
                "receive_maximum": settings_now.connector_receive_maximum,
                "linger_ms": settings_now.connector_linger_ms,
            },
            "load_average_before_after": [load_before, list(os.getloadavg())],
            "results": results,
            "ratios": {
                # Medians over the rounds; per round too, since rounds share conditions.
                "publisher_over_bare_subscriber": round(pub / bare, 2),
                "connector_over_bare_subscriber": round(conn / bare, 3),
                "connector_over_bare_subscriber_per_round": [
                    round(r["connector"]["rate_per_s"] / r["bare_subscriber"]["rate_per_s"], 3)
                    for r in rounds
                ],
            },
            "where_the_time_goes": where_the_time_goes(rounds),
            "versions": versions(),
            "machine": machine(),
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["ratios"]))
        return 0
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
