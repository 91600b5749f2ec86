"""Every metric the processor reports, in one place (``/metrics`` of ``f2pipe processor``).

Counters and histograms are updated once per batch, never per record: a
per-record update would cost more than decoding the frame. The dead-letter
counter shared with the other stages is :data:`f2pipe.runtime.metrics.DEAD_LETTERS`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Raw records taken from the raw topic.
CONSUMED = Counter("f2pipe_processor_consumed", "raw records consumed")
# Readings written to the processed topic (one per datapoint of a decoded message).
PRODUCED = Counter("f2pipe_processor_produced", "readings produced to the processed topic")
# Records that are neither readings nor dead letters, by kind (command, reader, a status kind).
SKIPPED_TOTAL = Counter(
    "f2pipe_processor_skipped", "records deliberately not decoded (no wired device, text)", ["kind"]
)
# Metadata lookups answered by a tier (process, redis, database).
CACHE_HITS = Counter("f2pipe_metadata_cache_hits", "metadata lookups answered by a tier", ["tier"])
# Metadata lookups a tier could not answer, so the next tier was asked.
CACHE_MISSES = Counter("f2pipe_metadata_cache_misses", "metadata lookups a tier missed", ["tier"])
# Records per consumed batch: near the batch size means the processor is behind.
BATCH_SIZE = Histogram(
    "f2pipe_processor_batch_size",
    "records per consumed batch",
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 50000),
)
# Stage time per record, the number bench/processor.json tracks (a few µs).
DECODE_SECONDS = Histogram(
    "f2pipe_processor_decode_seconds",
    "stage time per record (lookup + decode + serialise), averaged over each batch",
    buckets=(1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3, 1e-2, 0.1),
)
# Poll-to-commit time of a batch, Kafka's acknowledgements included.
BATCH_SECONDS = Histogram(
    "f2pipe_processor_batch_seconds", "poll-to-commit time of a batch (incl. Kafka acks)"
)
# Records between this replica's position and the high watermark, per assigned partition.
LAG = Gauge("f2pipe_processor_consumer_lag", "records behind the high watermark", ["partition"])
# Dead letters / consumed over the alarm's window.
DLQ_RATIO = Gauge("f2pipe_processor_dead_letter_ratio", "dead letters / consumed, recent window")
# 1 while that ratio is above the threshold (F2PIPE_DLQ_ALARM_*).
DLQ_ALARM = Gauge("f2pipe_processor_dead_letter_alarm", "1 while the dead-letter ratio is too high")
# Raw records held in memory (the batch being handled; at most processor_batch_size).
BUFFERED = Gauge("f2pipe_processor_buffered_records", "raw records held in memory")
# Raw-topic partitions this replica owns.
ASSIGNED = Gauge("f2pipe_processor_assigned_partitions", "raw-topic partitions this replica owns")
# 1 while consumption is paused because the metadata database cannot be reached.
PAUSED = Gauge("f2pipe_processor_paused", "1 while waiting for the metadata database")
# The metadata version the lookups answer from.
METADATA_VERSION = Gauge("f2pipe_processor_metadata_version", "metadata version in use")
# Readings whose local time was ambiguous (the hour repeated when clocks went back).
AMBIGUOUS = Counter(
    "f2pipe_ambiguous_timestamps",
    "readings decoded from an ambiguous local time (clocks went back)",
)
