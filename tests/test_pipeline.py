"""End to end through the whole pipeline (SPEC section 7).

The services run as separate processes, exactly as ``f2pipe up`` starts them
(:mod:`f2pipe.operations.services`), configured only through ``F2PIPE_*`` variables. The
simulator publishes over mutual TLS and writes a ledger of every message the
broker acknowledged; the ledger is the ground truth the table is compared to.

- ``test_pipeline``: on the test stack's PostgreSQL, Redis and Kafka (unique
  database, topics and groups) with a dedicated mTLS Mosquitto: every expected
  reading is in ``decoded_data`` with its exact value, every malformed message
  is on the dead-letter topic with its reason, and nothing else is in the table.
- ``test_crash``: on dedicated servers (a whole ``f2pipe up`` in a temporary
  state folder), two of the controllers in daylight-saving zones and a fifth
  of the messages faulty: while QoS 1 messages stream through, each stage is
  killed with SIGKILL and restarted, then killed again at its commit point by
  the test-only fault hook (``tests/faults``: the connector between Kafka's
  ack and the PUBACK, the processor between its flush and its offset commit,
  the sink between the database commit and the offset commit); PostgreSQL and
  Kafka are killed with SIGKILL and Kafka restarted gracefully; Redis is killed
  and restarted; and Mosquitto is restarted gracefully while it holds the
  connector's queued messages. The rows equal the ledger exactly and the dead
  letters are exactly the faulty messages. ``CHAOS_MESSAGES`` sets its size
  (``make chaos``: 50,000).
- ``test_broker_drops_past_its_queue_bound_are_reported``: Kafka stopped and
  more published than the broker may queue; the drops are reported and the
  table holds exactly the acknowledged messages minus them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from conftest import unique, wait_until
from f2pipe.metadata.fleet.demo import demo_fleet
from f2pipe.operations import pipeline, services, stack, status, statusview
from f2pipe.operations.stack import security
from f2pipe.runtime.kafka import admin_config, client_config
from f2pipe.settings import Settings, get_settings, load_settings
from f2pipe.testing.ledger import datapoint_map
from f2pipe.testing.stack import free_ports, private_settings, private_state
from pipeline_helpers import killed_at_commit_point

pytestmark = pytest.mark.servers

Row = tuple[datetime, int, int, float]
# Simulator fault -> the dead-letter reason it must produce. `duplicate` must produce
# nothing extra; `unknown_mac` is dropped by the broker's ACL (a device may publish only
# on its own topics), so it reaches neither the table nor the dead letters.
FAULT_REASONS = {
    "bad_crc": "crc_mismatch",
    "bad_json": "invalid_json",
    "clock_skew": "timestamp_out_of_range",
}
STAGES = ("connector", "processor", "sink")
# Demo controllers the crash test moves into daylight-saving zones.
DST_ZONES = {"aabbccddee01": "Europe/Madrid", "aabbccddee02": "America/New_York"}


def simulate(settings: Settings, ledger: Path, count: int, *extra: str) -> subprocess.Popen[bytes]:
    """Start the load-mode simulator (demo fleet, mTLS) writing ``ledger``."""
    command = [
        sys.executable, "-m", "f2pipe.cli", "simulate", "--count", str(count),
        "--ledger", str(ledger), "--json", *extra,
    ]  # fmt: skip
    env = {**os.environ, **services.settings_env(settings)}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err.decode()[-2000:]
    summary: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return summary


def read_ledger(*paths: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


def expected_rows(
    entries: Sequence[dict[str, Any]], dsn: str, zones: Mapping[str, str] | None = None
) -> set[Row]:
    """The readings the ledger says must land (faulty messages carry none).

    The simulator stamps the UTC wall clock without an offset; a controller whose
    time zone is in ``zones`` (MAC -> zone) has that wall time read in its zone.
    """
    mapping = datapoint_map(dsn)
    expected: set[Row] = set()
    for entry in entries:
        if not entry["readings"]:
            continue
        # tele/f2-<mac>/sensor-mode/J<n>/sensor-<pin>
        _, device, _, connector, sensor = entry["topic"].split("/")
        mac, number, pin = device[3:], int(connector[1:]), int(sensor.split("-")[1])
        zone = ZoneInfo((zones or {}).get(mac, "UTC"))
        ts = datetime.fromisoformat(entry["timestamp"]).replace(tzinfo=zone).astimezone(UTC)
        for reading in entry["readings"]:
            device_id, datapoint_id = mapping[(mac, number, pin, reading["label"])]
            expected.add((ts, device_id, datapoint_id, float(reading["value"])))
    return expected


def stored_rows(dsn: str) -> set[Row]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT timestamp, device_id, datapoint_id, value FROM decoded_data"
        ).fetchall()
    return {(ts.astimezone(UTC), int(d), int(p), float(v)) for ts, d, p, v in rows}


def row_count(dsn: str) -> int:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            found = conn.execute("SELECT count(*) FROM decoded_data").fetchone()
    except psycopg.Error:
        return -1  # restarting
    return int(found[0]) if found else 0


def lags(settings: Settings) -> dict[str, int | None]:
    admin = AdminClient(admin_config(settings, log_level=2))
    return {
        "processor": status.consumer_lag(admin, settings.processor_group, settings.topic_raw),
        "sink": status.consumer_lag(admin, settings.sink_group, settings.topic_processed),
    }


def drained(settings: Settings, expected: set[Row]) -> bool:
    """Every stage has committed all its input and the table holds ``expected``'s count."""
    return row_count(settings.timeseries_dsn) >= len(expected) and all(
        lag == 0 for lag in lags(settings).values()
    )


