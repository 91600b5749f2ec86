"""ConsumerWatch's arithmetic: lag as an age and offsets out of retention (no servers).

The consumer here is a stand-in that answers what the client would: the
assignment, positions, committed offsets and watermarks a test sets.
"""

from __future__ import annotations

from confluent_kafka import TopicPartition
from prometheus_client import CollectorRegistry, Gauge

from f2pipe.runtime.kafka import ConsumerWatch


class FakeConsumer:
    def __init__(self, partitions: int = 1) -> None:
        self.partitions = [TopicPartition("raw", p) for p in range(partitions)]
        self.positions = dict.fromkeys(range(partitions), -1001)
        self.committed_at = dict.fromkeys(range(partitions), -1001)
        self.marks = {p: (0, -1) for p in range(partitions)}  # partition -> (low, high)

    def assignment(self) -> list[TopicPartition]:
        return self.partitions

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition("raw", tp.partition, self.positions[tp.partition]) for tp in partitions
        ]

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [
            TopicPartition("raw", tp.partition, self.committed_at[tp.partition])
            for tp in partitions
        ]

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float | None = None, cached: bool = False
    ) -> tuple[int, int]:
        return self.marks[tp.partition]


def test_the_age_is_the_time_since_the_oldest_unconsumed_record_was_there() -> None:
    consumer, watch = FakeConsumer(), ConsumerWatch("processor", every_s=1.0)
    consumer.positions[0] = 0
    consumer.marks[0] = (0, 0)
    assert watch.update(consumer, now=100.0) == 0.0  # nothing to consume
    consumer.marks[0] = (0, 10)  # records 0-9 arrive
    assert watch.update(consumer, now=102.0) == 0.0  # seen just now
    consumer.marks[0] = (0, 20)  # records 10-19 arrive; nothing consumed
    assert watch.update(consumer, now=104.0) == 2.0  # record 0 was there at 102
    assert watch.update(consumer, now=104.5) == 2.0  # not recomputed within every_s
    consumer.positions[0] = 12  # 0-11 consumed: record 12 was first seen at 104
    assert watch.update(consumer, now=110.0) == 6.0
    consumer.positions[0] = 20  # caught up
    assert watch.update(consumer, now=112.0) == 0.0
    consumer.marks[0] = (0, 21)  # after a long quiet spell, one record arrives
    assert watch.update(consumer, now=4000.0) == 0.0  # it is new, not an hour old


def test_a_long_backlog_keeps_its_oldest_sample_when_thinned() -> None:
    consumer, watch = FakeConsumer(), ConsumerWatch("sink", every_s=0.0, samples=8)
    consumer.positions[0] = 0
    for second in range(1, 101):  # a record a second, none consumed
        consumer.marks[0] = (0, second)
        age = watch.update(consumer, now=float(second))
    assert age == 99.0  # record 0 was there at second 1
    assert len(watch._history[("raw", 0)]) <= 9


def test_committed_offsets_below_the_low_watermark_count_once_per_partition() -> None:
    consumer, watch = FakeConsumer(partitions=3), ConsumerWatch("processor", every_s=0.0)
    consumer.committed_at.update({0: 100, 1: 500, 2: -1001})  # 2: never committed
    consumer.marks.update({0: (150, 600), 1: (150, 600), 2: (150, 600)})
    assert watch.assigned(consumer, consumer.partitions) == 1  # only partition 0
    assert watch.resets == 1
    # The client has not reset yet: the position is still below; not counted again.
    consumer.positions.update({0: 100, 1: 500, 2: 150})
    watch.update(consumer, now=1.0)
    assert watch.resets == 1
    # Later, retention overtakes partition 1 while it is behind: a reset is coming.
    consumer.positions[0] = 150
    consumer.marks[1] = (550, 600)
    watch.update(consumer, now=2.0)
    assert watch.resets == 2


def test_the_same_pass_sets_each_partitions_lag_in_records() -> None:
    gauge = Gauge("lag_records", "records behind", ["partition"], registry=CollectorRegistry())
    consumer = FakeConsumer(partitions=2)
    watch = ConsumerWatch("processor", every_s=0.0, records=gauge)
    consumer.positions.update({0: 5, 1: -1001})  # partition 1: no position yet
    consumer.marks.update({0: (0, 12), 1: (0, 7)})
    watch.update(consumer, now=1.0)
    assert gauge.labels("0")._value.get() == 7
    assert [s.labels for s in gauge.collect()[0].samples] == [{"partition": "0"}]
    watch.revoked(consumer.partitions)
    assert gauge.collect()[0].samples == []
