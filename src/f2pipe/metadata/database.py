"""Database schema migrations and the demo fleet (``f2pipe db migrate | seed-demo``).

Migrations are the ``schema/NNNN_*.sql`` files, applied once each in name order,
each in its own transaction, recorded in ``schema_migrations``; a session-level
advisory lock serialises concurrent migrators. After the files, the TimescaleDB
step runs every time (idempotently): with the extension available,
``decoded_data`` becomes a hypertable with compression, retention and an hourly
continuous aggregate; without it, a plain ``decoded_data_hourly`` view stands in
for the aggregate and one log line says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from f2pipe.errors import MigrationError
from f2pipe.settings import Settings, get_settings

log = logging.getLogger(__name__)

_LOCK_KEY = 0xF2_91_9E  # advisory lock id shared by every migrator


def migration_files() -> list[tuple[str, str]]:
    """(name, SQL) of every migration shipped with the package, in apply order."""
    schema = resources.files("f2pipe.metadata") / "schema"
    names = sorted(p.name for p in schema.iterdir() if p.name.endswith(".sql"))
    return [(name, (schema / name).read_text(encoding="utf-8")) for name in names]


def migrate(dsn: str, settings: Settings | None = None) -> list[str]:
    """Apply pending migrations to ``dsn``; return the names applied. Idempotent.

    Raises MigrationError (naming the file) when one fails; that file's
    transaction is rolled back, so nothing of it is half-applied.
    """
    settings = settings or get_settings()
    applied: list[str] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for name, text in migration_files():
                if name in done:
                    continue
                try:
                    with conn.transaction():
                        conn.execute(text.encode())
                        conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                except psycopg.Error as exc:
                    raise MigrationError(f"{name}: {exc}".strip()) from exc
                applied.append(name)
            _timescale_step(conn, settings)
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    except psycopg.OperationalError as exc:
        raise MigrationError(f"cannot connect to {_redact(dsn)}: {exc}".strip()) from exc
    return applied


def timescale_available(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    """True when the TimescaleDB extension is installed and preloaded (it must be both)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),"
        " current_setting('shared_preload_libraries') LIKE '%%timescaledb%%'"
    ).fetchone()
    if row is None or not row[0]:
        return False
    if not row[1]:
        log.warning(
            "TimescaleDB is installed but not in shared_preload_libraries;"
            " add it there and restart PostgreSQL to get hypertables"
        )
        return False
    return True


def _timescale_step(conn: psycopg.Connection[tuple[object, ...]], settings: Settings) -> None:
    if not timescale_available(conn):
        log.info("TimescaleDB extension not available: decoded_data is a plain PostgreSQL table")
        conn.execute(
            "CREATE OR REPLACE VIEW decoded_data_hourly AS"
            " SELECT date_trunc('hour', timestamp) AS bucket, device_id, datapoint_id,"
            " avg(value) AS avg_value, min(value) AS min_value, max(value) AS max_value,"
            " count(*) AS samples FROM decoded_data GROUP BY 1, 2, 3"
        )
        return
    # Written from TimescaleDB 2.x's documented API; every call is idempotent.
    with conn.transaction():
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        conn.execute(
            "SELECT create_hypertable('decoded_data', by_range('timestamp'),"
            " if_not_exists => TRUE, migrate_data => TRUE)"
        )
        row = conn.execute(
            "SELECT compression_enabled FROM timescaledb_information.hypertables"
            " WHERE hypertable_name = 'decoded_data'"
        ).fetchone()
        if not (row and row[0]):
            conn.execute(
                "ALTER TABLE decoded_data SET (timescaledb.compress,"
                " timescaledb.compress_segmentby = 'device_id, datapoint_id',"
                " timescaledb.compress_orderby = 'timestamp DESC')"
            )
        conn.execute(
            "SELECT add_compression_policy('decoded_data', compress_after => %s::interval,"
            " if_not_exists => TRUE)",
            (settings.compress_after,),
        )
        conn.execute(
            "SELECT add_retention_policy('decoded_data', drop_after => %s::interval,"
            " if_not_exists => TRUE)",
            (settings.retention,),
        )
        is_aggregate = conn.execute(
            "SELECT 1 FROM timescaledb_information.continuous_aggregates"
            " WHERE view_name = 'decoded_data_hourly'"
        ).fetchone()
        if not is_aggregate:
            # The plain stand-in from a run before the extension was there.
            conn.execute("DROP VIEW IF EXISTS decoded_data_hourly")
    # A continuous aggregate cannot be created inside a transaction block.
    conn.execute(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS decoded_data_hourly"
        " WITH (timescaledb.continuous) AS"
        " SELECT time_bucket('1 hour', timestamp) AS bucket, device_id, datapoint_id,"
        " avg(value) AS avg_value, min(value) AS min_value, max(value) AS max_value,"
        " count(*) AS samples FROM decoded_data GROUP BY 1, 2, 3 WITH NO DATA"
    )
    conn.execute(
        "SELECT add_continuous_aggregate_policy('decoded_data_hourly',"
        " start_offset => INTERVAL '3 hours', end_offset => INTERVAL '1 hour',"
        " schedule_interval => INTERVAL '1 hour', if_not_exists => TRUE)"
    )
    log.info("TimescaleDB: decoded_data is a compressed hypertable with retention")


