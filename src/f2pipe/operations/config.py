"""``f2pipe config``: the effective settings (``show``), their validation (``check``), and
the reference of every setting (``reference``, the source of ``docs/settings.md``).

``show`` masks every secret: ``SecretStr`` settings print as ``****`` and a
password inside a URL (user info or a ``password=`` parameter) is replaced.
``check`` starts nothing and contacts no server; it exits 1 with one line per
problem (a bad value, an unreadable file, inconsistent Kafka security).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BeforeValidator, SecretStr
from pydantic.fields import FieldInfo

from f2pipe._settings_values import (
    CONFIG_FILE_VARIABLE,
    DEPRECATED_NAMES,
    URL_SECRETS,
    config_file_values,
    parse_duration,
    variable,
)
from f2pipe.errors import ConfigError
from f2pipe.settings import FILE_KEYS, Settings, load_settings, shown_value

REFERENCE_COMMAND = "f2pipe config reference --output docs/settings.md"

# Defaults that depend on the machine or on another setting, as the reference states them.
_DEFAULT_TEXT = {
    "state_dir": "`var/` in the checkout, else under the working directory",
    "timeseries_dsn": "the metadata DSN",
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="print the effective settings and where each comes from")
    show.set_defaults(func=_show)
    check = sub.add_parser("check", help="validate the settings and the files they name")
    check.set_defaults(func=_check)
    reference = sub.add_parser("reference", help="every setting as a Markdown table")
    reference.add_argument("--output", type=Path, help="write to this file (default stdout)")
    reference.set_defaults(func=_reference)


def sources(settings: Settings) -> dict[str, str]:
    """Where each setting's value comes from: environment, file, default (or keyword)."""
    file_path = os.environ.get(CONFIG_FILE_VARIABLE)
    in_file = config_file_values(file_path, FILE_KEYS)
    old_names = {new: old for old, new in DEPRECATED_NAMES.items()}
    found: dict[str, str] = {}
    for name in Settings.model_fields:
        old = old_names.get(name)
        if variable(name) in os.environ:
            found[name] = "environment"
        elif name in URL_SECRETS and variable(name) + "_FILE" in os.environ:
            found[name] = f"environment ({variable(name)}_FILE)"
        elif old is not None and variable(old) in os.environ:
            found[name] = f"environment ({variable(old)}, deprecated)"
        elif name in in_file:
            found[name] = f"file {file_path}"
        elif name in settings.model_fields_set:
            found[name] = "given"
        else:
            found[name] = "default"
    return found


def show_lines(settings: Settings) -> list[str]:
    """``F2PIPE_NAME=value  # source`` for every setting, secrets masked."""
    where = sources(settings)
    return [
        f"{variable(name)}={shown_value(name, getattr(settings, name))}  # {where[name]}"
        for name in Settings.model_fields
    ]


def _show(args: argparse.Namespace) -> int:
    print("\n".join(show_lines(load_settings())))
    return 0


def problems(settings: Settings) -> list[str]:
    """One line per unreadable file a setting names, then Kafka security inconsistencies."""
    found = []
    for name, field in Settings.model_fields.items():
        path = getattr(settings, name)
        if name == "state_dir" or not isinstance(path, Path) or _base_type(field) is not Path:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            found.append(f"{variable(name)}: cannot read {path}: {exc.strerror}")
    if not found:
        from f2pipe.runtime.kafka import client_config

        try:
            client_config(settings)
        except ConfigError as exc:
            found.append(str(exc))
    return found


# F2PIPE_ variables that are not settings, read by the deployment and the tests.
OTHER_VARIABLES = frozenset({"F2PIPE_IMAGE", "F2PIPE_BENCH_FRAMES", "F2PIPE_TIMESCALE_ADMIN_DSN"})


def unknown_variables() -> list[str]:
    """``F2PIPE_`` variables in the environment that no setting reads (typos, old names)."""
    known = {variable(name) for name in Settings.model_fields}
    known |= {variable(old) for old in DEPRECATED_NAMES}
    known |= {variable(name) + "_FILE" for name in URL_SECRETS}
    return sorted(
        name
        for name in os.environ
        if name.startswith("F2PIPE_") and name not in known | OTHER_VARIABLES
    )


