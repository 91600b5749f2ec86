"""``f2pipe cmnd MAC J<n> COMPONENT PAYLOAD``: send one command to a device.

Connects as the ``svc-commander`` identity (the only one the broker lets write
``cmnd/#``) to the broker the controller belongs to (several brokers: its
broker in the metadata), publishes with QoS 1 and returns once the broker
acknowledged it.
The topic is built and checked against SPEC section 1 and the payload
validated before anything is sent:

- strikes and sirens: a JSON object with ``power-flag`` 0 (off), 1 (on) or
  2 (on for ``period`` seconds), and ``period`` a non-negative number;
- a reader's ``success`` level (``reader-1/success``): any JSON object;
- any other component: a JSON object.

With ``--wait SECONDS`` it then waits for the controller's answer and prints
it. A strike or siren answers a command with its new status on the status
topic of the connector and component the command named (``cmnd/...`` becomes
``stat/...``); a pulse (``power-flag`` 2) answers twice, "on" at once and "off"
``period`` seconds later. The answers are read from the pipeline's own data:
the connector forwards every ``stat/`` message to the raw Kafka topic (SPEC
section 4), so the commander needs no broker subscription and no rights beyond
writing ``cmnd/#`` (SPEC section 6). Kafka is read with the settings' Kafka
credentials (an operator's, from ``<state>/admin.env`` on a secured stack), by
assigned partitions: no consumer group is joined or committed. The raw topic's
end offsets are taken before the command is sent, so only answers after it
count. When no answer comes within the time it exits 1 and says so.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from confluent_kafka import Consumer, KafkaException, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from f2pipe.core.records import TOPIC_HEADER
from f2pipe.core.topics import parse_topic
from f2pipe.errors import ConfigError, F2PipeError
from f2pipe.runtime import tls
from f2pipe.runtime.kafka import consumer_config
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


@dataclass(frozen=True)
class Answer:
    """One status message the controller published after the command."""

    topic: str
    payload: bytes

    def render(self) -> str:
        return f"answer {self.topic} {self.payload.decode('utf-8', 'replace')}"


def expected_answers(topic: str, payload: bytes) -> tuple[str, list[bool]]:
    """The status topic a command is answered on and the states it answers with, in order.

    Raises CommandError for a command no controller answers (only strikes and
    sirens report their state back).
    """
    parsed = parse_topic(topic)
    if parsed is None or parsed.kind not in ("strike", "siren") or parsed.sub is not None:
        raise CommandError("--wait: only strikes and sirens answer a command with their status")
    flag = json.loads(payload)["power-flag"]
    states = [False] if flag == 0 else [True] if flag == 1 else [True, False]
    return "stat" + topic.removeprefix("cmnd"), states


class AnswerWatch:
    """Reads a controller's status answers from the raw Kafka topic, from its end as of now.

    Open it before sending the command: the end offsets are fixed in
    :meth:`__init__`, so an answer published after the command cannot be
    missed and one published before it is never taken for an answer. Partitions
    are assigned, not subscribed: no consumer group is joined or committed.
    Raises CommandError when Kafka cannot be reached.
    """

    def __init__(self, settings: Settings, mac: str, timeout: float = 10.0) -> None:
        self.topic = settings.topic_raw
        self.key = mac.encode()
        self.consumer = Consumer(consumer_config(settings, "f2pipe-cmnd-wait"))
        try:
            meta = self.consumer.list_topics(self.topic, timeout=timeout)
            info = meta.topics.get(self.topic)
            if info is None or info.error is not None or not info.partitions:
                raise CommandError(f"--wait: Kafka has no topic {self.topic}")
            starts = []
            for partition in sorted(info.partitions):
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=timeout
                )
                starts.append(TopicPartition(self.topic, partition, high))
            self.consumer.assign(starts)
        except KafkaException as exc:
            self.consumer.close()
            raise CommandError(f"--wait: cannot read {self.topic} from Kafka: {exc}") from None
        except CommandError:
            self.consumer.close()
            raise

    def next_answer(self, status_topic: str, state: bool, deadline: float) -> Answer | None:
        """The first record on ``status_topic`` reporting ``state``, or None at ``deadline``
        (``time.monotonic()``)."""
        wanted = status_topic.encode()
        while (left := deadline - time.monotonic()) > 0:
            for msg in self.consumer.consume(num_messages=500, timeout=min(left, 0.5)):
                if msg.error() is not None or msg.key() != self.key:
                    continue
                headers = dict(msg.headers() or [])
                value = msg.value() or b""
                if headers.get(TOPIC_HEADER) == wanted and _reports(value, state):
                    return Answer(status_topic, value)
        return None

    def close(self) -> None:
        self.consumer.close()


def _reports(payload: bytes, state: bool) -> bool:
    try:
        body = json.loads(payload)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") is state


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mac", help="device MAC (aabbccddee01, aa:bb:... or aa-bb-...)")
    parser.add_argument("connector", help="J1..J4")
    parser.add_argument("component", help="strike-1, siren-2, reader-1/success, ...")
    parser.add_argument("payload", help='JSON, e.g. \'{"power-flag": 2, "period": 3}\'')
    parser.add_argument("--mode", choices=sorted(set(_MODE_OF.values())), help="override")
    parser.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=10.0,
        metavar="SECONDS",
        help="wait up to SECONDS (default 10) for the controller's answer, read from the raw"
        " Kafka topic the connector fills, and print it; exit 1 if none comes",
    )
    parser.set_defaults(func=main)


def device_broker(settings: Settings, mac: str) -> Settings:
    """``settings`` pointed at the broker ``mac`` belongs to (SPEC section 10): with several
    brokers a command must go where the controller is connected. Raises ConfigError for a
    broker these settings do not run."""
    if settings.mqtt_brokers == 1:
        return settings
    from f2pipe.tools.simulator.provisioning import broker_addresses

    host, port = broker_addresses(settings, [mac])[mac]
    return settings.model_copy(update={"mqtt_host": host, "mqtt_port": port})


def main(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        topic, payload = build_command(
            args.mac, args.connector, args.component, args.payload, args.mode
        )
        settings = device_broker(settings, topic.split("/")[1].removeprefix("f2-"))
        if args.wait is not None and args.wait <= 0:
            raise CommandError("--wait takes a positive number of seconds")
        expected = None if args.wait is None else expected_answers(topic, payload)
    except CommandError as exc:
        raise ConfigError(str(exc)) from None
    if expected is None:
        send(settings, topic, payload)
        print(f"sent {topic} {payload.decode()}")
        return 0
    status_topic, states = expected
    mac = topic.split("/")[1].removeprefix("f2-")
    watch = AnswerWatch(settings, mac)
    try:
        send(settings, topic, payload)
        print(f"sent {topic} {payload.decode()}", flush=True)
        period = float(json.loads(payload).get("period", 3))
        deadline = time.monotonic() + args.wait
        for i, state in enumerate(states):
            answer = watch.next_answer(status_topic, state, deadline)
            if answer is None:
                what = "no answer" if i == 0 else f'no "{"on" if state else "off"}" answer'
                print(
                    f"{what} on {status_topic} within {args.wait:g} s"
                    f" (read from Kafka topic {settings.topic_raw})",
                    file=sys.stderr,
                )
                return 1
            print(answer.render(), flush=True)
            # A pulse's "off" comes `period` seconds after its "on".
            deadline = time.monotonic() + period + args.wait
    finally:
        watch.close()
    return 0