def dead_letters(settings: Settings, want: int, timeout: float) -> list[tuple[bytes, str, str]]:
    """(value, dlq.stage, dlq.reason) of the dead-letter topic, once ``want`` are there."""
    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": unique("dlq-reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.topic_dead_letter])
    found: list[tuple[bytes, str, str]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                if len(found) >= want:
                    break  # and nothing more arrived in the last half second
                continue
            assert message.error() is None, message.error()
            headers = {k: (v or b"").decode() for k, v in message.headers() or []}
            found.append((message.value() or b"", headers["dlq.stage"], headers["dlq.reason"]))
    finally:
        consumer.close()
    return found


def create_topics(settings: Settings, partitions: int = 3) -> None:
    admin = AdminClient(admin_config(settings))
    day = stack.DAY_MS
    stack.create_topics(
        admin,
        {
            settings.topic_raw: (partitions, day),
            settings.topic_processed: (partitions, day),
            settings.topic_dead_letter: (1, day),
        },
        deadline=time.monotonic() + 60,
    )


def delete_topics(settings: Settings) -> None:
    admin = AdminClient(admin_config(settings))
    topics = [settings.topic_raw, settings.topic_processed, settings.topic_dead_letter]
    for future in admin.delete_topics(topics).values():
        with contextlib.suppress(Exception):  # best-effort cleanup
            future.result(30)


# The Kafka client's reconnection chatter while a server is down: it would crowd
# out of a failure's message the lines that say why a stage stalled.
_CLIENT_NOISE = re.compile(r'^%\d\||"msg":"(kafka|kafka client error)"|FAIL \[rdkafka')


def failure_logs(settings: Settings) -> str:
    """The tail of every log (replicas' included) and each stage's threads, for a failing
    assertion."""
    parts = []
    for path in sorted((settings.state_dir / "log").glob("*.log")):
        lines = [
            line
            for line in path.read_text(errors="replace").splitlines()
            if not _CLIENT_NOISE.search(line)
        ][-25:]
        parts.append(f"--- {path.stem}\n" + "\n".join(line[:300] for line in lines))
    # Which stage stalled: each one's counters and the lag per consumer group.
    with contextlib.suppress(Exception):
        snapshot = status.Observer(settings).snapshot(with_health=False)
        parts.append(f"--- counters {snapshot.counters}\n--- lag {snapshot.lag}")
    return "\n".join(parts + _thread_dumps(settings))


def _thread_dumps(settings: Settings) -> list[str]:
    """Where each running stage waits: its threads' stacks (SIGUSR1, see f2pipe.runtime.logs)."""
    sizes = {}
    for service in services.services(settings):
        pid = service.pid()
        if pid is not None and service.log_file.is_file():
            sizes[service.label] = (service.log_file, service.log_file.stat().st_size)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR1)
    dumps = []
    for name, (path, size) in sizes.items():
        with contextlib.suppress(pytest.fail.Exception):
            wait_until(
                lambda path=path, size=size: path.stat().st_size > size,
                timeout=5,
                what=f"{name}'s threads",
            )
        with path.open("rb") as log:
            log.seek(size)
            lines = log.read().decode(errors="replace").splitlines()
        # The threads and their frames in f2pipe and its libraries, not the standard library's.
        stacks = [
            line.replace(str(Path.cwd()), ".")
            for line in lines
            if line.startswith(("Thread", "Current thread"))
            or (line.startswith("  File") and ("f2pipe" in line or "site-packages" in line))
        ]
        dumps.append(f"--- {name} threads\n" + "\n".join(stacks[:60]))
    return dumps


