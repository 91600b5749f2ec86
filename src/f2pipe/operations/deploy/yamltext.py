"""YAML text for the rendered files: deterministic, readable, with comments.

PyYAML writes the data (so quoting is always right); this module only puts a
comment block before a top-level entry or a service, keeps the key order the
renderer chose, and writes multi-line strings (scripts) as literal blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["Commented", "document"]


@dataclass(frozen=True)
class Commented:
    """A mapping entry with the comment lines written above it."""

    value: Any
    comment: Sequence[str] = field(default_factory=tuple)


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        # Sequences indented under their key, as Compose files usually are.
        super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


def _list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.SequenceNode:
    # Short lists of plain words on one line ([CMD, pg_isready, ...]); the rest one per line.
    plain = all(isinstance(v, str | int) and "\n" not in str(v) for v in value)
    short = sum(len(str(v)) + 2 for v in value) < _FLOW_WIDTH
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=plain and short)


def _none(dumper: yaml.SafeDumper, value: None) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:null", "")  # `name:`, not `name: null`


_FLOW_WIDTH = 72
# Long values (commands, JAAS lines) stay on one line: folding would hide what runs.
_NO_FOLDING = 10_000
_Dumper.add_representer(type(None), _none)
_Dumper.add_representer(str, _str)
_Dumper.add_representer(list, _list)


def _dump(data: object, indent: int) -> str:
    text = yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=_NO_FOLDING,
        allow_unicode=True,
    )  # fmt: skip
    pad = " " * indent
    return "".join(pad + line if line.strip() else line for line in text.splitlines(True))


def _comment(lines: Sequence[str], indent: int) -> str:
    pad = " " * indent
    return "".join(f"{pad}# {line}".rstrip() + "\n" for line in lines)


def document(header: Sequence[str], sections: dict[str, Commented]) -> str:
    """A YAML document: ``header`` as comments, then each top-level key with its comment.

    A section whose value is a mapping of :class:`Commented` (services) gets a
    comment before each of its entries too. Blank lines separate sections and entries.
    """
    parts = [_comment(header, 0)]
    for key, section in sections.items():
        parts.append("\n" + _comment(section.comment, 0))
        value = section.value
        if (
            isinstance(value, dict)
            and value
            and all(isinstance(v, Commented) for v in value.values())
        ):
            parts.append(f"{key}:\n")
            for index, (name, entry) in enumerate(value.items()):
                if index:
                    parts.append("\n")
                parts.append(_comment(entry.comment, 2))
                parts.append(_dump({name: entry.value}, 2))
        else:
            parts.append(_dump({key: value}, 0))
    return "".join(parts)
