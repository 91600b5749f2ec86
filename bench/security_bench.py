"""What securing the local stack costs: Kafka SASL_SSL and PostgreSQL TLS against clear text.

Run: ``.venv/bin/python bench/security_bench.py`` (a few minutes; it starts two
private stacks of its own, PostgreSQL and Kafka on free ports, one with
``F2PIPE_STACK_SECURED=false`` and one secured, one after the other). Writes
``bench/security.json``.

Method. Per mode, ``F2PIPE_BENCH_FRAMES`` raw records (default 200,000; the
connector's shape: a 12-byte key, a 90-byte JSON payload, four headers) are
produced as the connector produces them (idempotent, acks=all, lz4 off) and
then consumed as the processor consumes them, and the same count of readings
is written to PostgreSQL by binary COPY in batches of 5,000 as the sink
writes them. For each step: records per second (wall) and CPU per record,
for the client (``time.process_time``, librdkafka's threads included) and for
the server (the broker's or the COPY backend's user + system time from
/proc). The best of two passes counts: the box is shared. The ratio
secured / plain is the cost of securing.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from f2pipe.operations import stack
from f2pipe.operations.stack import security
from f2pipe.runtime.kafka import admin_config, consumer_config, producer_config
from f2pipe.settings import Settings
from f2pipe.testing.stack import private_settings, private_state

HERE = Path(__file__).resolve().parent
FRAMES = int(os.environ.get("F2PIPE_BENCH_FRAMES", "200000"))
SERVERS = ["postgres", "kafka"]
TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """user + system seconds of process ``pid`` (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@contextmanager
def private_stack(secured: bool) -> Iterator[tuple[Settings, Settings]]:
    """(caller's settings, operator's settings) of a PostgreSQL and Kafka of our own."""
    with private_state("f2pipe-secbench-") as state:
        settings = private_settings(
            state, kafka_heap="1g", stack_install=False, stack_secured=secured
        )
        try:
            stack.up(settings, SERVERS)
            yield settings, security.admin_settings(settings)
        finally:
            stack.down(settings, SERVERS)


def measure(step: Callable[[], int], server_pid: Callable[[], int]) -> dict[str, float]:
    pid = server_pid()
    wall, cpu, server = time.monotonic(), time.process_time(), process_cpu(pid)
    count = step()
    wall = time.monotonic() - wall
    cpu = time.process_time() - cpu
    server = process_cpu(pid) - server
    return {
        "records": count,
        "per_s": round(count / wall),
        "client_us": round(cpu / count * 1e6, 2),
        "server_us": round(server / count * 1e6, 2),
    }


def raw_records(count: int) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    records = []
    for i in range(count):
        mac = f"aabbcc{i % 1000:06x}"
        payload = json.dumps(
            {"timestamp": "2024-07-15 14:30:25.123456", "data": "01 03 06 09 F8 11 A0 01 9F 8D 6C"}
        ).encode()
        headers = [
            ("mqtt.topic", f"tele/f2-{mac}/sensor-mode/J1/sensor-1".encode()),
            ("mqtt.qos", b"1"),
            ("mqtt.retain", b"0"),
            ("ingest.ts", str(1_700_000_000_000 + i).encode()),
        ]
        records.append((mac.encode(), payload, headers))
    return records


def kafka_steps(admin: Settings, records: list[Any], broker: int) -> dict[str, dict[str, float]]:
    topic = f"secbench-{uuid.uuid4().hex[:8]}"
    client = AdminClient(admin_config(admin))
    client.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])[topic].result(
        30
    )

    def produce() -> int:
        producer = Producer(producer_config(admin, **{"linger.ms": 20}))
        for key, value, headers in records:
            while True:
                try:
                    producer.produce(topic, value, key, headers=headers)
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.flush(120)
        return len(records)

    def consume() -> int:
        consumer = Consumer(consumer_config(admin, f"secbench-{uuid.uuid4().hex[:8]}"))
        consumer.subscribe([topic])
        seen, deadline = 0, time.monotonic() + 300
        while seen < len(records) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=10_000, timeout=1.0):
                if message.error() is None:
                    message.key(), message.value(), message.headers()
                    seen += 1
        consumer.close()
        return seen

    try:
        return {
            "kafka_produce": measure(produce, lambda: broker),
            "kafka_consume": measure(consume, lambda: broker),
        }
    finally:
        client.delete_topics([topic])[topic].result(30)


def copy_step(admin: Settings, count: int) -> dict[str, float]:
    start = datetime.fromtimestamp(1_700_000_000, UTC)
    rows = [(start + timedelta(seconds=i), i % 500, i % 3, i * 0.5) for i in range(count)]
    table = f"secbench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin.timeseries_dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (timestamp timestamptz NOT NULL, device_id integer NOT NULL,"
            " datapoint_id integer NOT NULL, value double precision)"
        )
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None

        def write() -> int:
            for start in range(0, count, 5_000):
                with conn.transaction(), conn.cursor() as cur:
                    copy = f"COPY {table} FROM STDIN (FORMAT BINARY)"
                    with cur.copy(copy) as writer:
                        writer.set_types(["timestamptz", "int4", "int4", "float8"])
                        for row in rows[start : start + 5_000]:
                            writer.write_row(row)
            return count

        try:
            return measure(write, lambda: int(backend[0]))
        finally:
            conn.execute(f"DROP TABLE {table}")


def run_mode(secured: bool, records: list[Any]) -> dict[str, dict[str, float]]:
    best: dict[str, dict[str, float]] = {}
    with private_stack(secured) as (settings, admin):
        broker = stack.Kafka(settings, stack.Paths(settings.state_dir)).pid()
        assert broker is not None
        with psycopg.connect(admin.metadata_dsn) as conn:
            print(f"  PostgreSQL TLS in use: {conn.pgconn.ssl_in_use}", file=sys.stderr)
        for attempt in (1, 2):
            print(f"  pass {attempt} ...", file=sys.stderr)
            steps = {**kafka_steps(admin, records, broker), "pg_copy": copy_step(admin, FRAMES)}
            for name, figures in steps.items():
                total = figures["client_us"] + figures["server_us"]
                if name not in best or total < best[name]["client_us"] + best[name]["server_us"]:
                    best[name] = figures
    return best


def main() -> int:
    records = raw_records(FRAMES)
    modes = {}
    for name, secured in (("plain", False), ("secured", True)):
        print(f"{name} stack ...", file=sys.stderr)
        modes[name] = run_mode(secured, records)
    ratios = {
        step: {
            "throughput": round(modes["secured"][step]["per_s"] / modes["plain"][step]["per_s"], 3),
            "cpu": round(
                (modes["secured"][step]["client_us"] + modes["secured"][step]["server_us"])
                / (modes["plain"][step]["client_us"] + modes["plain"][step]["server_us"]),
                3,
            ),
        }
        for step in modes["plain"]
    }
    report = {
        "benchmark": "cost of the secured local stack (SASL_SSL SCRAM-SHA-512, PostgreSQL TLS)",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "frames": FRAMES,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "plain": modes["plain"],
        "secured": modes["secured"],
        "secured_over_plain": ratios,
    }
    (HERE / "security.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'step':<14} {'mode':<8} {'records/s':>10} {'client us':>10} {'server us':>10}")
    for step in modes["plain"]:
        for mode in ("plain", "secured"):
            f = modes[mode][step]
            print(
                f"{step:<14} {mode:<8} {f['per_s']:>10} {f['client_us']:>10} {f['server_us']:>10}"
            )
        r = ratios[step]
        print(f"{'':<14} {'ratio':<8} {r['throughput']:>10} {'cpu x':>10} {r['cpu']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