# --------------------------------------------------------------------------- end to end
@pytest.fixture
def shared_pipeline(tmp_path: Path, fresh_db: str) -> Iterator[Settings]:
    """Connector, processor and sink as processes on the test stack, with their own broker."""
    mqtt, connector, processor, sink, certgen = free_ports(5)
    base = get_settings()
    settings = load_settings(
        state_dir=tmp_path / "state",
        metadata_dsn=fresh_db,
        timeseries_dsn=fresh_db,
        redis_url=base.redis_url,
        kafka_bootstrap=base.kafka_bootstrap,
        mqtt_port=mqtt,
        mqtt_tls=True,
        connector_port=connector,
        processor_port=processor,
        sink_port=sink,
        certgen_port=certgen,
        topic_raw=unique("raw"),
        topic_processed=unique("processed"),
        topic_dead_letter=unique("dead"),
        processor_group=unique("processor"),
        sink_group=unique("sink"),
        sink_batch_age_ms=200,
    )
    create_topics(settings)
    try:
        pipeline.up(settings, STAGES, quiet=True, servers=["mosquitto"])
        yield settings
    finally:
        pipeline.down(settings, quiet=True)
        delete_topics(settings)


def test_pipeline(shared_pipeline: Settings, tmp_path: Path) -> None:
    settings = shared_pipeline
    ledger = tmp_path / "ledger.jsonl"
    summary = finish(
        simulate(settings, ledger, 800, "--faults", "0.2", "--seed", "20261126"), timeout=120
    )
    assert summary["acknowledged"] == summary["published"] == 800
    entries = read_ledger(ledger)
    assert len(entries) == 800
    faults = {fault for entry in entries if (fault := entry["fault"])}
    assert set(FAULT_REASONS) <= faults, "the seed must exercise every dead-letter fault"

    expected = expected_rows(entries, settings.timeseries_dsn)
    wait_until(
        lambda: drained(settings, expected), timeout=90, what="every stage to commit its input"
    )
    stored = stored_rows(settings.timeseries_dsn)
    assert not expected - stored, f"missing readings\n{failure_logs(settings)}"
    assert not stored - expected, "rows that the ledger does not hold"
    assert len(stored) == row_count(settings.timeseries_dsn)

    malformed = sorted(
        (entry["payload"].encode(), FAULT_REASONS[entry["fault"]])
        for entry in entries
        if entry["fault"] in FAULT_REASONS
    )
    found = dead_letters(settings, len(malformed), timeout=30)
    assert sorted((value, reason) for value, _stage, reason in found) == malformed
    assert {stage for _value, stage, _reason in found} == {"processor"}


# --------------------------------------------------------------------------- crash test
def chaos_size() -> int:
    return int(os.environ.get("CHAOS_MESSAGES", "4000"))


@contextlib.contextmanager
def own_stack(**overrides: Any) -> Iterator[Settings]:
    """``f2pipe up`` of the three stages on dedicated servers in a temporary state folder."""
    with private_state("f2pipe-chaos-") as state:
        settings = private_settings(
            state,
            stages=True,
            kafka_heap="512m",
            mqtt_tls=True,
            data_topic_partitions=3,
            processor_group=unique("processor"),
            sink_group=unique("sink"),
            # A killed replica's partitions wait this long for the group to notice.
            processor_session_timeout_s=6,
            sink_batch_age_ms=200,
            **overrides,
        )
        try:
            pipeline.up(settings, STAGES, quiet=True)
            # The stack is secured: the test acts as the operator, the stages as themselves.
            yield security.admin_settings(settings)
        finally:
            pipeline.down(settings, quiet=True)


@pytest.fixture
def own_pipeline() -> Iterator[Settings]:
    with own_stack() as settings:
        yield settings


def _service(settings: Settings, name: str) -> services.Service:
    return services.services(settings, [name])[0]


