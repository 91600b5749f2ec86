"""The ``f2pipe`` command: one subcommand per service or tool.

Each subcommand lives in its own module, imported only when chosen so that a
quick tool (``f2pipe decode``) does not pay for the Kafka or HTTP stacks. A
module exposes ``configure(parser)``, which adds its arguments and sets
``func`` (called with the parsed namespace, returning the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from f2pipe._version import package_version, python_version
from f2pipe.errors import F2PipeError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("f2pipe.operations.pipeline:configure_up", "start the whole pipeline in the background"),
    "down": ("f2pipe.operations.pipeline:configure_down", "stop what `f2pipe up` started"),
    "run": (
        "f2pipe.operations.pipeline:configure_run",
        "the whole pipeline in the foreground, live view",
    ),
    "connector": (
        "f2pipe.connector.runner",
        "bridge device messages from MQTT into Kafka (raw-iot-data)",
    ),
    "processor": ("f2pipe.processor.runner", "decode raw frames into readings (stream processor)"),
    "sink": (
        "f2pipe.sink.runner",
        "write processed readings from Kafka into the time-series database",
    ),
    "status": (
        "f2pipe.operations.statusview",
        "each service up or down, throughput, lag, dead letters",
    ),
    "stack": ("f2pipe.operations.stack", "install, start, stop or inspect the local servers"),
    "db": ("f2pipe.metadata.database", "migrate the database schema and seed the demo fleet"),
    "dlq": ("f2pipe.tools.dlq", "list, show or replay dead letters"),
    "config": ("f2pipe.operations.config", "show, check or list the settings"),
    "deploy": (
        "f2pipe.operations.deploy",
        "write a deployment's configuration (compose file, deploy/) from f2pipe's own code",
    ),
    "fleet": ("f2pipe.metadata.fleet.cli", "import or export a fleet description (YAML)"),
    "simulate": (
        "f2pipe.tools.simulator.cli",
        "simulate F2 controllers: live telemetry or a counted load",
    ),
    "cmnd": ("f2pipe.tools.cmnd", "send a command to a device (as svc-commander)"),
    "certgen": ("f2pipe.pki.cli", "certificate authority: init, serve the API, issue, revoke"),
    "decode": ("f2pipe.tools.decode", "decode one F2 message and print its readings or reason"),
    "bench": ("f2pipe.tools.bench", "benchmark the whole pipeline on this machine"),
}

# What a person is doing -> the commands for it, in the order the help lists them.
GROUPS: dict[str, tuple[str, ...]] = {
    "run the pipeline": ("up", "down", "run", "connector", "processor", "sink"),
    "operate it": ("status", "stack", "db", "dlq", "config", "deploy"),
    "manage the fleet": ("fleet", "simulate", "cmnd"),
    "certificates": ("certgen",),
    "tools": ("decode", "bench"),
}

CONFIGURATION_HELP = (
    "configuration: F2PIPE_* environment variables, or the TOML file named by\n"
    "F2PIPE_CONFIG_FILE (lower-case names without the prefix; variables override it).\n"
    "`f2pipe config show` prints the effective settings, `f2pipe config check`\n"
    "validates them, docs/settings.md lists them all. Services take --log-level\n"
    "(default F2PIPE_LOG_LEVEL, else info)."
)


def _command_list() -> str:
    width = max(len(name) for name in COMMANDS) + 2
    parts = []
    for group, names in GROUPS.items():
        parts.append(f"{group}:")
        parts.extend(f"  {name:<{width}}{COMMANDS[name][1]}" for name in names)
        parts.append("")
    return "\n".join([*parts, CONFIGURATION_HELP])


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="f2pipe",
        usage="f2pipe [-h] [--version] COMMAND ...",
        description="F2 telemetry pipeline: MQTT -> Kafka -> TimescaleDB.",
        epilog=_command_list(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"f2pipe {package_version()} (Python {python_version()})",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS
    )
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=text, description=text)
        if name == chosen:
            # "package.module:function" names a configure function other than `configure`.
            module_name, _, function = module.partition(":")
            getattr(importlib.import_module(module_name), function or "configure")(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_in)
    args, extra = parser.parse_known_args(args_in)
    if hasattr(args, "rest"):
        # A command that passes its arguments through (``bench``) gets them as typed:
        # argparse.REMAINDER alone would leave out options before its first word.
        args.rest = args_in[args_in.index(args.command) + 1 :]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*args_in, "--help"])
        return 2
    try:
        return int(func(args) or 0)
    except F2PipeError as exc:
        print(f"f2pipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`f2pipe dlq list | head`): stop quietly, as a pipe
        # filter does, and keep Python from complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