# --- the demo fleet (SPEC section 3) ---------------------------------------------------


@dataclass(frozen=True)
class DemoDatapoint:
    label: str
    data_encoding: str
    byte_offset: int
    byte_length: int
    decimals: int
    unit: str


DEMO_TEMPLATES: dict[str, tuple[DemoDatapoint, ...]] = {
    "Environmental Sensor": (
        DemoDatapoint("Temperature", "int16", 0, 2, 2, "°C"),
        DemoDatapoint("Humidity", "uint16", 2, 2, 2, "%"),
        DemoDatapoint("CO2", "uint16", 4, 2, 0, "ppm"),
    ),
    "Power Monitor": (
        DemoDatapoint("Voltage", "uint16", 0, 2, 1, "V"),
        DemoDatapoint("Current", "uint16", 2, 2, 3, "A"),
    ),
}
DEMO_CONTROLLERS = tuple(f"aabbccddee0{n}" for n in range(1, 5))
# sensor name, template, controller MAC, connector number, pin position
DEMO_WIRING = (
    ("Living Room Env Sensor", "Environmental Sensor", "aabbccddee01", 1, 1),
    ("Kitchen Power Monitor", "Power Monitor", "aabbccddee02", 2, 2),
    ("Bedroom Env Sensor", "Environmental Sensor", "aabbccddee03", 4, 3),
    ("Office Env Sensor", "Environmental Sensor", "aabbccddee04", 1, 1),
)