def _check(args: argparse.Namespace) -> int:
    settings = load_settings()
    for name in unknown_variables():
        print(f"f2pipe config: note: {name} is not a setting (ignored)", file=sys.stderr)
    found = problems(settings)
    for line in found:
        print(f"f2pipe config: error: {line}", file=sys.stderr)
    if found:
        return 1
    counted: dict[str, int] = {}
    for source in sources(settings).values():
        counted[source] = counted.get(source, 0) + 1
    summary = ", ".join(f"{n} from {source}" for source, n in sorted(counted.items()))
    print(f"settings are valid ({summary})")
    return 0


# --- reference ---------------------------------------------------------------------------


def _base_type(field: FieldInfo) -> Any:
    """The field's type without ``| None``."""
    annotation = field.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else annotation
    return annotation


def type_text(field: FieldInfo) -> str:
    """How the reference names a field's type."""
    for meta in field.metadata:
        func = getattr(meta, "func", None) if isinstance(meta, BeforeValidator) else None
        if isinstance(func, functools.partial) and func.func is parse_duration:
            unit = {0.001: "ms", 1.0: "s", 86400.0: "days"}[func.keywords["unit_seconds"]]
            return f"duration ({unit})"
    base = _base_type(field)
    if get_origin(base) is Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in get_args(base))
    names = {str: "text", int: "integer", float: "number", bool: "true/false", Path: "path"}
    return "secret" if base is SecretStr else names.get(base, str(base))


def _default_text(name: str, field: FieldInfo) -> str:
    if name in _DEFAULT_TEXT:
        return _DEFAULT_TEXT[name]
    if field.default is None or field.default == "":
        return "unset"
    if isinstance(field.default, bool):
        return f"`{str(field.default).lower()}`"
    return f"`{field.default}`"


def reference() -> str:
    """Every setting as Markdown: variable, TOML key, type, default, description."""
    lines = [
        "# Settings",
        "",
        f"Generated from the settings model by `{REFERENCE_COMMAND}`;",
        "do not edit by hand.",
        "",
        "Every setting is read from the environment variable in the first column or",
        f"from the TOML file named by `{CONFIG_FILE_VARIABLE}`, whose keys are the",
        'lower-case names without the prefix (`kafka_bootstrap = "host:9092"`).',
        "Environment variables override the file; an unknown key in the file, or a",
        "bad value anywhere, stops the command with one line naming it.",
        "`f2pipe config show` prints the effective settings, secrets masked, with",
        "where each comes from; `f2pipe config check` validates them and the files",
        "they name without starting anything.",
        "",
        "Secrets may come from files: `_PASSWORD_FILE`, `_TOKEN_FILE` and",
        "`_PASSPHRASE_FILE` settings are listed below, and a URL that may carry a",
        "password is also read from the file its variable plus `_FILE` names",
        "(" + ", ".join(f"`{variable(name)}_FILE`" for name in URL_SECRETS) + ").",
        "",
        "Durations: the name ends in the unit of a bare number (`_MS`, `_S`,",
        "`_DAYS`), and every duration also takes a number with a unit: `500ms`,",
        "`90s`, `5m`, `2h`, `7d`, `7 days`. Renamed settings still work under their",
        "old names, with one deprecation line:",
        "",
        *(f"- `{variable(old)}` → `{variable(new)}`" for old, new in DEPRECATED_NAMES.items()),
        "",
        "| variable | TOML key | type | default | description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        key = "(environment only)" if name not in FILE_KEYS else f"`{name}`"
        description = (field.description or "").replace("|", "\\|")
        lines.append(
            f"| `{variable(name)}` | {key} | {type_text(field)} "
            f"| {_default_text(name, field)} | {description} |"
        )
    return "\n".join(lines) + "\n"


def _reference(args: argparse.Namespace) -> int:
    text = reference()
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0
