"""Device metadata lookups for the processor, cached so they are fast and never stale.

:meth:`Resolver.resolve` maps ``(mac, connector number, kind, index)`` to the
sensor device, the controller's time zone and the compiled template of the
sensor (SPEC section 2), or to a lookup verdict: ``unknown_device``,
``unmapped_sensor``, or :data:`SKIPPED` (a status component or reader with no
wired device is not a reading and not a dead letter).

Tiers, per controller MAC (one query loads a controller with all its wiring and
templates, so a controller costs one round trip however many sensors it has):

1. in-process LRU (``cache_size`` controllers), plus a negative entry for an
   unknown MAC that lives at most ``negative_cache_s`` (default 5 s);
2. Redis, shared by every replica, key
   ``f2pipe:meta:<db host:port/name>:v<version>:<mac>`` (the database named so
   two fleets never share entries) with a TTL (``cache_ttl_s``) only as a
   backstop;
3. PostgreSQL.

Freshness (SPEC section 7). Every metadata change bumps ``metadata_version``
and notifies ``f2pipe_metadata`` in the same transaction. The resolver

- LISTENs on that channel in a background thread and drops its in-process
  entries as soon as a newer version is announced, and
- re-reads the version in :meth:`Resolver.sync`, which the runner calls once
  per batch *after* polling it: any metadata committed before a message was
  published is committed before the batch holding it was polled, so the version
  read then covers it. Redis keys carry the version, so a bump makes every old
  entry unreachable for all replicas at once.

Outages. Redis errors are logged and the tier is skipped (retried after a
short pause); lookups carry on from the process and PostgreSQL. A PostgreSQL
error raises :class:`~f2pipe.errors.MetadataUnavailable`; the caller pauses and
retries, and no message is ever judged ``unknown_device`` on a failed lookup.

Not thread-safe except for the listener, which only publishes a version
number that the owning thread applies.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Final, LiteralString
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import psycopg
import redis

from f2pipe.core.decode import CompiledTemplate, DatapointSpec, TemplateSpec, compile_template
from f2pipe.core.reasons import Reason
from f2pipe.core.topics import STATUS_KINDS
from f2pipe.errors import MetadataUnavailable
from f2pipe.metadata.lookup import SKIPPED, Resolution, Resolved
from f2pipe.runtime import pgtrouble
from f2pipe.runtime.backoff import Backoff
from f2pipe.settings import Settings

log = logging.getLogger(__name__)

CHANNEL: Final = "f2pipe_metadata"
REDIS_PREFIX: Final = "f2pipe:meta"
TIERS: Final = ("process", "redis", "database")

# Kinds whose messages are status or free text: with no wired device they are skipped.
# Components whose messages are skipped, not dead-lettered, when nothing is wired to them:
# the status kinds, and readers (their telemetry is free text).
SKIPPED_KINDS: Final = STATUS_KINDS | {"reader"}


_CONTROLLER_SQL: Final = """
SELECT ctl.device_id, ctl.timezone, c.connector_number, p.position, s.device_id,
       t.device_template_id, t.frame_check,
       dp.datapoint_id, dp.label, dp.data_encoding, dp.byte_offset, dp.byte_length,
       dp.byte_order, dp.decimals, dp.unit, dp.json_field
