"""Dead-letter tools (``f2pipe dlq list | show | replay``), SPEC sections 4 and 7.

The dead-letter topic is read with *assigned* partitions from their low to
their high watermark as of the start of the command, so a listing ends, and no
consumer group state is created or committed (listing twice shows the same).
Only committed records are read: dead letters of a transaction a crashed
processor left open or aborted (``F2PIPE_PROCESSOR_TRANSACTIONS``) are not
letters, its batch is dead-lettered again when consumed again.

Replay sends each selected dead letter back to its stage's input, with its
original key, value and headers (the ``dlq.*`` headers dropped):

- ``dlq.stage=processor`` -> the raw topic; the processor decodes it again,
- ``dlq.stage=sink`` -> the processed topic,
- ``dlq.stage=connector`` -> listed, never replayed (there is no raw record).

Replaying twice is harmless: decoding is deterministic (same record, same
metadata -> the same readings, keys and values), and the sink's primary key
keeps the first row of every reading. A replayed record that fails again
becomes a new dead letter with a new ``dlq.source``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from f2pipe.core import deadletter
from f2pipe.core.reasons import Reason
from f2pipe.core.records import Headers
from f2pipe.errors import F2PipeError
from f2pipe.runtime.kafka import consumer_config, produce, producer_config
from f2pipe.settings import Settings, get_settings

REPLAYABLE = {"processor", "sink"}


class DeadLetterError(F2PipeError):
    """The dead-letter topic could not be read, or a replay could not be delivered."""


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", "replace")
        return ""

    @property
    def stage(self) -> str:
        return self.header("dlq.stage")

    @property
    def reason(self) -> str:
        return self.header("dlq.reason")

    @property
    def ts_ms(self) -> int:
        text = self.header("dlq.ts")
        return int(text) if text.isdigit() else 0

    @property
    def ref(self) -> str:
        """How ``dlq show`` names it: ``<partition>/<offset>``."""
        return f"{self.partition}/{self.offset}"

    def original_headers(self) -> Headers:
        """The headers the record had before it was dead-lettered (no ``dlq.*`` ones)."""
        return deadletter.original_headers(self.headers)


def parse_since(text: str, now: float | None = None) -> int:
    """``--since`` as epoch milliseconds: an ISO-8601 time (UTC when no offset) or an
    age such as ``30s``, ``15m``, ``2h``, ``7d``. Raises DeadLetterError."""
    now = time.time() if now is None else now
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match:
        seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return int((now - seconds) * 1000)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise DeadLetterError(
            f"--since {text!r}: expected an ISO-8601 time or an age like 15m, 2h, 7d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def read_dead_letters(settings: Settings, timeout: float = 10.0) -> Iterator[DeadLetter]:
    """Every dead letter present when called, partition by partition, in offset order."""
    topic = settings.topic_dead_letter
    # The group is required by the client; it is never joined or committed. Only
    # committed dead letters are read, and a partition ends where the client says
    # it does: with transactions the log ends in a commit marker (no record) and
    # may hold aborted records, so no record need sit at high watermark - 1.
    consumer = Consumer(
        consumer_config(
            settings,
            "f2pipe-dlq-reader",
            **{"enable.partition.eof": True, "isolation.level": "read_committed"},
        )
    )
    try:
        try:
            meta = consumer.list_topics(topic, timeout=timeout)
        except KafkaException as exc:
            raise DeadLetterError(f"cannot reach Kafka: {exc}") from exc
        info = meta.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            return
        ends: dict[int, int] = {}
        starts: list[TopicPartition] = []
        for partition in sorted(info.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
            if high > low:
                ends[partition] = high
                starts.append(TopicPartition(topic, partition, low))
        if not starts:
            return
        consumer.assign(starts)
        deadline = time.monotonic() + max(timeout, 30.0)
        while ends:
            msgs = consumer.consume(num_messages=1000, timeout=1.0)
            if not msgs and time.monotonic() > deadline:
                raise DeadLetterError(f"timed out reading {topic}")
            for msg in msgs:
                partition, offset = msg.partition() or 0, msg.offset() or 0
                if partition not in ends:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:  # nothing more, for now
                        del ends[partition]
                        consumer.pause([TopicPartition(topic, partition)])
                    continue
                if offset >= ends[partition]:  # written after the command started
                    del ends[partition]
                    consumer.pause([TopicPartition(topic, partition)])
                    continue
                raw = msg.headers() or []
                pairs = list(raw.items()) if isinstance(raw, dict) else raw
                headers = [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in pairs]
                yield DeadLetter(partition, offset, msg.key(), msg.value(), headers)
                if offset + 1 >= ends[partition]:
                    del ends[partition]
                    consumer.pause([TopicPartition(topic, partition)])
            deadline = time.monotonic() + max(timeout, 30.0) if msgs else deadline
    finally:
        consumer.close()


def select(
    letters: Iterator[DeadLetter], reason: str | None, since_ms: int | None
) -> Iterator[DeadLetter]:
    for letter in letters:
        if reason is not None and letter.reason != reason:
            continue
        if since_ms is not None and letter.ts_ms < since_ms:
            continue
        yield letter


def replay(settings: Settings, letters: Iterator[DeadLetter]) -> dict[str, int]:
    """Send the replayable ``letters`` back to their stage's input; count per outcome.

    Returns ``{"processor": n, "sink": n, "skipped": n}``. Blocks until Kafka
    acknowledged every replayed record; raises DeadLetterError otherwise.
    """
    target = {"processor": settings.topic_raw, "sink": settings.topic_processed}
    counts = {"processor": 0, "sink": 0, "skipped": 0}
    failures: list[str] = []

    def on_delivery(err: object, msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    producer = Producer(producer_config(settings, on_delivery=on_delivery))
    try:
        for letter in letters:
            if letter.stage not in REPLAYABLE:
                counts["skipped"] += 1
                continue
            headers = letter.original_headers()
            produce(producer, target[letter.stage], letter.value, letter.key, headers)
            counts[letter.stage] += 1
            producer.poll(0)
    finally:
        # Even when reading the letters failed part-way: what was handed over is delivered.
        remaining = producer.flush(60)
    if remaining or failures:
        raise DeadLetterError(f"{remaining} replayed record(s) not acknowledged; {failures[:3]}")
    return counts


# --- CLI ----------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    reasons = [r.value for r in Reason]
    since_help = "only dead letters since: ISO-8601 time or age (15m, 2h)"
    listing = sub.add_parser("list", help="one line per dead letter (oldest first per partition)")
    listing.add_argument("--reason", choices=reasons, help="only dead letters with this reason")
    listing.add_argument("--since", help=since_help)
    listing.set_defaults(func=_cmd_list)
    # Replaying is chosen by reason: the fix for one cause (a device registered, a
    # datapoint corrected) says nothing about letters dead for another.
    text = "send dead letters back to their stage's input (--reason R or --all)"
    again = sub.add_parser("replay", help=text, description=text)
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("--reason", choices=reasons, help="replay the letters with this reason")
    which.add_argument("--all", action="store_true", help="replay every replayable letter")
    again.add_argument("--since", help=since_help)
    again.set_defaults(func=_cmd_replay)
    show = sub.add_parser("show", help="print one dead letter in full (headers and value)")
    show.add_argument("ref", help="<partition>/<offset>, as `dlq list` prints it")
    show.set_defaults(func=_cmd_show)


def _selected(args: argparse.Namespace, settings: Settings) -> Iterator[DeadLetter]:
    since = parse_since(args.since) if args.since else None
    return select(read_dead_letters(settings), args.reason, since)


def _text(data: bytes | None, limit: int = 120) -> str:
    if data is None:
        return "-"
    text = data.decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cmd_list(args: argparse.Namespace) -> int:
    settings = get_settings()
    count = 0
    for letter in _selected(args, settings):
        count += 1
        moment = datetime.fromtimestamp(letter.ts_ms / 1000, UTC).isoformat(timespec="seconds")
        print(
            f"{letter.ref}\t{moment}\t{letter.stage}\t{letter.reason}\t"
            f"{letter.header('mqtt.topic') or _text(letter.key)}\t{letter.header('dlq.detail')}"
        )
    print(f"{count} dead letter(s) in {settings.topic_dead_letter}", file=sys.stderr)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    settings = get_settings()
    partition, _, offset = args.ref.partition("/")
    if not (partition.isdigit() and offset.isdigit()):
        raise DeadLetterError(f"expected <partition>/<offset>, got {args.ref!r}")
    for letter in read_dead_letters(settings):
        if letter.partition == int(partition) and letter.offset == int(offset):
            print(f"ref: {letter.ref}")
            print(f"key: {_text(letter.key, 10_000)}")
            for name, value in letter.headers:
                print(f"header {name}: {_text(value, 10_000)}")
            print(f"value: {_text(letter.value, 1_000_000)}")
            return 0
    raise DeadLetterError(f"no dead letter {args.ref} in {settings.topic_dead_letter}")


def _cmd_replay(args: argparse.Namespace) -> int:
    settings = get_settings()
    counts = replay(settings, _selected(args, settings))
    print(
        f"replayed {counts['processor']} to {settings.topic_raw},"
        f" {counts['sink']} to {settings.topic_processed};"
        f" {counts['skipped']} not replayable (connector)"
    )
    return 0