def _server(settings: Settings, name: str) -> stack.Server:
    cls = next(cls for cls in stack.SERVERS if cls.name == name)
    return cls(settings, stack.Paths(settings.state_dir))


def _kill(server: stack.Server) -> None:
    """SIGKILL a process and everything it started (its own process group)."""
    pid = server.pid()
    assert pid is not None, f"{server.name} is not running"
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: server.pid() is None, timeout=30, what=f"{server.name} to die")
    server.pidfile.remove()


def kill_and_restart(settings: Settings, name: str) -> None:
    """SIGKILL a stage (no chance to flush or commit), then start it again."""
    service = _service(settings, name)
    _kill(service)
    service.start()
    service.wait_healthy()


def kill_server_and_restart(settings: Settings, name: str) -> None:
    """SIGKILL a server with all its processes, as a power cut would, then start it."""
    server = _server(settings, name)
    _kill(server)
    server.prepare()
    server.start()
    server.wait_healthy()


def crash_at_commit_point(settings: Settings, name: str, call: int = 3) -> None:
    """Restart a stage so that it kills itself at its ``call``-th commit point, then
    start it again normally."""
    service = _service(settings, name)
    _kill(service)
    before = dict(os.environ)
    os.environ.update(killed_at_commit_point(before, name, call))
    try:
        service.start()
    finally:
        os.environ.clear()
        os.environ.update(before)
    wait_until(lambda: service.pid() is None, timeout=180, what=f"{name} to die at its commit")
    assert "fault hook: SIGKILL" in service.log_file.read_text(errors="replace")
    service.pidfile.remove()
    service.start()
    service.wait_healthy()


def restart_server(settings: Settings, name: str) -> None:
    """A graceful stop (the server's own shutdown signal), then a start on the same data."""
    server = _server(settings, name)
    assert server.stop(), f"{name} was not running"
    server.prepare()
    server.start()
    server.wait_healthy()


class Publisher(threading.Thread):
    """Publishes in back-to-back simulator runs until told to stop and ``minimum`` are in.

    However long the chaos events take, messages keep streaming through all of
    them; each run writes its own ledger.
    """

    def __init__(
        self, settings: Settings, folder: Path, minimum: int, rate: float, faults: float = 0.0
    ) -> None:
        super().__init__(daemon=True)
        self.settings, self.folder, self.minimum, self.rate = settings, folder, minimum, rate
        self.faults = faults
        self.chunk = max(100, int(rate * 10))
        self.ledgers: list[Path] = []
        self.published = 0
        self.stop = threading.Event()
        self.failure: str | None = None

    def run(self) -> None:
        try:
            while not (self.stop.is_set() and self.published >= self.minimum):
                ledger = self.folder / f"ledger-{len(self.ledgers) + 1}.jsonl"
                self.ledgers.append(ledger)
                process = simulate(
                    self.settings, ledger, self.chunk, "--rate", str(self.rate),
                    "--window", "2000", "--faults", str(self.faults),
                )  # fmt: skip
                summary = finish(process, timeout=600)
                if summary["acknowledged"] != summary["published"]:
                    self.failure = f"unacknowledged messages: {summary}"
                    return
                self.published += int(summary["published"])
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.failure = repr(exc)

    def rows_flow(self, label: str, more: int = 20, timeout: float = 180) -> None:
        """Wait until ``more`` new rows land: what was killed or restarted is back in the
        chain. Fails with every log's tail if they do not, or if publishing failed.

        180 s by default: a killed stage's partitions wait out its session, and a Kafka
        restart adds the coordinator's reload and a rebalance.
        """
        dsn = self.settings.timeseries_dsn
        base = row_count(dsn)
        try:
            wait_until(
                lambda: self.failure is not None or row_count(dsn) >= base + more,
                timeout=timeout,
                what=f"rows to flow again after {label}",
            )
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n{failure_logs(self.settings)}")
        assert self.failure is None, self.failure


