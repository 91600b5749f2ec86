"""Live mode: the fleet publishes telemetry and status until it is told to stop.

Each sensor publishes every ``interval`` s (QoS 1), each controller changes a
door, exit-button or motion status now and then and answers strike and siren
commands (:mod:`f2pipe.tools.simulator.commands`). One asyncio event loop
drives every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from f2pipe.settings import Settings
from f2pipe.tools.simulator.client import LeanClient, Window, connect_all
from f2pipe.tools.simulator.commands import (
    SPONTANEOUS,
    STATUS_CONNECTOR,
    Answer,
    command_response,
    status_message,
    status_payload,
)
from f2pipe.tools.simulator.fleet import Sensor
from f2pipe.tools.simulator.messages import Message, Summary, make_message
from f2pipe.tools.simulator.provisioning import device_ssl_context

__all__ = ["Live", "run_live"]

log = logging.getLogger(__name__)


class Live:
    """One live run: its connections, counters and component states, reachable while it runs.

    ``summary`` counts what was published and acknowledged, ``clients`` holds
    one connection per controller, ``states`` each controller's spontaneous
    components (on or off), ``background`` the delayed command answers still
    to publish. :meth:`run` runs until ``stop`` is set; :meth:`request_stop`
    sets it from anywhere, a signal handler included.
    """

    def __init__(
        self,
        settings: Settings,
        sensors: Sequence[Sensor],
        interval: float,
        stop: asyncio.Event,
        status_interval: float = 60.0,
        addresses: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        self.settings = settings
        # Each controller's broker (host, port); one missing connects to the settings' broker.
        self.addresses = addresses or {}
        self.sensors = sensors
        self.interval = interval
        self.stop = stop
        self.status_interval = status_interval
        self.rng = random.Random()  # noqa: S311 -- simulated values, not secrets
        self.summary = Summary()
        self.window = Window(65535)
        self.clients: dict[str, LeanClient] = {}
        self.states: dict[str, dict[str, bool]] = {}  # controller MAC -> component -> on
        self.background: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def request_stop(self) -> None:
        """Ask the run to end. Safe from a signal handler or another thread: it wakes
        the event loop, which a plain ``stop.set()`` from a signal handler does not."""
        loop = self._loop
        if loop is None:
            self.stop.set()  # not running yet: nothing waits on the event
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self.stop.set)

    def on_acks(self, messages: list[Message]) -> None:
        self.summary.acknowledged += len(messages)

    async def publish(self, client: LeanClient, message: Message) -> None:
        """Publish ``message`` (QoS 1); dropped if the run ends while ``client`` reconnects."""
        stop = self.stop
        await self.window.wait(1)
        if not client.connected:
            # Reconnecting: wait for it, or for the end of the run.
            waits = [
                asyncio.ensure_future(client.usable.wait()),
                asyncio.ensure_future(stop.wait()),
            ]
            _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if not client.connected:
                return
        self.window.take()
        client.publish(message)
        client.flush()
        self.summary.published += 1

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def on_command(self, client: LeanClient, topic: str, payload: bytes) -> None:
        answers = command_response(topic, payload)
        log.info("command", extra={"topic": topic, "answered": bool(answers)})
        if answers:
            self.spawn(self.answer(client, answers))

    async def answer(self, client: LeanClient, answers: Sequence[Answer]) -> None:
        """Publish each answer of one command when it happens, in order, stamped then.

        Each answer's delay counts from the command's arrival; the run ending
        drops the answers still to come.
        """
        mac = client.client_id.removeprefix("f2-")
        loop = asyncio.get_running_loop()
        start = loop.time()
        for answer in answers:
            wait = start + answer.delay - loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), wait)
            if self.stop.is_set():
                return
            body = status_payload(answer.component, answer.state, self.rng)
            message = status_message(mac, answer.mode, answer.connector, answer.component, body)
            await self.publish(client, message)

    async def connect(self) -> None:
        """One connection per controller, subscribed to its commands."""
        for sensor in self.sensors:
            if sensor.mac not in self.clients:
                host, port = self.addresses.get(
                    sensor.mac, (self.settings.mqtt_host, self.settings.mqtt_port)
                )
                client = LeanClient(
                    host,
                    port,
                    f"f2-{sensor.mac}",
                    device_ssl_context(self.settings, sensor.mac),
                    self.window,
                    self.on_acks,
                )
                client.on_command = self.on_command
                self.clients[sensor.mac] = client
        await connect_all(self.clients.values())
        for mac, client in self.clients.items():
            client.subscribe(f"cmnd/f2-{mac}/#")
        log.info(
            "devices connected",
            extra={"connections": len(self.clients), "sensors": len(self.sensors)},
        )

    async def sensor_loop(self, sensor: Sensor) -> None:
        stop, interval, rng = self.stop, self.interval, self.rng
        # Spread the sensors over the interval so the load is even.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(0, interval))
        while not stop.is_set():
            await self.publish(self.clients[sensor.mac], make_message(sensor, rng, None))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def status_loop(self, mac: str, client: LeanClient) -> None:
        stop, status_interval, rng = self.stop, self.status_interval, self.rng
        states = self.states.setdefault(mac, dict.fromkeys(SPONTANEOUS, False))
        while status_interval > 0 and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.expovariate(1 / status_interval))
            if stop.is_set():
                return
            component = rng.choice(SPONTANEOUS)
            states[component] = not states[component]
            mode = "alarm-mode" if component.startswith("motion") else "access-control-mode"
            body = status_payload(component, states[component], rng)
            message = status_message(mac, mode, STATUS_CONNECTOR, component, body)
            await self.publish(client, message)

    async def run(self) -> Summary:
        """Connect, run until ``stop`` is set, close every connection."""
        self._loop = asyncio.get_running_loop()
        await self.connect()
        start = time.perf_counter()
        try:
            await asyncio.gather(
                *(self.sensor_loop(s) for s in self.sensors),
                *(self.status_loop(mac, c) for mac, c in self.clients.items()),
            )
        finally:
            self.summary.elapsed = time.perf_counter() - start
            for task in list(self.background):
                task.cancel()
            await asyncio.gather(*(c.close() for c in self.clients.values()))
        return self.summary


async def run_live(
    settings: Settings,
    sensors: Sequence[Sensor],
    interval: float,
    stop: asyncio.Event,
    status_interval: float = 60.0,
) -> Summary:
    """Run the fleet until ``stop`` is set.

    Each sensor publishes telemetry every ``interval`` s (QoS 1); each
    controller changes a door, exit-button or motion status about every
    ``status_interval`` s (0: never) and answers strike and siren commands on
    ``cmnd/f2-<mac>/#`` by publishing the new status. Connections lost on the
    way are reopened (with their subscriptions) for as long as it runs.
    """
    return await Live(settings, sensors, interval, stop, status_interval).run()
