"""The fleet file as a JSON Schema (draft 2020-12), for editors: ``f2pipe fleet schema``.

Generated from the same pydantic models the importer validates with, then
given what those models check in code: the MAC forms, the encodings and byte
orders (case-insensitive, as the decoder reads them), and the shortest
claiming code that can reach the strength rule. What needs the whole document
(duplicates, dangling names) or the database (time zones) is left to
``f2pipe fleet import --dry-run``, which names the line.
"""

from __future__ import annotations

import math
from typing import Any

from f2pipe.core.decode import BYTE_ORDERS, ENCODINGS
from f2pipe.metadata.fleet.document import CODE_ALPHABETS, MIN_CODE_BITS, Fleet

__all__ = ["DIALECT", "fleet_json_schema"]

DIALECT = "https://json-schema.org/draft/2020-12/schema"

_HEX = "[0-9A-Fa-f]"
# The three spellings normalize_mac accepts; surrounding blanks are trimmed there too.
_MAC = (
    rf"^\s*(?:{_HEX}{{12}}|{_HEX}{{2}}(?::{_HEX}{{2}}){{5}}|{_HEX}{{2}}(?:-{_HEX}{{2}}){{5}})\s*$"
)
# The fewest characters that can reach MIN_CODE_BITS: from the largest alphabet.
_MIN_CODE_LENGTH = math.ceil(MIN_CODE_BITS / math.log2(max(len(a) for _, a in CODE_ALPHABETS)))


def _any_case(words: list[str]) -> str:
    """A pattern matching exactly ``words`` in any letter case (JSON Schema has no ``(?i)``)."""

    def letters(word: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)

    return "^(?:" + "|".join(letters(w) for w in words) + ")$"


def fleet_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a fleet file, as a JSON-ready dict."""
    schema = Fleet.model_json_schema(mode="validation")
    defs = schema["$defs"]
    mac = {"type": "string", "pattern": _MAC, "description": "aabbccddee01, aa:bb:... or aa-bb-..."}
    defs["ControllerEntry"]["properties"]["mac"] = {**mac, "title": "Mac"}
    defs["WiringEntry"]["properties"]["controller"] = {**mac, "title": "Controller"}
    code = defs["ControllerEntry"]["properties"]["claiming_code"]
    code["anyOf"][0]["minLength"] = _MIN_CODE_LENGTH
    code["description"] = (
        f"A credential: at least {MIN_CODE_BITS} bits by the estimate length x log2(size of the"
        " smallest standard alphabet holding its characters), printable ASCII without spaces."
        " Omitted: the stored code is kept."
    )
    datapoint = defs["Datapoint"]["properties"]
    datapoint["data_encoding"]["pattern"] = _any_case(sorted(ENCODINGS))
    datapoint["byte_order"]["pattern"] = _any_case(list(BYTE_ORDERS))
    for entry in defs.values():
        entry.pop("description", None)  # the models' docstrings speak to programmers
    schema.pop("description", None)
    return {
        "$schema": DIALECT,
        **schema,
        "title": "f2pipe fleet file",
        "description": (
            "Device types, templates, controllers, sensors and wiring for"
            " `f2pipe fleet import FILE.yaml`."
        ),
    }
