"""The whole pipeline on this box, with the load generator on the same box (SPEC section 9).

    .venv/bin/python bench/pipeline_bench.py [--duration 60] [--devices 1000]

Runs ``f2pipe up``'s connector, processor and sink on dedicated servers (a
temporary state folder, free ports; nothing shared is touched), PostgreSQL with
``track_commit_timestamp`` so every row carries its commit time. The load comes
from ``--devices`` generated controllers (default 1,000), each registered in the
metadata with a certificate from the stack's CA and publishing on its own mTLS
connection, as a fleet does (:mod:`pipeline_scale`).

The measurement runs twice on the same stack: with one processor and one sink,
then with a second processor and a second sink in the same consumer groups.
Each run has these phases:

1. probe (first run only): a burst published as fast as the broker
   acknowledges; the time until every stage has committed it gives a first
   estimate of the capacity.
2. sustained: the simulator publishes at a fixed rate for ``--duration`` s
   (at least 60 for a report); the rate counts as sustained when the publisher
   kept it, the Kafka lag did not grow, and the pipeline drained within a few
   seconds of the last publish. Otherwise the rate is lowered and the phase
   repeated (``--tries``). The second run starts at the first run's sustained
   rate, so its first attempt compares CPU per frame at equal load
   (``--replica-tries`` attempts). Per-stage rates come from the services'
   counters (every replica's), CPU from /proc (every replica's own line).
3. latency: 25 % of the run's sustained rate; per reading, the commit time of
   its row minus the publish time the ledger holds (the message timestamp,
   taken as the message is published).

Every acknowledged message is in a ledger; after each run the table is compared
with that run's ledgers in SQL (``lost``: ledger readings missing, ``wrong``:
rows not in the ledger or with another value). Ceilings are measured in the
same run by the stage benchmarks' own code: the connector's bare MQTT
subscriber (``connector_bench.phase_subscriber``) and binary COPY with and
without the idempotent staging step (``sink_bench.ceiling``).

Writes ``bench/report.json`` and ``bench/report.md`` (:mod:`pipeline_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import pipeline_report  # noqa: E402
import pipeline_scale  # noqa: E402
import psycopg  # noqa: E402

from f2pipe.operations import pipeline, services, stack, status  # noqa: E402
from f2pipe.operations.stack import security  # noqa: E402
from f2pipe.settings import Settings, load_settings  # noqa: E402
from f2pipe.testing.stack import free_ports  # noqa: E402

STAGES = ("connector", "processor", "sink")
TICK = os.sysconf("SC_CLK_TCK")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _stat(process: Path) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first); None
    once the process is gone."""
    try:
        return (process / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def cpu_seconds(pid: int | None) -> float:
    fields = None if pid is None else _stat(Path(f"/proc/{pid}"))
    return 0.0 if fields is None else _cpu(fields)


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU of ``pid`` and its live children (PostgreSQL works in its backends)."""
    if pid is None:
        return 0.0
    total = cpu_seconds(pid)
    for entry in Path("/proc").iterdir():
        fields = _stat(entry) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid:
            total += _cpu(fields)
    return total


def peak_rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


class Bench:
    """The benchmark's stack, its services (replicas included) and the ledgers of each run.

    ``settings`` are the stack's; ``admin`` the same with the operator's credentials,
    for the benchmark's own reads of PostgreSQL and Kafka.
    """

    def __init__(self, settings: Settings, workdir: Path, devices: int) -> None:
        self.settings = settings
        self.admin = settings
        self.workdir = workdir
        self.devices = devices
        self.ledgers: list[Path] = []
        self.replicas: list[services.Service] = []
        self.connections: list[int] = []  # the broker's connections, sampled while publishing
        self.reconnects = 0

    @property
    def dsn(self) -> str:
        return self.admin.timeseries_dsn

    # -- processes
    def stage_services(self) -> Iterator[tuple[str, services.Service]]:
        """(label, service) of every running stage: ``processor``, ``processor-2``, ..."""
        for service in services.services(self.settings, STAGES):
            yield service.name, service
        for service in self.replicas:
            yield service.pidfile.path.stem, service

    def pids(self) -> dict[str, int | None]:
        paths = stack.Paths(self.settings.state_dir)
        found: dict[str, int | None] = {}
        for cls in stack.SERVERS:
            found[cls.name] = cls(self.settings, paths).pid()
        for label, service in self.stage_services():
            found[label] = service.pid()
        return found

    def counters(self) -> dict[str, dict[str, float]]:
        """Each service's throughput counters, by its label."""
        out: dict[str, dict[str, float]] = {}
        for label, service in self.stage_services():
            samples = status.scrape(service.url("/metrics"))
            out[label] = {
                counter: status.total(samples, family)
                for counter, (name, family) in status.THROUGHPUT.items()
                if name == service.name
            }
        return out

    def lag(self) -> int:
        lags = status.Observer(self.admin).lag()
        return sum(v or 0 for v in lags.values())

    def stored(self) -> int:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT count(*) FROM decoded_data").fetchone()
        return int(row[0]) if row else 0

    # -- publishing
    def publish(
        self,
        count: int,
        rate: float | None,
        name: str,
        on_connected: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Run the simulator for ``count`` messages; its summary, with its CPU and wall time.

        ``on_connected`` runs once the broker holds a connection of every simulated
        controller, before the first publish has gone far (the simulator starts as
        soon as its last handshake is done): measured phases start their CPU clocks
        there, since a device makes its TLS handshake once, not per message.
        ``cpu_connected_s`` is the simulator's CPU until then.
        """
        ledger = self.workdir / f"ledger-{name}.jsonl"
        self.ledgers.append(ledger)
        command = [
            sys.executable, "-m", "f2pipe.cli", "simulate", "--devices", str(self.devices),
            "--count", str(count), "--ledger", str(ledger), "--json", "--window", "20000",
        ]  # fmt: skip
        if rate:
            command += ["--rate", f"{rate:.1f}"]
        env = {**os.environ, **services.settings_env(self.settings)}
        port = self.settings.mqtt_port
        wanted = pipeline_scale.broker_connections(port) + self.devices
        started = time.monotonic()
        before = os.times()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        connected_cpu = 0.0
        try:
            if on_connected is not None:
                while pipeline_scale.broker_connections(port) < wanted:
                    if proc.poll() is not None:
                        break
                    if time.monotonic() - started > 600:
                        raise RuntimeError(f"{self.devices} controllers did not connect in 600 s")
                    time.sleep(0.02)
                else:
                    connected_cpu = cpu_seconds(proc.pid)
                    on_connected()
            stdout, stderr = proc.communicate(timeout=3600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        after = os.times()
        if proc.returncode != 0:
            raise RuntimeError(f"simulator failed: {stderr.decode()[-1000:]}")
        summary: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
        summary["wall_s"] = time.monotonic() - started
        # The load generator shares the two cores: its CPU belongs in the budget.
        summary["cpu_s"] = (after.children_user - before.children_user) + (
            after.children_system - before.children_system
        )
        summary["cpu_connected_s"] = connected_cpu
        self.reconnects += summary.get("reconnects", 0)
        return summary

    def wait_drained(self, timeout: float = 600) -> float:
        """Block until both consumer groups have committed everything; return when (monotonic)."""
        deadline = time.monotonic() + timeout
        observer = status.Observer(self.admin)
        last_rows, still, lags = -1, 0, {}
        while time.monotonic() < deadline:
            lags = observer.lag()
            rows = self.stored()
            if all(v == 0 for v in lags.values()):
                # The connector may still hold messages not yet in Kafka: rows must settle too.
                still = still + 1 if rows == last_rows else 0
                if still >= 2:
                    return time.monotonic()
            last_rows = rows
            time.sleep(0.5)
        raise RuntimeError(
            f"the pipeline did not drain in {timeout:.0f} s: consumer lag {lags}, {last_rows} rows"
        )

    def keep_evidence(self) -> Path:
        """After a failure: each stage writes its threads' stacks to its log (SIGUSR1), and
        the logs are copied to a folder that outlives the run; return that folder."""
        for _label, service in self.stage_services():
            pid = service.pid()
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGUSR1)
        time.sleep(1)  # the dumps are written by the stages' own threads
        kept = Path(tempfile.mkdtemp(prefix="f2pipe-bench-failed-"))
        shutil.copytree(self.settings.state_dir / "log", kept / "log", dirs_exist_ok=True)
        return kept

    # -- replicas
    def add_replicas(self, ports: list[int]) -> None:
        """A second processor and a second sink, consuming until each has had records.

        A consumer that joins its group makes the group rebalance: small bursts are
        published until both new replicas have consumed some, so no measured phase
        pays for a rebalance.
        """
        processor_port, sink_port = ports
        self.replicas = [
            pipeline_scale.replica(services.Processor, self.settings, 2, processor_port),
            pipeline_scale.replica(services.Sink, self.settings, 2, sink_port),
        ]
        pipeline_scale.start(self.replicas)
        for attempt in range(10):
            self.publish(2000, None, f"warmup-replicas-{attempt + 1}")
            self.wait_drained()
            counts = self.counters()
            idle = [
                label
                for label, _service in self.stage_services()
                if label != "connector" and not any(counts[label].values())
            ]
            if not idle:
                return
            log(f"replicas: {', '.join(idle)} consumed nothing yet")
            time.sleep(2)
        raise RuntimeError("a replica never got partitions of its topic")

    def stop_replicas(self) -> None:
        for service in reversed(self.replicas):
            service.stop()

    # -- phases
    def span_since(self, since: datetime) -> float | None:
        """Seconds from the first message timestamp after ``since`` to the last row's commit."""
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM max(pg_xact_commit_timestamp(xmin)) - min(timestamp))"
                "  FROM decoded_data WHERE timestamp >= %s",
                (since,),
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def probe(self, count: int) -> float:
        log(f"probe: {count} messages as fast as the broker takes them")
        since = datetime.now(UTC)
        t0 = time.monotonic()
        self.publish(count, None, "probe")
        done = self.wait_drained()
        # From the first publish, so the fleet's handshakes before it do not count.
        rate = count / (self.span_since(since) or done - t0)
        log(f"probe: {rate:.0f} frames/s end to end (including ramp and drain)")
        return rate

    def sustained(self, rate: float, duration: float, name: str) -> dict[str, Any]:
        count = int(rate * duration)
        log(f"{name}: {rate:.0f} frames/s for {duration:.0f} s ({count} messages)")
        pids = self.pids()
        cpu_start = {n: tree_cpu_seconds(p) for n, p in pids.items()}
        c0 = self.counters()
        rows0 = self.stored()
        since = datetime.now(UTC)
        t0 = time.monotonic()
        lag_samples: list[int] = []
        connections: list[int] = []
        cpu0: dict[str, float] = {}
        connect_s: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(5.0):
                connections.append(pipeline_scale.broker_connections(self.settings.mqtt_port))
                with contextlib.suppress(Exception):
                    lag_samples.append(self.lag())

        sampler = threading.Thread(target=sample, daemon=True)

        def connected() -> None:
            cpu0.update({n: tree_cpu_seconds(p) for n, p in pids.items()})
            connect_s.append(time.monotonic() - t0)
            sampler.start()

        try:
            summary = self.publish(count, rate, name, connected)
        finally:
            stop.set()
            if sampler.is_alive():
                sampler.join()
        if not cpu0:
            raise RuntimeError(f"{name}: the simulator ended before all its controllers connected")
        published_at = time.monotonic()
        done = self.wait_drained()
        c1 = self.counters()
        cpu1 = {n: tree_cpu_seconds(p) for n, p in pids.items()}
        rows1 = self.stored()
        # First publish (the earliest message timestamp) to the last row's commit.
        span = self.span_since(since) or done - t0
        # Counters and CPU were read after the drain: per second of the same span.
        elapsed = span
        kept = summary["acknowledged"] / max(summary["elapsed_s"], 1e-6)
        third = max(1, len(lag_samples) // 3)
        early = sum(lag_samples[:third]) / third if lag_samples else 0
        late = sum(lag_samples[-third:]) / third if lag_samples else 0
        drain_s = done - published_at
        frames = summary["acknowledged"]
        readings = rows1 - rows0
        # Per service, then per counter over every replica of a stage.
        delta = {
            label: {k: max(0.0, v - c0.get(label, {}).get(k, 0.0)) for k, v in values.items()}
            for label, values in c1.items()
        }
        totals: dict[str, float] = {}
        for values in delta.values():
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v
        rates = {k: v / elapsed for k, v in totals.items()}
        cpu = {n: cpu1[n] - cpu0[n] for n in cpu1}
        cpu["simulator"] = summary["cpu_s"] - summary["cpu_connected_s"]
        # The fleet's TLS handshakes, made before the measured phase: per connection.
        handshake = {
            "mosquitto": cpu0.get("mosquitto", 0.0) - cpu_start.get("mosquitto", 0.0),
            "simulator": summary["cpu_connected_s"],
        }

        def stage_cpu(stage: str) -> float:
            return sum(v for n, v in cpu.items() if n.split("-")[0] == stage)

        consumed = max(1.0, totals.get("frames_consumed", 0))
        replicas = {
            stage: {
                label: {
                    "share_of_input": round(
                        delta[label].get(counter, 0) / max(1.0, totals.get(counter, 0)), 3
                    ),
                    "cpu_us_per_frame": round(cpu.get(label, 0) / max(frames, 1) * 1e6, 1),
                }
                for label in delta
                if label.split("-")[0] == stage
            }
            for stage, counter in (("processor", "frames_consumed"), ("sink", "sink_consumed"))
        }
        ok = kept >= 0.95 * rate and drain_s <= 10 and late <= max(2 * early, 5000)
        result = {
            "target_frames_per_s": round(rate, 1),
            "publisher_frames_per_s": round(kept, 1),
            "frames": frames,
            "readings": readings,
            "frames_per_s": round(frames / span, 1),
            "readings_per_s": round(readings / span, 1),
            "drain_after_last_publish_s": round(drain_s, 2),
            "kafka_lag_samples": lag_samples,
            "sustained": ok,
            "load_average_1m": round(os.getloadavg()[0], 2),
            "connections": {
                # Sampled every 5 s while publishing; the connector's own one included.
                "broker_median": sorted(connections)[len(connections) // 2] if connections else 0,
                "reconnects": summary.get("reconnects", 0),
                "connect_s": round(connect_s[0], 1),
                "handshake_cpu_ms_per_connection": {
                    k: round(v / self.devices * 1e3, 2) for k, v in handshake.items()
                },
            },
            "stage_rates_per_s": {k: round(v, 1) for k, v in rates.items()},
            "replicas": replicas,
            "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
            "cpu_share_of_2_cores": {
                k: round(v / elapsed / (os.cpu_count() or 1), 3) for k, v in cpu.items()
            },
            "processor_cpu_us_per_frame": round(stage_cpu("processor") / consumed * 1e6, 1),
            "connector_cpu_us_per_msg": round(stage_cpu("connector") / max(frames, 1) * 1e6, 1),
            "sink_cpu_us_per_row": round(stage_cpu("sink") / max(readings, 1) * 1e6, 1),
        }
        self.connections += connections
        shown = {k: v for k, v in result.items() if k not in ("cpu_s", "replicas")}
        log(f"{name}: {json.dumps(shown)}")
        return result

    def search(
        self, rate: float, duration: float, tries: int, run: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Sustained attempts from ``rate``: (the best sustained one, every attempt).

        Up by a quarter while sustained and down by a fifth while not, until the two
        meet; then halve the gap between the best sustained and the lowest failed rate
        while it is wider than 5 %. With none sustained, the last attempt is the result.
        """
        best: dict[str, Any] | None = None
        failed: float | None = None  # the lowest rate that was not sustained
        attempts: list[dict[str, Any]] = []
        for attempt in range(tries):
            result = self.sustained(rate, duration, f"{run}-sustained-{attempt + 1}")
            attempts.append(result)
            if result["sustained"]:
                if best is None or result["frames_per_s"] > best["frames_per_s"]:
                    best = result
            else:
                failed = rate if failed is None else min(failed, rate)
            if best is None:
                rate *= 0.8
            elif failed is None:
                rate *= 1.25
            elif failed > best["target_frames_per_s"] * 1.05:
                rate = (best["target_frames_per_s"] + failed) / 2
            else:
                break
        if best is None:
            log(f"{run}: no attempt was sustained; reporting the last one")
            best = attempts[-1]
        return best, attempts

    def latency(self, rate: float, duration: float, run: str) -> dict[str, Any]:
        count = max(100, int(rate * duration))
        log(f"{run}-latency: {rate:.0f} frames/s for {duration:.0f} s")
        since = datetime.now(UTC)
        # The simulator stamps each message when it writes it: the ledger's timestamp is
        # the publish time the latency is measured from.
        summary = self.publish(count, rate, f"{run}-latency")
        if summary["acknowledged"] != count:
            raise RuntimeError(f"latency phase: {summary}")
        self.wait_drained()
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms),"
                "       max(ms), count(*)"
                "  FROM (SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - timestamp)"
                "               * 1000 AS ms"
                "          FROM decoded_data WHERE timestamp >= %s) t",
                (since,),
            ).fetchone()
        assert row is not None
        (p50, p95, p99), worst, n = row
        result = {
            "p50": round(float(p50), 1),
            "p95": round(float(p95), 1),
            "p99": round(float(p99), 1),
            "max": round(float(worst), 1),
            "readings": int(n),
            "frames_per_s": round(rate, 1),
        }
        log(f"{run}-latency: {result}")
        return result

    # -- correctness
    def compare(self, ledgers: list[Path], since: datetime | None) -> tuple[int, int, int]:
        """(expected readings, lost, wrong) of one run, computed in SQL.

        ``ledgers``: the run's; ``since``: when the run began (None: the table's
        every row), since the table holds the earlier runs' rows too.
        """
        from f2pipe.testing.ledger import datapoint_map

        mapping = datapoint_map(self.dsn)
        # The epoch stands for "every row": the table holds nothing older.
        since = since or datetime(1970, 1, 1, tzinfo=UTC)
        with psycopg.connect(self.dsn) as conn:
            conn.execute(
                "CREATE TEMP TABLE expected (timestamp timestamptz, device_id int,"
                " datapoint_id int, value double precision)"
            )
            with conn.cursor().copy("COPY expected FROM STDIN") as copy:
                for ledger in ledgers:
                    with ledger.open() as lines:
                        chunk: list[str] = []
                        for line in lines:
                            chunk.append(expected_rows(json.loads(line), mapping))
                            if len(chunk) >= 10000:
                                copy.write("".join(chunk))
                                chunk.clear()
                        copy.write("".join(chunk))
            conn.execute("CREATE INDEX ON expected (timestamp, device_id, datapoint_id)")
            conn.execute("ANALYZE expected")
            q = conn.execute(
                "SELECT (SELECT count(*) FROM (SELECT DISTINCT * FROM expected) e),"
                " (SELECT count(*) FROM (SELECT timestamp, device_id, datapoint_id, value"
                "   FROM expected EXCEPT SELECT timestamp, device_id, datapoint_id, value"
                "   FROM decoded_data WHERE timestamp >= %(since)s) m),"
                " (SELECT count(*) FROM (SELECT timestamp, device_id, datapoint_id, value"
                "   FROM decoded_data WHERE timestamp >= %(since)s"
                "   EXCEPT SELECT timestamp, device_id, datapoint_id, value FROM expected) w)",
                {"since": since},
            ).fetchone()
        assert q is not None
        return int(q[0]), int(q[1]), int(q[2])


def expected_rows(entry: dict[str, Any], mapping: dict[tuple[str, int, int, str], Any]) -> str:
    """The rows one ledger entry must have become, as COPY text lines."""
    if not entry["readings"]:
        return ""
    _, device, _, connector, sensor = entry["topic"].split("/")
    key = (device[3:], int(connector[1:]), int(sensor.split("-")[1]))
    out = []
    for reading in entry["readings"]:
        dev, dp = mapping[(*key, reading["label"])]
        out.append(f"{entry['timestamp']}+00\t{dev}\t{dp}\t{float(reading['value'])!r}\n")
    return "".join(out)


# --------------------------------------------------------------------------- ceilings
def mqtt_ceiling(settings: Settings, workdir: Path, count: int) -> dict[str, Any]:
    """The connector's bare MQTT receive path (acknowledge on receipt), by connector_bench."""
    import connector_bench as cb

    from f2pipe.testing.servers import Mosquitto, TestPki, connector_env
    from f2pipe.tools.simulator import generated_fleet

    pki = TestPki(workdir / "ceiling-state")
    sensors = generated_fleet(8)
    for sensor in sensors:
        pki.device(sensor.mac)
    broker = Mosquitto(workdir / "ceiling-mosquitto", tls=pki.mosquitto_tls())
    broker.start()
    try:
        local = load_settings(mqtt_tls=True, mqtt_port=broker.port, state_dir=pki.root)
        identity = f"svc-connector-ceiling-{os.getpid()}"
        env = connector_env(pki, broker.port, identity, settings.kafka_bootstrap)
        env["F2PIPE_CONNECTOR_PORT"] = str(free_ports(1)[0])
        # The stack's Kafka is secured by default: the subscriber needs the credentials.
        paths = stack.Paths(settings.state_dir)
        env |= {
            k: v
            for k, v in security.admin_env(settings, paths).items()
            if k.startswith("F2PIPE_KAFKA_")
        }
        cb.publish(local, sensors, min(5000, count), 2)  # warm-up
        result: dict[str, Any] = cb.phase_subscriber(
            local,
            sensors,
            count,
            broker,
            env,
            True,
            workdir / "bare.log",
            2,
            settings.kafka_bootstrap,
        )
    finally:
        broker.stop()
    return result


def copy_ceilings(settings: Settings, rows: int) -> dict[str, float]:
    """Binary COPY into decoded_data, and COPY + INSERT ... ON CONFLICT, by sink_bench."""
    import sink_bench as sb

    from f2pipe.metadata.database import create_database, migrate
    from f2pipe.sink import stage as sinkmod

    admin = settings.metadata_dsn.rsplit("/", 1)[0] + "/postgres"
    create_database(admin, "f2bench_ceiling")
    dsn = admin.rsplit("/", 1)[0] + "/f2bench_ceiling"
    migrate(dsn, settings)
    records = sb.make_records(rows)
    parsed = [sinkmod.parse_reading(v) for _, v in records]
    decoded = [r for r in parsed if isinstance(r, tuple)]
    size = settings.sink_batch_rows
    encoded = [sinkmod.encode_copy(decoded[i : i + size]) for i in range(0, len(decoded), size)]
    return {
        "copy_rows_per_s": round(sb.ceiling(dsn, encoded, len(decoded), staging=False)),
        "copy_upsert_rows_per_s": round(sb.ceiling(dsn, encoded, len(decoded), staging=True)),
        "batch_rows": size,
    }


def measure(
    bench: Bench, replicas: int, rate: float, tries: int, args: argparse.Namespace
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One run: the sustained search from ``rate``, its latency and its ledger check."""
    run = f"{replicas}x"
    since = datetime.now(UTC)
    first = len(bench.ledgers)
    best, attempts = bench.search(rate, args.duration, tries, run)
    # Peak memory before the latency phase, as before: the sustained load's.
    peak = {name: peak_rss_mb(pid) for name, pid in bench.pids().items()}
    latency = bench.latency(best["target_frames_per_s"] * 0.25, args.latency_duration, run)
    # The first run's rows (warm-up and probe included) are all the table holds; the
    # second run's are those stamped after it began, against its own ledgers.
    if replicas == 1:
        check = bench.compare(bench.ledgers, None)
    else:
        check = bench.compare(bench.ledgers[first:], since)
    log(f"{run}: ledger {check[0]} readings, lost {check[1]}, wrong {check[2]}")
    report = pipeline_report.run_report(replicas, best, attempts, latency, check, peak)
    return report, attempts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="sustained phase, s")
    parser.add_argument("--latency-duration", type=float, default=30.0)
    parser.add_argument(
        "--devices", type=int, default=1000, help="simulated controllers, one connection each"
    )
    parser.add_argument("--probe", type=int, default=60000, help="messages in the probe burst")
    parser.add_argument("--rate", type=float, help="skip the probe: start at this frames/s")
    parser.add_argument("--tries", type=int, default=6, help="at most this many sustained runs")
    parser.add_argument(
        "--replica-tries",
        type=int,
        default=2,
        help="sustained runs with two processors and two sinks (the first at the first run's rate)",
    )
    parser.add_argument("--ceiling-messages", type=int, default=40000)
    parser.add_argument("--ceiling-rows", type=int, default=200000)
    parser.add_argument("--out", type=Path, default=REPO / "bench")
    args = parser.parse_args()
    if args.devices < 1:
        parser.error("--devices must be at least 1")

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    workdir = Path(tempfile.mkdtemp(prefix="f2pipe-bench-"))
    workdir.chmod(0o711)  # PostgreSQL's account must reach its data folder
    ports = free_ports(11)
    pg, redis, kafka, controller, mqtt, connector, processor, sink, certgen = ports[:9]
    dsn = f"postgresql://postgres@127.0.0.1:{pg}/f2pipe"
    settings = load_settings(
        state_dir=workdir / "state",
        metadata_dsn=dsn,
        timeseries_dsn=dsn,
        redis_url=f"redis://127.0.0.1:{redis}/0",
        kafka_bootstrap=f"127.0.0.1:{kafka}",
        kafka_controller_port=controller,
        mqtt_port=mqtt,
        connector_port=connector,
        processor_port=processor,
        sink_port=sink,
        certgen_port=certgen,
        stack_install=False,
    )
    bench = Bench(settings, workdir, args.devices)
    try:
        log(f"starting the pipeline in {workdir}")
        # Every row's commit time, for the latency: set before the stages connect, since
        # it takes a restart of PostgreSQL.
        stack.up(settings, ["postgres"])
        bench.admin = security.admin_settings(settings)
        with psycopg.connect(bench.dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
        server = stack.Postgres(settings, stack.Paths(settings.state_dir))
        server.stop()
        pipeline.up(settings, STAGES, quiet=True)
        bench.admin = security.admin_settings(settings)
        log(f"fleet: registering {args.devices} controllers and issuing their certificates")
        provision_s = pipeline_scale.provision(bench.admin, args.devices)
        log(f"fleet: ready ({provision_s})")
        bench.publish(2000, None, "warmup")
        bench.wait_drained()

        rate = args.rate or bench.probe(args.probe)
        one, _ = measure(bench, 1, rate, args.tries, args)
        log("adding a second processor and a second sink")
        bench.add_replicas(ports[9:])
        two, attempts = measure(bench, 2, one["target_frames_per_s"], args.replica_tries, args)
        step = pipeline_report.scaling(one, two, attempts[0])
        log(f"scaling: {step['verdict']}")
        bench.stop_replicas()

        log("ceiling: bare MQTT subscriber")
        mqtt_result = mqtt_ceiling(settings, workdir, args.ceiling_messages)
        log("ceiling: COPY")
        copy_result = copy_ceilings(bench.admin, args.ceiling_rows)
        ceilings = {
            "mqtt_subscriber_msgs_per_s": mqtt_result["rate_per_s"],
            "copy_rows_per_s": copy_result["copy_rows_per_s"],
            "copy_upsert_rows_per_s": copy_result["copy_upsert_rows_per_s"],
            "copy_batch_rows": copy_result["batch_rows"],
        }
        for run in (one, two):
            run["ratios"] = {
                "connector_over_mqtt_ceiling": round(
                    run["stages"]["connector"]["msgs_per_s"]
                    / ceilings["mqtt_subscriber_msgs_per_s"],
                    3,
                ),
                "sink_over_copy_ceiling": round(
                    run["readings_per_s"] / ceilings["copy_rows_per_s"], 3
                ),
            }
        report = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "duration_s": args.duration,
            "fleet": {
                "controllers": args.devices,
                "connections": "one mTLS connection per controller",
                # Sampled while the measured phases published (median).
                "broker_connections": sorted(bench.connections)[len(bench.connections) // 2]
                if bench.connections
                else 0,
                "reconnects": bench.reconnects,
                "sensors_per_controller": 1,
                "provision_s": provision_s,
            },
            # How the services reach each server: TLS and passwords cost CPU per record.
            "secured": {
                name: security.is_secured(stack.Paths(settings.state_dir), name)
                for name in ("postgres", "redis", "kafka")
            },
            "runs": [one, two],
            "scaling": step,
            "ceilings": ceilings,
            "versions": pipeline_report.versions(bench.dsn),
            "machine": {**pipeline_report.machine(), "load_average_at_start": load_at_start},
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "report.md").write_text(pipeline_report.markdown(report))
        log(f"wrote {args.out / 'report.json'} and report.md")
    except BaseException:
        log(f"failed: the stages' logs and thread stacks are kept in {bench.keep_evidence()}")
        raise
    finally:
        bench.stop_replicas()
        pipeline.down(settings, quiet=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
