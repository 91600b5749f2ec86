"""Load mode: publish exactly M QoS 1 messages, count the PUBACKs, write the ledger.

Messages go out as fast as the in-flight window allows, or at a fixed rate;
the ledger gets one JSON line per message the broker acknowledged, with its
topic, payload, timestamp, expected readings and injected fault (if any). That
ledger is the ground truth tests compare the pipeline against. At a fixed rate
each message is made and stamped when it is due and written at once, so its
timestamp is its publish time (latency measured from it is not inflated by a
local queue).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from f2pipe.settings import Settings
from f2pipe.tools.simulator.client import LeanClient, MqttError, Window, connect_all
from f2pipe.tools.simulator.fleet import Sensor
from f2pipe.tools.simulator.messages import FAULTS, Message, Summary, make_message
from f2pipe.tools.simulator.provisioning import device_ssl_context

__all__ = ["Load", "run_load"]


def _schedule(
    sensors: Sequence[Sensor], fault_fraction: float, rng: random.Random
) -> Iterator[tuple[Sensor, str | None]]:
    """Sensors round-robin, each message with a fault drawn at ``fault_fraction``; endless."""
    i = 0
    while True:
        sensor = sensors[i % len(sensors)]
        i += 1
        fault = rng.choice(FAULTS) if fault_fraction and rng.random() < fault_fraction else None
        yield sensor, fault


# Messages made and written per pass of the load loop at full speed: one write per
# connection per pass, and one pass per wake-up of a publisher waiting for room.
_BATCH = 512
# At a fixed rate the loop sleeps until the next message is due, but not less than this.
_MIN_SLEEP = 0.0005


class Load:
    """One load run: its connections, window, schedule and counters, reachable while it runs.

    ``summary`` counts what was published and acknowledged, ``window`` bounds
    the unacknowledged messages across all ``clients`` (one per controller),
    ``schedule`` yields the next (sensor, fault), and ``written`` holds the
    connections with messages not yet flushed. :meth:`run` publishes; see
    :meth:`run` for the contract.
    """

    def __init__(
        self,
        settings: Settings,
        sensors: Sequence[Sensor],
        count: int,
        *,
        rate: float | None = None,
        window: int = 20000,
        fault_fraction: float = 0.0,
        ledger: IO[str] | None = None,
        seed: int | None = None,
        ssl_for: Any = None,
        progress: Callable[[Summary], None] | None = None,
        give_up: float = 120.0,
        addresses: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        self.settings = settings
        # Each controller's broker (host, port); one missing connects to the settings' broker.
        self.addresses = addresses or {}
        self.sensors = sensors
        self.count = count
        self.rate = rate
        self.ledger = ledger
        self.progress = progress
        self.give_up = give_up
        self.ssl_for = ssl_for or (lambda mac: device_ssl_context(settings, mac))
        self.rng = random.Random(seed)  # noqa: S311 -- simulated values, not secrets
        self.summary = Summary()
        self.window = Window(window)
        self.batch = max(1, min(_BATCH, window // 2))
        self.schedule = _schedule(sensors, fault_fraction, self.rng)
        self.clients: dict[str, LeanClient] = {}
        self.written: dict[LeanClient, None] = {}  # connections with unflushed messages, in order

    def on_acks(self, messages: list[Message]) -> None:
        self.summary.acknowledged += len(messages)
        if self.ledger is not None:
            self.ledger.write("".join([message.ledger_line() for message in messages]))

    async def connect(self) -> None:
        """One connection per controller; raises MqttError if one is refused."""
        for sensor in self.sensors:
            if sensor.mac not in self.clients:
                host, port = self.addresses.get(
                    sensor.mac, (self.settings.mqtt_host, self.settings.mqtt_port)
                )
                self.clients[sensor.mac] = LeanClient(
                    host,
                    port,
                    f"f2-{sensor.mac}",
                    self.ssl_for(sensor.mac),
                    self.window,
                    self.on_acks,
                    give_up=self.give_up,
                )
        await connect_all(self.clients.values())

    def flush(self) -> None:
        for client in self.written:
            client.flush()
        self.written.clear()

    async def usable(self, client: LeanClient) -> None:
        """Wait while ``client`` reconnects; raise MqttError if it gave up."""
        self.flush()
        await client.usable.wait()
        if client.closed.is_set():
            raise MqttError(f"connection of {client.client_id} lost")

    async def room(self, need: int) -> None:
        if self.window.room < need:
            self.flush()
            await self.window.wait(need)

    async def run(self) -> Summary:
        """Publish exactly ``count`` QoS 1 messages over one connection per controller,
        then close the connections.

        At full speed messages are made and written in batches, bounded by
        ``window`` unacknowledged messages across all connections. With ``rate``
        each message is made (and stamped) when it is due and written at once, so
        its timestamp is its publish time; if the window is full it waits, and the
        stamp is taken after the wait.

        A ``duplicate`` fault publishes the same message twice; both copies count
        toward ``count``. ``unknown_mac`` publishes on another MAC's topic from the
        sensor's own connection: a broker with the product's ACL drops it (and
        still acknowledges it, as MQTT 3.1.1 requires), so use that fault against a
        broker without the ACL or expect those ledger entries to be missing.

        A lost connection is reopened (see :class:`LeanClient`) and its
        unacknowledged messages are published again; only PUBACKs count. Returns
        once every message is acknowledged or abandoned with a connection that
        stayed down for ``give_up`` seconds; raises MqttError when such a
        connection still has messages to send. ``ledger`` gets one line per
        acknowledged message (:meth:`Message.ledger_line`).
        """
        await self.connect()
        # The loop state lives on self; the loop reads it through locals (same objects).
        summary, win, clients, written = self.summary, self.window, self.clients, self.written
        count, rate, rng, schedule = self.count, self.rate, self.rng, self.schedule
        room, usable, flush, progress = self.room, self.usable, self.flush, self.progress
        start = time.perf_counter()
        try:
            batch = self.batch
            next_progress = 0.0
            while summary.published < count:
                left = count - summary.published
                if rate:
                    elapsed = time.perf_counter() - start
                    due = int(elapsed * rate) + 1 - summary.published
                    if due <= 0:
                        await asyncio.sleep(max(summary.published / rate - elapsed, _MIN_SLEEP))
                        continue
                    wanted = min(due, left, batch)
                    await room(1)
                else:
                    wanted = min(left, batch)
                    await room(wanted)
                target = summary.published + min(wanted, win.room)
                while summary.published < target:
                    sensor, fault = next(schedule)
                    client = clients[sensor.mac]
                    if not client.connected:
                        await usable(client)
                    message = make_message(sensor, rng, fault)
                    win.take()
                    client.publish(message)
                    written[client] = None
                    summary.published += 1
                    if fault:
                        summary.faults[fault] = summary.faults.get(fault, 0) + 1
                        if fault == "duplicate" and summary.published < count:
                            # The same bytes again, as a device retrying after a lost PUBACK.
                            await room(1)
                            if not client.connected:
                                await usable(client)
                            win.take()
                            client.publish(message)
                            written[client] = None
                            summary.published += 1
                flush()
                if progress is not None and time.perf_counter() >= next_progress:
                    progress(summary)
                    next_progress = time.perf_counter() + 0.2
                if not rate:
                    await asyncio.sleep(0)  # let the acknowledgements in
            # The last acknowledgements (or the abandoned messages of connections given up).
            await win.wait(win.limit)
            if progress is not None:
                progress(summary)
        finally:
            summary.elapsed = time.perf_counter() - start
            await asyncio.gather(*(c.close() for c in clients.values()))
            summary.reconnects = sum(c.reconnects for c in clients.values())
            summary.republished = sum(c.republished for c in clients.values())
        return summary


async def run_load(
    settings: Settings, sensors: Sequence[Sensor], count: int, **options: Any
) -> Summary:
    """``Load(settings, sensors, count, **options).run()``: the options and the
    contract are :class:`Load`'s."""
    return await Load(settings, sensors, count, **options).run()
