"""Fleet descriptions: ``f2pipe fleet import FILE.yaml`` and ``f2pipe fleet export [FILE]``.

A fleet file is YAML with one version key and five lists::

    version: 1
    device_types:   [{name, is_controller, is_sensor}]
    templates:      [{name, device_type, model, description, frame_check,
                      datapoints: [{label, data_encoding, byte_offset, byte_length,
                                    byte_order, decimals, unit, json_field}]}]
    controllers:    [{name, mac, template, timezone, serial_number, claiming_code}]
    sensors:        [{name, template, serial_number}]
    wiring:         [{controller: <mac>, connector: 1..4, pin: 1..6, sensor: <name>}]

Identity on re-import (what an entry updates rather than creates):

- device types and templates by ``name`` (both unique in the schema);
- datapoints by ``(template, label)``;
- controllers by MAC (``aabbccddee01``, ``aa:bb:cc:dd:ee:01`` and ``aa-bb-...`` are
  the same controller);
- sensors by ``name`` among the devices that have no MAC. Sensor names must
  therefore be unique in the file, and an import refuses a name that more than
  one MAC-less device in the database already carries. Renaming a sensor in the
  file registers a new device (the old one keeps its id and its readings).

What the file names, it states completely: a template's datapoints are exactly
those listed (others of that template are deleted), and the wiring of every
controller in the file is exactly the file's wiring (pins it does not list are
removed; a changed entry rewires the pin). Whatever the file does not name
(other templates, controllers, sensors) is left as it is; nothing is deleted
except datapoints and pins as just said. A controller's ``claiming_code`` is set
when given and left unchanged when omitted.

Guarantees: the whole file is validated before anything is written (every
error names the file's line and the field); the import runs in one
transaction, so a database refusal leaves nothing half-written; only rows that
actually differ are written, so re-importing the same file changes nothing
(and wakes no processor cache). Export omits claiming codes unless asked,
because they are credentials.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from f2pipe.core.decode import ENCODINGS
from f2pipe.core.models import Datapoint
from f2pipe.core.topics import normalize_mac
from f2pipe.errors import FleetError
from f2pipe.settings import get_settings

FORMAT_VERSION: Literal[1] = 1

Loc = tuple[str | int, ...]

# encoding -> width in bytes (bool's width is free, 1..8)
ENCODING_WIDTHS: dict[str, int] = {name: width for name, (_, width) in ENCODINGS.items() if width}
# --- the document model -------------------------------------------------------------


class _Entry(BaseModel):
    # strict: a fleet file is configuration; "2" for a number is a mistake worth naming.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DeviceTypeEntry(_Entry):
    name: str = Field(min_length=1)
    is_controller: bool = False
    is_sensor: bool = False


class DatapointEntry(_Entry, Datapoint):
    """A template's datapoint in a fleet file: the shared model, strict, nothing extra."""


class TemplateEntry(_Entry):
    name: str = Field(min_length=1)
    device_type: str = Field(min_length=1)
    model: str | None = None
    description: str | None = None
    frame_check: Literal["modbus_crc", "none"] = "modbus_crc"
    datapoints: list[DatapointEntry] = Field(default_factory=list)


class ControllerEntry(_Entry):
    name: str = Field(min_length=1)
    mac: str
    template: str = Field(min_length=1)
    # Checked by the database against pg_timezone_names, the authority the processor uses.
    timezone: str = Field(default="UTC", min_length=1)
    serial_number: str | None = None
    claiming_code: str | None = Field(default=None, min_length=1)

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        return normalize_mac(value)


class SensorEntry(_Entry):
    name: str = Field(min_length=1)
    template: str = Field(min_length=1)
    serial_number: str | None = None


class WiringEntry(_Entry):
    controller: str
    connector: int = Field(ge=1, le=4)
    pin: int = Field(ge=1, le=6)
    sensor: str = Field(min_length=1)

    @field_validator("controller")
    @classmethod
    def _mac(cls, value: str) -> str:
        return normalize_mac(value)