def seed_demo(dsn: str, state_dir: Path) -> dict[str, str]:
    """Load the demo fleet, idempotently, in one transaction; return MAC -> claiming code.

    Claiming codes are generated once and kept in ``<state>/claiming-codes.json``
    (mode 0600); a re-run keeps the existing ones.
    """
    codes_file = state_dir / "claiming-codes.json"
    codes: dict[str, str] = json.loads(codes_file.read_text()) if codes_file.exists() else {}
    with psycopg.connect(dsn) as conn, conn.transaction():
        controller_type = _upsert_type(conn, "F2 Controller", controller=True)
        sensor_type = _upsert_type(conn, "RS-485 Sensor", controller=False)
        controller_tpl = _upsert_template(conn, "F2 Controller", "F2", controller_type)
        for mac in DEMO_CONTROLLERS:
            code = codes.setdefault(mac, secrets.token_urlsafe(12))
            conn.execute(
                "INSERT INTO devices (name, device_template_id, mac_address, claiming_code,"
                " timezone) VALUES (%s, %s, %s, %s, 'UTC')"
                " ON CONFLICT (mac_address) DO UPDATE SET claiming_code ="
                " COALESCE(devices.claiming_code, EXCLUDED.claiming_code)",
                (f"F2 Controller {mac}", controller_tpl, mac, code),
            )
        for name, datapoints in DEMO_TEMPLATES.items():
            tpl = _upsert_template(conn, name, name, sensor_type)
            for dp in datapoints:
                conn.execute(
                    "INSERT INTO datapoints (device_template_id, label, data_encoding,"
                    " byte_offset, byte_length, decimals, unit) VALUES (%s,%s,%s,%s,%s,%s,%s)"
                    " ON CONFLICT (device_template_id, label) DO NOTHING",
                    (
                        tpl,
                        dp.label,
                        dp.data_encoding,
                        dp.byte_offset,
                        dp.byte_length,
                        dp.decimals,
                        dp.unit,
                    ),
                )
        for sensor, template, mac, number, position in DEMO_WIRING:
            _wire(conn, sensor, template, mac, number, position)
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(codes_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(codes, out, indent=2)
    return codes


def _upsert_type(conn: psycopg.Connection[tuple[object, ...]], name: str, controller: bool) -> int:
    row = conn.execute(
        "INSERT INTO device_types (name, is_controller, is_sensor) VALUES (%s, %s, %s)"
        " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING device_type_id",
        (name, controller, not controller),
    ).fetchone()
    assert row is not None
    return int(str(row[0]))


def _upsert_template(
    conn: psycopg.Connection[tuple[object, ...]], name: str, model: str, type_id: int
) -> int:
    row = conn.execute(
        "INSERT INTO device_templates (name, model, device_type_id) VALUES (%s, %s, %s)"
        " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING device_template_id",
        (name, model, type_id),
    ).fetchone()
    assert row is not None
    return int(str(row[0]))


def _wire(
    conn: psycopg.Connection[tuple[object, ...]],
    sensor: str,
    template: str,
    mac: str,
    number: int,
    position: int,
) -> None:
    row = conn.execute(
        "SELECT d.device_id FROM pins p JOIN connectors c USING (connector_id)"
        " JOIN devices ctl ON ctl.device_id = c.controller_id"
        " JOIN devices d ON d.device_id = p.device_id"
        " WHERE ctl.mac_address = %s AND c.connector_number = %s AND p.position = %s",
        (mac, number, position),
    ).fetchone()
    if row is not None:
        return
    sensor_row = conn.execute(
        "INSERT INTO devices (name, device_template_id) SELECT %s, device_template_id"
        " FROM device_templates WHERE name = %s RETURNING device_id",
        (sensor, template),
    ).fetchone()
    connector_row = conn.execute(
        "INSERT INTO connectors (controller_id, connector_number)"
        " SELECT device_id, %s FROM devices WHERE mac_address = %s"
        " ON CONFLICT (controller_id, connector_number) DO UPDATE"
        " SET connector_number = EXCLUDED.connector_number RETURNING connector_id",
        (number, mac),
    ).fetchone()
    assert sensor_row is not None
    assert connector_row is not None
    conn.execute(
        "INSERT INTO pins (connector_id, position, device_id) VALUES (%s, %s, %s)",
        (connector_row[0], position, sensor_row[0]),
    )


def create_database(admin_dsn: str, name: str) -> None:
    """Create database ``name`` on the server of ``admin_dsn`` if it does not exist."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _redact(dsn: str) -> str:
    """The DSN with any password masked, for messages."""
    password = urlsplit(dsn).password
    return dsn.replace(f":{password}@", ":***@") if password else dsn


# --- CLI -----------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    sub.add_parser("migrate", help="apply pending schema migrations (idempotent)").set_defaults(
        func=_cmd_migrate
    )
    sub.add_parser(
        "seed-demo", help="load the demo fleet of SPEC section 3 (idempotent)"
    ).set_defaults(func=_cmd_seed)


def _cmd_migrate(args: argparse.Namespace) -> int:
    settings = get_settings()
    dsns = dict.fromkeys([settings.metadata_dsn, settings.timeseries_dsn])
    for dsn in dsns:
        applied = migrate(dsn, settings)
        print(
            f"{_redact(dsn)}: {len(applied)} migration(s) applied"
            + (f" ({', '.join(applied)})" if applied else ", schema up to date")
        )
    return 0


def _cmd_seed(args: argparse.Namespace) -> int:
    settings = get_settings()
    codes = seed_demo(settings.metadata_dsn, settings.state_dir)
    print(
        f"demo fleet loaded: {len(codes)} controllers, {len(DEMO_WIRING)} sensors;"
        f" claiming codes in {settings.state_dir / 'claiming-codes.json'}"
    )
    return 0
