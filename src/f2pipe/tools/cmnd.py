"""``f2pipe cmnd MAC J<n> COMPONENT PAYLOAD``: send one command to a device.

Connects as the ``svc-commander`` identity (the only one the broker lets write
``cmnd/#``), publishes with QoS 1 and returns once the broker acknowledged it.
The topic is built and checked against SPEC section 1 and the payload
validated before anything is sent:

- strikes and sirens: a JSON object with ``power-flag`` 0 (off), 1 (on) or
  2 (on for ``period`` seconds), and ``period`` a non-negative number;
- a reader's ``success`` level (``reader-1/success``): any JSON object;
- any other component: a JSON object.
"""

from __future__ import annotations

import argparse
import json
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from f2pipe.core.topics import parse_topic
from f2pipe.errors import ConfigError, F2PipeError
from f2pipe.runtime import tls
from f2pipe.settings import Settings, get_settings

# The mode a component's commands use unless --mode says otherwise.
_MODE_OF = {
    "sensor": "sensor-mode",
    "strike": "access-control-mode",
    "reader": "access-control-mode",
    "door-sensors": "access-control-mode",
    "exit-buttons": "access-control-mode",
    "siren": "alarm-mode",
    "motion-sensor": "alarm-mode",
}


class CommandError(F2PipeError):
    """A command is malformed or the broker did not take it."""


def build_command(
    mac: str, connector: str, component: str, payload: str, mode: str | None = None
) -> tuple[str, bytes]:
    """The topic and payload bytes of one command; raises CommandError saying what is wrong."""
    mac = mac.lower().replace(":", "").replace("-", "")
    connector = connector if connector.upper().startswith("J") else f"J{connector}"
    connector = connector.upper()
    kind = component.split("/")[0].rsplit("-", 1)[0] if "-" in component else component
    if component in ("door-sensors", "exit-buttons"):
        kind = component
    chosen_mode = mode or _MODE_OF.get(kind)
    if chosen_mode is None:
        raise CommandError(f"unknown component {component!r}")
    topic = f"cmnd/f2-{mac}/{chosen_mode}/{connector}/{component}"
    if parse_topic(topic) is None:
        raise CommandError(f"not a valid F2 command topic: {topic}")
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise CommandError(f"payload is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CommandError("payload must be a JSON object")
    if kind in ("strike", "siren"):
        _check_power(body)
    return topic, json.dumps(body, separators=(",", ":")).encode()


def _check_power(body: dict[str, Any]) -> None:
    flag = body.get("power-flag")
    if isinstance(flag, bool) or flag not in (0, 1, 2):
        raise CommandError('"power-flag" must be 0 (off), 1 (on) or 2 (on for "period" s)')
    period = body.get("period", 3 if flag == 2 else None)
    if period is not None and (
        isinstance(period, bool) or not isinstance(period, int | float) or period < 0
    ):
        raise CommandError('"period" must be a non-negative number of seconds')


def send(settings: Settings, topic: str, payload: bytes, timeout: float = 10.0) -> None:
    """Publish ``payload`` to ``topic`` with QoS 1 as svc-commander; wait for the PUBACK."""
    context: ssl.SSLContext | None = None
    if settings.mqtt_tls:
        context = tls.service_context(settings.pki_dir, "svc-commander")
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="svc-commander", protocol=mqtt.MQTTv311
    )
    if context is not None:
        client.tls_set_context(context)
    try:
        client.connect(settings.mqtt_host, settings.mqtt_port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(
            f"cannot reach the broker at {settings.mqtt_host}:{settings.mqtt_port}: {exc}"
        ) from None
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise CommandError(f"the broker did not acknowledge the command within {timeout} s")
    finally:
        client.disconnect()
        client.loop_stop()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mac", help="device MAC (aabbccddee01, aa:bb:... or aa-bb-...)")
    parser.add_argument("connector", help="J1..J4")
    parser.add_argument("component", help="strike-1, siren-2, reader-1/success, ...")
    parser.add_argument("payload", help='JSON, e.g. \'{"power-flag": 2, "period": 3}\'')
    parser.add_argument("--mode", choices=sorted(set(_MODE_OF.values())), help="override")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        topic, payload = build_command(
            args.mac, args.connector, args.component, args.payload, args.mode
        )
    except CommandError as exc:
        raise ConfigError(str(exc)) from None
    send(settings, topic, payload)
    print(f"sent {topic} {payload.decode()}")
    return 0