class Fleet(_Entry):
    """A whole fleet file, field-valid; :func:`check_references` checks the cross-references."""

    version: Literal[1] = FORMAT_VERSION
    device_types: list[DeviceTypeEntry] = Field(default_factory=list)
    templates: list[TemplateEntry] = Field(default_factory=list)
    controllers: list[ControllerEntry] = Field(default_factory=list)
    sensors: list[SensorEntry] = Field(default_factory=list)
    wiring: list[WiringEntry] = Field(default_factory=list)


# --- YAML with line numbers -------------------------------------------------------------


class LineDict(dict[Any, Any]):
    """A mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class LineList(list[Any]):
    """A sequence that remembers the line of each item (1-based)."""

    line: int = 0
    item_lines: list[int]


# Keys whose values are text whatever they look like: YAML 1.1 would read the MAC
# 001122334455 as an octal number and 11:22:33:44:55:66 as a base-60 one.
_TEXT_KEYS = frozenset(
    {"name", "mac", "controller", "sensor", "serial_number", "claiming_code", "model"}
    | {"description", "label", "unit", "json_field", "timezone", "template", "device_type"}
)


class _Loader(yaml.SafeLoader):
    pass


class _LoadError(Exception):
    """A YAML construct the format refuses (duplicate or non-text key), with its line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Iterator[LineDict]:
    data = LineDict()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    # Duplicates among the keys written here (PyYAML would keep the last silently);
    # keys a merge (<<) brings in may be overridden, as YAML says.
    first: dict[str, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        line = key_node.start_mark.line + 1
        if key_node.value in first:
            raise _LoadError(
                line, f"duplicate key {key_node.value!r} (first on line {first[key_node.value]})"
            )
        first[key_node.value] = line
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise _LoadError(line, f"key {key!r} is not text")
        if (
            key in _TEXT_KEYS
            and isinstance(value_node, yaml.ScalarNode)
            and value_node.tag != "tag:yaml.org,2002:null"
        ):
            value: Any = value_node.value
        else:
            value = loader.construct_object(value_node, deep=True)
        data[key] = value
        data.key_lines[key] = line


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> Iterator[LineList]:
    data = LineList()
    data.line = node.start_mark.line + 1
    data.item_lines = []
    yield data
    for item in node.value:
        data.append(loader.construct_object(item, deep=True))
        data.item_lines.append(item.start_mark.line + 1)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


def line_of(document: Any, loc: Loc) -> int:
    """The line of the deepest node of ``document`` that ``loc`` reaches (1 if none)."""
    line = getattr(document, "line", 1)
    node = document
    for step in loc:
        if isinstance(node, LineDict) and isinstance(step, str) and step in node:
            line = node.key_lines[step]
            node = node[step]
        elif isinstance(node, LineList) and isinstance(step, int) and 0 <= step < len(node):
            line = node.item_lines[step]
            node = node[step]
        else:
            break
    return line


def _loc_text(loc: Loc) -> str:
    text = ""
    for step in loc:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text or "(document)"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a fleet file: where (line, field path) and what."""

    line: int | None  # None for a document that never was text (a Fleet built in code)
    loc: Loc
    message: str

    def render(self, source: str) -> str:
        where = source if self.line is None else f"{source}:{self.line}"
        return f"{where}: {_loc_text(self.loc)}: {self.message}"


def _fail(source: str, problems: Sequence[Problem]) -> FleetError:
    ordered = sorted(problems, key=lambda p: p.line or 0)
    noun = "problem" if len(ordered) == 1 else "problems"
    lines = [p.render(source) for p in ordered]
    return FleetError(f"{len(ordered)} {noun}, nothing written:\n  " + "\n  ".join(lines))


def parse_fleet(text: str, source: str = "<fleet>") -> Fleet:
    """Parse and fully validate a fleet document; FleetError lists every problem by line."""
    return _load(text, source)[1]


def _load(text: str, source: str) -> tuple[LineDict, Fleet]:
    try:
        document = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except _LoadError as exc:
        raise FleetError(f"{source}:{exc.line}: {exc.message}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise FleetError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if document is None:
        document = LineDict()
        document.line, document.key_lines = 1, {}
    if not isinstance(document, LineDict):
        raise FleetError(f"{source}:1: a fleet file is a mapping (version, templates, ...)")
    try:
        fleet = Fleet.model_validate(document)
    except ValidationError as exc:
        problems = [
            Problem(line_of(document, tuple(err["loc"])), tuple(err["loc"]), _message(err))
            for err in exc.errors()
        ]
        raise _fail(source, problems) from None
    problems = [
        Problem(line_of(document, loc), loc, message) for loc, message in check_references(fleet)
    ]
    if problems:
        raise _fail(source, problems)
    return document, fleet


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "value_error":  # our validators already quote the value
        return str(err["msg"]).removeprefix("Value error, ")
    return f"{err['msg']} (got {err['input']!r})"


def check_references(fleet: Fleet) -> list[tuple[Loc, str]]:
    """Cross-entry problems of a field-valid fleet: duplicates and dangling names."""
    problems: list[tuple[Loc, str]] = []

    def unique(kind: str, keys: Iterable[object], what: str) -> None:
        seen: dict[object, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                problems.append(((kind, i), f"duplicate {what} {key!r} (also entry {seen[key]})"))
            else:
                seen[key] = i

    types = {t.name: t for t in fleet.device_types}
    templates = {t.name: t for t in fleet.templates}
    unique("device_types", (t.name for t in fleet.device_types), "device type name")
    unique("templates", (t.name for t in fleet.templates), "template name")
    unique("controllers", (c.mac for c in fleet.controllers), "controller MAC")
    unique("sensors", (s.name for s in fleet.sensors), "sensor name")
    unique("wiring", ((w.controller, w.connector, w.pin) for w in fleet.wiring), "position")
    unique("wiring", (w.sensor for w in fleet.wiring), "wiring of sensor")

    for i, tpl in enumerate(fleet.templates):
        if tpl.device_type not in types:
            problems.append(
                (("templates", i, "device_type"), f"unknown device type {tpl.device_type!r}")
            )
        labels: dict[str, int] = {}
        for j, dp in enumerate(tpl.datapoints):
            loc: Loc = ("templates", i, "datapoints", j)
            if dp.label in labels:
                problems.append(((*loc, "label"), f"duplicate label {dp.label!r} in this template"))
            labels.setdefault(dp.label, j)
            width = ENCODING_WIDTHS.get(dp.data_encoding)
            if width is not None and dp.byte_length != width:
                problems.append(
                    (
                        (*loc, "byte_length"),
                        f"{dp.data_encoding} is {width} byte(s), not {dp.byte_length}",
                    )
                )
            if dp.data_encoding == "bool" and dp.byte_length > 8:
                problems.append(((*loc, "byte_length"), "bool is 1 to 8 bytes"))

    def template_ref(kind: str, i: int, name: str, role: Literal["controller", "sensor"]) -> None:
        tpl = templates.get(name)
        if tpl is None:
            problems.append(((kind, i, "template"), f"unknown template {name!r}"))
            return
        dtype = types.get(tpl.device_type)
        if dtype is not None and not getattr(dtype, f"is_{role}"):
            problems.append(
                (
                    (kind, i, "template"),
                    f"template {name!r} is not a {role} (device type {dtype.name!r})",
                )
            )

    for i, ctl in enumerate(fleet.controllers):
        template_ref("controllers", i, ctl.template, "controller")
    for i, sensor in enumerate(fleet.sensors):
        template_ref("sensors", i, sensor.template, "sensor")
    macs = {c.mac for c in fleet.controllers}
    sensors = {s.name for s in fleet.sensors}
    for i, wire in enumerate(fleet.wiring):
        if wire.controller not in macs:
            problems.append(
                (("wiring", i, "controller"), f"no controller {wire.controller} in this file")
            )
        if wire.sensor not in sensors:
            problems.append((("wiring", i, "sensor"), f"no sensor {wire.sensor!r} in this file"))
    return problems


# --- import ------------------------------------------------------------------------------

Conn = psycopg.Connection[tuple[Any, ...]]
_LOCK_KEY = 0xF2_F1_EE  # serialises concurrent imports: each plans its changes from a fresh read


@dataclass
class Changes:
    """What an import wrote, counted per kind: ``{"templates": {"created": 1}, ...}``."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, kind: str, action: str) -> None:
        per_kind = self.counts.setdefault(kind, {})
        per_kind[action] = per_kind.get(action, 0) + 1

    @property
    def total(self) -> int:
        return sum(sum(a.values()) for a in self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no changes: the database already matches the file"
        parts = []
        for kind, actions in self.counts.items():
            done = ", ".join(f"{n} {action}" for action, n in actions.items())
            parts.append(f"{kind}: {done}")
        return "; ".join(parts)


class _Refused(Exception):
    """A database refusal during the import, tied to the entry that caused it."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def import_fleet(dsn: str, path: Path, dry_run: bool = False) -> Changes:
    """Validate ``path`` and make the database match it in one transaction.

    Raises FleetError (every message names the file's line and the field) when the
    file is invalid or the database refuses an entry; then nothing is written.
    With ``dry_run`` the changes are counted and rolled back.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetError(f"cannot read {source}: {exc.strerror}") from None
    document, fleet = _load(text, source)
    return _write(dsn, fleet, dry_run, source, lambda loc: line_of(document, loc))


def apply_fleet(dsn: str, fleet: Fleet, dry_run: bool = False) -> Changes:
    """Make the database match an already-parsed fleet document, as :func:`import_fleet` does.

    The same guarantees: the references are checked before anything is written,
    the writes run in one transaction under the importers' advisory lock, only
    rows that differ are written (so applying the same fleet twice changes
    nothing), and ``dry_run`` counts the changes and rolls them back. Raises
    FleetError naming the entry (``controllers[0].name: ...``) on a problem.
    """
    source = "<fleet>"
    problems = [Problem(None, loc, message) for loc, message in check_references(fleet)]
    if problems:
        raise _fail(source, problems)
    return _write(dsn, fleet, dry_run, source, lambda loc: None)


def _write(
    dsn: str, fleet: Fleet, dry_run: bool, source: str, line: Callable[[Loc], int | None]
) -> Changes:
    """Write a checked fleet in one locked transaction; a refusal names ``source`` and line."""
    try:
        with psycopg.connect(dsn) as conn:
            try:
                with conn.transaction() as tx:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    changes = _apply(conn, fleet)
                    if dry_run:
                        raise psycopg.Rollback(tx)
            except _Refused as exc:
                raise _fail(source, [Problem(line(exc.loc), exc.loc, exc.message)]) from None
    except psycopg.OperationalError as exc:
        raise FleetError(f"cannot reach the metadata database: {exc}".strip()) from None
    return changes


def _refusal(exc: psycopg.Error) -> str:
    diag = exc.diag
    what = diag.message_primary or str(exc)
    if diag.constraint_name:
        what += f" (constraint {diag.constraint_name})"
    return f"database refused it: {what}"


def _run(conn: Conn, loc: Loc, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Run one statement for the entry at ``loc``; a refusal becomes _Refused naming it."""
    try:
        with conn.transaction():  # a savepoint, so the refusal names this entry alone
            cur = conn.execute(query.encode(), params)
            return cur.fetchall() if cur.description else []
    except psycopg.errors.IntegrityError as exc:
        raise _Refused(loc, _refusal(exc)) from None
    except psycopg.errors.DataError as exc:
        raise _Refused(loc, _refusal(exc)) from None


def _apply(conn: Conn, fleet: Fleet) -> Changes:
    changes = Changes()
    type_ids = _apply_types(conn, fleet, changes)
    template_ids = _apply_templates(conn, fleet, type_ids, changes)
    controller_ids = _apply_controllers(conn, fleet, template_ids, changes)
    sensor_ids = _apply_sensors(conn, fleet, template_ids, changes)
    _apply_wiring(conn, fleet, controller_ids, sensor_ids, changes)
    return changes


def _apply_types(conn: Conn, fleet: Fleet, changes: Changes) -> dict[str, int]:
    current = {
        row[0]: (row[1], row[2], row[3])
        for row in conn.execute(
            "SELECT name, device_type_id, is_controller, is_sensor FROM device_types"
        )
    }
    ids: dict[str, int] = {name: v[0] for name, v in current.items()}
    for i, entry in enumerate(fleet.device_types):
        loc: Loc = ("device_types", i)
        have = current.get(entry.name)
        if have is None:
            rows = _run(
                conn,
                loc,
                "INSERT INTO device_types (name, is_controller, is_sensor) VALUES (%s, %s, %s)"
                " RETURNING device_type_id",
                (entry.name, entry.is_controller, entry.is_sensor),
            )
            ids[entry.name] = rows[0][0]
            changes.add("device types", "created")
        elif have[1:] != (entry.is_controller, entry.is_sensor):
            _run(
                conn,
                loc,
                "UPDATE device_types SET is_controller = %s, is_sensor = %s"
                " WHERE device_type_id = %s",
                (entry.is_controller, entry.is_sensor, have[0]),
            )
            changes.add("device types", "updated")
    return ids


def _apply_templates(
    conn: Conn, fleet: Fleet, type_ids: dict[str, int], changes: Changes
) -> dict[str, int]:
    current = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT name, device_template_id, model, description, device_type_id, frame_check"
            " FROM device_templates"
        )
    }
    ids: dict[str, int] = {name: v[0] for name, v in current.items()}
    for i, entry in enumerate(fleet.templates):
        loc: Loc = ("templates", i)
        wanted = (entry.model, entry.description, type_ids[entry.device_type], entry.frame_check)
        have = current.get(entry.name)
        if have is None:
            rows = _run(
                conn,
                loc,
                "INSERT INTO device_templates"
                " (name, model, description, device_type_id, frame_check)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING device_template_id",
                (entry.name, *wanted),
            )
            ids[entry.name] = rows[0][0]
            changes.add("templates", "created")
        elif tuple(have[1:]) != wanted:
            _run(
                conn,
                loc,
                "UPDATE device_templates SET model = %s, description = %s, device_type_id = %s,"
                " frame_check = %s WHERE device_template_id = %s",
                (*wanted, have[0]),
            )
            changes.add("templates", "updated")
        _apply_datapoints(conn, loc, entry, ids[entry.name], changes)
    return ids


def _apply_datapoints(
    conn: Conn, loc: Loc, entry: TemplateEntry, template_id: int, changes: Changes
) -> None:
    current = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT label, datapoint_id, data_encoding, byte_offset, byte_length, byte_order,"
            " decimals, unit, json_field FROM datapoints WHERE device_template_id = %s",
            (template_id,),
        )
    }
    for j, dp in enumerate(entry.datapoints):
        dp_loc: Loc = (*loc, "datapoints", j)
        wanted = (
            dp.data_encoding,
            dp.byte_offset,
            dp.byte_length,
            dp.byte_order,
            dp.decimals,
            dp.unit,
            dp.json_field,
        )
        have = current.get(dp.label)
        if have is None:
            _run(
                conn,
                dp_loc,
                "INSERT INTO datapoints (device_template_id, label, data_encoding, byte_offset,"
                " byte_length, byte_order, decimals, unit, json_field)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (template_id, dp.label, *wanted),
            )
            changes.add("datapoints", "created")
        elif (str(have[1]).lower(), *have[2:]) != wanted:
            _run(
                conn,
                dp_loc,
                "UPDATE datapoints SET data_encoding = %s, byte_offset = %s, byte_length = %s,"
                " byte_order = %s, decimals = %s, unit = %s, json_field = %s"
                " WHERE datapoint_id = %s",
                (*wanted, have[0]),
            )
            changes.add("datapoints", "updated")
    gone = [
        have[0]
        for label, have in current.items()
        if label not in {d.label for d in entry.datapoints}
    ]
    if gone:
        _run(conn, loc, "DELETE FROM datapoints WHERE datapoint_id = ANY(%s)", (gone,))
        for _ in gone:
            changes.add("datapoints", "deleted")


def _apply_controllers(
    conn: Conn, fleet: Fleet, template_ids: dict[str, int], changes: Changes
) -> dict[str, int]:
    macs = [c.mac for c in fleet.controllers]
    current = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT mac_address, device_id, name, device_template_id, timezone, serial_number,"
            " claiming_code FROM devices WHERE mac_address = ANY(%s)",
            (macs,),
        )
    }
    ids: dict[str, int] = {}
    for i, entry in enumerate(fleet.controllers):
        loc: Loc = ("controllers", i)
        have = current.get(entry.mac)
        wanted = (entry.name, template_ids[entry.template], entry.timezone, entry.serial_number)
        if have is None:
            rows = _run(
                conn,
                loc,
                "INSERT INTO devices (name, device_template_id, timezone, serial_number,"
                " claiming_code, mac_address) VALUES (%s, %s, %s, %s, %s, %s) RETURNING device_id",
                (*wanted, entry.claiming_code, entry.mac),
            )
            ids[entry.mac] = rows[0][0]
            changes.add("controllers", "created")
            continue
        ids[entry.mac] = have[0]
        code = have[5] if entry.claiming_code is None else entry.claiming_code
        if (*have[1:5], have[5]) != (*wanted, code):
            _run(
                conn,
                loc,
                "UPDATE devices SET name = %s, device_template_id = %s, timezone = %s,"
                " serial_number = %s, claiming_code = %s WHERE device_id = %s",
                (*wanted, code, have[0]),
            )
            changes.add("controllers", "updated")
    return ids


def _apply_sensors(
    conn: Conn, fleet: Fleet, template_ids: dict[str, int], changes: Changes
) -> dict[str, int]:
    names = [s.name for s in fleet.sensors]
    current: dict[str, list[tuple[Any, ...]]] = {}
    for row in conn.execute(
        "SELECT name, device_id, device_template_id, serial_number FROM devices"
        " WHERE mac_address IS NULL AND name = ANY(%s) ORDER BY device_id",
        (names,),
    ):
        current.setdefault(row[0], []).append(row[1:])
    ids: dict[str, int] = {}
    for i, entry in enumerate(fleet.sensors):
        loc: Loc = ("sensors", i)
        matches = current.get(entry.name, [])
        wanted = (template_ids[entry.template], entry.serial_number)
        if len(matches) > 1:
            listed = ", ".join(str(m[0]) for m in matches)
            raise _Refused(
                (*loc, "name"),
                f"{len(matches)} sensors in the database are named {entry.name!r}"
                f" (device ids {listed}); rename them so the name says which one is meant",
            )
        if not matches:
            rows = _run(
                conn,
                loc,
                "INSERT INTO devices (name, device_template_id, serial_number) VALUES (%s, %s, %s)"
                " RETURNING device_id",
                (entry.name, *wanted),
            )
            ids[entry.name] = rows[0][0]
            changes.add("sensors", "created")
            continue
        have = matches[0]
        ids[entry.name] = have[0]
        if tuple(have[1:]) != wanted:
            _run(
                conn,
                loc,
                "UPDATE devices SET device_template_id = %s, serial_number = %s"
                " WHERE device_id = %s",
                (*wanted, have[0]),
            )
            changes.add("sensors", "updated")
    return ids


def _apply_wiring(
    conn: Conn,
    fleet: Fleet,
    controller_ids: dict[str, int],
    sensor_ids: dict[str, int],
    changes: Changes,
) -> None:
    for ctl_index, ctl in enumerate(fleet.controllers):
        controller_id = controller_ids[ctl.mac]
        connectors = {
            row[0]: row[1]
            for row in conn.execute(
                "SELECT connector_number, connector_id FROM connectors WHERE controller_id = %s",
                (controller_id,),
            )
        }
        current = {
            (row[0], row[1]): (row[2], row[3])
            for row in conn.execute(
                "SELECT c.connector_number, p.position, p.pin_id, p.device_id"
                " FROM pins p JOIN connectors c USING (connector_id) WHERE c.controller_id = %s",
                (controller_id,),
            )
        }
        wanted = {
            (w.connector, w.pin): (i, sensor_ids[w.sensor])
            for i, w in enumerate(fleet.wiring)
            if w.controller == ctl.mac
        }
        # Removals first, so a sensor moved between pins never sits on two at once.
        gone = [pin_id for key, (pin_id, _) in current.items() if key not in wanted]
        if gone:
            _run(
                conn, ("controllers", ctl_index), "DELETE FROM pins WHERE pin_id = ANY(%s)", (gone,)
            )
            for _ in gone:
                changes.add("wiring", "removed")
        for (number, position), (i, device_id) in sorted(wanted.items()):
            loc: Loc = ("wiring", i)
            have = current.get((number, position))
            if have is not None:
                if have[1] != device_id:
                    _run(
                        conn,
                        loc,
                        "UPDATE pins SET device_id = %s WHERE pin_id = %s",
                        (device_id, have[0]),
                    )
                    changes.add("wiring", "rewired")
                continue
            if number not in connectors:
                rows = _run(
                    conn,
                    loc,
                    "INSERT INTO connectors (controller_id, connector_number) VALUES (%s, %s)"
                    " RETURNING connector_id",
                    (controller_id, number),
                )
                connectors[number] = rows[0][0]
            _run(
                conn,
                loc,
                "INSERT INTO pins (connector_id, position, device_id) VALUES (%s, %s, %s)",
                (connectors[number], position, device_id),
            )
            changes.add("wiring", "created")


# --- export ------------------------------------------------------------------------------


def export_fleet(dsn: str, with_claiming_codes: bool = False) -> str:
    """The whole fleet in the database as a fleet document (YAML text), in a stable order.

    Raises FleetError when the database holds something the format cannot
    express unambiguously (two MAC-less devices with one name).
    """
    try:
        rows = _read_fleet(dsn)
    except psycopg.OperationalError as exc:
        raise FleetError(f"cannot reach the metadata database: {exc}".strip()) from None
    return _render(*rows, with_claiming_codes=with_claiming_codes)


Rows = list[tuple[Any, ...]]


def _read_fleet(dsn: str) -> tuple[Rows, Rows, Rows, Rows, Rows, Rows]:
    with psycopg.connect(dsn) as conn, conn.transaction():
        # One snapshot for every query, so a concurrent change cannot tear the document.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        types = conn.execute(
            "SELECT name, is_controller, is_sensor FROM device_types ORDER BY name"
        ).fetchall()
        templates = conn.execute(
            "SELECT t.device_template_id, t.name, ty.name, t.model, t.description, t.frame_check"
            " FROM device_templates t JOIN device_types ty USING (device_type_id) ORDER BY t.name"
        ).fetchall()
        datapoints = conn.execute(
            "SELECT device_template_id, label, lower(data_encoding), byte_offset, byte_length,"
            " byte_order, decimals, unit, json_field FROM datapoints"
            " ORDER BY device_template_id, byte_offset, label"
        ).fetchall()
        controllers = conn.execute(
            "SELECT d.name, d.mac_address, t.name, d.timezone, d.serial_number, d.claiming_code"
            " FROM devices d JOIN device_templates t USING (device_template_id)"
            " WHERE d.mac_address IS NOT NULL ORDER BY d.mac_address"
        ).fetchall()
        sensors = conn.execute(
            "SELECT d.name, t.name, d.serial_number, d.device_id"
            " FROM devices d JOIN device_templates t USING (device_template_id)"
            " WHERE d.mac_address IS NULL ORDER BY d.name, d.device_id"
        ).fetchall()
        wiring = conn.execute(
            "SELECT ctl.mac_address, c.connector_number, p.position, d.name"
            " FROM pins p JOIN connectors c USING (connector_id)"
            " JOIN devices ctl ON ctl.device_id = c.controller_id"
            " JOIN devices d ON d.device_id = p.device_id"
            " WHERE d.mac_address IS NULL"
            " ORDER BY ctl.mac_address, c.connector_number, p.position"
        ).fetchall()
    return types, templates, datapoints, controllers, sensors, wiring


def _render(
    types: Rows,
    templates: Rows,
    datapoints: Rows,
    controllers: Rows,
    sensors: Rows,
    wiring: Rows,
    with_claiming_codes: bool,
) -> str:
    seen: dict[str, int] = {}
    for name, _, _, device_id in sensors:
        if name in seen:
            raise FleetError(
                f"sensors {seen[name]} and {device_id} are both named {name!r}:"
                " rename one so a fleet file can tell them apart"
            )
        seen[name] = device_id

    def compact(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entry.items() if v is not None}

    by_template: dict[int, list[dict[str, Any]]] = {}
    for tpl_id, label, enc, offset, length, order, decimals, unit, json_field in datapoints:
        by_template.setdefault(tpl_id, []).append(
            compact(
                {
                    "label": label,
                    "data_encoding": enc,
                    "byte_offset": offset,
                    "byte_length": length,
                    "byte_order": order,
                    "decimals": decimals,
                    "unit": unit,
                    "json_field": json_field,
                }
            )
        )
    document: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "device_types": [{"name": n, "is_controller": c, "is_sensor": s} for n, c, s in types],
        "templates": [
            compact(
                {
                    "name": name,
                    "device_type": dtype,
                    "model": model,
                    "description": description,
                    "frame_check": frame_check,
                    "datapoints": by_template.get(tpl_id, []),
                }
            )
            for tpl_id, name, dtype, model, description, frame_check in templates
        ],
        "controllers": [
            compact(
                {
                    "name": name,
                    "mac": mac,
                    "template": template,
                    "timezone": tz,
                    "serial_number": serial,
                    "claiming_code": code if with_claiming_codes else None,
                }
            )
            for name, mac, template, tz, serial, code in controllers
        ],
        "sensors": [
            compact({"name": name, "template": template, "serial_number": serial})
            for name, template, serial, _ in sensors
        ],
        "wiring": [
            {"controller": mac, "connector": number, "pin": position, "sensor": sensor}
            for mac, number, position, sensor in wiring
        ],
    }
    header = "# f2pipe fleet description (f2pipe fleet import FILE.yaml)\n"
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


# --- CLI ---------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    imp = sub.add_parser(
        "import", help="make the metadata match a fleet file (idempotent, all or nothing)"
    )
    imp.add_argument("file", type=Path, metavar="FILE.yaml")
    imp.add_argument(
        "--dry-run", action="store_true", help="validate and count the changes, write nothing"
    )
    imp.set_defaults(func=_cmd_import)
    exp = sub.add_parser("export", help="write the fleet in the metadata as a fleet file")
    exp.add_argument("file", type=Path, nargs="?", metavar="FILE", help="default: standard output")
    exp.add_argument(
        "--with-claiming-codes",
        action="store_true",
        help="include the controllers' claiming codes (credentials: the file is written 0600)",
    )
    exp.set_defaults(func=_cmd_export)


def _cmd_import(args: argparse.Namespace) -> int:
    changes = import_fleet(get_settings().metadata_dsn, args.file, dry_run=args.dry_run)
    prefix = "dry run, would write: " if args.dry_run and changes.total else ""
    print(f"{args.file}: {prefix}{changes.summary()}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    text = export_fleet(get_settings().metadata_dsn, args.with_claiming_codes)
    if args.file is None:
        sys.stdout.write(text)
        return 0
    mode = 0o600 if args.with_claiming_codes else 0o644
    fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return 0