@pytest.mark.slow
def test_crash(own_pipeline: Settings, tmp_path: Path) -> None:
    settings = own_pipeline
    dsn = settings.timeseries_dsn
    with psycopg.connect(settings.metadata_dsn) as conn:
        for mac, zone in DST_ZONES.items():
            conn.execute("UPDATE devices SET timezone = %s WHERE mac_address = %s", (zone, mac))
    total = chaos_size()
    first = int(total * 0.7)
    # Phase one streams through every event, a fifth of its messages faulty; it lasts
    # about 100 s however large it is.
    publisher = Publisher(settings, tmp_path, first, rate=max(30.0, first / 100), faults=0.2)
    publisher.start()

    publisher.rows_flow("start")
    for name in STAGES:
        kill_and_restart(settings, name)
        publisher.rows_flow(f"kill -9 {name}")
    for name in STAGES:
        crash_at_commit_point(settings, name)
        publisher.rows_flow(f"{name} killed at its commit point")
    for name in ("postgres", "kafka"):
        kill_server_and_restart(settings, name)
        publisher.rows_flow(f"kill -9 {name}")
    restart_server(settings, "kafka")
    publisher.rows_flow("restarting kafka")
    # Redis down: the processor reads its metadata from PostgreSQL meanwhile.
    redis = _server(settings, "redis")
    _kill(redis)
    publisher.rows_flow("kill -9 redis")
    redis.prepare()
    redis.start()
    redis.wait_healthy()
    publisher.rows_flow("redis back")
    publisher.stop.set()
    publisher.join(timeout=900)
    assert publisher.failure is None, publisher.failure
    second = max(100, total - publisher.published)
    ledgers = [*publisher.ledgers, tmp_path / "ledger-last.jsonl"]

    # Phase two: the connector is down, so the broker queues everything for its persistent
    # session; a graceful broker restart must keep that queue.
    connector = _service(settings, "connector")
    pid = connector.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: connector.pid() is None, timeout=10, what="connector to die")
    summary = finish(simulate(settings, ledgers[-1], second, "--window", "2000"), timeout=600)
    assert summary["acknowledged"] == summary["published"] == second
    restart_server(settings, "mosquitto")
    connector.pidfile.remove()
    connector.start()
    connector.wait_healthy()

    expected = expected_rows(read_ledger(*ledgers), dsn, DST_ZONES)
    assert len(expected) > total  # every demo sensor carries several datapoints
    wait_until(
        lambda: drained(settings, expected),
        timeout=300,
        interval=1.0,
        what="every stage to commit its input",
    )
    stored = stored_rows(dsn)
    missing, extra = expected - stored, stored - expected
    assert not missing, f"{len(missing)} readings lost\n{failure_logs(settings)}"
    assert not extra, f"{len(extra)} rows not in the ledger"

    # The dead letters are exactly the faulty messages (a crash may repeat one).
    entries = read_ledger(*ledgers)
    malformed = {
        (entry["payload"].encode(), FAULT_REASONS[entry["fault"]])
        for entry in entries
        if entry["fault"] in FAULT_REASONS
    }
    # A fifth of phase one's messages were faulty, three fault kinds of five malformed:
    # 12 % expected. How many messages there were depends on how long the events took.
    assert len(malformed) > publisher.published * 0.08
    found = dead_letters(settings, len(malformed), timeout=60)
    assert {(value, reason) for value, _stage, reason in found} == malformed


def ledger_messages(entries: Sequence[dict[str, Any]], dsn: str) -> list[set[Row]]:
    """The readings of each acknowledged message, one set per ledger entry."""
    return [expected_rows([entry], dsn) for entry in entries if entry["readings"]]


