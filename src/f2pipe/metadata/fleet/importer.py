"""Make the metadata match a fleet document: one transaction, only the rows that differ.

Every writer of fleet documents (``f2pipe fleet import``, ``f2pipe db
seed-demo``, the simulator's provisioning) goes through here. An import takes a
transaction-level advisory lock first, so concurrent imports each plan their
changes from a fresh read. The current rows are read a table at a time, the
changes planned in memory, and each kind of change written in bulk: one
statement per few thousand rows over arrays (``unnest``), in the file's order,
so 10,000 controllers with 40,000 sensors cost the importer a handful of
statements instead of a hundred thousand. Each bulk statement runs in a
savepoint; when the database refuses one, its rows are halved and retried
until the one entry that caused it is found, so a refusal still names that
entry (and its line), and the whole import rolls back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from f2pipe.errors import FleetError
from f2pipe.metadata.fleet.bulk import Conn, Progress, ProgressReport, Refused, Row, bulk, run
from f2pipe.metadata.fleet.document import (
    Fleet,
    Loc,
    TemplateEntry,
    check_brokers,
    check_references,
)
from f2pipe.metadata.fleet.yamlload import Problem, line_of, load_document, problems_error

_LOCK_KEY = 0xF2_F1_EE  # serialises concurrent imports: each plans its changes from a fresh read


@dataclass
class Changes:
    """What an import wrote, counted per kind: ``{"templates": {"created": 1}, ...}``."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, kind: str, action: str, count: int = 1) -> None:
        """Count ``count`` rows of ``kind`` as ``action``; nothing for none."""
        if count:
            per_kind = self.counts.setdefault(kind, {})
            per_kind[action] = per_kind.get(action, 0) + count

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


def import_fleet(
    dsn: str,
    path: Path,
    dry_run: bool = False,
    progress: ProgressReport | None = None,
    brokers: Sequence[str] | None = None,
) -> Changes:
    """Validate ``path`` and make the database match it in one transaction.

    Raises FleetError (every message names the file's line and the field) when the
    file is invalid, names a broker outside ``brokers`` (when given), or the
    database refuses an entry; then nothing is written. With ``dry_run`` the
    changes are counted and rolled back. ``progress``, when given, is told the
    entries done after each bulk statement.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetError(f"cannot read {source}: {exc.strerror}") from None
    document, fleet = load_document(text, source)
    if brokers is not None and (wrong := check_brokers(fleet, brokers)):
        found = [Problem(line_of(document, loc), loc, message) for loc, message in wrong]
        raise problems_error(source, found)
    return _in_transaction(
        dsn,
        dry_run,
        lambda conn: _write(
            conn, fleet, source, lambda loc: line_of(document, loc), Progress(fleet, progress)
        ),
    )


def apply_fleet(
    dsn: str, fleet: Fleet, dry_run: bool = False, brokers: Sequence[str] | None = None
) -> Changes:
    """Make the database match an already-parsed fleet document, as :func:`import_fleet` does.

    The same guarantees: the references are checked before anything is written,
    the writes run in one transaction under the importers' advisory lock, only
    rows that differ are written (so applying the same fleet twice changes
    nothing), and ``dry_run`` counts the changes and rolls them back. Raises
    FleetError naming the entry (``controllers[0].name: ...``) on a problem,
    a broker outside ``brokers`` (when given) included.
    """
    _check(fleet, brokers)
    return _in_transaction(
        dsn, dry_run, lambda conn: _write(conn, fleet, _SOURCE, _no_line, Progress(fleet))
    )


def write_fleet(conn: Conn, fleet: Fleet) -> Changes:
    """What :func:`apply_fleet` does, inside the caller's open transaction on ``conn``.

    For a caller that reads and writes in one transaction: it calls
    :func:`hold_import_lock` before its reads, then this. A FleetError leaves the
    transaction to the caller, who lets it roll back.
    """
    _check(fleet)
    return _write(conn, fleet, _SOURCE, _no_line, Progress(fleet))


def hold_import_lock(conn: Conn) -> None:
    """Wait for, then hold until the transaction ends, the lock every fleet writer takes."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))


_SOURCE = "<fleet>"  # how problems name a document that never was a file


def _no_line(loc: Loc) -> int | None:
    return None


def _check(fleet: Fleet, brokers: Sequence[str] | None = None) -> None:
    found = check_references(fleet) + ([] if brokers is None else check_brokers(fleet, brokers))
    problems = [Problem(None, loc, message) for loc, message in found]
    if problems:
        raise problems_error(_SOURCE, problems)


def _in_transaction(dsn: str, dry_run: bool, write: Callable[[Conn], Changes]) -> Changes:
    try:
        with psycopg.connect(dsn) as conn, conn.transaction() as tx:
            changes = write(conn)
            if dry_run:
                raise psycopg.Rollback(tx)
    except psycopg.OperationalError as exc:
        raise FleetError(f"cannot reach the metadata database: {exc}".strip()) from None
    return changes


