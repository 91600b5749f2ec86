"""The processor against the real Kafka, PostgreSQL and Redis (SPEC sections 2, 4 and 7)."""

from __future__ import annotations

import json
import math
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from conftest import VECTORS, unique, wait_until
from pipeline_helpers import (
    ENV_DATAPOINTS,
    VENV_BIN,
    Fleet,
    ProcessorProcess,
    Publisher,
    TopicReader,
    Topics,
    create_topics,
    delete_topics,
    env_payload,
    processor_env,
)

pytestmark = pytest.mark.servers


@pytest.fixture
def topics() -> Iterator[Topics]:
    names = Topics(unique("raw"), unique("processed"), unique("dead"), unique("grp"))
    create_topics([names.raw], partitions=4)
    create_topics([names.processed, names.dead], partitions=1)
    yield names
    delete_topics([names.raw, names.processed, names.dead])


@pytest.fixture
def fleet(fresh_db: str) -> Iterator[Fleet]:
    f = Fleet(fresh_db)
    yield f
    f.close()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _counter(metrics: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus text page (0 when absent)."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _readings(reader: TopicReader) -> set[tuple[int, int, str, float]]:
    return {
        (v["device_id"], v["datapoint_id"], v["ts"], v["value"])
        for v in (r.json() for r in reader.poll())
    }


def test_every_shared_vector_yields_its_readings_or_its_dead_letter(
    fresh_db: str, fleet: Fleet, topics: Topics, tmp_path: Path
) -> None:
    vectors = [json.loads(line) for line in VECTORS.read_text().splitlines() if line.strip()]
    publisher = Publisher(topics.raw)
    expected: dict[str, dict[str, object]] = {}  # mac -> expectation
    for i, vector in enumerate(vectors):
        mac = f"ab{i:010x}"
        tail = vector["topic_tail"].split("/")
        connector = int(tail[1][1:])
        index = int(tail[2].rsplit("-", 1)[1]) if tail[2][-1].isdigit() else 1
        template = fleet.template(
            f"{vector['name']} template",
            vector["template"]["frame_check"],
            vector["template"]["datapoints"],
        )
        fleet.controller(mac, vector["timezone"])
        sensor = fleet.sensor(f"{vector['name']} sensor", template)
        fleet.wire(mac, connector, index, sensor)
        ids = fleet.datapoint_ids(template)
        expected[mac] = {"sensor": sensor, "ids": ids, **vector["expect"], "name": vector["name"]}
        # A vector's ingest time, or none: the receive time would resolve an ambiguous
        # local time differently from the vector (SPEC section 2).
        ingest = datetime.fromisoformat(vector["ingest_ts"]) if "ingest_ts" in vector else None
        publisher.send(
            f"{vector['topic_type']}/f2-{mac}/{vector['topic_tail']}",
            vector["payload"].encode(),
            ingest=ingest,
        )
    publisher.flush()
    # Every reading decoded from an ambiguous local time is counted.
    ambiguous = sum(
        len(v["expect"].get("readings", [])) for v in vectors if "dst_ambiguous" in v["name"]
    )

    n_readings = sum(len(e.get("readings", [])) for e in expected.values())  # type: ignore[arg-type]
    n_dead = sum(1 for e in expected.values() if "dead_letter" in e)
    proc = ProcessorProcess(processor_env(fresh_db, topics), tmp_path / "processor.log")
    out, dead = TopicReader(topics.processed), TopicReader(topics.dead)
    try:
        wait_until(lambda: len(out.poll()) >= n_readings, 60, what="all readings")
        wait_until(lambda: len(dead.poll()) >= n_dead, 30, what="all dead letters")

        def counted() -> str | None:
            page = _metrics(proc.port)
            return (
                page if _counter(page, "f2pipe_ambiguous_timestamps_total") == ambiguous else None
            )

        metrics = wait_until(counted, 10, what="the ambiguous-time counter")
    finally:
        proc.stop()

    by_sensor: dict[int, list[dict[str, object]]] = {}
    for record in out.records:
        value = record.json()
        assert record.key == f"{value['device_id']}:{value['datapoint_id']}".encode()
        assert value["v"] == 1
        by_sensor.setdefault(value["device_id"], []).append(value)
    reasons = {r.key.decode(): r.headers for r in dead.records if r.key}
    for mac, exp in expected.items():
        sensor = exp["sensor"]
        if "dead_letter" in exp:
            assert mac in reasons, exp["name"]
            headers = reasons[mac]
            assert headers["dlq.reason"].decode() == exp["dead_letter"], exp["name"]
            assert headers["dlq.stage"] == b"processor"
            assert headers["dlq.source"].startswith(topics.raw.encode() + b"/")
            assert sensor not in by_sensor, exp["name"]
            continue
        got = sorted(by_sensor.get(sensor, []), key=lambda v: v["datapoint_id"])  # type: ignore[arg-type, return-value]
        ids: dict[str, int] = exp["ids"]  # type: ignore[assignment]
        want = sorted(exp["readings"], key=lambda r: ids[r["label"]])  # type: ignore[attr-defined]
        assert len(got) == len(want), exp["name"]
        for value, reading in zip(got, want, strict=True):
            assert value["datapoint_id"] == ids[reading["label"]], exp["name"]
            assert value["ts"] == reading["ts"], exp["name"]
            assert math.isclose(value["value"], reading["value"], rel_tol=1e-9), exp["name"]  # type: ignore[arg-type]
    assert 'f2pipe_dead_letters_total{reason="crc_mismatch",stage="processor"}' in metrics
    assert "f2pipe_processor_consumed_total" in metrics


def test_rewiring_takes_effect_within_five_seconds_without_waiting_for_the_ttl(
    fresh_db: str, fleet: Fleet, topics: Topics, tmp_path: Path
) -> None:
    template = fleet.template("env", "modbus_crc", ENV_DATAPOINTS)
    mac = "0123456789ab"
    fleet.controller(mac)
    first, second = fleet.sensor("first", template), fleet.sensor("second", template)
    fleet.wire(mac, 1, 1, first)
    fleet.wire(mac, 2, 1, second)
    env = processor_env(fresh_db, topics, F2PIPE_CACHE_TTL_S="3600")
    proc = ProcessorProcess(env, tmp_path / "processor.log")
    publisher, out = Publisher(topics.raw), TopicReader(topics.processed)
    topic = f"tele/f2-{mac}/sensor-mode/J1/sensor-1"
    seq = 0

    def send_and_see(device_id: int) -> bool:
        nonlocal seq
        seq += 1
        publisher.send(topic, env_payload(seq))
        publisher.flush()
        return any(r.json()["device_id"] == device_id and r.offset >= mark for r in out.poll())

    try:
        mark = 0
        wait_until(lambda: send_and_see(first), 30, 0.1, "readings of the first sensor")
        mark = len(out.poll())
        swapped_at = seq
        # Swap: J1 pin 1 now holds the second sensor.
        fleet.wire(mac, 1, 1, second)
        fleet.wire(mac, 2, 1, first)
        wait_until(lambda: send_and_see(second), 5, 0.1, "the new mapping within 5 s")
        wait_until(lambda: len(out.poll()) >= 3 * seq, 10, what="every reading")
    finally:
        proc.stop()
    # Metadata committed before a message was published is used for it: no message
    # sent after the swap may come out for the first sensor (CO2 carries the sequence).
    ids = fleet.datapoint_ids(template)
    late = [
        v
        for v in (r.json() for r in out.records)
        if v["datapoint_id"] == ids["CO2"] and v["device_id"] == first and v["value"] > swapped_at
    ]
    assert late == []


def test_processor_counts_skipped_status_without_device_and_rejects_bad_topics(
    fresh_db: str, fleet: Fleet, topics: Topics, tmp_path: Path
) -> None:
    template = fleet.template("env", "modbus_crc", ENV_DATAPOINTS)
    mac = "0123456789ac"
    fleet.controller(mac)
    fleet.wire(mac, 1, 1, fleet.sensor("s", template))
    publisher = Publisher(topics.raw)
    ts = b'{"timestamp": "2024-07-15 10:00:00", "status": true}'
    publisher.send(f"stat/f2-{mac}/alarm-mode/J3/siren-2", ts)  # nothing wired: skipped
    publisher.send(f"tele/f2-{mac}/access-control-mode/J1/reader-1", b'{"data": "x"}')
    publisher.send(f"tele/f2-{mac}/sensor-mode/J2/sensor-1", env_payload(1))  # unmapped
    publisher.send(f"tele/f2-{mac}/sensor-mode/J5/sensor-1", env_payload(2))  # invalid topic
    publisher.send("tele/f2-ffffffffffff/sensor-mode/J1/sensor-1", env_payload(3))  # unknown
    publisher.send(f"tele/f2-{mac}/sensor-mode/J1/sensor-1", b"\xff\xfe")  # invalid json
    publisher.flush()
    proc = ProcessorProcess(processor_env(fresh_db, topics), tmp_path / "p.log")
    dead = TopicReader(topics.dead)
    try:
        wait_until(lambda: len(dead.poll()) >= 4, 30, what="dead letters")
        wait_until(lambda: "f2pipe_processor_skipped_total" in _metrics(proc.port), 10)
        metrics = _metrics(proc.port)
    finally:
        proc.stop()
    assert sorted(r.headers["dlq.reason"].decode() for r in dead.records) == [
        "invalid_json",
        "invalid_topic",
        "unknown_device",
        "unmapped_sensor",
    ]
    assert 'f2pipe_processor_skipped_total{kind="siren"} 1.0' in metrics
    assert 'f2pipe_processor_skipped_total{kind="reader"} 1.0' in metrics
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (2,)


def _f2pipe(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [str(VENV_BIN / "f2pipe"), *args], env=env, capture_output=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_unknown_device_registered_later_decodes_and_replay_recovers_its_dead_letters(
    fresh_db: str, fleet: Fleet, topics: Topics, tmp_path: Path
) -> None:
    mac = "0123456789ad"
    topic = f"tele/f2-{mac}/sensor-mode/J1/sensor-1"
    env = processor_env(fresh_db, topics)
    proc = ProcessorProcess(env, tmp_path / "processor.log")
    publisher = Publisher(topics.raw)
    out, dead = TopicReader(topics.processed), TopicReader(topics.dead)
    try:
        for seq in range(1, 4):
            publisher.send(topic, env_payload(seq))
        publisher.flush()
        wait_until(lambda: len(dead.poll()) >= 3, 30, what="three unknown_device dead letters")
        assert {r.headers["dlq.reason"] for r in dead.records} == {b"unknown_device"}

        template = fleet.template("env", "modbus_crc", ENV_DATAPOINTS)
        fleet.controller(mac)
        sensor = fleet.sensor("late sensor", template)
        fleet.wire(mac, 1, 1, sensor)
        publisher.send(topic, env_payload(4))
        publisher.flush()
        wait_until(lambda: len(out.poll()) >= 3, 10, what="the next message decoded")
        assert {v["device_id"] for v in (r.json() for r in out.records)} == {sensor}

        listing = _f2pipe(env, "dlq", "list", "--reason", "unknown_device")
        assert listing.count("unknown_device") == 3
        first = listing.splitlines()[0].split("\t")[0]
        shown = _f2pipe(env, "dlq", "show", first)
        assert "header dlq.stage: processor" in shown
        assert f"header mqtt.topic: {topic}" in shown

        assert "replayed 3 to" in _f2pipe(env, "dlq", "replay", "--reason", "unknown_device")
        wait_until(lambda: len(out.poll()) >= 12, 20, what="replayed readings")
        distinct = _readings(out)
        assert len(distinct) == 12  # four messages x three datapoints
        refused = subprocess.run(
            [str(VENV_BIN / "f2pipe"), "dlq", "replay"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert refused.returncode == 2  # a reason, or --all, is required
        assert "--reason" in refused.stderr
        assert "replayed 3 to" in _f2pipe(env, "dlq", "replay", "--all", "--since", "1h")
        wait_until(lambda: len(out.poll()) >= 21, 20, what="second replay")
        assert _readings(out) == distinct  # same keys and values: the sink keeps one row each
        assert len(dead.poll()) == 3  # nothing replayed failed again
    finally:
        proc.stop()


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_transactional_mode_commits_outputs_and_offsets_together(
    fresh_db: str, fleet: Fleet, topics: Topics, tmp_path: Path
) -> None:
    macs = [f"7a00000000{i:02x}" for i in range(4)]
    fleet.env_sensors(macs)
    publisher = Publisher(topics.raw)
    for seq in range(1, 41):
        publisher.send(f"tele/f2-{macs[seq % 4]}/sensor-mode/J1/sensor-1", env_payload(seq))
    publisher.flush()
    env = processor_env(fresh_db, topics, F2PIPE_PROCESSOR_TRANSACTIONS="true")
    proc = ProcessorProcess(env, tmp_path / "processor.log")
    out = TopicReader(topics.processed)  # read_committed: sees committed transactions only
    try:
        wait_until(lambda: len(out.poll()) >= 120, 60, what="transactional readings")
        wait_until(lambda: _status(proc.port, "/readyz") == 200, 10, what="ready")
        assert _status(proc.port, "/healthz") == 200
    finally:
        assert proc.stop() == 0
    # The offsets were committed with the outputs: a restart re-reads nothing.
    proc.start()
    try:
        publisher.send(f"tele/f2-{macs[0]}/sensor-mode/J1/sensor-1", env_payload(41))
        publisher.flush()
        wait_until(lambda: len(out.poll()) >= 123, 60, what="the next message")
    finally:
        proc.stop()
    assert len(out.poll()) == 123
    assert len(_readings(out)) == 123