FROM devices ctl
LEFT JOIN connectors c ON c.controller_id = ctl.device_id
LEFT JOIN pins p ON p.connector_id = c.connector_id
LEFT JOIN devices s ON s.device_id = p.device_id
LEFT JOIN device_templates t ON t.device_template_id = s.device_template_id
LEFT JOIN datapoints dp ON dp.device_template_id = t.device_template_id
WHERE ctl.mac_address = %s
ORDER BY c.connector_number, p.position, dp.datapoint_id
"""


def controller_document(rows: list[tuple[Any, ...]]) -> dict[str, Any] | None:
    """The cacheable (JSON-safe) description of one controller from its query rows.

    ``{"device_id", "timezone", "pins": {"<connector>:<position>": {"device_id",
    "template"}}, "templates": {"<id>": {"frame_check", "datapoints": [...]}}}``;
    None when the MAC is unknown. Datapoints keep ``datapoint_id`` order, so the
    readings of a message always come out in the same order.
    """
    if not rows:
        return None
    pins: dict[str, dict[str, int]] = {}
    templates: dict[str, dict[str, Any]] = {}
    for row in rows:
        (_, _, number, position, sensor, template_id, frame_check, dp_id, *dp) = row
        if number is None or position is None or sensor is None:
            continue
        pins[f"{number}:{position}"] = {"device_id": sensor, "template": template_id}
        tpl = templates.setdefault(str(template_id), {"frame_check": frame_check, "datapoints": []})
        if dp_id is not None:
            label, encoding, offset, length, order, decimals, unit, json_field = dp
            tpl["datapoints"].append(
                [dp_id, label, encoding, offset, length, order, decimals, unit, json_field]
            )
    return {"device_id": rows[0][0], "timezone": rows[0][1], "pins": pins, "templates": templates}


@functools.lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        # PostgreSQL accepted the name but this host's tz database lacks it: say so
        # loudly and use UTC rather than stall the partition.
        log.error("time zone unknown to this host, using UTC", extra={"timezone": name})
        return ZoneInfo("UTC")


class Controller:
    """A controller's compiled wiring: (connector, position) -> :class:`Resolved`."""

    __slots__ = ("device_id", "pins")

    def __init__(self, doc: dict[str, Any]) -> None:
        self.device_id: int = doc["device_id"]
        tz = _zone(doc["timezone"])
        compiled: dict[str, CompiledTemplate] = {}
        for key, tpl in doc["templates"].items():
            spec = TemplateSpec(
                frame_check=tpl["frame_check"],
                datapoints=tuple(DatapointSpec(*dp) for dp in tpl["datapoints"]),
            )
            compiled[key] = compile_template(spec)
        self.pins: dict[tuple[int, int], Resolved] = {}
        for key, pin in doc["pins"].items():
            number, _, position = key.partition(":")
            self.pins[(int(number), int(position))] = Resolved(
                pin["device_id"], tz, compiled[str(pin["template"])]
            )


