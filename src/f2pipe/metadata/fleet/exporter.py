"""The fleet in the database written out as a fleet document (``f2pipe fleet export``)."""

from __future__ import annotations

from typing import Any

import psycopg
import yaml

from f2pipe.errors import FleetError
from f2pipe.metadata.fleet.document import FORMAT_VERSION


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
            "SELECT d.name, d.mac_address, t.name, d.timezone, d.serial_number, d.claiming_code,"
            " d.broker"
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
                    "broker": broker,
                }
            )
            for name, mac, template, tz, serial, code, broker in controllers
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
