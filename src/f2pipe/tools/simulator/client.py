"""A lean MQTT 3.1.1 client for simulated devices: CONNECT, PUBLISH QoS 0/1, PUBACK,
SUBSCRIBE, PINGREQ, DISCONNECT.

A general client spends most of a publisher's CPU on per-message bookkeeping,
and a load generator that is slower than the system under test measures only
itself. Messages are written in batches (one TLS record per connection per
batch), PUBACKs are parsed in bulk, and a lost connection is reopened with
jittered exponential backoff, its unacknowledged messages published again with
the DUP flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from collections.abc import Callable, Iterable
from typing import Any, cast

from f2pipe.errors import F2PipeError
from f2pipe.runtime.backoff import Backoff
from f2pipe.runtime.mqttwire import (
    MalformedPacket,
    encode_length,
    mqtt_string,
    puback_ids,
    pubacks,
    split_packets,
)
from f2pipe.tools.simulator.messages import Message

__all__ = ["AckHandler", "LeanClient", "MqttError", "Window", "connect_all"]

log = logging.getLogger(__name__)


class MqttError(F2PipeError):
    """The broker refused or dropped a connection."""


_PUBLISH_HEADS: dict[tuple[int, int], bytes] = {}
_DUP = 0x08


def _publish_head(first: int, length: int) -> bytes:
    """The fixed header of a PUBLISH: first byte ``first``, ``length`` bytes after it.

    Cached: a device's messages nearly all have one length, so every message
    after the first reuses the same few bytes.
    """
    head = _PUBLISH_HEADS.get((first, length))
    if head is None:
        head = bytes((first,)) + encode_length(length)
        if len(_PUBLISH_HEADS) < 4096:
            _PUBLISH_HEADS[(first, length)] = head
    return head


class Window:
    """A bound on unacknowledged QoS 1 messages, shared by the connections of one event loop.

    A publisher :meth:`take` s a unit per QoS 1 message and the connection
    :meth:`give` s it back when the PUBACK arrives (or when the message is
    abandoned with its connection). :meth:`wait` returns once a given amount
    of room is free, so a publisher waiting for room wakes once per batch of
    acknowledgements rather than once per message.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the window must allow at least one message")
        self.limit = limit
        self.used = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def room(self) -> int:
        return self.limit - self.used

    def take(self, n: int = 1) -> None:
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        if self._waiters:
            room = self.limit - self.used
            waiting = []
            for need, future in self._waiters:
                if need > room:
                    waiting.append((need, future))
                elif not future.done():
                    future.set_result(None)
            self._waiters = waiting

    async def wait(self, need: int = 1) -> None:
        """Return once ``need`` more messages fit (``need`` is capped at the limit, so
        ``wait(limit)`` returns once nothing is unacknowledged)."""
        need = min(need, self.limit)
        while self.limit - self.used < need:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((need, future))
            await future


class _Protocol(asyncio.Protocol):
    """Hands one connection's transport events to its :class:`LeanClient`."""

    def __init__(self, client: LeanClient) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client._made(self, transport)

    def data_received(self, data: bytes) -> None:
        self.client._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(self)


AckHandler = Callable[[list[Message]], None]
"""Called with the messages one read acknowledged, in the order they were published."""


