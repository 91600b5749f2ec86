"""``f2pipe fleet import FILE.yaml`` and ``f2pipe fleet export [FILE]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from f2pipe.metadata.fleet.exporter import export_fleet
from f2pipe.metadata.fleet.importer import import_fleet
from f2pipe.settings import get_settings


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
