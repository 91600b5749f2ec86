"""``f2pipe dlq``: ``show`` reads one offset directly, ``list`` and ``replay`` show progress.

The pure parts (the reference syntax, the progress line) are tested with plain
asserts; the readers and the commands against a private plaintext Kafka of this
module, so they do not depend on the shared stack's security settings.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from conftest import unique, wait_until
from f2pipe.settings import Settings, load_settings
from f2pipe.testing.servers import (
    KAFKA_SECURITY,
    KafkaServer,
    create_topics,
    read_topic,
    running_kafka,
)
from f2pipe.tools.dlq import DeadLetterError, Watch
from f2pipe.tools.dlqread import Scan, parse_ref, read_dead_letters, read_one
from f2pipe.tools.progress import ERASE, Progress

F2PIPE = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "f2pipe"
LETTERS = 5000


# --- pure: the reference and the progress line ---


def test_a_reference_is_partition_slash_offset_as_list_prints_it() -> None:
    assert parse_ref("0/4999") == (0, 4999)
    assert parse_ref(" 2/0 ") == (2, 0)
    for bad in ("0:12", "0/", "/3", "-1/2", "0/1/2", "a/b", "0/²", ""):
        with pytest.raises(DeadLetterError, match="expected <partition>/<offset>"):
            parse_ref(bad)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_come_at_most_once_a_second_and_the_summary_always() -> None:
    clock, err = Clock(), io.StringIO()
    progress = Progress(err, enabled=True, clock=clock)
    for step in range(12):  # three seconds of updates, four a second
        progress.update(lambda seconds, step=step: f"step {step} at {seconds:.2f}")
        clock.now += 0.25
    progress.finish("done")
    assert err.getvalue().splitlines() == [
        "step 0 at 0.00",  # the first at once: the total is worth seeing early
        "step 4 at 1.00",
        "step 8 at 2.00",
        "done",
    ]
    quiet = io.StringIO()  # not a terminal and not asked for: only the summary
    progress = Progress(quiet, clock=clock)
    progress.update(lambda _: "step")
    progress.finish("done")
    assert quiet.getvalue() == "done\n"


def test_on_a_terminal_the_line_is_redrawn_and_output_goes_above_it() -> None:
    clock, err = Clock(), Terminal()
    progress = Progress(err, clock=clock, output=err)  # stdout and stderr on one terminal
    progress.update(lambda _: "read 1 of 2")
    progress.echo("a listing line")
    clock.now += 1.0
    progress.update(lambda _: "read 2 of 2")
    progress.finish("2 listed")
    assert err.getvalue() == (
        f"{ERASE}read 1 of 2{ERASE}a listing line\nread 1 of 2{ERASE}read 2 of 2{ERASE}2 listed\n"
    )
    out = io.StringIO()  # stdout elsewhere (a file): its lines as print writes them
    progress = Progress(Terminal(), clock=clock, output=out)
    progress.update(lambda _: "read 1 of 2")
    progress.echo("a listing line")
    assert out.getvalue() == "a listing line\n"


def test_the_line_has_records_read_of_the_total_replayed_and_the_rate() -> None:
    watch = Watch("replay", Progress(io.StringIO(), enabled=True, clock=Clock()))
    watch.scan.total, watch.scan.done, watch.replayed = 5000, 1250, 1200
    assert watch.line(2.5) == "dlq replay: read 1,250 of 5,000 records (25%), replayed 1,200, 500/s"
    watch = Watch("list", watch.progress)
    watch.scan.total, watch.scan.done = 0, 0
    assert watch.line(0.0) == "dlq list: read 0 of 0 records, -/s"


# --- against a private Kafka ---


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    with running_kafka(tmp_path_factory.mktemp("kafka")) as server:
        yield server


def _create(bootstrap: str, *topics: str) -> bool:
    try:
        create_topics(bootstrap, *topics, partitions=1)
    except KafkaException:  # the broker listens before it takes requests
        return False
    return True


def _settings(kafka: KafkaServer, dead: str) -> Settings:
    """Settings for the private Kafka: plaintext, whatever the environment's security."""
    plain: dict[str, Any] = {name.removeprefix("F2PIPE_").lower(): None for name in KAFKA_SECURITY}
    plain.update(kafka_security_protocol="PLAINTEXT", kafka_properties_file=None)
    return load_settings(**plain, kafka_bootstrap=kafka.bootstrap, topic_dead_letter=dead)


