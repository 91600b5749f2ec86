"""Fleet documents from YAML, with every problem placed on the file's line.

PyYAML's safe loader (on libyaml's parser when present), taught to remember
the line of each mapping key and sequence item, to refuse duplicate and
non-text keys, and to keep text fields text (YAML 1.1 would read the MAC
``001122334455`` as an octal number).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from f2pipe.errors import FleetError
from f2pipe.metadata.fleet.document import Fleet, Loc, check_references


class LineDict(dict[Any, Any]):
    """A mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class LineList(list[Any]):
    """A sequence that remembers the line of each item (1-based)."""

    line: int = 0
    item_lines: list[int]


# Keys whose values are text whatever they look like: YAML 1.1 would read the MAC
# 001122334455 as an octal number and 11:22:33:44:55:66 as a base-60 one.
_TEXT_KEYS = frozenset(
    {"name", "mac", "controller", "sensor", "serial_number", "claiming_code", "model"}
    | {"description", "label", "unit", "json_field", "timezone", "template", "device_type"}
)


# libyaml's parser when PyYAML was built with it: five times faster on a fleet of
# 10,000 controllers; the constructors below are the same either way.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_STR = "tag:yaml.org,2002:str"


class _Loader(_SafeLoader):  # type: ignore[valid-type,misc]
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # A fleet file repeats the same few keys (name, template, ...) tens of
        # thousands of times: resolve each plain scalar's tag once.
        self._tags: dict[tuple[str, tuple[bool, bool]], str] = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is not yaml.ScalarNode or not isinstance(value, str):
            return super().resolve(kind, value, implicit)
        key = (value, tuple(implicit))
        tag = self._tags.get(key)
        if tag is None:
            tag = self._tags[key] = super().resolve(kind, value, implicit)
        return tag


class _LoadError(FleetError):
    """A YAML construct the format refuses (duplicate or non-text key), with its line.

    Never escapes: :func:`load_document` turns it into a FleetError naming the source.
    """

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Iterator[LineDict]:
    data = LineDict()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    # Duplicates among the keys written here (PyYAML would keep the last silently);
    # keys a merge (<<) brings in may be overridden, as YAML says.
    first: dict[str, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        line = key_node.start_mark.line + 1
        if key_node.value in first:
            raise _LoadError(
                line, f"duplicate key {key_node.value!r} (first on line {first[key_node.value]})"
            )
        first[key_node.value] = line
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        # A plain text key is its own value: skip the constructor's dispatch.
        is_text = key_node.tag == _STR and isinstance(key_node, yaml.ScalarNode)
        key = key_node.value if is_text else loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise _LoadError(line, f"key {key!r} is not text")
        if (
            key in _TEXT_KEYS
            and isinstance(value_node, yaml.ScalarNode)
            and value_node.tag != "tag:yaml.org,2002:null"
        ):
            value: Any = value_node.value
        else:
            value = loader.construct_object(value_node, deep=True)
        data[key] = value
        data.key_lines[key] = line


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> Iterator[LineList]:
    data = LineList()
    data.line = node.start_mark.line + 1
    data.item_lines = []
    yield data
    for item in node.value:
        data.append(loader.construct_object(item, deep=True))
        data.item_lines.append(item.start_mark.line + 1)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


def line_of(document: Any, loc: Loc) -> int:
    """The line of the deepest node of ``document`` that ``loc`` reaches (1 if none)."""
    line = getattr(document, "line", 1)
    node = document
    for step in loc:
        if isinstance(node, LineDict) and isinstance(step, str) and step in node:
            line = node.key_lines[step]
            node = node[step]
        elif isinstance(node, LineList) and isinstance(step, int) and 0 <= step < len(node):
            line = node.item_lines[step]
            node = node[step]
        else:
            break
    return line


def _loc_text(loc: Loc) -> str:
    text = ""
    for step in loc:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text or "(document)"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a fleet file: where (line, field path) and what."""

    line: int | None  # None for a document that never was text (a Fleet built in code)
    loc: Loc
    message: str

    def render(self, source: str) -> str:
        where = source if self.line is None else f"{source}:{self.line}"
        return f"{where}: {_loc_text(self.loc)}: {self.message}"


def problems_error(source: str, problems: Sequence[Problem]) -> FleetError:
    """One FleetError listing ``problems`` by line, for a document nothing was written of."""
    ordered = sorted(problems, key=lambda p: p.line or 0)
    noun = "problem" if len(ordered) == 1 else "problems"
    lines = [p.render(source) for p in ordered]
    return FleetError(f"{len(ordered)} {noun}, nothing written:\n  " + "\n  ".join(lines))


def parse_fleet(text: str, source: str = "<fleet>") -> Fleet:
    """Parse and fully validate a fleet document; FleetError lists every problem by line."""
    return load_document(text, source)[1]


def load_document(text: str, source: str) -> tuple[LineDict, Fleet]:
    """The parsed YAML (with its lines, to place later problems) and the checked fleet."""
    try:
        document = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except _LoadError as exc:
        raise FleetError(f"{source}:{exc.line}: {exc.message}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise FleetError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if document is None:
        document = LineDict()
        document.line, document.key_lines = 1, {}
    if not isinstance(document, LineDict):
        raise FleetError(f"{source}:1: a fleet file is a mapping (version, templates, ...)")
    try:
        fleet = Fleet.model_validate(document)
    except ValidationError as exc:
        problems = [
            Problem(line_of(document, tuple(err["loc"])), tuple(err["loc"]), _message(err))
            for err in exc.errors()
        ]
        raise problems_error(source, problems) from None
    problems = [
        Problem(line_of(document, loc), loc, message) for loc, message in check_references(fleet)
    ]
    if problems:
        raise problems_error(source, problems)
    return document, fleet


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "value_error":  # our validators already quote the value
        return str(err["msg"]).removeprefix("Value error, ")
    if "claiming_code" in err["loc"]:  # a credential: never echoed
        return str(err["msg"])
    return f"{err['msg']} (got {err['input']!r})"