def _write(
    conn: Conn,
    fleet: Fleet,
    source: str,
    line: Callable[[Loc], int | None],
    progress: Progress,
) -> Changes:
    """Write a checked fleet under the lock; a refusal names ``source``, line and entry."""
    hold_import_lock(conn)
    try:
        return _apply(conn, fleet, progress)
    except Refused as exc:
        raise problems_error(source, [Problem(line(exc.loc), exc.loc, exc.message)]) from None


def _apply(conn: Conn, fleet: Fleet, progress: Progress) -> Changes:
    changes = Changes()
    type_ids = _apply_types(conn, fleet, changes)
    progress.advance(len(fleet.device_types))
    template_ids = _apply_templates(conn, fleet, type_ids, changes)
    progress.advance(len(fleet.templates))
    controller_ids = _apply_controllers(conn, fleet, template_ids, changes, progress)
    sensor_ids = _apply_sensors(conn, fleet, template_ids, changes, progress)
    _apply_wiring(conn, fleet, controller_ids, sensor_ids, changes, progress)
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
            rows = run(
                conn,
                loc,
                "INSERT INTO device_types (name, is_controller, is_sensor) VALUES (%s, %s, %s)"
                " RETURNING device_type_id",
                (entry.name, entry.is_controller, entry.is_sensor),
            )
            ids[entry.name] = rows[0][0]
            changes.add("device types", "created")
        elif have[1:] != (entry.is_controller, entry.is_sensor):
            run(
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
            rows = run(
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
            run(
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
            run(
                conn,
                dp_loc,
                "INSERT INTO datapoints (device_template_id, label, data_encoding, byte_offset,"
                " byte_length, byte_order, decimals, unit, json_field)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (template_id, dp.label, *wanted),
            )
            changes.add("datapoints", "created")
        elif (str(have[1]).lower(), *have[2:]) != wanted:
            run(
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
        run(conn, loc, "DELETE FROM datapoints WHERE datapoint_id = ANY(%s)", (gone,))
        changes.add("datapoints", "deleted", len(gone))


def _apply_controllers(
    conn: Conn, fleet: Fleet, template_ids: dict[str, int], changes: Changes, progress: Progress
) -> dict[str, int]:
    macs = [c.mac for c in fleet.controllers]
    current = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT mac_address, device_id, name, device_template_id, timezone, serial_number,"
            " broker, claiming_code FROM devices WHERE mac_address = ANY(%s)",
            (macs,),
        )
    }
    ids: dict[str, int] = {}
    inserts: list[Row] = []
    updates: list[Row] = []
    for i, entry in enumerate(fleet.controllers):
        loc: Loc = ("controllers", i)
        have = current.get(entry.mac)
        wanted = (
            entry.name,
            template_ids[entry.template],
            entry.timezone,
            entry.serial_number,
            entry.broker,
        )
        if have is None:
            inserts.append((loc, (*wanted, entry.claiming_code, entry.mac)))
            continue
        ids[entry.mac] = have[0]
        code = have[6] if entry.claiming_code is None else entry.claiming_code
        if (*have[1:6], have[6]) != (*wanted, code):
            updates.append((loc, (*wanted, code, have[0])))
    progress.advance(len(fleet.controllers) - len(inserts) - len(updates))
    for mac, device_id in bulk(conn, inserts, _INSERT_CONTROLLERS, progress):
        ids[mac] = device_id
    changes.add("controllers", "created", len(inserts))
    bulk(conn, updates, _UPDATE_CONTROLLERS, progress)
    changes.add("controllers", "updated", len(updates))
    return ids


_INSERT_CONTROLLERS = (
    "INSERT INTO devices (name, device_template_id, timezone, serial_number, broker,"
    " claiming_code, mac_address) SELECT n, t, z, s, b, c, m FROM unnest(%s::text[],"
    " %s::int[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
    " WITH ORDINALITY AS u(n, t, z, s, b, c, m, o) ORDER BY o RETURNING mac_address, device_id"
)
_UPDATE_CONTROLLERS = (
    "UPDATE devices d SET name = u.n, device_template_id = u.t, timezone = u.z,"
    " serial_number = u.s, broker = u.b, claiming_code = u.c FROM unnest(%s::text[],"
    " %s::int[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int[])"
    " AS u(n, t, z, s, b, c, id) WHERE d.device_id = u.id"
)


def _apply_sensors(
    conn: Conn, fleet: Fleet, template_ids: dict[str, int], changes: Changes, progress: Progress
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
    inserts: list[Row] = []
    updates: list[Row] = []
    for i, entry in enumerate(fleet.sensors):
        loc: Loc = ("sensors", i)
        matches = current.get(entry.name, [])
        wanted = (template_ids[entry.template], entry.serial_number)
        if len(matches) > 1:
            listed = ", ".join(str(m[0]) for m in matches)
            raise Refused(
                (*loc, "name"),
                f"{len(matches)} sensors in the database are named {entry.name!r}"
                f" (device ids {listed}); rename them so the name says which one is meant",
            )
        if not matches:
            inserts.append((loc, (entry.name, *wanted)))
            continue
        have = matches[0]
        ids[entry.name] = have[0]
        if tuple(have[1:]) != wanted:
            updates.append((loc, (*wanted, have[0])))
    progress.advance(len(fleet.sensors) - len(inserts) - len(updates))
    # Sensor names are unique in a checked fleet, so the name says which row is which.
    for name, device_id in bulk(conn, inserts, _INSERT_SENSORS, progress):
        ids[name] = device_id
    changes.add("sensors", "created", len(inserts))
    bulk(conn, updates, _UPDATE_SENSORS, progress)
    changes.add("sensors", "updated", len(updates))
    return ids


_INSERT_SENSORS = (
    "INSERT INTO devices (name, device_template_id, serial_number)"
    " SELECT n, t, s FROM unnest(%s::text[], %s::int[], %s::text[]) WITH ORDINALITY"
    " AS u(n, t, s, o) ORDER BY o RETURNING name, device_id"
)
_UPDATE_SENSORS = (
    "UPDATE devices d SET device_template_id = u.t, serial_number = u.s"
    " FROM unnest(%s::int[], %s::text[], %s::int[]) AS u(t, s, id) WHERE d.device_id = u.id"
)


def _apply_wiring(
    conn: Conn,
    fleet: Fleet,
    controller_ids: dict[str, int],
    sensor_ids: dict[str, int],
    changes: Changes,
    progress: Progress,
) -> None:
    ids = list(controller_ids.values())
    connectors = {
        (row[0], row[1]): row[2]
        for row in conn.execute(
            "SELECT controller_id, connector_number, connector_id FROM connectors"
            " WHERE controller_id = ANY(%s)",
            (ids,),
        )
    }
    current_of: dict[int, dict[tuple[int, int], tuple[int, int]]] = {}
    for row in conn.execute(
        "SELECT c.controller_id, c.connector_number, p.position, p.pin_id, p.device_id"
        " FROM pins p JOIN connectors c USING (connector_id) WHERE c.controller_id = ANY(%s)",
        (ids,),
    ):
        current_of.setdefault(row[0], {})[(row[1], row[2])] = (row[3], row[4])
    wanted_of: dict[str, dict[tuple[int, int], tuple[int, int]]] = {}
    for i, w in enumerate(fleet.wiring):
        wanted_of.setdefault(w.controller, {})[(w.connector, w.pin)] = (i, sensor_ids[w.sensor])
    removals: list[Row] = []
    rewires: list[Row] = []
    new_connectors: list[Row] = []
    new_pins: list[tuple[Loc, tuple[int, int], int, int]] = []  # loc, connector, position, device
    for ctl_index, ctl in enumerate(fleet.controllers):
        controller_id = controller_ids[ctl.mac]
        wanted = wanted_of.get(ctl.mac, {})
        current = current_of.get(controller_id, {})
        removals += [
            (("controllers", ctl_index), (pin_id,))
            for key, (pin_id, _) in current.items()
            if key not in wanted
        ]
        for (number, position), (i, device_id) in sorted(wanted.items()):
            loc: Loc = ("wiring", i)
            have = current.get((number, position))
            if have is not None:
                if have[1] != device_id:
                    rewires.append((loc, (device_id, have[0])))
                continue
            key = (controller_id, number)
            if key not in connectors:
                connectors[key] = -1  # created below, once
                new_connectors.append((loc, key))
            new_pins.append((loc, key, position, device_id))
    progress.advance(len(fleet.wiring) - len(rewires) - len(new_pins))
    # Removals first, so a sensor moved between pins never sits on two at once.
    bulk(conn, removals, "DELETE FROM pins WHERE pin_id = ANY(%s::int[])", progress, count=False)
    changes.add("wiring", "removed", len(removals))
    bulk(conn, rewires, _REWIRE, progress)
    changes.add("wiring", "rewired", len(rewires))
    for controller_id, number, connector_id in bulk(
        conn, new_connectors, _INSERT_CONNECTORS, progress, count=False
    ):
        connectors[(controller_id, number)] = connector_id
    pins = [(loc, (connectors[key], position, device)) for loc, key, position, device in new_pins]
    bulk(conn, pins, _INSERT_PINS, progress)
    changes.add("wiring", "created", len(pins))


_REWIRE = (
    "UPDATE pins p SET device_id = u.d FROM unnest(%s::int[], %s::int[]) AS u(d, id)"
    " WHERE p.pin_id = u.id"
)
_INSERT_CONNECTORS = (
    "INSERT INTO connectors (controller_id, connector_number)"
    " SELECT c, n FROM unnest(%s::int[], %s::int[]) WITH ORDINALITY AS u(c, n, o) ORDER BY o"
    " RETURNING controller_id, connector_number, connector_id"
)
_INSERT_PINS = (
    "INSERT INTO pins (connector_id, position, device_id)"
    " SELECT c, p, d FROM unnest(%s::int[], %s::int[], %s::int[]) WITH ORDINALITY"
    " AS u(c, p, d, o) ORDER BY o"
)
