"""What a simulated controller says about its status components, and how it obeys commands.

Every controller has strikes, sirens, door sensors, exit buttons and a motion
sensor. Strikes and sirens obey ``cmnd/f2-<mac>/...`` commands
(:func:`command_response`) and answer on the status topic of the connector and
component the command named; door sensors, exit buttons and the motion sensor
sit on a connector the sensors leave free and change on their own now and
then. Each change is published as F2 status JSON (SPEC section 1), stamped
when it happens: a pulse's "off" carries a time ``period`` seconds after its "on".
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any, NamedTuple

from f2pipe.core.topics import parse_topic
from f2pipe.tools.simulator.messages import Message, format_timestamp

__all__ = [
    "SPONTANEOUS",
    "STATUS_CONNECTOR",
    "Answer",
    "command_response",
    "status_message",
    "status_payload",
]

# The connector a simulated controller's spontaneous components sit on (its sensors
# leave it free). Strikes and sirens answer on the connector their command names.
STATUS_CONNECTOR = 3
# The components that change on their own (a door opens, someone walks by).
SPONTANEOUS = ("door-sensors", "exit-buttons", "motion-sensor-1")


def status_payload(component: str, state: bool, rng: random.Random) -> dict[str, Any]:
    """The F2 status JSON of ``component`` (SPEC section 1), without its timestamp."""
    if component == "door-sensors":
        return {"door-sensor-1": state, "door-sensor-2": rng.random() < 0.5}
    if component == "exit-buttons":
        return {"exit-button-1": state, "exit-button-2": False}
    return {"status": state}


def status_message(
    mac: str, mode: str, connector: int, component: str, body: dict[str, Any]
) -> Message:
    """The status message of ``component`` on connector ``J<connector>`` of controller
    ``mac``, stamped now (UTC): build it when the change happens, not before."""
    stamp = format_timestamp(datetime.now(UTC).replace(tzinfo=None))
    topic = f"stat/f2-{mac}/{mode}/J{connector}/{component}"
    payload = json.dumps({"timestamp": stamp, **body}).encode()
    return Message(topic, payload, stamp, (), (), None, mac)


class Answer(NamedTuple):
    """One status change a command causes: ``delay`` s after the command arrived,
    ``component`` on connector ``J<connector>`` in ``mode`` turns ``state``."""

    delay: float
    mode: str
    connector: int
    component: str
    state: bool


def command_response(topic: str, payload: bytes) -> list[Answer]:
    """What a controller does for one command, in order of time.

    ``{"power-flag": 0}`` switches a strike or siren off, ``1`` on, and ``2``
    on for ``period`` seconds (default 3), then off. The answers name the
    connector and component of the command. Other commands, and malformed
    ones, get no answer (a real controller ignores them too).
    """
    parsed = parse_topic(topic)
    if parsed is None or parsed.type != "cmnd" or parsed.kind not in ("strike", "siren"):
        return []
    mode, number, component = parsed.mode, parsed.connector, parsed.component
    try:
        body = json.loads(payload)
        flag = int(body["power-flag"])
        period = float(body.get("period", 3))
    except (ValueError, TypeError, KeyError):
        return []
    if flag == 0:
        return [Answer(0.0, mode, number, component, False)]
    if flag == 1:
        return [Answer(0.0, mode, number, component, True)]
    if flag == 2 and period >= 0:
        return [
            Answer(0.0, mode, number, component, True),
            Answer(period, mode, number, component, False),
        ]
    return []
