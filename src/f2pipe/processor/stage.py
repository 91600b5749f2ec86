"""The processor's pure stage: one raw record in, its readings or a verdict out.

:class:`Stage` turns a record's ``mqtt.topic`` header and payload into the
sensor's readings (:class:`Decoded`, or handed to an :data:`Emit` function on
the hot path), a dead-letter verdict (:class:`~f2pipe.core.deadletter.Rejected`,
reason chosen in SPEC section 7's order) or :class:`Skipped` (status components
and readers with no wired device, reader text, commands). Its only dependency
is an injected metadata :data:`Lookup`; it does no I/O of its own, so it is
tested with plain asserts and driven by :mod:`f2pipe.processor.runner`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from itertools import repeat
from typing import Final, TypeVar, cast

from f2pipe.core.deadletter import Rejected
from f2pipe.core.decode import DecodeError
from f2pipe.core.reasons import Reason
from f2pipe.core.records import TOPIC_HEADER, Reading, ingest_time
from f2pipe.core.topics import Topic, parse_topic
from f2pipe.metadata.lookup import SKIPPED, Resolution, Resolved

__all__ = ["Decoded", "Emit", "Lookup", "Outcome", "Skipped", "Stage"]


@dataclass(slots=True)  # not frozen: a frozen init costs ~0.5 µs per message
class Decoded:
    """The readings of one message (all of its datapoints, in datapoint order)."""

    device_id: int
    readings: list[Reading]


@dataclass(frozen=True, slots=True)
class Skipped:
    """Deliberately not a reading and not a dead letter; counted by kind."""

    kind: str


Outcome = Decoded | Rejected | Skipped
Lookup = Callable[[str, int, str, int], Resolution]
T = TypeVar("T")
# Where :meth:`Stage.emit` hands a decoded message: (device_id, datapoint ids, UTC
# timestamp, values in datapoint order, the caller's output list).
Emit = Callable[[int, tuple[int, ...], datetime, tuple[float, ...], list[T]], None]

_TOPIC_CACHE_MAX: Final = 100_000
_NO_TOPIC_HEADER: Final = Rejected(Reason.INVALID_TOPIC, f"no {TOPIC_HEADER} header")
_SKIP_COMMAND: Final = Skipped("command")
_SKIP_READER: Final = Skipped("reader")


class Stage:
    """Turns one raw record into an :data:`Outcome`. No I/O but the injected lookup.

    Order of verdicts (SPEC section 7): ``invalid_topic`` (header missing, not
    UTF-8, or not the topic grammar), then the lookup (``unknown_device``,
    ``unmapped_sensor``, or skipped), then the template's own checks from
    ``no_datapoints`` to ``non_finite_value``. Readers and commands are skipped
    before any lookup: reader data is free text, commands are not telemetry.
    The lookup may raise MetadataUnavailable; nothing else escapes.
    """

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        # topic header -> (parsed topic, None) when the lookup decides, or (None, verdict)
        # when the topic alone does (invalid, a command, a reader); verdicts are immutable.
        self._topics: dict[bytes | None, tuple[Topic | None, Rejected | Skipped | None]] = {}
        # topic header -> (kind, what the lookup resolved it to), for wired components
        # only, valid for the metadata the lookup answered from: see forget_routes().
        self._routes: dict[bytes | None, tuple[str, Resolved]] = {}
        self.route_hits = 0
        """Messages whose lookup the stage answered itself (a process-cache hit)."""
        self.ambiguous_readings = 0
        """Readings decoded from an ambiguous local time (SPEC section 2)."""
        self._ingest_header: bytes | None = None  # the last ingest.ts parsed, and its time
        self._ingest: datetime | None = None

    def clear(self) -> None:
        self._topics.clear()
        self._routes.clear()

    def forget_routes(self) -> None:
        """Drop every remembered lookup result. Call it whenever the lookup's metadata
        may have changed (the runner: after each batch's version read, when it moved),
        and before handling records published after that change."""
        self._routes.clear()

    def handle(
        self,
        topic_header: bytes | None,
        payload: bytes | None,
        now: datetime,
        ingest_header: bytes | None = None,
    ) -> Outcome:
        """The outcome of one record, its readings as :class:`Decoded`.

        ``ingest_header`` is the record's ``ingest.ts`` (epoch milliseconds as
        text): it places an ambiguous local time (SPEC section 2), and a device
        time more than 24 h after it is ``timestamp_out_of_range`` however late
        the record is decoded (``now`` is the limit only when it is earlier, or
        when there is no ingest time). Without it, or when it is not a number,
        an ambiguous time takes its earlier instant.
        """
        out: list[Decoded] = []
        verdict = self.emit(topic_header, payload, now, _as_decoded, out, ingest_header)
        return out[0] if verdict is None else verdict

    def emit(
        self,
        topic_header: bytes | None,
        payload: bytes | None,
        now: datetime,
        encode: Emit[T],
        out: list[T],
        ingest_header: bytes | None = None,
    ) -> Rejected | Skipped | None:
        """:meth:`handle` for the hot path: a decoded message goes to ``encode`` (with
        ``out``) as its values, with no object per reading, and None is returned;
        otherwise the verdict is. ``encode`` is called at most once, only after every
        check passed (a message yields all of its readings or none)."""
        route = self._routes.get(topic_header)
        if route is None:
            found = self._route(topic_header)
            if not isinstance(found, tuple):
                return found
            route = found
        else:
            self.route_hits += 1
        kind, resolved = route
        template = resolved.template
        # The record's ingest time places an ambiguous local time and is the clock the
        # time range is judged by, so a replayed record gets the verdict it got live
        # (SPEC section 7). Records of one read share it: parse it once per change.
        if ingest_header is None:
            ingest = None
        elif ingest_header == self._ingest_header:
            ingest = self._ingest
        else:
            ingest = self._ingest = ingest_time(ingest_header)
            self._ingest_header = ingest_header
        clock = now if ingest is None or ingest > now else ingest
        try:
            stamp, values, ambiguous = template.decode_values(
                kind, payload or b"", resolved.tz, clock, ingest
            )
        except DecodeError as exc:
            return Rejected(exc.reason, exc.detail)
        if ambiguous:
            self.ambiguous_readings += len(values)
        encode(resolved.device_id, template.datapoint_ids, stamp, values, out)
        return None

    def _route(self, topic_header: bytes | None) -> tuple[str, Resolved] | Rejected | Skipped:
        """The topic's wired component (remembered) or the verdict the topic or the lookup
        gives (in SPEC section 7's order)."""
        entry = self._topics.get(topic_header)
        if entry is None:
            entry = self._parse(topic_header)
        topic, verdict = entry
        if topic is None:
            assert verdict is not None
            return verdict
        found = self._lookup(topic.mac, topic.connector, topic.kind, topic.index)
        if type(found) is not Resolved:
            if found is SKIPPED:
                return Skipped(topic.kind)
            reason = cast(Reason, found)
            return Rejected(reason, _lookup_detail(reason, topic))
        if len(self._routes) >= _TOPIC_CACHE_MAX:
            self._routes.clear()
        route = self._routes[topic_header] = (topic.kind, found)
        return route

    def _parse(self, topic_header: bytes | None) -> tuple[Topic | None, Rejected | Skipped | None]:
        entry: tuple[Topic | None, Rejected | Skipped | None]
        if topic_header is None:
            return None, _NO_TOPIC_HEADER
        try:
            topic = parse_topic(topic_header.decode("utf-8"))
        except UnicodeDecodeError:
            topic = None
        if topic is None:
            text = topic_header.decode("utf-8", "replace")[:300]
            entry = None, Rejected(Reason.INVALID_TOPIC, text)
        elif topic.type == "cmnd":
            entry = None, _SKIP_COMMAND
        elif topic.kind == "reader":
            entry = None, _SKIP_READER
        else:
            entry = topic, None
        if len(self._topics) >= _TOPIC_CACHE_MAX:
            self._topics.clear()
        self._topics[topic_header] = entry
        return entry


def _as_decoded(
    device_id: int,
    datapoint_ids: tuple[int, ...],
    stamp: datetime,
    values: tuple[float, ...],
    out: list[Decoded],
) -> None:
    out.append(Decoded(device_id, list(zip(datapoint_ids, repeat(stamp), values))))


def _lookup_detail(reason: Reason, topic: Topic) -> str:
    if reason is Reason.UNKNOWN_DEVICE:
        return f"no device with MAC {topic.mac}"
    return f"nothing wired to J{topic.connector} {topic.kind}-{topic.index} of {topic.mac}"
