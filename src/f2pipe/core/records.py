"""The Kafka record formats (SPEC section 4), written and read in one place.

Raw records (the connector's output) carry the MQTT payload unchanged with the
headers named here; processed records (the processor's output) are one reading
each, keyed ``<device_id>:<datapoint_id>`` with a JSON version 1 value. Pure:
no client, no clock.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import orjson

__all__ = [
    "INGEST_HEADER",
    "QOS_HEADER",
    "RETAIN_HEADER",
    "TOPIC_HEADER",
    "Header",
    "Headers",
    "Reading",
    "ReadingEncoder",
    "ingest_time",
    "reading_key",
    "reading_value",
]

# Headers of a raw record, in the order the connector writes them.
TOPIC_HEADER: Final = "mqtt.topic"
QOS_HEADER: Final = "mqtt.qos"
RETAIN_HEADER: Final = "mqtt.retain"
INGEST_HEADER: Final = "ingest.ts"  # the connector's receive time, epoch milliseconds

# A Kafka header, and a record's headers as a list of them; consumed values are bytes
# (or None, or str for headers a producer set as text).
Header = tuple[str, str | bytes | None]
Headers = list[Header]

Reading = tuple[int, datetime, float]  # (datapoint_id, aware UTC timestamp, value)


def ingest_time(header: bytes) -> datetime | None:
    """The aware UTC time an ``ingest.ts`` header holds, None when it is not epoch ms."""
    try:
        return datetime.fromtimestamp(int(header) / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def reading_key(device_id: int, datapoint_id: int) -> bytes:
    """Key of a processed record (SPEC section 4): ``<device_id>:<datapoint_id>``."""
    return b"%d:%d" % (device_id, datapoint_id)


def reading_value(device_id: int, reading: Reading) -> bytes:
    """Value of a processed record (SPEC section 4), JSON version 1; deterministic.

    ``ts`` is orjson's RFC 3339 text of the aware UTC timestamp (``+00:00``).
    """
    datapoint_id, ts, value = reading
    return orjson.dumps(
        {"v": 1, "ts": ts, "device_id": device_id, "datapoint_id": datapoint_id, "value": value}
    )


_ENCODER_DEVICES_MAX: Final = 100_000


class ReadingEncoder:
    """Key and value of each processed record, byte for byte :func:`reading_key` and
    :func:`reading_value`, for a fraction of the instructions.

    :func:`reading_value` builds and walks a dictionary per reading; here each
    ``(device_id, datapoint_id)`` has its key and a value template with both ids
    written in, formatted once and cached; per message the timestamp is written
    once, and per reading only the value, by orjson (its float text is the
    contract, and it is cheaper than ``repr()``). The cache holds only what the
    ids determine, so metadata changes never make it stale.
    """

    __slots__ = ("_devices",)

    def __init__(self) -> None:
        # device_id -> (datapoint ids, ((key, value template), ...) in the same order)
        self._devices: dict[int, tuple[tuple[int, ...], tuple[tuple[bytes, bytes], ...]]] = {}

    def encode_values(
        self,
        device_id: int,
        datapoint_ids: tuple[int, ...],
        stamp: datetime,
        values: tuple[float, ...],
        out: list[tuple[bytes, bytes]],
    ) -> None:
        """Append ``(key, value)`` of each reading of one message to ``out``: the
        reading of ``datapoint_ids[i]`` at ``stamp`` (aware UTC) is ``values[i]``."""
        entry = self._devices.get(device_id)
        # `is` first: the ids of one compiled template are one tuple, held by the entry.
        if entry is None or (entry[0] is not datapoint_ids and entry[0] != datapoint_ids):
            entry = self._remember(device_id, datapoint_ids)
        dumps = orjson.dumps
        ts_json = dumps(stamp)
        append = out.append
        parts = entry[1]
        # enumerate, not zip(strict=True): the keyword alone costs a dictionary per call
        for i, value in enumerate(values):
            key, template = parts[i]
            append((key, template % (ts_json, dumps(value))))

    def _remember(
        self, device_id: int, datapoint_ids: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[tuple[bytes, bytes], ...]]:
        if len(self._devices) >= _ENCODER_DEVICES_MAX:
            self._devices.clear()
        parts = tuple(
            (
                reading_key(device_id, dp),
                # ids are integers, so the only % directives left are the two %b
                b'{"v":1,"ts":%%b,"device_id":%d,"datapoint_id":%d,"value":%%b}' % (device_id, dp),
            )
            for dp in datapoint_ids
        )
        entry = self._devices[device_id] = (datapoint_ids, parts)
        return entry
