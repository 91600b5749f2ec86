"""Database schema migrations and the demo fleet (``f2pipe db migrate | seed-demo``).

Migrations are the ``schema/NNNN_*.sql`` files, applied once each in name order,
each in its own transaction, recorded in ``schema_migrations``; a session-level
advisory lock serialises concurrent migrators. After the files, the TimescaleDB
step runs every time (idempotently): with the extension available,
``decoded_data`` becomes a hypertable with compression, retention and an hourly
continuous aggregate; without it, a plain ``decoded_data_hourly`` view stands in
for the aggregate and one log line says so.

The demo fleet is a fleet document shipped beside this module
(``demo-fleet.yaml``); ``seed-demo`` writes it with the fleet importer, the one
writer of fleets, and keeps the controllers' claiming codes in the state folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
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
            # Zones a PostgreSQL upgrade added since the copy was taken (0005).
            conn.execute(
                "INSERT INTO timezone_names SELECT DISTINCT name FROM pg_timezone_names"
                " ON CONFLICT DO NOTHING"
            )
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
            (f"{settings.compress_after_days} days",),
        )
        conn.execute(
            "SELECT add_retention_policy('decoded_data', drop_after => %s::interval,"
            " if_not_exists => TRUE)",
            (f"{settings.retention_days} days",),
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


def seed_demo(dsn: str, state_dir: Path) -> dict[str, str]:
    """Load the demo fleet, idempotently, in one transaction; return MAC -> claiming code.

    The demo controllers missing from the database are written through the fleet
    importer, with their sensors and wiring and the demo's types and templates.
    A demo controller already there is left as it is (an operator's changes to
    it, or a simulator's wiring, survive every ``f2pipe up``), except that a
    missing claiming code is filled in. Claiming codes are generated once and
    kept in ``<state>/claiming-codes.json`` (mode 0600); a re-run keeps the
    existing ones, and a code already in the database wins. Raises FleetError
    when the database refuses an entry (then nothing is written).
    """
    # Here, not at the top: `f2pipe db migrate` needs neither YAML nor the fleet models.
    from f2pipe.metadata.fleet.demo import demo_fleet
    from f2pipe.metadata.fleet.importer import hold_import_lock, write_fleet

    codes_file = state_dir / "claiming-codes.json"
    codes: dict[str, str] = json.loads(codes_file.read_text()) if codes_file.exists() else {}
    fleet = demo_fleet()
    macs = [c.mac for c in fleet.controllers]
    for mac in macs:
        codes.setdefault(mac, secrets.token_urlsafe(12))
    with psycopg.connect(dsn) as conn, conn.transaction():
        hold_import_lock(conn)  # before the read, so no other writer comes in between
        present = {
            row[0]
            for row in conn.execute(
                "SELECT mac_address FROM devices WHERE mac_address = ANY(%s)", (macs,)
            )
        }
        missing = [
            c.model_copy(update={"claiming_code": codes[c.mac]})
            for c in fleet.controllers
            if c.mac not in present
        ]
        if missing:
            wiring = [w for w in fleet.wiring if w.controller not in present]
            wired = {w.sensor for w in wiring}
            sensors = [s for s in fleet.sensors if s.name in wired]
            write_fleet(
                conn,
                fleet.model_copy(
                    update={"controllers": missing, "sensors": sensors, "wiring": wiring}
                ),
            )
        # A present controller keeps its code; one without gets the state folder's.
        for mac in present:
            conn.execute(
                "UPDATE devices SET claiming_code = %s"
                " WHERE mac_address = %s AND claiming_code IS NULL",
                (codes[mac], mac),
            )
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(codes_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through open()
    with os.fdopen(fd, "w") as out:
        json.dump(codes, out, indent=2)
    return codes


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
    from f2pipe.metadata.fleet.demo import demo_fleet

    codes = seed_demo(settings.metadata_dsn, settings.state_dir)
    print(
        f"demo fleet loaded: {len(codes)} controllers, {len(demo_fleet().sensors)} sensors;"
        f" claiming codes in {settings.state_dir / 'claiming-codes.json'}"
    )
    if settings.mqtt_brokers > 1:  # unassigned controllers belong in mqtt-1's ACL
        from f2pipe.operations.stack.mqtt_shards import sync_acls

        if rewritten := sync_acls(settings):
            print(f"broker ACLs rewritten: {', '.join(rewritten)}")
    return 0
