"""What a simulated controller says about its status components, and how it obeys commands.

Every controller has strikes, sirens, door sensors, exit buttons and a motion
sensor on a connector its sensors leave free. Strikes and sirens obey
``cmnd/f2-<mac>/...`` commands (:func:`command_response`); the rest change on
their own now and then. Each change is published as F2 status JSON (SPEC section 1).
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

from f2pipe.tools.simulator.messages import Message, format_timestamp

__all__ = [
    "SPONTANEOUS",
    "STATUS_CONNECTOR",
    "command_response",
    "status_message",
    "status_payload",
]

# The connector a simulated controller's status components sit on (its sensors leave
# it free). Strikes and sirens obey commands; the others change on their own.
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


def status_message(mac: str, mode: str, component: str, body: dict[str, Any]) -> Message:
    """The status message of ``component`` on controller ``mac``, stamped now (UTC)."""
    stamp = format_timestamp(datetime.now(UTC).replace(tzinfo=None))
    topic = f"stat/f2-{mac}/{mode}/J{STATUS_CONNECTOR}/{component}"
    payload = json.dumps({"timestamp": stamp, **body}).encode()
    return Message(topic, payload, stamp, (), (), None, mac)


def command_response(topic: str, payload: bytes) -> list[tuple[float, str, str, bool]]:
    """What a controller does for one command: ``[(delay s, mode, component, state)]``.

    ``{"power-flag": 0}`` switches a strike or siren off, ``1`` on, and ``2``
    on for ``period`` seconds (default 3), then off. Other commands, and
    malformed ones, get no answer (a real controller ignores them too).
    """
    levels = topic.split("/")
    if len(levels) != 5 or levels[0] != "cmnd":
        return []
    _type, _device, mode, _connector, component = levels
    if not component.startswith(("strike-", "siren-")):
        return []
    try:
        body = json.loads(payload)
        flag = int(body["power-flag"])
        period = float(body.get("period", 3))
    except (ValueError, TypeError, KeyError):
        return []
    if flag == 0:
        return [(0.0, mode, component, False)]
    if flag == 1:
        return [(0.0, mode, component, True)]
    if flag == 2 and period >= 0:
        return [(0.0, mode, component, True), (period, mode, component, False)]
    return []