def _env(kafka: KafkaServer, dead: str, raw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KAFKA_SECURITY}
    env.pop("F2PIPE_KAFKA_PROPERTIES_FILE", None)
    env.update(
        F2PIPE_KAFKA_BOOTSTRAP=kafka.bootstrap,
        F2PIPE_KAFKA_SECURITY_PROTOCOL="PLAINTEXT",
        F2PIPE_TOPIC_DEAD_LETTER=dead,
        F2PIPE_TOPIC_RAW=raw,
        F2PIPE_TOPIC_PROCESSED="unused-processed",
    )
    return env


def _letter_headers(seq: int) -> list[tuple[str, bytes]]:
    reason = b"unknown_device" if seq % 5 else b"crc_mismatch"
    return [
        ("mqtt.topic", f"tele/f2-0123456789ab/sensor-mode/J1/s{seq}".encode()),
        ("dlq.stage", b"processor"),
        ("dlq.reason", reason),
        ("dlq.detail", b"test"),
        ("dlq.ts", b"1700000000000"),
    ]


@pytest.fixture(scope="module")
def letters(kafka: KafkaServer) -> str:
    """A dead-letter topic of LETTERS processor dead letters in one partition."""
    topic = unique("dead")
    wait_until(lambda: _create(kafka.bootstrap, topic), 60, 0.5, what="the dead-letter topic")
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 5})
    for seq in range(LETTERS):
        producer.produce(topic, b'{"seq": %d}' % seq, b"0123456789ab", headers=_letter_headers(seq))
    assert producer.flush(30) == 0
    return topic


def _dlq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(F2PIPE), "dlq", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.servers
def test_show_reads_the_one_record_at_its_offset_not_the_topic(
    kafka: KafkaServer, letters: str
) -> None:
    settings = _settings(kafka, letters)
    scan = Scan()
    letter = read_one(settings, 0, LETTERS - 1, scan=scan)
    assert (letter.ref, letter.value) == (f"0/{LETTERS - 1}", b'{"seq": %d}' % (LETTERS - 1))
    assert letter.header("mqtt.topic").endswith(f"/s{LETTERS - 1}")
    assert scan.records == 1  # the one record, where a scan reads them all:
    full = Scan()
    assert sum(1 for _ in read_dead_letters(settings, scan=full)) == LETTERS
    assert full.records == LETTERS

    shown = _dlq(_env(kafka, letters, "unused-raw"), "show", "0/1234")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:2] == ["ref: 0/1234", "key: 0123456789ab"]
    assert 'value: {"seq": 1234}' in shown.stdout


@pytest.mark.servers
def test_show_of_an_offset_out_of_range_is_one_line_saying_why(kafka: KafkaServer) -> None:
    topic = unique("dead")
    wait_until(lambda: _create(kafka.bootstrap, topic), 60, 0.5, what="a dead-letter topic")
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    for seq in range(20):
        producer.produce(topic, b"x", headers=_letter_headers(seq))
    assert producer.flush(30) == 0
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, 10)]).values():
        future.result(30)  # what retention does: the log now starts at offset 10

    held = f"({topic} partition 0 holds offsets 10 to 19)"
    env = _env(kafka, topic, "unused-raw")
    for ref, message in [
        ("0/3", f"0/3: deleted by retention {held}"),
        ("0/20", f"0/20: not written yet {held}"),
    ]:
        shown = _dlq(env, "show", ref)
        assert shown.returncode == 1
        assert (shown.stdout, shown.stderr) == ("", f"f2pipe dlq: error: {message}\n")
    settings = _settings(kafka, topic)
    for partition, offset, message in [
        (0, 9, f"0/9: deleted by retention {held}"),
        (0, 99999, f"0/99999: not written yet {held}"),
        (4, 0, f"4/0: {topic} has no partition 4 (it has 0 to 0)"),
    ]:
        with pytest.raises(DeadLetterError) as caught:
            read_one(settings, partition, offset)
        assert str(caught.value) == message
    assert read_one(_settings(kafka, topic), 0, 10).offset == 10


