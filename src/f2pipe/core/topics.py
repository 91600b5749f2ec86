"""F2 controller MQTT topics (SPEC section 1).

Grammar: ``<type>/f2-<mac>/<mode>/J<connector>/<component>``, where the
component is ``<kind>-<N>`` (N = 1..6) for the indexed kinds and the bare kind
for the plural ones (``door-sensors``, ``exit-buttons``, which stand for pin 1).
Only reader commands take one more level:
``cmnd/f2-<mac>/<mode>/J<n>/reader-<N>/success``. Anything else is
``invalid_topic``, which :func:`parse_topic` reports as ``None``.

:func:`parse_topic` is memoised: a fleet publishes on a bounded set of topics,
so the processor's hot path pays a dictionary lookup, not a parse.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CONNECTORS",
    "INDEXED_KINDS",
    "KINDS",
    "MODES",
    "PLURAL_KINDS",
    "STATUS_KINDS",
    "TYPES",
    "Topic",
    "format_topic",
    "normalize_mac",
    "parse_topic",
]

TYPES: Final = frozenset({"cmnd", "stat", "tele"})
MODES: Final = frozenset({"sensor-mode", "access-control-mode", "alarm-mode"})
CONNECTORS: Final = range(1, 5)
# Kinds written as ``<kind>-<N>``.
INDEXED_KINDS: Final = frozenset({"sensor", "strike", "reader", "siren", "motion-sensor"})
# Kinds written bare; they map to pin 1.
PLURAL_KINDS: Final = frozenset({"door-sensors", "exit-buttons"})
KINDS: Final = INDEXED_KINDS | PLURAL_KINDS
# Kinds whose payload is a JSON status object read through ``json_field``.
STATUS_KINDS: Final = frozenset(
    {"strike", "door-sensors", "exit-buttons", "siren", "motion-sensor"}
)
# The only extra level the grammar knows, and only under a reader command.
_READER_SUBS: Final = frozenset({"success"})

_HEX: Final = frozenset("0123456789abcdef")
_CONNECTOR_OF: Final = {f"J{n}": n for n in CONNECTORS}
_INDEX_OF: Final = {str(n): n for n in range(1, 7)}


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic. ``index`` is the pin position (1 for the plural kinds);
    ``sub`` is the extra level of a reader command (``'success'``), else ``None``."""

    type: str
    mac: str
    mode: str
    connector: int
    kind: str
    index: int
    sub: str | None = None

    @property
    def component(self) -> str:
        """The component level as written in the topic (``sensor-1``, ``door-sensors``)."""
        return self.kind if self.kind in PLURAL_KINDS else f"{self.kind}-{self.index}"

    def __str__(self) -> str:
        return format_topic(self)


def format_topic(topic: Topic) -> str:
    """The topic string of ``topic``; ``parse_topic(format_topic(t)) == t`` for valid ``t``."""
    text = f"{topic.type}/f2-{topic.mac}/{topic.mode}/J{topic.connector}/{topic.component}"
    return text if topic.sub is None else f"{text}/{topic.sub}"


def _component(text: str) -> tuple[str, int] | None:
    if text in PLURAL_KINDS:
        return text, 1
    kind, dash, number = text.rpartition("-")
    if not dash or kind not in INDEXED_KINDS:
        return None
    index = _INDEX_OF.get(number)
    return None if index is None else (kind, index)


@functools.lru_cache(maxsize=65536)
def parse_topic(topic: str) -> Topic | None:
    """Parse ``topic`` per SPEC section 1; ``None`` means ``invalid_topic``.

    Pure and total: never raises for any string. Results (including ``None``)
    are cached for the most recent 65536 distinct topics.
    """
    levels = topic.split("/")
    if len(levels) == 6:
        type_, device, mode, connector, component, sub = levels
        if type_ != "cmnd" or sub not in _READER_SUBS:
            return None
    elif len(levels) == 5:
        type_, device, mode, connector, component = levels
        sub = None
    else:
        return None
    if type_ not in TYPES or mode not in MODES:
        return None
    if len(device) != 15 or not device.startswith("f2-"):
        return None
    mac = device[3:]
    if not _HEX.issuperset(mac):
        return None
    number = _CONNECTOR_OF.get(connector)
    if number is None:
        return None
    parsed = _component(component)
    if parsed is None:
        return None
    kind, index = parsed
    if sub is not None and kind != "reader":
        return None
    return Topic(type_, mac, mode, number, kind, index, sub)


_MAC_FORMS = (
    re.compile(r"[0-9a-f]{12}"),
    re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}"),
    re.compile(r"(?:[0-9a-f]{2}-){5}[0-9a-f]{2}"),
)


def normalize_mac(text: str) -> str:
    """``aabbccddee01``, ``AA:BB:CC:DD:EE:01`` or ``aa-bb-...`` -> ``aabbccddee01``.

    Raises ValueError for anything else (other separators, mixed separators,
    wrong length, non-hex digits).
    """
    lowered = text.strip().lower()
    if not any(form.fullmatch(lowered) for form in _MAC_FORMS):
        raise ValueError(
            f"not a MAC address: {text[:40]!r} (expected 12 hex digits, optionally "
            "separated by ':' or '-' in pairs)"
        )
    return lowered.replace(":", "").replace("-", "")
