"""The sink's runner (``f2pipe sink``): ``processed-iot-data`` into ``decoded_data``, exactly once.

The pure stage (:mod:`.stage`) turns record values into rows or dead-letter
details; the writer (:mod:`.writer`) stores batches idempotently; this module
owns the consumer loop, the rebalance callbacks, signals and the ops endpoints.

Guarantees (SPEC sections 5 and 7):

- One database transaction per batch (see :mod:`.writer`): a reading is
  stored once and the first write wins, ``latest_readings`` never moves
  backwards in time.
- Kafka offsets are committed (synchronously, the exact offsets of the
  batch) only after the database transaction committed and every dead
  letter of the batch was acknowledged by Kafka. A crash anywhere before
  that re-delivers the batch, which the idempotent write absorbs.
- A record that cannot be parsed is dead-lettered with ``sink_rejected``; so
  is a row the database rejects, isolated by the writer; the rest of the
  batch lands.
- Database down: the partitions are paused, the batch is kept, the write is
  retried with jittered exponential backoff, then consumption resumes.
  Kafka down: the loop waits (consume returns nothing, commits are retried).
- No deadlock: a batch's rows reach the table only once the batch before it
  takes no more locks there (see :meth:`Sink._flush`); every database wait is bounded
  (:class:`~f2pipe.sink.writer.Timeouts`). A sink that cannot progress
  answers ``/readyz`` with 503 (:class:`~f2pipe.sink.progress.Progress`).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from f2pipe.errors import DatabaseUnavailable
from f2pipe.runtime import pgtrouble
from f2pipe.runtime.gctune import quiet_gc
from f2pipe.runtime.kafka import (
    ConsumerWatch,
    admin_config,
    consume_available,
    consumer_config,
    producer_config,
    set_fetching,
)
from f2pipe.runtime.kafkatrouble import KafkaTrouble
from f2pipe.runtime.logs import add_log_level_argument, setup_logging
from f2pipe.runtime.opsserver import NotReady, OpsServer
from f2pipe.runtime.shutdown import stop_on_signals
from f2pipe.settings import Settings, get_settings
from f2pipe.sink.batching import Batch, CommitPolicy, retry_backoff
from f2pipe.sink.metrics import BATCH_AGE, BATCH_ROWS, CONSUMED, DB_RETRIES, WRITE_SECONDS, owns
from f2pipe.sink.progress import Progress
from f2pipe.sink.settle import Settler
from f2pipe.sink.stage import parse_batch, parse_reading
from f2pipe.sink.writer import Timeouts, Writer, WriteResult

__all__ = ["Sink", "configure", "tune_gc"]

log = logging.getLogger(__name__)


class Sink:
    """Consumes ``settings.topic_processed`` and writes it to the time-series database.

    :meth:`run` blocks until :meth:`stop` (or SIGTERM/SIGINT via :func:`main`),
    then writes the open batch, commits, and closes everything.

    Two batches overlap: while one commits on a background thread (its own
    connection), the next is consumed and encoded for the other connection,
    which sends it into the table once every row of the first is there (see
    :meth:`_flush`). Everything that touches Kafka stays on the loop's thread, and
    batches are settled (counted, dead-lettered, offsets committed) strictly
    in order: a batch's offsets are committed only after its own database
    commit and after every earlier batch's.

    ``on_settled(batch, result)``, if given, is called on the loop's thread
    after each batch is settled (stored, its dead letters acknowledged, its
    offsets committed), for whoever measures the sink (``bench/sink_bench.py``):
    ``batch.started`` is when its first record was consumed,
    ``batch.write_seconds`` how long the database took, ``batch.messages`` its
    stored records. It must not keep the loop waiting.
    """

    def __init__(
        self,
        settings: Settings,
        policy: CommitPolicy | None = None,
        *,
        on_settled: Callable[[Batch, WriteResult], None] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy or CommitPolicy.from_settings(settings)
        self.database_backoff = retry_backoff(settings.sink_backoff_max_ms / 1000)
        self._on_settled = on_settled
        timeouts = Timeouts.from_settings(settings, self.policy.max_age_s)
        self._writers = (
            Writer(settings.timeseries_dsn, timeouts=timeouts),
            Writer(settings.timeseries_dsn, announce=False, timeouts=timeouts),
        )
        self.progress = Progress(settings.sink_stall_s)
        self.writer = self._writers[0]  # the open batch streams into this one
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink-commit")
        # The batch committing in the background: (batch, its writer, its outcome).
        self._inflight: tuple[Batch, Writer, Future[WriteResult]] | None = None
        self._retrying: Batch | None = None  # a batch being retried through an outage
        self.kafka_trouble = KafkaTrouble(settings)  # its clients' errors, with the fix
        self.consumer = Consumer(
            consumer_config(
                settings,
                settings.sink_group,
                error_cb=self.kafka_trouble.heard,
                # A deep prefetch queue: with the shared default (20,000) the
                # consumer waits on fetches and delivers under half the records
                # per second (bench/sink.json). Bounded in bytes too. A killed sink
                # holds its partitions for the session timeout.
                **{
                    "queued.min.messages": 200_000,
                    "queued.max.messages.kbytes": 131_072,
                    "session.timeout.ms": int(settings.sink_session_timeout_s * 1000),
                    "heartbeat.interval.ms": int(settings.sink_session_timeout_s * 1000 / 4),
                },
            )
        )
        self.producer = Producer(producer_config(settings, error_cb=self.kafka_trouble.heard))
        self.settler = Settler(
            self.consumer,
            self.producer,
            settings.topic_dead_letter,
            # A schedule of its own: an offset commit retried inside a rebalance
            # callback must not restart the database's.
            backoff=retry_backoff(settings.sink_backoff_max_ms / 1000),
            stopping=self._is_stopping,
            sleep=self._sleep,
        )
        self._admin = AdminClient(admin_config(settings))
        self.batch = Batch()
        self._stopping = False
        self._in_backpressure = False
        self._assigned: set[tuple[str, int]] = set()
        self.watch = ConsumerWatch("sink")  # lag as an age, offsets out of retention

    # -- lifecycle --

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler: only sets a flag)."""
        self._stopping = True

    @property
    def assigned(self) -> frozenset[tuple[str, int]]:
        """The (topic, partition) pairs this sink owns now; empty until it joined the group."""
        return frozenset(self._assigned)

    def ready(self) -> bool:
        """The sink progresses (:attr:`progress`), the database and Kafka answer (with
        no error only an operator can fix: :attr:`kafka_trouble`).

        Safe from another thread; a fresh database connection, a Kafka metadata request.
        """
        if reason := self.progress.stalled():
            raise NotReady(reason)
        self.kafka_trouble.check()
        pgtrouble.probe(self.settings.timeseries_dsn, "F2PIPE_TIMESERIES_DSN")
        # Its own client: the consumer's handle is busy in the loop's consume().
        self._admin.list_topics(self.settings.topic_processed, timeout=2)
        return True

    def run(self) -> int:
        self.consumer.subscribe(
            [self.settings.topic_processed],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            self._connect_database()
            while not self._stopping:
                self._poll_once()
            if len(self.batch):
                log.info("stopping: writing the open batch", extra={"records": len(self.batch)})
                self._flush()
            self._settle()
        finally:
            self._close()
        return 0

    def _connect_database(self) -> None:
        backoff = self.database_backoff
        backoff.reset()
        while not self._stopping:
            try:
                self.writer.connection()
                return
            except DatabaseUnavailable as exc:
                log.warning("database unavailable at start", extra={"error": str(exc)[:300]})
                self._sleep(backoff.next_delay())

    def _close(self) -> None:
        self._committer.shutdown(wait=True)
        for writer in self._writers:
            writer.close()
        remaining = self.producer.flush(10)
        if remaining:
            log.error("dead letters not acknowledged at exit", extra={"records": remaining})
        self.consumer.close()

    # -- the loop --

    def _poll_once(self) -> None:
        """One poll: settle a finished commit, take records, flush when due.

        A batch is flushed when it is full, when it is ``max_age_s`` old, or
        when the sink has caught up with its input while no commit is in
        flight (the poll drained the client's queue without filling the
        batch): waiting for the age then would only add latency. Under load
        a commit is in flight most of the time, so the batch keeps growing
        while the previous one commits, up to ``max_rows``; at light load a
        record is written within milliseconds of its arrival.
        """
        # At most 0.5 s: the signal handler runs (and the stop flag is seen)
        # only between calls into librdkafka.
        timeout = 0.5
        if self._inflight is not None:
            if self._inflight[2].done():
                self._settle()  # commit its offsets now, not when the next batch is full
            else:
                timeout = 0.02
                if self._inflight[1].rows_in_table:  # it takes no more locks we could hold
                    self.writer.release()
        batch = self.batch
        room = max(self.policy.max_rows - len(batch), 1)
        if len(batch):
            age = time.monotonic() - batch.started
            timeout = min(timeout, max(0.0, self.policy.max_age_s - age))
        eager = self.policy.flush_when_caught_up and self._inflight is None
        if eager:
            # Nothing committing: wake on the first record rather than after
            # the timeout (consume() waits for all ``room`` records or the
            # timeout), then take whatever else is already queued.
            messages = consume_available(self.consumer, room, 0.0 if len(batch) else timeout)
        else:
            messages = self.consumer.consume(num_messages=room, timeout=timeout)
        if messages:
            self._add(messages)
        self.watch.update(self.consumer)  # every few seconds, not per poll
        self.settler.recommit(self._assigned)
        batch = self.batch  # a rebalance callback inside consume() may have replaced it
        if len(batch) and (
            len(batch) >= self.policy.max_rows
            or time.monotonic() - batch.started >= self.policy.max_age_s
            or (eager and len(messages) < room and self._inflight is None)
        ):
            self._flush()

    def _add(self, messages: list[Message]) -> None:
        # Per-record Python statements dominate the sink's CPU time, so the
        # common case runs as C-level passes over the whole poll (map, zip).
        batch = self.batch
        if not batch.records:
            batch.started = time.monotonic()
        if any(map(Message.error, messages)):  # rare: events mixed into the poll
            for msg in messages:
                err = msg.error()
                if err is not None:
                    self.kafka_trouble.heard(err)
            messages = [msg for msg in messages if msg.error() is None]
            if not messages:
                return
        first = len(batch.rows)
        rows = parse_batch(list(map(Message.value, messages)))
        if rows is not None:
            batch.rows += rows
            batch.messages += messages
        else:
            for msg in messages:
                parsed = parse_reading(msg.value())
                if type(parsed) is tuple:
                    batch.rows.append(parsed)
                    batch.messages.append(msg)
                else:
                    batch.unparsed.append((msg, str(parsed)))
        # The last message of each partition in this poll carries its offset
        # (one topic is subscribed, and a partition's records arrive in order).
        last = dict(zip(map(Message.partition, messages), messages, strict=True))
        offsets: dict[Any, Any] = batch.offsets  # message accessors are typed Optional
        for partition, msg in last.items():
            offsets[(msg.topic(), partition)] = msg.offset()
        batch.records += len(messages)
        CONSUMED.inc(len(messages))
        if not self._in_backpressure and len(batch.rows) > first:
            self.writer.stream(batch.rows[first:])

    def _flush(self) -> None:
        """Hand the open batch to the committer; first settle the one before it.

        Blocks only while the previous batch is still committing (or, during
        a database outage, until it is written). If stopping during an outage,
        returns without committing: those records are re-read on the next start.
        """
        batch = self.batch
        BATCH_ROWS.observe(len(batch))
        BATCH_AGE.observe(time.monotonic() - batch.started)
        if not self._settle():
            return
        self.batch = Batch()
        if not batch.rows:  # nothing for the database (only unparseable records)
            self._complete(batch, WriteResult(0, []))
            return
        writer = self.writer
        self.writer = self._writers[1] if writer is self._writers[0] else self._writers[0]
        # The next batch stays out of the table until this one is all in it
        # (_poll_once) or committed (_complete): else a duplicate straddling them
        # could make this one wait for the next one's row lock, held until after
        # this commit; a deadlock no database sees, the loop being one of its parties.
        self.writer.hold()
        self.progress.flushed()
        future = self._committer.submit(self._timed_finish, writer, batch)
        self._inflight = (batch, writer, future)

    def _timed_finish(self, writer: Writer, batch: Batch) -> WriteResult:
        started = time.monotonic()
        result = writer.finish(batch.rows)
        batch.write_seconds = time.monotonic() - started
        WRITE_SECONDS.observe(batch.write_seconds)
        return result

    def _settle(self) -> bool:
        """Wait for the batch committing in the background, then complete it.

        False only when stopping during a database outage (nothing committed).
        """
        if self._inflight is None:
            return True
        batch, writer, future = self._inflight
        self._inflight = None
        try:
            result = future.result()
        except DatabaseUnavailable as exc:
            self.progress.failed(str(exc))
            self.writer.abandon()  # out of the table while this one is retried: see _flush
            written = self._write_with_backpressure(batch, writer, exc)
            if written is None:
                return False
            result = written
        self._complete(batch, result)
        return True

    def _complete(self, batch: Batch, result: WriteResult) -> None:
        """After the database commit: count, dead-letter the rejects, commit offsets.

        The open batch may reach the table from now on (see :meth:`_flush`).
        """
        self.progress.settled()
        self.writer.release()
        self.settler.settle(batch, result)
        if self._on_settled is not None:
            self._on_settled(batch, result)

    def _write_with_backpressure(
        self, batch: Batch, writer: Writer, error: DatabaseUnavailable
    ) -> WriteResult | None:
        """Retry ``batch`` until it is written, consumption paused meanwhile.

        None when stopping first (nothing committed). Runs on the loop's
        thread, which keeps serving the consumer between attempts.
        """
        self._retrying = batch
        backoff = self.database_backoff
        backoff.reset()
        try:
            while True:
                DB_RETRIES.inc()
                if not self._in_backpressure:
                    log.warning(
                        "database unavailable: pausing consumption, keeping the batch",
                        extra={"error": str(error)[:300], "records": len(batch)},
                    )
                    self._pause()
                if self._stopping:
                    log.warning(
                        "stopping during a database outage: batch not written, offsets not"
                        " committed; it will be re-read on restart",
                        extra={"records": len(batch) + len(self.batch)},
                    )
                    return None
                self._wait_paused(backoff.next_delay())
                if not batch.rows:  # every partition of it was revoked meanwhile
                    return WriteResult(0, [])
                try:
                    result = self._timed_finish(writer, batch)
                except DatabaseUnavailable as exc:
                    self.progress.failed(str(exc))
                    error = exc
                    continue
                if self._in_backpressure:
                    log.info("database available again: resuming consumption")
                    self._resume()
                return result
        finally:
            self._retrying = None

    def _pause(self) -> None:
        self._in_backpressure = True
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(assignment)

    def _resume(self) -> None:
        self._in_backpressure = False
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.resume(assignment)

    def _wait_paused(self, seconds: float) -> None:
        # Keep serving the consumer (group membership, rebalances) while paused.
        # Paused partitions return no records; anything already fetched that
        # does come back is simply added to the kept batch.
        deadline = time.monotonic() + seconds
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            msg = self.consumer.poll(min(left, 0.2))
            if msg is not None:
                self._add([msg])

    # -- callbacks --

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(tp.topic, tp.partition) for tp in partitions}
        owns("assigned", len(self._assigned))
        log.info("partitions assigned", extra={"partitions": [tp.partition for tp in partitions]})
        self.watch.assigned(consumer, partitions)
        self.settler.forget({(tp.topic, tp.partition) for tp in partitions})
        set_fetching(consumer, partitions, paused=self._in_backpressure)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned -= gone
        owns("revoked", len(self._assigned))
        settled = self._settle_for_rebalance(gone)
        if settled and not self._in_backpressure and self.batch.rows:
            # Hand over cleanly: write what we hold, so the next owner starts after it.
            batch = self.batch
            try:
                result = self.writer.finish(batch.rows)
            except DatabaseUnavailable:
                batch.drop_partitions(gone)
                self.writer.abandon()
            else:
                self.batch = Batch()
                self._complete(batch, result)
        else:
            self.batch.drop_partitions(gone)
            self.writer.abandon()
        log.info("partitions revoked", extra={"partitions": [tp.partition for tp in partitions]})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned -= gone
        owns("lost", len(self._assigned))
        self._settle_for_rebalance(gone)
        self.batch.drop_partitions(gone)
        self.writer.abandon()
        log.warning("partitions lost", extra={"partitions": [tp.partition for tp in partitions]})

    def _settle_for_rebalance(self, gone: set[tuple[str, int]]) -> bool:
        """Finish the background batch inside a rebalance callback, without retrying.

        On a database error the batch forgets the partitions in ``gone`` (their
        next owner re-reads them) and stays queued for the normal retry.
        Returns whether nothing is left in flight.
        """
        if self._retrying is not None:
            self._retrying.drop_partitions(gone)
        if self._inflight is None:
            return True
        batch, _writer, future = self._inflight
        try:
            result = future.result()  # the thread is done with the batch after this
        except DatabaseUnavailable:
            batch.drop_partitions(gone)
            return False
        self._inflight = None
        self._complete(batch, result)
        return True

    def _is_stopping(self) -> bool:
        return self._stopping

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))


