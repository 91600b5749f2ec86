"""Topic grammar of SPEC section 1: what parses, to what, and every malformed form."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from f2pipe.core.topics import (
    INDEXED_KINDS,
    MODES,
    PLURAL_KINDS,
    TYPES,
    Topic,
    format_topic,
    parse_topic,
)

MAC = "e4fd45f654be"

# The machines this runs on are shared: time per example is not a property under test.
NO_DEADLINE = settings(deadline=None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"tele/f2-{MAC}/sensor-mode/J1/sensor-1",
            Topic("tele", MAC, "sensor-mode", 1, "sensor", 1),
        ),
        (
            f"stat/f2-{MAC}/sensor-mode/J4/sensor-6",
            Topic("stat", MAC, "sensor-mode", 4, "sensor", 6),
        ),
        (
            f"stat/f2-{MAC}/access-control-mode/J2/door-sensors",
            Topic("stat", MAC, "access-control-mode", 2, "door-sensors", 1),
        ),
        (
            f"stat/f2-{MAC}/access-control-mode/J3/exit-buttons",
            Topic("stat", MAC, "access-control-mode", 3, "exit-buttons", 1),
        ),
        (
            f"stat/f2-{MAC}/alarm-mode/J3/motion-sensor-3",
            Topic("stat", MAC, "alarm-mode", 3, "motion-sensor", 3),
        ),
        (
            f"stat/f2-{MAC}/alarm-mode/J1/siren-2",
            Topic("stat", MAC, "alarm-mode", 1, "siren", 2),
        ),
        (
            f"stat/f2-{MAC}/access-control-mode/J1/strike-5",
            Topic("stat", MAC, "access-control-mode", 1, "strike", 5),
        ),
        (
            f"tele/f2-{MAC}/access-control-mode/J2/reader-1",
            Topic("tele", MAC, "access-control-mode", 2, "reader", 1),
        ),
        (
            f"cmnd/f2-{MAC}/access-control-mode/J2/reader-4/success",
            Topic("cmnd", MAC, "access-control-mode", 2, "reader", 4, "success"),
        ),
        (
            f"cmnd/f2-{MAC}/access-control-mode/J1/strike-1",
            Topic("cmnd", MAC, "access-control-mode", 1, "strike", 1),
        ),
    ],
)
def test_valid_topics_parse(text: str, expected: Topic) -> None:
    assert parse_topic(text) == expected
    assert format_topic(expected) == text
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        f"TELE/f2-{MAC}/sensor-mode/J1/sensor-1",  # type is lowercase
        f"data/f2-{MAC}/sensor-mode/J1/sensor-1",  # unknown type
        f"tele/F2-{MAC}/sensor-mode/J1/sensor-1",  # prefix is lowercase
        f"tele/{MAC}/sensor-mode/J1/sensor-1",  # no f2- prefix
        "tele/f2-E4FD45F654BE/sensor-mode/J1/sensor-1",  # MAC must be lowercase
        "tele/f2-e4fd45f654b/sensor-mode/J1/sensor-1",  # 11 digits
        "tele/f2-e4fd45f654bee/sensor-mode/J1/sensor-1",  # 13 digits
        "tele/f2-e4:fd:45:f6:54:be/sensor-mode/J1/sensor-1",  # separators
        "tele/f2-g4fd45f654be/sensor-mode/J1/sensor-1",  # not hex
        f"tele/f2-{MAC}/party-mode/J1/sensor-1",  # unknown mode
        f"tele/f2-{MAC}/sensor-mode/J0/sensor-1",  # connector below J1
        f"tele/f2-{MAC}/sensor-mode/J5/sensor-1",  # connector above J4
        f"tele/f2-{MAC}/sensor-mode/j1/sensor-1",  # lowercase j
        f"tele/f2-{MAC}/sensor-mode/1/sensor-1",  # no J
        f"tele/f2-{MAC}/sensor-mode/J01/sensor-1",  # padded
        f"tele/f2-{MAC}/sensor-mode/J1/sensor-0",  # index below 1
        f"tele/f2-{MAC}/sensor-mode/J1/sensor-7",  # index above 6
        f"tele/f2-{MAC}/sensor-mode/J1/sensor-01",  # padded index
        f"tele/f2-{MAC}/sensor-mode/J1/sensor",  # indexed kind without index
        f"tele/f2-{MAC}/sensor-mode/J1/sensor-",  # empty index
        f"tele/f2-{MAC}/sensor-mode/J1/thermostat-1",  # unknown kind
        f"stat/f2-{MAC}/access-control-mode/J1/door-sensors-1",  # plural kind with index
        f"stat/f2-{MAC}/access-control-mode/J1/door-sensor-1",  # singular of a plural kind
        f"stat/f2-{MAC}/access-control-mode/J1/exit-buttons-2",
        f"tele/f2-{MAC}/sensor-mode/J1",  # too few levels
        f"tele/f2-{MAC}/sensor-mode/J1/sensor-1/extra",  # too many levels
        f"tele/f2-{MAC}/sensor-mode/J1/sensor-1/",  # trailing slash
        f"/tele/f2-{MAC}/sensor-mode/J1/sensor-1",  # leading slash
        f"tele//f2-{MAC}/sensor-mode/J1/sensor-1",  # empty level
        f"stat/f2-{MAC}/access-control-mode/J2/reader-1/success",  # extra level not a command
        f"tele/f2-{MAC}/access-control-mode/J2/reader-1/success",
        f"cmnd/f2-{MAC}/access-control-mode/J2/reader-1/failure",  # unknown extra level
        f"cmnd/f2-{MAC}/access-control-mode/J2/strike-1/success",  # extra level not a reader
        f"cmnd/f2-{MAC}/access-control-mode/J2/reader-1/success/now",
        f"tele/f2-{MAC}/sensor-mode/J1/sensor-١",  # a non-ASCII digit
        f"tele/f2-{MAC}/sensor-mode/J1/sensor-1 ",  # trailing space
    ],
)
def test_malformed_topics_are_invalid(text: str) -> None:
    assert parse_topic(text) is None


def _topics() -> st.SearchStrategy[Topic]:
    def build(
        type_: str, mac: str, mode: str, connector: int, kind: str, index: int, reader_sub: bool
    ) -> Topic:
        if kind in PLURAL_KINDS:
            index = 1
        sub = "success" if reader_sub and kind == "reader" and type_ == "cmnd" else None
        return Topic(type_, mac, mode, connector, kind, index, sub)

    return st.builds(
        build,
        st.sampled_from(sorted(TYPES)),
        st.text("0123456789abcdef", min_size=12, max_size=12),
        st.sampled_from(sorted(MODES)),
        st.integers(1, 4),
        st.sampled_from(sorted(INDEXED_KINDS | PLURAL_KINDS)),
        st.integers(1, 6),
        st.booleans(),
    )


@NO_DEADLINE
@given(_topics())
def test_every_valid_topic_round_trips(topic: Topic) -> None:
    assert parse_topic(format_topic(topic)) == topic


@NO_DEADLINE
@given(st.text(max_size=80))
def test_any_string_parses_or_is_invalid(text: str) -> None:
    parsed = parse_topic(text)
    assert parsed is None or format_topic(parsed) == text


@NO_DEADLINE
@given(_topics(), st.data())
def test_one_level_damaged_is_invalid(topic: Topic, data: st.DataObject) -> None:
    levels = format_topic(topic).split("/")
    position = data.draw(st.integers(0, len(levels) - 1), label="level")
    damage = data.draw(
        st.sampled_from(["upper", "append", "empty", "drop", "duplicate"]), label="damage"
    )
    if damage == "upper":
        if levels[position].upper() == levels[position]:
            return
        levels[position] = levels[position].upper()
    elif damage == "append":
        levels[position] += "x"
    elif damage == "empty":
        levels[position] = ""
    elif damage == "drop":
        if position == 5:
            return  # a reader command without its extra level is a valid topic
        del levels[position]
    else:
        levels.insert(position, levels[position])
    assert parse_topic("/".join(levels)) is None
