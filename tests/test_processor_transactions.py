"""Transactional mode under a crash between the flush and the offset commit.

The processor is killed from outside its code: the test-only fault hook
(``tests/faults``) wraps :meth:`f2pipe.processor.delivery.Delivery.commit_offsets`
so that it SIGKILLs the process on its third call, after that batch's outputs
were flushed into the open transaction. The restarted replica must fence it at
once, and neither the readings nor the dead letters (``f2pipe dlq``) may repeat.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import unique, wait_until
from pipeline_helpers import (
    VENV_BIN,
    ProcessorProcess,
    Publisher,
    TopicReader,
    Topics,
    create_topics,
    delete_topics,
    env_payload,
    killed_at_commit_point,
    processor_env,
    wire_env_fleet,
)

pytestmark = [pytest.mark.servers, pytest.mark.slow]


@pytest.fixture
def topics() -> Iterator[Topics]:
    names = Topics(unique("raw"), unique("processed"), unique("dead"), unique("grp"))
    create_topics([names.raw], partitions=2)
    create_topics([names.processed, names.dead], partitions=1)
    yield names
    delete_topics([names.raw, names.processed, names.dead])


def _f2pipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "f2pipe"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_crash_between_flush_and_commit_repeats_no_reading_and_no_dead_letter(
    fresh_db: str, topics: Topics, tmp_path: Path
) -> None:
    good = [f"7c00000000{i:02x}" for i in range(4)]
    wire_env_fleet(fresh_db, good)
    publisher = Publisher(topics.raw)
    total = 600
    for seq in range(1, total + 1):  # every third from a controller nobody registered
        mac = f"dead000000{seq % 7:02x}" if seq % 3 == 0 else good[seq % 4]
        publisher.send(f"tele/f2-{mac}/sensor-mode/J1/sensor-1", env_payload(seq))
    publisher.flush()
    env = processor_env(
        fresh_db,
        topics,
        F2PIPE_PROCESSOR_TRANSACTIONS="true",
        F2PIPE_PROCESSOR_BATCH_SIZE="100",
    )
    with (tmp_path / "crashing.log").open("ab") as log:
        crashed = subprocess.run(
            [str(VENV_BIN / "f2pipe"), "processor"],
            env=killed_at_commit_point(env, "processor", 3),
            stderr=log,
            timeout=120,
        )
    assert crashed.returncode == -9  # killed with a flushed, uncommitted transaction open

    proc = ProcessorProcess(env, tmp_path / "processor.log")  # same replica, restarted
    out, dead = TopicReader(topics.processed), TopicReader(topics.dead)  # read_committed
    try:
        # Well within Kafka's 60 s transaction timeout: the restart fenced the crashed one.
        wait_until(lambda: len(out.poll()) >= 2 * 3 * total // 3, 30, what="every reading")
        wait_until(lambda: len(dead.poll()) >= total // 3, 10, what="every dead letter")
    finally:
        assert proc.stop() == 0

    readings = [(r.key, r.value) for r in out.poll()]
    assert len(readings) == len(set(readings)) == 2 * 3 * total // 3
    listing = _f2pipe(env, "dlq", "list")
    assert listing.returncode == 0, listing.stderr  # ends at the commit marker, no timeout
    lines = listing.stdout.splitlines()
    assert len(lines) == total // 3  # no dead letter twice, none of the aborted ones
    assert {line.split("\t")[3] for line in lines} == {"unknown_device"}
    replayed = _f2pipe(env, "dlq", "replay", "--reason", "unknown_device")
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {total // 3} to {topics.raw}" in replayed.stdout