# --- CLI ---------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-rows", type=int, help="override F2PIPE_SINK_BATCH_ROWS")
    parser.add_argument("--batch-age-ms", type=int, help="override F2PIPE_SINK_BATCH_AGE_MS")
    add_log_level_argument(parser)
    parser.set_defaults(func=_cmd_sink)


def tune_gc() -> None:
    """The collector's settings for the sink, process-wide (see :mod:`f2pipe.runtime.gctune`).

    Called by ``f2pipe sink`` and the benchmark, not by :class:`Sink`. Every
    poll allocates tens of thousands of containers and the open batch keeps
    its Kafka messages until the commit, so generation 0 is collected only
    every 100,000 net allocations, by when most temporaries of a poll are gone.
    """
    quiet_gc(100_000, 50, 100)


def _cmd_sink(args: argparse.Namespace) -> int:
    setup_logging("sink", args.log_level)
    settings = get_settings()
    policy = CommitPolicy(
        args.batch_rows or settings.sink_batch_rows,
        (args.batch_age_ms or settings.sink_batch_age_ms) / 1000,
        settings.sink_flush_when_caught_up,
    )
    sink = Sink(settings, policy)
    tune_gc()
    stop_on_signals(sink.stop)
    ops = OpsServer(settings.ops_host, settings.sink_port, sink.ready)
    log.info(
        "sink started",
        extra={
            "topic": settings.topic_processed,
            "group": settings.sink_group,
            "batch_rows": policy.max_rows,
            "batch_age_s": policy.max_age_s,
            "flush_when_caught_up": policy.flush_when_caught_up,
            "ops_port": ops.port,
        },
    )
    try:
        return sink.run()
    finally:
        ops.close()
        log.info("sink stopped")