@pytest.mark.slow
def test_broker_drops_past_its_queue_bound_are_reported(tmp_path: Path) -> None:
    # A 20 kB queue and a 50-message connector window: with Kafka stopped, 600 messages
    # of about 90 bytes overflow what the broker may queue for the connector's session.
    with own_stack(broker_max_queued_bytes=20_000, connector_receive_maximum=50) as settings:
        dsn = settings.timeseries_dsn
        warm, ledger = tmp_path / "warm.jsonl", tmp_path / "ledger.jsonl"
        finish(simulate(settings, warm, 20), timeout=120)
        wait_until(lambda: row_count(dsn) > 0, timeout=60, what="the first rows")
        kafka = _server(settings, "kafka")
        assert kafka.stop()

        summary = finish(simulate(settings, ledger, 600, "--window", "100"), timeout=300)
        assert summary["acknowledged"] == summary["published"] == 600
        observer = status.Observer(settings)

        def reported() -> dict[str, int | None] | None:
            found = observer.broker(None)
            return found if (found.get("dropped_messages") or 0) > 0 else None

        broker = wait_until(
            reported, timeout=30, interval=1.0, what="the broker to report dropped messages"
        )
        dropped = int(broker["dropped_messages"] or 0)
        assert 0 < dropped < 600
        out = subprocess.run(
            [sys.executable, "-m", "f2pipe.cli", "status", "--json", "--interval", "0.5"],
            env={**os.environ, **services.settings_env(settings)},
            capture_output=True,
            check=False,
            timeout=120,
        )
        report = json.loads(out.stdout)
        assert out.returncode == 1
        assert report["broker"]["dropped_messages"] == dropped, out.stderr
        assert report["broker"]["queued_messages"] > 0
        assert any("broker dropped" in problem for problem in report["problems"])

        kafka.prepare()
        kafka.start()
        kafka.wait_healthy()
        messages = ledger_messages(read_ledger(warm, ledger), dsn)
        seen: list[int] = []

        def settled() -> bool:
            # Every stage committed its input and the table stopped growing.
            seen.append(row_count(dsn))
            quiet = len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]
            return quiet and all(lag == 0 for lag in lags(settings).values())

        wait_until(settled, timeout=180, interval=2.0, what="the pipeline to drain")
        stored = stored_rows(dsn)
        assert stored <= set().union(*messages), "rows that the ledger does not hold"
        landed = [rows for rows in messages if rows <= stored]
        partial = [rows for rows in messages if rows & stored and not rows <= stored]
        assert not partial, "a message landed only in part"
        assert len(landed) == len(messages) - dropped, failure_logs(settings)


def test_up_revives_a_killed_stage_and_status_sees_it(shared_pipeline: Settings) -> None:
    settings = shared_pipeline
    sink = _service(settings, "sink")
    pid = sink.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: sink.pid() is None, timeout=10, what="the sink to die")

    report = status.report(settings, interval=0.5)
    health = {h.name: h for h in report.health}
    assert not health["sink"].up
    assert health["processor"].up
    assert health["processor"].ready
    assert "sink is down" in " ".join(report.problems)

    again = pipeline.up(settings, STAGES, quiet=True, servers=["mosquitto"])
    assert again.services == ["sink"]  # only what was not running
    assert again.servers == []
    revived = sink.pid()
    assert revived is not None
    assert revived != pid
    health = {h.name: h for h in status.report(settings, interval=0.5).health}
    assert all(health[name].up for name in STAGES)


def test_up_starts_certgen_and_the_live_demo_and_status_exits_zero(
    shared_pipeline: Settings,
) -> None:
    settings = shared_pipeline
    started = pipeline.up(settings, ["certgen", "simulator"], quiet=True, servers=["mosquitto"])
    assert started.services == ["certgen", "simulator"]

    # The live simulator publishes the demo fleet; its readings land with names and units.
    demo_sensors = {sensor.name for sensor in demo_fleet().sensors}

    def every_sensor() -> list[tuple[Any, ...]] | None:
        rows = statusview.latest_readings(settings, limit=50) or []
        devices = {device for _ts, device, _label, _value, _unit in rows}
        return rows if demo_sensors <= devices else None

    latest = wait_until(every_sensor, timeout=60, what="every demo sensor in latest_readings")
    assert all(unit for *_rest, unit in latest)

    env = {**os.environ, **services.settings_env(settings)}
    out = subprocess.run(
        [sys.executable, "-m", "f2pipe.cli", "status", "--json", "--interval", "1"],
        env=env,
        capture_output=True,
        check=False,
        timeout=120,
    )
    report = json.loads(out.stdout)
    assert out.returncode == 0, report["problems"]
    assert {h["name"] for h in report["health"] if h["up"]} >= {*services.NAMES, "mosquitto"}
    assert report["rates"]["mqtt_received"] > 0
    assert report["alarms"] == []
    assert report["broker"]["dropped_messages"] == 0
    assert report["broker"]["connected_clients"] >= 2  # the connector and the simulator

    # certgen keeps the broker's counters in its metrics, as svc-monitor.
    certgen = _service(settings, "certgen")
    metrics = wait_until(
        lambda: (
            (found := status.scrape(certgen.url("/metrics")))
            and status.total(found, "f2pipe_broker_up") == 1
            and found
        ),
        timeout=30,
        what="certgen's broker monitor",
    )
    assert status.total(metrics, "f2pipe_broker_dropped_messages") == 0
    assert status.total(metrics, "f2pipe_broker_queued_messages") >= 0
    assert status.total(metrics, "f2pipe_build_info") == 1
