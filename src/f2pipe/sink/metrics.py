"""The sink's metrics, defined in one place; their names are part of the ops contract.

Served on ``/metrics`` by the ops server (``F2PIPE_SINK_PORT``). Dead letters
are counted in the family shared by every stage,
:data:`f2pipe.runtime.metrics.DEAD_LETTERS` (``stage="sink"``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from f2pipe.runtime.metrics import REBALANCES

__all__ = [
    "ASSIGNED",
    "BATCH_AGE",
    "BATCH_ROWS",
    "CONSUMED",
    "DB_RETRIES",
    "DB_TIMEOUTS",
    "DUPLICATES",
    "FALLBACKS",
    "LAG",
    "REJECTED",
    "ROWS_WRITTEN",
    "WRITE_SECONDS",
    "owns",
]

# Records taken from the processed topic (rows, unparseable ones included).
CONSUMED = Counter("f2pipe_sink_records_consumed", "records consumed from Kafka")
# Rows newly stored in decoded_data.
ROWS_WRITTEN = Counter("f2pipe_sink_rows_written", "rows stored in decoded_data")
# Rows of a batch that were already stored (redelivery or replay): rows in batch - inserted.
DUPLICATES = Counter("f2pipe_sink_duplicates_ignored", "rows already stored, ignored")
# Records not stored: unparseable, or refused by the database.
REJECTED = Counter("f2pipe_sink_rejected_rows", "records that could not be stored", ["cause"])
# Rows per written batch.
BATCH_ROWS = Histogram(
    "f2pipe_sink_batch_rows",
    "rows per batch",
    buckets=(1, 10, 100, 1000, 5000, 10000, 20000, 50000, 100000, 200000),
)
# Age of a batch (first record received -> write starts).
BATCH_AGE = Histogram(
    "f2pipe_sink_batch_age_seconds",
    "batch age when written",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
# Database write latency per batch (transaction start -> commit).
WRITE_SECONDS = Histogram(
    "f2pipe_sink_write_seconds",
    "database write time per batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# Batches that conflicted with stored rows and took the staging path.
FALLBACKS = Counter("f2pipe_sink_idempotent_fallbacks", "batches written via staging")
# Records behind the head of each partition, after the last commit.
LAG = Gauge("f2pipe_sink_consumer_lag", "records not yet committed", ["partition"])
# Partitions of the processed topic this sink currently owns.
ASSIGNED = Gauge("f2pipe_sink_assigned_partitions", "partitions assigned to this sink")
# Failed write attempts because the database was unavailable.
DB_RETRIES = Counter("f2pipe_sink_db_retries", "write attempts retried after a database error")
# Database waits cut short by lock_timeout or statement_timeout (then retried).
DB_TIMEOUTS = Counter("f2pipe_sink_db_timeouts", "database waits ended by a timeout", ["kind"])


def owns(kind: str, partitions: int) -> None:
    """After a rebalance callback of ``kind`` (assigned, revoked, lost): count it in
    ``f2pipe_rebalances_total{stage="sink"}``; the sink now owns ``partitions`` partitions."""
    REBALANCES.labels("sink", kind).inc()
    ASSIGNED.set(partitions)