@pytest.mark.servers
def test_show_of_a_marker_or_an_uncommitted_record_says_it_is_no_dead_letter(
    kafka: KafkaServer,
) -> None:
    topic = unique("dead")
    wait_until(lambda: _create(kafka.bootstrap, topic), 60, 0.5, what="a dead-letter topic")
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "transactional.id": topic})
    producer.init_transactions(60)
    producer.begin_transaction()
    producer.produce(topic, b"committed", headers=_letter_headers(1))  # offset 0
    producer.commit_transaction(30)  # its marker: offset 1
    producer.begin_transaction()
    producer.produce(topic, b"aborted", headers=_letter_headers(2))  # offset 2
    producer.flush(30)
    producer.abort_transaction(30)  # its marker: offset 3
    producer.begin_transaction()
    producer.produce(topic, b"open", headers=_letter_headers(3))  # offset 4
    producer.flush(30)
    try:
        settings = _settings(kafka, topic)
        assert read_one(settings, 0, 0).value == b"committed"
        for offset, why in [
            (1, "0/1: a transaction marker, not a record"),
            (2, "0/2: a record of an aborted transaction, not a dead letter"),
            (3, "0/3: a transaction marker, not a record"),
            (4, "0/4: not committed yet (a transaction is open from offset 4)"),
            (5, f"0/5: not written yet ({topic} partition 0 holds offsets 0 to 4)"),
        ]:
            with pytest.raises(DeadLetterError) as caught:
                read_one(settings, 0, offset)
            assert str(caught.value) == why
    finally:
        producer.abort_transaction(30)


@pytest.mark.servers
def test_progress_goes_to_stderr_and_leaves_stdout_as_it_was(
    kafka: KafkaServer, letters: str
) -> None:
    raw = unique("raw")
    wait_until(lambda: _create(kafka.bootstrap, raw), 60, 0.5, what="the raw topic")
    env = _env(kafka, letters, raw)

    plain, shown = _dlq(env, "list"), _dlq(env, "list", "--progress")
    assert plain.returncode == shown.returncode == 0, shown.stderr
    assert shown.stdout == plain.stdout
    assert len(plain.stdout.splitlines()) == LETTERS
    assert plain.stdout.splitlines()[0].split("\t")[:4] == [
        "0/0",
        "2023-11-14T22:13:20+00:00",
        "processor",
        "crc_mismatch",
    ]
    summary = (
        f"{LETTERS} dead letter(s) in {letters} (unknown_device 4,000, crc_mismatch 1,000);"
        f" read 5,000 records in "
    )
    assert plain.stderr.startswith(summary)  # the summary without --progress, alone
    assert len(plain.stderr.splitlines()) == 1
    lines = shown.stderr.splitlines()
    assert lines[0].startswith("dlq list: read 0 of 5,000 records (0%), ")  # at once
    assert all(line.startswith("dlq list: read ") for line in lines[:-1])
    assert lines[-1].startswith(summary)

    replayed = _dlq(env, "replay", "--reason", "crc_mismatch", "--progress")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == (
        f"replayed 1000 to {raw}, 0 to unused-processed; 0 not replayable (connector)\n"
    )
    lines = replayed.stderr.splitlines()
    assert lines[0].startswith("dlq replay: read 0 of 5,000 records (0%), replayed 0, ")
    assert lines[-1].startswith(
        f"replayed 1,000 of 1,000 dead letter(s) selected in {letters} (crc_mismatch 1,000);"
        " read 5,000 records in "
    )
    records = read_topic(kafka.bootstrap, raw, 1000, partitions=1)
    assert len(records) == 1000
    assert {r.value() for r in records} == {b'{"seq": %d}' % seq for seq in range(0, LETTERS, 5)}
    assert {k for k, _ in records[0].headers()} == {"mqtt.topic"}  # the dlq.* headers dropped
