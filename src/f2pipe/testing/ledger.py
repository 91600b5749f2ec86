"""Reading a run's ledger against the database: which rows each ledger reading must be."""

from __future__ import annotations

import psycopg

__all__ = ["datapoint_map"]


def datapoint_map(dsn: str) -> dict[tuple[str, int, int, str], tuple[int, int]]:
    """(controller MAC, connector number, pin, label) -> (sensor device_id, datapoint_id)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.mac_address, cn.connector_number, p.position, dp.label,"
            "       p.device_id, dp.datapoint_id"
            "  FROM pins p"
            "  JOIN connectors cn USING (connector_id)"
            "  JOIN devices c ON c.device_id = cn.controller_id"
            "  JOIN devices s ON s.device_id = p.device_id"
            "  JOIN datapoints dp ON dp.device_template_id = s.device_template_id"
        ).fetchall()
    return {(mac, int(n), int(pin), label): (dev, dp) for mac, n, pin, label, dev, dp in rows}
