"""The fleet document: its pydantic models and the checks across entries.

A :class:`Fleet` that validates is field-valid; :func:`check_references` finds
what only the whole document can show (duplicates, dangling names). A template's
datapoints are the one shared :class:`f2pipe.core.models.Datapoint`.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from f2pipe.core.decode import ENCODINGS
from f2pipe.core.models import Datapoint
from f2pipe.core.topics import normalize_mac

FORMAT_VERSION: Literal[1] = 1

Loc = tuple[str | int, ...]

# encoding -> width in bytes (bool's width is free, 1..8)
ENCODING_WIDTHS: dict[str, int] = {name: width for name, (_, width) in ENCODINGS.items() if width}


# The standard alphabets a claiming code may be drawn from, smallest first. A code's
# strength is estimated as its length times log2 of the size of the smallest one that
# holds all of its characters: the most an attacker who knows the alphabet must try.
_LOWER, _UPPER, _DIGITS = string.ascii_lowercase, string.ascii_uppercase, string.digits
CODE_ALPHABETS: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (name, frozenset(chars))
    for name, chars in (
        ("digits", _DIGITS),
        ("hexadecimal", _DIGITS + "abcdef"),
        ("hexadecimal", _DIGITS + "ABCDEF"),
        ("lower-case letters", _LOWER),
        ("upper-case letters", _UPPER),
        ("base32", _UPPER + "234567"),
        ("base32", _LOWER + "234567"),
        ("lower-case letters and digits", _LOWER + _DIGITS),
        ("upper-case letters and digits", _UPPER + _DIGITS),
        ("letters and digits", string.ascii_letters + _DIGITS),
        ("base64url", string.ascii_letters + _DIGITS + "-_"),
        ("base64", string.ascii_letters + _DIGITS + "+/"),
        ("printable ASCII", string.ascii_letters + _DIGITS + string.punctuation),
    )
)
MIN_CODE_BITS = 64  # what a claiming code must be worth; secrets.token_urlsafe(12) is 96


def code_strength(code: str) -> tuple[str, int, float] | None:
    """``(alphabet, its size, estimated bits)`` of a claiming code, or None when it has a
    character outside printable ASCII (spaces included), which no estimate covers."""
    chars = set(code)
    for name, alphabet in CODE_ALPHABETS:
        if chars <= alphabet:
            return name, len(alphabet), len(code) * math.log2(len(alphabet))
    return None


def weak_code(code: str) -> str | None:
    """Why ``code`` is too weak to be a claiming code, without quoting it; None when strong."""
    strength = code_strength(code)
    if strength is None:
        return "claiming code has characters outside printable ASCII (or spaces)"
    name, size, bits = strength
    if bits >= MIN_CODE_BITS:
        return None
    chars = f"{len(code)} character{'' if len(code) == 1 else 's'}"
    return (
        f"claiming code too weak: {chars} of {name} ({size} symbols) are"
        f" about {bits:.0f} bits, at least {MIN_CODE_BITS} needed"
        " (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(12))')"
    )


class _Entry(BaseModel):
    # strict: a fleet file is configuration; "2" for a number is a mistake worth naming.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DeviceTypeEntry(_Entry):
    name: str = Field(min_length=1)
    is_controller: bool = False
    is_sensor: bool = False


class TemplateEntry(_Entry):
    name: str = Field(min_length=1)
    device_type: str = Field(min_length=1)
    model: str | None = None
    description: str | None = None
    frame_check: Literal["modbus_crc", "none"] = "modbus_crc"
    datapoints: list[Datapoint] = Field(default_factory=list)


class ControllerEntry(_Entry):
    name: str = Field(min_length=1)
    mac: str
    template: str = Field(min_length=1)
    # Checked by the database against pg_timezone_names, the authority the processor uses.
    timezone: str = Field(default="UTC", min_length=1)
    serial_number: str | None = None
    claiming_code: str | None = Field(default=None, min_length=1)
    # The MQTT broker it connects to (mqtt-1, mqtt-2...); None: the default broker.
    broker: str | None = Field(default=None, pattern=r"^mqtt-[1-9][0-9]?$")

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        return normalize_mac(value)


class SensorEntry(_Entry):
    name: str = Field(min_length=1)
    template: str = Field(min_length=1)
    serial_number: str | None = None


class WiringEntry(_Entry):
    controller: str
    connector: int = Field(ge=1, le=4)
    pin: int = Field(ge=1, le=6)
    sensor: str = Field(min_length=1)

    @field_validator("controller")
    @classmethod
    def _mac(cls, value: str) -> str:
        return normalize_mac(value)


class Fleet(_Entry):
    """A whole fleet file, field-valid; :func:`check_references` checks the cross-references."""

    version: Literal[1] = FORMAT_VERSION
    device_types: list[DeviceTypeEntry] = Field(default_factory=list)
    templates: list[TemplateEntry] = Field(default_factory=list)
    controllers: list[ControllerEntry] = Field(default_factory=list)
    sensors: list[SensorEntry] = Field(default_factory=list)
    wiring: list[WiringEntry] = Field(default_factory=list)


def check_brokers(fleet: Fleet, known: Iterable[str]) -> list[tuple[Loc, str]]:
    """Controllers assigned to a broker outside ``known``: one problem each, naming the
    controller, its broker, the known ones and the fix."""
    names = list(known)
    return [
        (
            ("controllers", i, "broker"),
            f"controller {ctl.mac} ({ctl.name!r}) is assigned to unknown broker {ctl.broker!r};"
            f" known: {', '.join(names)} (raise F2PIPE_MQTT_BROKERS or assign one of those)",
        )
        for i, ctl in enumerate(fleet.controllers)
        if ctl.broker is not None and ctl.broker not in names
    ]


def check_references(fleet: Fleet) -> list[tuple[Loc, str]]:
    """Problems a field-valid fleet can still have: duplicates, dangling names, and
    claiming codes under :data:`MIN_CODE_BITS` (checked here, so a fleet built in code
    passes the same check as a file; the message never quotes the code)."""
    problems: list[tuple[Loc, str]] = []

    def unique(kind: str, keys: Iterable[object], what: str) -> None:
        seen: dict[object, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                problems.append(((kind, i), f"duplicate {what} {key!r} (also entry {seen[key]})"))
            else:
                seen[key] = i

    types = {t.name: t for t in fleet.device_types}
    templates = {t.name: t for t in fleet.templates}
    unique("device_types", (t.name for t in fleet.device_types), "device type name")
    unique("templates", (t.name for t in fleet.templates), "template name")
    unique("controllers", (c.mac for c in fleet.controllers), "controller MAC")
    unique("sensors", (s.name for s in fleet.sensors), "sensor name")
    unique("wiring", ((w.controller, w.connector, w.pin) for w in fleet.wiring), "position")
    unique("wiring", (w.sensor for w in fleet.wiring), "wiring of sensor")

    for i, tpl in enumerate(fleet.templates):
        if tpl.device_type not in types:
            problems.append(
                (("templates", i, "device_type"), f"unknown device type {tpl.device_type!r}")
            )
        labels: dict[str, int] = {}
        for j, dp in enumerate(tpl.datapoints):
            loc: Loc = ("templates", i, "datapoints", j)
            if dp.label in labels:
                problems.append(((*loc, "label"), f"duplicate label {dp.label!r} in this template"))
            labels.setdefault(dp.label, j)
            width = ENCODING_WIDTHS.get(dp.data_encoding)
            if width is not None and dp.byte_length != width:
                problems.append(
                    (
                        (*loc, "byte_length"),
                        f"{dp.data_encoding} is {width} byte(s), not {dp.byte_length}",
                    )
                )
            if dp.data_encoding == "bool" and dp.byte_length > 8:
                problems.append(((*loc, "byte_length"), "bool is 1 to 8 bytes"))

    def template_ref(kind: str, i: int, name: str, role: Literal["controller", "sensor"]) -> None:
        tpl = templates.get(name)
        if tpl is None:
            problems.append(((kind, i, "template"), f"unknown template {name!r}"))
            return
        dtype = types.get(tpl.device_type)
        if dtype is not None and not getattr(dtype, f"is_{role}"):
            problems.append(
                (
                    (kind, i, "template"),
                    f"template {name!r} is not a {role} (device type {dtype.name!r})",
                )
            )

    for i, ctl in enumerate(fleet.controllers):
        template_ref("controllers", i, ctl.template, "controller")
        why = None if ctl.claiming_code is None else weak_code(ctl.claiming_code)
        if why is not None:
            problems.append(
                (("controllers", i, "claiming_code"), f"controller {ctl.mac} ({ctl.name!r}): {why}")
            )
    for i, sensor in enumerate(fleet.sensors):
        template_ref("sensors", i, sensor.template, "sensor")
    macs = {c.mac for c in fleet.controllers}
    sensors = {s.name for s in fleet.sensors}
    for i, wire in enumerate(fleet.wiring):
        if wire.controller not in macs:
            problems.append(
                (("wiring", i, "controller"), f"no controller {wire.controller} in this file")
            )
        if wire.sensor not in sensors:
            problems.append((("wiring", i, "sensor"), f"no sensor {wire.sensor!r} in this file"))
    return problems