class Resolver:
    """Cached metadata lookups (see the module docstring for tiers and freshness)."""

    def __init__(self, settings: Settings, *, listen: bool = True) -> None:
        self._dsn = settings.metadata_dsn
        parts = urlsplit(self._dsn)
        self._namespace = f"{REDIS_PREFIX}:{parts.hostname}:{parts.port or 5432}{parts.path}"
        self._ttl = settings.cache_ttl_s
        self._negative_s = settings.negative_cache_s
        self._size = settings.cache_size
        self._controllers: OrderedDict[str, Controller] = OrderedDict()
        self._unknown: dict[str, float] = {}  # mac -> monotonic expiry
        self._version = 0  # 0: not read yet
        self._announced = 0  # highest version the listener heard of
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        self._redis_retry_at = 0.0
        self.hits = dict.fromkeys(TIERS, 0)
        self.misses = dict.fromkeys(TIERS, 0)
        self.database_ok = False
        #: What an operator must fix for the database to answer (:mod:`.pgtrouble`), if anything.
        self.database_trouble: str | None = None
        self.redis_ok = True
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        if listen:
            self._listener = threading.Thread(
                target=self._listen, name="metadata-listen", daemon=True
            )
            self._listener.start()

    @property
    def version(self) -> int:
        return self._version

    # --- freshness -------------------------------------------------------------------

    def sync(self) -> int:
        """Read ``metadata_version``; on a change drop the in-process entries. Return it.

        Call once per batch, after the batch was polled. Raises MetadataUnavailable.
        """
        row = self._query("SELECT version FROM metadata_version", ())
        self._apply(int(row[0][0]) if row else 0)
        return self._version

    def _apply(self, version: int) -> None:
        if version != self._version:
            if self._version:
                log.info(
                    "metadata changed, in-process cache cleared",
                    extra={"from_version": self._version, "to_version": version},
                )
            self._controllers.clear()
            self._unknown.clear()
            self._version = version

    def _listen(self) -> None:
        backoff = Backoff(base=0.5, cap=10.0)
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=3) as conn:
                    conn.execute("LISTEN f2pipe_metadata")  # = CHANNEL
                    backoff.reset()
                    self.database_trouble = None
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            if note.payload.isdigit():
                                self._announced = max(self._announced, int(note.payload))
            except psycopg.Error as exc:
                log.warning("metadata listener disconnected", extra={"error": str(exc)})
                self.database_trouble = pgtrouble.describe(exc, "F2PIPE_METADATA_DSN")
                self._stop.wait(backoff.next_delay())

    # --- lookups ---------------------------------------------------------------------

    def resolve(self, mac: str, connector: int, kind: str, index: int) -> Resolution:
        """The decoding context of one component, or why there is none.

        Precedence (SPEC section 7): an unknown MAC is ``unknown_device`` for every
        kind; then a sensor pin with no device is ``unmapped_sensor`` while a status
        component with none is SKIPPED. Raises MetadataUnavailable when PostgreSQL
        is needed and cannot answer.
        """
        if self._announced > self._version:
            # A change was announced mid-batch: forget now, re-read on the next miss.
            self._apply(self._announced)
        controller = self._controller(mac)
        if controller is None:
            return Reason.UNKNOWN_DEVICE
        resolved = controller.pins.get((connector, index))
        if resolved is not None:
            return resolved
        return SKIPPED if kind in SKIPPED_KINDS else Reason.UNMAPPED_SENSOR

    def _controller(self, mac: str) -> Controller | None:
        controllers = self._controllers
        found = controllers.get(mac)
        if found is not None:
            controllers.move_to_end(mac)
            self.hits["process"] += 1
            return found
        expiry = self._unknown.get(mac)
        if expiry is not None:
            if time.monotonic() < expiry:
                self.hits["process"] += 1
                return None
            del self._unknown[mac]
        self.misses["process"] += 1
        if not self._version:
            self.sync()
        doc = self._from_redis(mac)
        if doc is None:
            doc = self._from_database(mac)
            if doc is None:
                self._unknown[mac] = time.monotonic() + self._negative_s
                return None
        controller = Controller(doc)
        controllers[mac] = controller
        if len(controllers) > self._size:
            controllers.popitem(last=False)
        return controller

    def _redis_key(self, mac: str) -> str:
        return f"{self._namespace}:v{self._version}:{mac}"

    def _from_redis(self, mac: str) -> dict[str, Any] | None:
        if time.monotonic() < self._redis_retry_at:
            return None
        try:
            raw = self._redis.get(self._redis_key(mac))
        except redis.RedisError as exc:
            self._redis_down(exc)
            return None
        if raw is None:
            self.misses["redis"] += 1
            return None
        self.hits["redis"] += 1
        doc: dict[str, Any] = orjson.loads(raw)
        return doc

    def _from_database(self, mac: str) -> dict[str, Any] | None:
        rows = self._query(_CONTROLLER_SQL, (mac,))
        doc = controller_document(rows)
        if doc is None:
            self.misses["database"] += 1
            return None
        self.hits["database"] += 1
        if time.monotonic() >= self._redis_retry_at:
            try:
                self._redis.set(self._redis_key(mac), orjson.dumps(doc), ex=self._ttl)
            except redis.RedisError as exc:
                self._redis_down(exc)
        return doc

    def _redis_down(self, exc: Exception) -> None:
        if self.redis_ok:
            log.warning(
                "redis unreachable, using the process cache and PostgreSQL",
                extra={"error": str(exc)},
            )
        self.redis_ok = False
        self._redis_retry_at = time.monotonic() + 2.0

    def _query(self, sql: LiteralString, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=3,
                    options="-c statement_timeout=5000",
                )
            rows = self._conn.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            self.database_ok = False
            self.database_trouble = pgtrouble.describe(exc, "F2PIPE_METADATA_DSN")
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise MetadataUnavailable(f"metadata database: {exc}".strip()) from exc
        self.database_ok = True
        self.database_trouble = None
        if not self.redis_ok and time.monotonic() >= self._redis_retry_at:
            self.redis_ok = True  # optimistic; the next Redis error flips it back
        return rows

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=2)
        if self._conn is not None:
            self._conn.close()
        self._redis.close()
