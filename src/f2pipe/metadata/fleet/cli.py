"""``f2pipe fleet import FILE.yaml``, ``fleet export [FILE]``, ``fleet schema`` and
``fleet sync-acls`` (:mod:`f2pipe.operations.aclsync`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from f2pipe.metadata.fleet.exporter import export_fleet
from f2pipe.metadata.fleet.importer import import_fleet
from f2pipe.metadata.fleet.schema import fleet_json_schema
from f2pipe.runtime.mqttbrokers import broker_names
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
    sub.add_parser(
        "schema", help="print the JSON Schema (draft 2020-12) of fleet files, for editors"
    ).set_defaults(func=_cmd_schema)
    from f2pipe.operations import aclsync

    aclsync.configure(
        sub.add_parser(
            "sync-acls",
            help="write each broker's ACL from the metadata (several brokers)",
            description="Write DIR/<broker>/acl for every broker of F2PIPE_MQTT_BROKERS: each "
            "admits only the controllers the metadata assigns to it. Once, or with --every "
            "as a service (the compose render's broker-acls).",
        )
    )


class ProgressLine:
    """``entries done / total`` on one rewritten line of ``stream``, at most once a second.

    Only a person at a terminal wants it: nothing is written unless ``stream``
    is a TTY, so logs and pipes stay clean.
    """

    def __init__(self, stream: TextIO, interval: float = 1.0) -> None:
        self.stream = stream
        self.active = stream.isatty()
        self.interval = interval
        self.start = self.last = time.monotonic()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.active or (now - self.last < self.interval and done < total):
            return
        self.last = now
        self._show(f"{done:,} of {total:,} entries written or checked")

    def note(self, text: str) -> None:
        """Say what is happening before there is a count (reading a large file)."""
        if self.active:
            self._show(text)

    def _show(self, text: str) -> None:
        # Back to the line's start, and erase what a longer previous text left behind.
        self.stream.write(f"\rfleet import: {text}\x1b[K")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write(f" ({time.monotonic() - self.start:.1f} s)\n")
            self.stream.flush()


def _cmd_import(args: argparse.Namespace) -> int:
    progress = ProgressLine(sys.stderr)
    progress.note(f"reading and checking {args.file}")
    settings = get_settings()
    try:
        changes = import_fleet(
            settings.metadata_dsn,
            args.file,
            dry_run=args.dry_run,
            progress=progress,
            brokers=broker_names(settings),
        )
    finally:
        progress.close()
    prefix = "dry run, would write: " if args.dry_run and changes.total else ""
    print(f"{args.file}: {prefix}{changes.summary()}")
    if changes.total and not args.dry_run and settings.mqtt_brokers > 1:
        # The local brokers' ACLs name their controllers one by one: bring them up to date.
        from f2pipe.operations.stack.mqtt_shards import sync_acls

        if rewritten := sync_acls(settings):
            print(f"broker ACLs rewritten: {', '.join(rewritten)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    text = export_fleet(get_settings().metadata_dsn, args.with_claiming_codes)
    if args.file is None:
        sys.stdout.write(text)
        return 0
    mode = 0o600 if args.with_claiming_codes else 0o644
    fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    if args.with_claiming_codes:
        os.fchmod(fd, mode)  # an existing file keeps its mode through open()
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(fleet_json_schema(), indent=2, ensure_ascii=False))
    return 0
