"""Processor CPU time per frame, raw topic in, processed topic out (issue 5 benchmark).

Run: ``.venv/bin/python bench/processor_bench.py`` (about a minute or two, against
the local Kafka and PostgreSQL). Writes ``bench/processor.json``.

Method. ``F2PIPE_BENCH_FRAMES`` frames (default 200,000; three datapoints each,
100 controllers) are preloaded into a fresh raw topic, then ``f2pipe processor``
runs as its own process. Once it has consumed a warm-up share (caches warm,
buffers grown) its CPU time (user + system, all threads, from /proc) and its
consumed count are taken, and again when it has consumed everything:
CPU seconds / frames is the figure, so the Kafka broker sharing the box does
not blur it. The same run is repeated with Kafka transactions on.

The per-step costs are measured in this process with ``time.process_time``
(which also counts librdkafka's threads) over the same frames: Kafka in (a bare
consumer touching key, value and headers), JSON, hex, CRC, lookup (warm), the
whole decode, the whole stage, serialise (three JSON values and keys), Kafka
out (three idempotent produces + flush), and Kafka out with a Python delivery
callback per record, the variant the processor avoids.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import confluent_kafka
import orjson
import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from f2pipe.core.decode import DecodeError
from f2pipe.core.frames import crc16_modbus, encode_modbus_response
from f2pipe.core.records import ReadingEncoder
from f2pipe.metadata.database import create_database, migrate
from f2pipe.metadata.lookup import Resolved
from f2pipe.metadata.resolver import Resolver
from f2pipe.processor.stage import Stage
from f2pipe.runtime.kafka import admin_config, consumer_config, producer_config
from f2pipe.settings import Settings, load_settings

HERE = Path(__file__).resolve().parent
VENV_BIN = HERE.parent / ".venv" / "bin"
FRAMES = int(os.environ.get("F2PIPE_BENCH_FRAMES", "200000"))
CONTROLLERS = 100
TARGET_US = 25.0
TICK = os.sysconf("SC_CLK_TCK")


def frame_hex(seq: int) -> str:
    data = b"".join(
        (v % 65536).to_bytes(2, "big") for v in (seq % 30000, (seq * 7) % 10000, seq % 5000)
    )
    return encode_modbus_response(1, 3, data).hex(" ").upper()


def macs() -> list[str]:
    return [f"be00000000{i:02x}" for i in range(CONTROLLERS)]


def records(n: int) -> list[tuple[bytes, bytes, bytes]]:
    """(key, mqtt.topic, payload) of ``n`` distinct frames (timestamps and values differ)."""
    out = []
    all_macs = macs()
    for seq in range(n):
        mac = all_macs[seq % CONTROLLERS]
        second = seq // CONTROLLERS
        ts = f"2024-07-15 {second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d}"
        payload = orjson.dumps({"timestamp": f"{ts}.{seq % 1000:03d}", "data": frame_hex(seq)})
        out.append((mac.encode(), f"tele/f2-{mac}/sensor-mode/J1/sensor-1".encode(), payload))
    return out


def setup_database(admin_dsn: str) -> str:
    name = f"f2bench_{uuid.uuid4().hex[:10]}"
    create_database(admin_dsn, name)
    dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
    migrate(dsn)
    with psycopg.connect(dsn) as conn, conn.transaction():
        types = conn.execute(
            "INSERT INTO device_types (name, is_controller, is_sensor) VALUES"
            " ('ctl', true, false), ('sensor', false, true) RETURNING device_type_id"
        ).fetchall()
        ctl_tpl = conn.execute(
            "INSERT INTO device_templates (name, device_type_id) VALUES ('ctl', %s)"
            " RETURNING device_template_id",
            (types[0][0],),
        ).fetchone()
        env_tpl = conn.execute(
            "INSERT INTO device_templates (name, device_type_id) VALUES ('env', %s)"
            " RETURNING device_template_id",
            (types[1][0],),
        ).fetchone()
        assert ctl_tpl is not None
        assert env_tpl is not None
        for label, enc, off, dec in (
            ("Temperature", "int16", 0, 2),
            ("Humidity", "uint16", 2, 2),
            ("CO2", "uint16", 4, 0),
        ):
            conn.execute(
                "INSERT INTO datapoints (device_template_id, label, data_encoding, byte_offset,"
                " byte_length, decimals) VALUES (%s, %s, %s, %s, 2, %s)",
                (env_tpl[0], label, enc, off, dec),
            )
        for mac in macs():
            ctl = conn.execute(
                "INSERT INTO devices (name, device_template_id, mac_address) VALUES (%s, %s, %s)"
                " RETURNING device_id",
                (mac, ctl_tpl[0], mac),
            ).fetchone()
            sensor = conn.execute(
                "INSERT INTO devices (name, device_template_id) VALUES (%s, %s)"
                " RETURNING device_id",
                (f"env {mac}", env_tpl[0]),
            ).fetchone()
            conn_row = conn.execute(
                "INSERT INTO connectors (controller_id, connector_number) VALUES (%s, 1)"
                " RETURNING connector_id",
                (ctl[0],),  # type: ignore[index]
            ).fetchone()
            conn.execute(
                "INSERT INTO pins (connector_id, position, device_id) VALUES (%s, 1, %s)",
                (conn_row[0], sensor[0]),  # type: ignore[index]
            )
    return dsn


def drop_database(admin_dsn: str, dsn: str) -> None:
    name = dsn.rsplit("/", 1)[1]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def preload(settings: Settings, topic: str, recs: list[tuple[bytes, bytes, bytes]]) -> None:
    producer = Producer(
        producer_config(settings, **{"linger.ms": 20, "queue.buffering.max.messages": 1_000_000})
    )
    ingest = b"%d" % int(time.time() * 1000)
    for key, mqtt_topic, payload in recs:
        headers: list[tuple[str, str | bytes | None]] = [
            ("mqtt.topic", mqtt_topic), ("mqtt.qos", b"1"), ("mqtt.retain", b"0"),
            ("ingest.ts", ingest)]  # fmt: skip
        while True:
            try:
                producer.produce(topic, payload, key, headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(120) == 0


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def consumed(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    match = re.search(r"^f2pipe_processor_consumed_total ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def run_processor(env: dict[str, str], total: int) -> dict[str, float]:
    """Run ``f2pipe processor`` until it consumed ``total``; its CPU per frame after warm-up."""
    port = int(env["F2PIPE_PROCESSOR_PORT"])
    log = (Path(tempfile.gettempdir()) / "f2pipe-processor-bench.log").open("ab")
    proc = subprocess.Popen([str(VENV_BIN / "f2pipe"), "processor"], env=env, stderr=log)
    try:
        warm = total // 5
        deadline = time.monotonic() + 300
        while (c0 := consumed(port)) < warm:
            assert time.monotonic() < deadline, "processor did not warm up"
            time.sleep(0.05)
        cpu0, wall0 = proc_cpu(proc.pid), time.monotonic()
        while (c1 := consumed(port)) < total:
            assert time.monotonic() < deadline, "processor did not finish"
            time.sleep(0.25)
        cpu1, wall1 = proc_cpu(proc.pid), time.monotonic()
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    frames = c1 - c0
    return {
        "frames_measured": frames,
        "cpu_seconds": round(cpu1 - cpu0, 3),
        "cpu_us_per_frame": round((cpu1 - cpu0) / frames * 1e6, 2),
        "wall_frames_per_s": round(frames / (wall1 - wall0)),
    }


def cost(make: Callable[[], Callable[[], object]], n: int, repeats: int = 3) -> float:
    """Process CPU µs per frame of the step ``make()`` returns (it handles ``n`` frames).

    The best of ``repeats`` runs: the box is shared, and interference only adds time.
    """
    best = float("inf")
    for _ in range(repeats):
        fn = make()
        gc.collect()
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return round(best / n * 1e6, 3)


def once(fn: Callable[[], object]) -> Callable[[], Callable[[], object]]:
    return lambda: fn


def step_costs(
    settings: Any, dsn: str, recs: list[tuple[bytes, bytes, bytes]], raw: str, bench_out: str
) -> dict[str, float]:
    n = min(len(recs), 50_000)
    sample = recs[:n]
    resolver = Resolver(settings.model_copy(update={"metadata_dsn": dsn}), listen=False)
    now = datetime.now(UTC)
    stage = Stage(resolver.resolve)
    for key, _, _ in sample[:CONTROLLERS]:
        resolver.resolve(key.decode(), 1, "sensor", 1)
    found = resolver.resolve(sample[0][0].decode(), 1, "sensor", 1)
    assert isinstance(found, Resolved)
    template, tz = found.template, found.tz
    payloads = [p for _, _, p in sample]
    objs = [orjson.loads(p) for p in payloads]
    hexes = [o["data"] for o in objs]
    frames = [bytes.fromhex(h) for h in hexes]
    mac_strs = [k.decode() for k, _, _ in sample]
    decoded = [template.decode("sensor", p, tz, now) for p in payloads]
    out: dict[str, float] = {}

    def kafka_in() -> Callable[[], None]:
        consumer = Consumer(consumer_config(settings, "bench-unused"))
        parts = consumer.list_topics(raw, timeout=10).topics[raw].partitions
        consumer.assign([TopicPartition(raw, p, 0) for p in parts])

        def run() -> None:
            got = 0
            while got < n:
                for msg in consumer.consume(num_messages=5000, timeout=1.0):
                    msg.key(), msg.value(), msg.headers()
                    got += 1
            consumer.close()

        return run

    out["kafka_in"] = cost(kafka_in, n)
    out["json"] = cost(once(lambda: [orjson.loads(p) for p in payloads]), n)
    out["hex"] = cost(once(lambda: [bytes.fromhex(h) for h in hexes]), n)
    out["crc"] = cost(once(lambda: [crc16_modbus(f[:-2]) for f in frames]), n)

    def lookup_all() -> None:
        for m in mac_strs:
            resolver.resolve(m, 1, "sensor", 1)

    out["lookup"] = cost(once(lookup_all), n)

    def decode_all() -> None:
        for p in payloads:
            with contextlib.suppress(DecodeError):
                template.decode("sensor", p, tz, now)

    out["decode_total"] = cost(once(decode_all), n)
    topics = [t for _, t, _ in sample]

    def stage_all() -> None:  # results dropped as the processor drops them, batch by batch
        for t, p in zip(topics, payloads, strict=True):
            stage.handle(t, p, now)

    out["stage_total"] = cost(once(stage_all), n)

    encoder = ReadingEncoder()
    ids = template.datapoint_ids
    columns = [(readings[0][1], tuple(v for _, _, v in readings)) for readings in decoded]

    def serialise() -> None:  # what the processor does: cached parts, ts once per frame
        out: list[tuple[bytes, bytes]] = []
        for stamp, vals in columns:
            encoder.encode_values(7, ids, stamp, vals, out)

    def serialise_orjson() -> None:  # the alternative it replaced: a dict per reading
        dumps = orjson.dumps
        for readings in decoded:
            for dp, ts, value in readings:
                _ = b"%d:%d" % (7, dp)
                dumps({"v": 1, "ts": ts, "device_id": 7, "datapoint_id": dp, "value": value})

    out["serialise"] = cost(once(serialise), n)
    out["serialise_orjson_dict_alternative"] = cost(once(serialise_orjson), n)
    values = [
        [
            (b"%d:%d" % (7, dp), orjson.dumps({"v": 1, "ts": ts, "device_id": 7,
                                               "datapoint_id": dp, "value": v}))
            for dp, ts, v in readings
        ]
        for readings in decoded
    ]  # fmt: skip

    def kafka_out(with_callback: bool) -> Callable[[], None]:
        extra: dict[str, Any] = (
            {} if with_callback else {"on_delivery": lambda e, m: None,
                                      "delivery.report.only.error": True}
        )  # fmt: skip
        producer = Producer(producer_config(settings, **extra))

        def on_delivery(err: object, msg: object) -> None:
            pass

        def run() -> None:
            produce = producer.produce
            for recs3 in values:
                for key, value in recs3:
                    while True:
                        try:
                            if with_callback:
                                produce(bench_out, value, key, on_delivery=on_delivery)
                            else:
                                produce(bench_out, value, key)
                            break
                        except BufferError:
                            producer.poll(0.05)
            assert producer.flush(60) == 0

        return run

    out["kafka_out"] = cost(lambda: kafka_out(False), n)
    out["kafka_out_with_per_record_callback"] = cost(lambda: kafka_out(True), n)
    resolver.close()
    return out


def main() -> int:
    settings = load_settings()
    admin_dsn = settings.metadata_dsn.rsplit("/", 1)[0] + "/postgres"
    tag = uuid.uuid4().hex[:8]
    raw, out, out_tx, dead, bench_out = (
        f"bench-raw-{tag}", f"bench-processed-{tag}", f"bench-processed-tx-{tag}",
        f"bench-dead-{tag}", f"bench-out-{tag}",
    )  # fmt: skip
    admin = AdminClient(admin_config(settings))
    for future in admin.create_topics(
        [NewTopic(raw, num_partitions=6, replication_factor=1)]
        + [NewTopic(t, num_partitions=3, replication_factor=1) for t in (out, out_tx, dead,
                                                                            bench_out)]
    ).values():  # fmt: skip
        future.result(30)
    dsn = setup_database(admin_dsn)
    try:
        print(f"preloading {FRAMES} frames ...", file=sys.stderr)
        recs = records(FRAMES)
        preload(settings, raw, recs)
        print("step costs ...", file=sys.stderr)
        steps = step_costs(settings, dsn, recs, raw, bench_out)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("F2PIPE_")}
        base_env.update(
            {
                "F2PIPE_METADATA_DSN": dsn,
                "F2PIPE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                "F2PIPE_TOPIC_RAW": raw,
                "F2PIPE_TOPIC_DEAD_LETTER": dead,
                "F2PIPE_PROCESSOR_PORT": "19777",
            }
        )
        runs = []
        for attempt in (1, 2):  # best of two: the box is shared
            print(f"processor run {attempt} ...", file=sys.stderr)
            runs.append(
                run_processor(
                    {
                        **base_env,
                        "F2PIPE_TOPIC_PROCESSED": out,
                        "F2PIPE_PROCESSOR_GROUP": f"b{attempt}-{tag}",
                    },
                    FRAMES,
                )
            )
        plain = min(runs, key=lambda r: r["cpu_us_per_frame"])
        print("processor run with transactions ...", file=sys.stderr)
        transactional = run_processor(
            {
                **base_env,
                "F2PIPE_TOPIC_PROCESSED": out_tx,
                "F2PIPE_PROCESSOR_GROUP": f"btx-{tag}",
                "F2PIPE_PROCESSOR_TRANSACTIONS": "true",
            },
            FRAMES,
        )
    finally:
        drop_database(admin_dsn, dsn)
        for future in admin.delete_topics([raw, out, out_tx, dead, bench_out]).values():
            future.result(30)
    largest = max(
        ("kafka_in", "json", "hex", "crc", "lookup", "decode_total", "serialise", "kafka_out"),
        key=lambda k: steps[k],
    )
    report = {
        "benchmark": "processor CPU time per frame (3 datapoints, warm cache)",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "frames": FRAMES,
        "target_us_per_frame": TARGET_US,
        "processor": plain,
        "processor_runs_us_per_frame": [r["cpu_us_per_frame"] for r in runs],
        "processor_with_transactions": transactional,
        "transactions_cost_us_per_frame": round(
            transactional["cpu_us_per_frame"] - plain["cpu_us_per_frame"], 2
        ),
        "meets_target": plain["cpu_us_per_frame"] <= TARGET_US,
        "step_us_per_frame": steps,
        "largest_step": largest,
        "unattributed_us_per_frame": round(
            plain["cpu_us_per_frame"]
            - sum(steps[k] for k in ("kafka_in", "stage_total", "serialise", "kafka_out")),
            2,
        ),
        "notes": [
            "CPU time includes librdkafka's threads (fetch, decompression, produce).",
            "Largest step, Kafka in: consumed in batches of up to 5000 with one consume()"
            " call, offsets committed once per batch (no per-record offset store), headers"
            " read once per record and the topic grammar memoised per topic string; what"
            " remains is librdkafka's fetch and the per-record Message object.",
            "Kafka out: delivery reports only for errors (a Python callback per record costs"
            " kafka_out_with_per_record_callback - kafka_out).",
            "Serialise: ReadingEncoder writes each value from a cached per-(device,"
            " datapoint) key and JSON middle, the timestamp written once per frame and only"
            " the value by orjson per reading (Hypothesis-checked byte for byte against a"
            " dict per reading); under callgrind a three-datapoint frame takes 14.1k"
            " instructions instead of 22.2k (repr() for the value: 18.8k).",
            "Producer compression: lz4 costs about 0.6k instructions per record in"
            " librdkafka's thread over none (callgrind, 30k records), about 2% of a"
            " frame; kept, as it cuts the processed topic's bytes several-fold."
            " linger.ms 50 instead of 5 measured no cheaper.",
            "Metrics are updated once per batch, not per record; gc.freeze() after start-up.",
            "Largest cuts (callgrind, whole processor, 30k frames after warm-up: 91.1k ->"
            " 68.0k instructions per frame): the timestamp fast path now takes 1-6 fraction"
            " digits (the 3-digit form went through the regular expression); the stage hands"
            " a tuple of values to the encoder (no tuple per reading, no Decoded); wired"
            " routes are remembered per topic and metadata version (no resolver call per"
            " message); the young-generation GC threshold no longer makes each batch traverse"
            " itself (about 3 us per frame in back-to-back runs).",
            "Kafka transactions: no cheaper per frame in interleaved runs (plain 25.3/26.5/"
            "25.1 vs transactional 27.9/26.9/26.8 us at load ~1); batches are full either way"
            " (about 1,100 records per produce request), so the earlier gap was noise.",
            "Light load (1,000 frames/s, raw produce to processed receive): before the"
            " batch-wait change p50 148 ms, p99 279 ms; after p50 14 ms, p99 98 ms (load"
            " average 4.5-5.3); consume() no longer waits for a full batch.",
            "What remains per frame is mostly confluent-kafka itself: consume() parses all"
            " four headers (about 6k instructions), headers() builds them in Python (3.4k),"
            " three produce() calls (8.8k), delivery reports (3k), librdkafka's producer thread"
            " (6.4k, of which lz4 2.2k).",
            "Figures are the best of repeats on a shared 2-core box: see load_average_1m.",
        ],
        "software": {
            "python": platform.python_version(),
            "confluent_kafka": confluent_kafka.version()[0],
            "librdkafka": confluent_kafka.libversion()[0],
            "orjson": orjson.__version__,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m": os.getloadavg()[0],
        },
    }
    (HERE / "processor.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
