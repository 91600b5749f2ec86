"""Which offset-commit errors the sink retries, which it defers and which it skips.

Skipping is always safe (the rows are stored; re-reading them is absorbed by
the idempotent write), retrying an error that cannot change would stop the
sink. The consumer here is a stand-in that fails a given way: only the
decision is under test; the real commits run in tests/test_sink_service.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from f2pipe.sink import settle
from f2pipe.sink.batching import retry_backoff
from f2pipe.sink.settle import Settler


class FailingConsumer:
    """Fails its first ``failures`` commits with ``code``, then commits."""

    def __init__(self, code: int, failures: int) -> None:
        self.code, self.failures = code, failures
        self.calls = 0
        self.committed: list[TopicPartition] | None = None

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise KafkaException(KafkaError(self.code))
        self.committed = offsets

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        return (0, 10)


def settler(consumer: Any) -> Settler:
    return Settler(
        consumer, None, "dead-letters",  # type: ignore[arg-type]
        backoff=retry_backoff(0.001), stopping=lambda: False, sleep=lambda _s: None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "code",
    [KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.NOT_COORDINATOR, KafkaError._TRANSPORT],
)
def test_a_transient_commit_error_is_retried_until_the_commit_lands(code: int) -> None:
    consumer = FailingConsumer(code, failures=3)
    settler(consumer).commit_offsets({("processed-iot-data", 0): 41})
    assert consumer.calls == 4
    assert consumer.committed == [TopicPartition("processed-iot-data", 0, 42)]


@pytest.mark.parametrize(
    "code",
    [KafkaError._STATE, KafkaError._ASSIGNMENT_LOST, KafkaError.ILLEGAL_GENERATION],
)
def test_a_commit_error_that_cannot_pass_skips_the_commit_instead_of_stalling(code: int) -> None:
    consumer = FailingConsumer(code, failures=10**9)
    settler(consumer).commit_offsets({("processed-iot-data", 0): 41})
    assert consumer.calls == 1
    assert consumer.committed is None


def test_a_commit_a_rebalance_refused_is_made_again_for_the_partitions_still_owned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settle, "RECOMMIT_AFTER_S", 0.0)
    consumer = FailingConsumer(KafkaError.REBALANCE_IN_PROGRESS, failures=1)
    s = settler(consumer)
    s.commit_offsets({("t", 0): 41, ("t", 1): 9, ("t", 2): 5})
    assert consumer.committed is None
    s.forget({("t", 2)})  # assigned again: whoever had it meanwhile committed its own
    s.recommit({("t", 0), ("t", 2)})  # partition 1 went to another member
    assert consumer.committed == [TopicPartition("t", 0, 42)]
    consumer.committed = None
    s.recommit({("t", 0), ("t", 1), ("t", 2)})
    assert consumer.committed is None  # once committed, nothing is left to commit again