class LeanClient:
    """One device's MQTT 3.1.1 connection: QoS 0/1 publishes, PUBACKs counted, reconnects.

    - :meth:`publish` only appends to a buffer and :meth:`flush` hands the
      buffer to the transport in one write, so a batch of messages costs one
      TLS record and one system call. For QoS 1 the caller takes a unit of the
      shared :class:`Window` first; the PUBACK gives it back.
    - PUBACKs are parsed in bulk as the transport delivers bytes, and
      ``on_acks`` runs once per read with the messages the broker
      acknowledged. A message counts as acknowledged only then.
    - A lost connection (broker restart, network) is reopened with jittered
      exponential backoff; every unacknowledged message is then published
      again with its packet identifier and the DUP flag, and the
      subscriptions are renewed. After ``give_up`` seconds (None: never)
      without a connection the client stops: ``closed`` is set and its
      unacknowledged messages are given back to the window, uncounted.
    - ``usable`` is set while the client is connected or closed for good:
      what a publisher waits for before :meth:`publish`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        ssl_context: ssl.SSLContext | None,
        window: Window,
        on_acks: AckHandler,
        keepalive: int = 60,
        give_up: float | None = None,
        handshakes: asyncio.Semaphore | None = None,
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.ssl_context = ssl_context
        self.window = window
        self.on_acks = on_acks
        self.keepalive = keepalive
        self.give_up = give_up
        # Shared by the clients of one loop: bounds concurrent TLS handshakes on reconnects.
        self.handshakes = handshakes
        # Called as on_command(client, topic, payload) for each PUBLISH the broker sends.
        self.on_command: Callable[[LeanClient, str, bytes], None] | None = None
        self.connected = False
        self.usable = asyncio.Event()
        self.closed = asyncio.Event()
        self.reconnects = 0
        self.republished = 0
        self._inflight: dict[int, Message] = {}  # packet id -> message, in publish order
        self._next_mid = 0
        self._protocol: _Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._connack: asyncio.Future[int] | None = None
        self._out = bytearray()
        self._rbuf = b""
        self._filters: list[str] = []
        self._closing = False
        self._silent_pings = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # --- connection ---

    async def connect(self) -> None:
        """Open the first connection; raises MqttError naming the broker (no retry here)."""
        try:
            await self._open()
        except OSError as exc:  # refused, unreachable, timed out, TLS handshake refused
            why = exc.strerror or str(exc) or type(exc).__name__
            raise MqttError(
                f"{self.client_id}: cannot reach the broker at {self.host}:{self.port} ({why}):"
                " start it (`f2pipe up`), or check F2PIPE_MQTT_HOST, F2PIPE_MQTT_PORT and"
                " F2PIPE_MQTT_BROKERS"
            ) from None
        self.usable.set()
        self._spawn(self._ping_loop())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        gate = self.handshakes if self.handshakes is not None else contextlib.nullcontext()
        async with gate:
            connack: asyncio.Future[int] = loop.create_future()
            self._connack = connack
            transport, _protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(self), self.host, self.port, ssl=self.ssl_context
                ),
                30,
            )
            body = mqtt_string("MQTT") + bytes((4, 0x02)) + struct.pack(">H", self.keepalive)
            body += mqtt_string(self.client_id)
            transport.write(b"\x10" + encode_length(len(body)) + body)
            try:
                code = await asyncio.wait_for(connack, 30)
            except BaseException:
                transport.abort()
                raise
        if code != 0:
            transport.abort()
            raise MqttError(f"{self.client_id}: CONNACK refused (code {code})")
        self.connected = True

    def _made(self, protocol: _Protocol, transport: asyncio.Transport) -> None:
        self._protocol, self._transport = protocol, transport
        self._out, self._rbuf = bytearray(), b""

    def _lost(self, protocol: _Protocol) -> None:
        if protocol is not self._protocol:
            return  # a connection this client already replaced
        was_connected = self.connected
        self._protocol = self._transport = None
        self.connected = False
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError(f"{self.client_id}: connection closed"))
        if self._closing:
            self.closed.set()
        elif was_connected:
            self.usable.clear()
            self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        lost_at = loop.time()
        backoff = Backoff(base=0.1, cap=10.0)
        log.info("connection lost; reconnecting", extra={"client": self.client_id})
        while not self._closing:
            await asyncio.sleep(backoff.next_delay())
            try:
                await self._open()
            except Exception as exc:  # whatever failed, the next attempt may succeed
                if self.give_up is not None and loop.time() - lost_at > self.give_up:
                    log.warning(
                        "giving up reconnecting",
                        extra={"client": self.client_id, "error": str(exc)},
                    )
                    self._abandon()
                    return
                continue
            self.reconnects += 1
            # Unacknowledged messages again, with their packet ids, before anything new.
            out = self._out
            for mid, message in self._inflight.items():
                wire, payload = message.wire_topic, message.payload
                out += _publish_head(0x32 | _DUP, len(wire) + 2 + len(payload))
                out += wire
                out += mid.to_bytes(2, "big")
                out += payload
            self.republished += len(self._inflight)
            for topic_filter in self._filters:
                self._send_subscribe(topic_filter)
            self.flush()
            self.usable.set()
            return

    def _abandon(self) -> None:
        """Stop for good; unacknowledged messages leave the window uncounted."""
        self._closing = True
        if self._inflight:
            self.window.give(len(self._inflight))
            self._inflight.clear()
        self.closed.set()
        self.usable.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ping_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.keepalive / 2)
            transport = self._transport
            if transport is None or not self.connected:
                continue
            self._silent_pings += 1
            if self._silent_pings > 3:
                # Nothing, not even a PINGRESP, for 1.5 keepalives: the connection is dead.
                transport.abort()
                continue
            self.flush()
            transport.write(b"\xc0\x00")

    async def close(self) -> None:
        """DISCONNECT and close; what stays unacknowledged leaves the window uncounted."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        transport = self._transport
        if transport is not None:
            if self.connected:
                self.flush()
                transport.write(b"\xe0\x00")
            transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), 5)
        self._abandon()

    # --- publishing ---

    @property
    def unacknowledged(self) -> int:
        return len(self._inflight)

    def publish(self, message: Message, qos: int = 1) -> None:
        """Buffer one PUBLISH for the next :meth:`flush`; raises MqttError when not connected.

        For QoS 1 the caller has taken one unit of the window.
        """
        if not self.connected:
            raise MqttError(f"{self.client_id}: not connected")
        wire, payload = message.wire_topic, message.payload
        out = self._out
        if qos:
            mid = self._next_mid % 65535 + 1
            if mid in self._inflight:
                mid = self._free_mid()
            self._next_mid = mid
            self._inflight[mid] = message
            out += _publish_head(0x32, len(wire) + 2 + len(payload))
            out += wire
            out += mid.to_bytes(2, "big")
        else:
            out += _publish_head(0x30, len(wire) + len(payload))
            out += wire
        out += payload

    def _free_mid(self) -> int:
        for _ in range(65535):
            self._next_mid = self._next_mid % 65535 + 1
            if self._next_mid not in self._inflight:
                return self._next_mid
        raise MqttError("65,535 messages unacknowledged on one connection")

    def flush(self) -> None:
        """Hand the buffered packets to the transport in one write."""
        if self._out and self._transport is not None:
            # The transport keeps the object until it is sent: hand it over, start a new one.
            data, self._out = self._out, bytearray()
            self._transport.write(data)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and after every reconnect (the SUBACK is not awaited)."""
        self._filters.append(topic_filter)
        if self.connected:
            self._send_subscribe(topic_filter, qos)
            self.flush()

    def _send_subscribe(self, topic_filter: str, qos: int = 1) -> None:
        mid = self._free_mid()  # an id no PUBLISH in flight uses
        body = mid.to_bytes(2, "big") + mqtt_string(topic_filter) + bytes((qos,))
        self._out += b"\x82" + encode_length(len(body)) + body

    # --- input ---

    def _received(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        self._silent_pings = 0
        if self._rbuf:
            data = self._rbuf + data
            self._rbuf = b""
        # Under load a read is nothing but PUBACKs: all their packet ids are taken at once
        # instead of walking the packets one by one.
        ids = puback_ids(data) if self.connected else None
        if ids is not None:
            self._acknowledged(ids)
            return
        self._received_slowly(data)

    def _acknowledged(self, ids: Iterable[int]) -> None:
        pop = self._inflight.pop
        found = [pop(mid, None) for mid in ids]
        # None: an id this client never sent or already had acknowledged.
        acked = [m for m in found if m is not None] if None in found else cast(list[Message], found)
        if acked:
            self.window.give(len(acked))
            self.on_acks(acked)

    def _received_slowly(self, data: bytes) -> None:
        try:
            packets, pos = split_packets(data)
        except MalformedPacket:
            self._protocol_error("malformed remaining length")
            return
        acked: list[int] = []
        for first, i, end in packets:
            kind = first & 0xF0
            if kind == 0x40 and end - i >= 2:  # PUBACK
                acked.append((data[i] << 8) | data[i + 1])
            elif kind == 0x30:  # PUBLISH: a command for this device
                self._incoming(first, data[i:end])
            elif kind == 0x20 and end - i >= 2:  # CONNACK
                connack = self._connack
                if connack is not None and not connack.done():
                    connack.set_result(data[i + 1])
        self._rbuf = data[pos:]
        if acked:
            self._acknowledged(acked)

    def _protocol_error(self, what: str) -> None:
        log.warning("protocol error from broker", extra={"client": self.client_id, "error": what})
        if self._transport is not None:
            self._transport.abort()

    def _incoming(self, command: int, body: bytes) -> None:
        qos = (command >> 1) & 0x03
        topic_end = 2 + ((body[0] << 8) | body[1])
        topic = body[2:topic_end].decode("utf-8", "replace")
        start = topic_end
        if qos:
            start += 2
            if self._transport is not None:  # PUBACK (commands are not sent with QoS 2)
                self.flush()
                self._transport.write(pubacks([(body[topic_end] << 8) | body[topic_end + 1]]))
        if self.on_command is not None:
            self.on_command(self, topic, body[start:])


async def connect_all(clients: Iterable[LeanClient], concurrency: int = 64) -> None:
    """Connect every client, at most ``concurrency`` handshakes at a time (a burst of
    thousands of TLS handshakes overflows the broker's accept queue and its CPU).

    Clients without a handshake gate of their own share this one, for their reconnects too.
    """
    gate = asyncio.Semaphore(concurrency)
    clients = list(clients)
    for client in clients:
        if client.handshakes is None:
            client.handshakes = gate
    await asyncio.gather(*(client.connect() for client in clients))
