"""Dead-letter tools (``f2pipe dlq list | show | replay``), SPEC sections 4 and 7.

How the topic is read is :mod:`f2pipe.tools.dlqread`'s: committed records
only, partitions assigned (no consumer group state), a listing from the low
to the high watermark as of its start, so it ends; ``show`` reads the one
record at its offset, however long the topic.

``list`` and ``replay`` show a person waiting how far they got (records read
of the total, replayed, the rate) on stderr when it is a terminal or with
``--progress``, and always end with a summary there (counts by reason,
replayed, seconds). What they print on stdout does not change with either,
so scripts keep reading it.

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
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

from confluent_kafka import Producer

from f2pipe.core.reasons import Reason
from f2pipe.runtime.kafka import produce, producer_config
from f2pipe.settings import Settings, get_settings
from f2pipe.tools.dlqread import (
    DeadLetter,
    DeadLetterError,
    Scan,
    parse_ref,
    read_dead_letters,
    read_one,
)
from f2pipe.tools.progress import Progress, rate

__all__ = [
    "REPLAYABLE",
    "DeadLetter",
    "DeadLetterError",
    "configure",
    "parse_since",
    "replay",
    "select",
]

REPLAYABLE = {"processor", "sink"}


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
    progress_help = "progress on stderr at most once a second, also when it is not a terminal"
    listing = sub.add_parser("list", help="one line per dead letter (oldest first per partition)")
    listing.add_argument("--reason", choices=reasons, help="only dead letters with this reason")
    listing.add_argument("--since", help=since_help)
    listing.add_argument("--progress", action="store_true", help=progress_help)
    listing.set_defaults(func=_cmd_list)
    # Replaying is chosen by reason: the fix for one cause (a device registered, a
    # datapoint corrected) says nothing about letters dead for another.
    text = "send dead letters back to their stage's input (--reason R or --all)"
    again = sub.add_parser("replay", help=text, description=text)
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("--reason", choices=reasons, help="replay the letters with this reason")
    which.add_argument("--all", action="store_true", help="replay every replayable letter")
    again.add_argument("--since", help=since_help)
    again.add_argument("--progress", action="store_true", help=progress_help)
    again.set_defaults(func=_cmd_replay)
    show = sub.add_parser("show", help="print one dead letter in full (headers and value)")
    show.add_argument("ref", help="<partition>/<offset>, as `dlq list` prints it")
    show.set_defaults(func=_cmd_show)


class Watch:
    """What ``list`` and ``replay`` tell a person waiting, on stderr: a progress line
    (records read of the total, replayed so far, the rate) and a summary."""

    def __init__(self, action: str, progress: Progress) -> None:
        self.action = action
        self.progress = progress
        self.scan = Scan(on_progress=lambda _: progress.update(self.line))
        self.reasons: Counter[str] = Counter()
        self.replayed = 0  # handed over for replay

    def count(self, letters: Iterator[DeadLetter]) -> Iterator[DeadLetter]:
        """``letters`` unchanged, counted by reason as they pass (and as replayed once
        the caller asks for the next: it has then sent the one before)."""
        for letter in letters:
            self.reasons[letter.reason or "-"] += 1
            yield letter
            if self.action == "replay" and letter.stage in REPLAYABLE:
                self.replayed += 1

    def line(self, seconds: float) -> str:
        scan = self.scan
        share = f" ({100 * scan.done // scan.total}%)" if scan.total else ""
        text = f"dlq {self.action}: read {scan.done:,} of {scan.total:,} records{share}"
        if self.action == "replay":
            text += f", replayed {self.replayed:,}"
        return f"{text}, {rate(scan.done, seconds)}"

    def by_reason(self) -> str:
        counts = sorted(self.reasons.items(), key=lambda item: (-item[1], item[0]))
        return ", ".join(f"{reason} {count:,}" for reason, count in counts) or "none"

    def took(self) -> str:
        seconds = self.progress.elapsed
        return (
            f"read {self.scan.done:,} records in {seconds:.1f} s ({rate(self.scan.done, seconds)})"
        )


def _watch(action: str, args: argparse.Namespace) -> Watch:
    return Watch(action, Progress(sys.stderr, enabled=True if args.progress else None))


def _selected(args: argparse.Namespace, settings: Settings, scan: Scan) -> Iterator[DeadLetter]:
    since = parse_since(args.since) if args.since else None
    return select(read_dead_letters(settings, scan=scan), args.reason, since)


def _text(data: bytes | None, limit: int = 120) -> str:
    if data is None:
        return "-"
    text = data.decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cmd_list(args: argparse.Namespace) -> int:
    settings = get_settings()
    watch = _watch("list", args)
    count = 0
    try:
        for letter in watch.count(_selected(args, settings, watch.scan)):
            count += 1
            moment = datetime.fromtimestamp(letter.ts_ms / 1000, UTC).isoformat(timespec="seconds")
            watch.progress.echo(
                f"{letter.ref}\t{moment}\t{letter.stage}\t{letter.reason}\t"
                f"{letter.header('mqtt.topic') or _text(letter.key)}\t{letter.header('dlq.detail')}"
            )
    finally:
        watch.progress.clear()
    watch.progress.finish(
        f"{count} dead letter(s) in {settings.topic_dead_letter} ({watch.by_reason()});"
        f" {watch.took()}"
    )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    settings = get_settings()
    letter = read_one(settings, *parse_ref(args.ref))
    print(f"ref: {letter.ref}")
    print(f"key: {_text(letter.key, 10_000)}")
    for name, value in letter.headers:
        print(f"header {name}: {_text(value, 10_000)}")
    print(f"value: {_text(letter.value, 1_000_000)}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    settings = get_settings()
    watch = _watch("replay", args)
    try:
        counts = replay(settings, watch.count(_selected(args, settings, watch.scan)))
    except BaseException:
        # What was handed over was flushed before the error: say how far it got.
        watch.progress.finish(
            f"dlq replay stopped: {watch.replayed:,} handed over for replay; {watch.took()}"
        )
        raise
    watch.progress.clear()
    print(
        f"replayed {counts['processor']} to {settings.topic_raw},"
        f" {counts['sink']} to {settings.topic_processed};"
        f" {counts['skipped']} not replayable (connector)"
    )
    selected = sum(watch.reasons.values())
    watch.progress.finish(
        f"replayed {counts['processor'] + counts['sink']:,} of {selected:,} dead letter(s)"
        f" selected in {settings.topic_dead_letter} ({watch.by_reason()}); {watch.took()}"
    )
    return 0
