"""The connector's MQTT v5 connection: the ``mqtt5`` codec driven by the connector's own loop.

``mqtt5`` is sans-I/O (a codec in Rust, public API): it turns bytes into
packets and packets into bytes and owns no socket. This module owns the socket
and the session's few rules: CONNECT with a persistent session, SUBSCRIBE,
keepalive PINGREQs, DISCONNECT, and noticing a lost connection. Reconnecting
is the runner's (it calls :meth:`MqttClient.connect` again after its backoff).

What makes it fast is working in bulk: up to 256 KiB per ``recv``, every
complete packet of a read decoded in one pass and the PUBLISH packets among
them handed to ``publish_handler`` as one list; every outgoing packet gathered
in one buffer that :meth:`flush_output` writes with one ``send``. PUBACKs, the
one per-message packet it writes, are built in bulk by
:func:`f2pipe.runtime.mqttwire.pubacks` (a tenth of the codec's cost per
message; ``bench/mqtt5_bench.py`` measures both). Nothing here blocks except
:meth:`connect`; only the thread that runs the loop may call it.

A caller with no room for more messages (its window of unacknowledged
messages is full, e.g. while Kafka is down) still reads: control packets
(CONNACK, SUBACK, PINGRESP, DISCONNECT) are handled as they arrive, so the
keepalive and a reconnection work with the window full, and PUBLISH packets
are held, in order, until the caller has room. The broker sends at most
``receive_maximum`` unacknowledged QoS 1 messages (MQTT 5 Receive Maximum,
which Mosquitto 2 also applies to a persistent session's queued messages), so
the held packets stay within that many; only a broker that breaks the limit,
or QoS 0 messages (outside the limit), can hold more, and then the socket is
not read until the caller takes some (the keepalive may then close the
connection; the broker sends the QoS 1 messages again on the next one).
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable

import mqtt5
from mqtt5 import (
    ConnAckPacket,
    ConnAckReasonCode,
    ConnectPacket,
    DisconnectPacket,
    PingReqPacket,
    PingRespPacket,
    PublishPacket,
    QoS,
    SubAckPacket,
    SubscribePacket,
    TopicFilter,
)

from f2pipe.runtime.mqttwire import MalformedPacket, packet_end, pubacks

__all__ = ["MqttClient", "PublishHandler"]

log = logging.getLogger(__name__)

PublishHandler = Callable[[list[PublishPacket]], None]
"""Takes the PUBLISH packets of one read, in the order the broker sent them."""

_PINGREQ = PingReqPacket().write()
_EXACTLY_ONCE = QoS.EXACTLY_ONCE
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class MqttClient:
    """One MQTT v5 connection at a time, driven by the caller's ``select`` loop.

    Callbacks run on the loop thread, from :meth:`read_packets`,
    :meth:`flush_output`, :meth:`loop_misc` or :meth:`connection_lost`:

    - ``on_connect(session_present, refusal)``: the CONNACK; ``refusal`` is the
      broker's reason name when it refused (the connection is then closed);
    - ``on_subscribe(refusals)``: the SUBACK; the reason names of refused filters;
    - ``on_disconnect(reason)``: the connection is gone (lost, refused, timed
      out, closed by the broker or after :meth:`disconnect`); :meth:`socket` is
      None from then on.
    """

    READ_SIZE = 256 * 1024
    READS_PER_PASS = 256
    CONNECT_TIMEOUT = 5.0  # TCP connect and TLS handshake

    def __init__(
        self,
        client_id: str,
        *,
        ssl_context: ssl.SSLContext | None,
        keepalive: int,
        session_expiry: int,
        receive_maximum: int,
        publish_handler: PublishHandler,
        on_connect: Callable[[bool, str | None], None],
        on_subscribe: Callable[[list[str]], None],
        on_disconnect: Callable[[str], None],
    ) -> None:
        self.client_id = client_id
        self.ssl_context = ssl_context
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.receive_maximum = receive_maximum
        self.publish_handler = publish_handler
        self.on_connect = on_connect
        self.on_subscribe = on_subscribe
        self.on_disconnect = on_disconnect
        self.connected = False  # CONNACK accepted on the current connection
        self.backlog = False  # received bytes may be waiting in the TLS layer
        # PUBLISH packets received while the caller had no room, in arrival order.
        self._held: list[PublishPacket] = []
        self._sock: socket.socket | None = None
        self._rbuf = bytearray()
        self._wbuf = bytearray()
        self._last_in = 0.0
        self._last_out = 0.0
        self._ping_sent = 0.0  # when the unanswered PINGREQ went out; 0 when none is
        self._closing = False  # DISCONNECT queued: close once it is written
        self._last_mid = 0

    # --- the connection ---

    def socket(self) -> socket.socket | None:
        """The open socket, None while disconnected."""
        return self._sock

    def connect(self, host: str, port: int) -> None:
        """Open a connection (TCP, then TLS when configured) and queue CONNECT.

        Blocks for at most :attr:`CONNECT_TIMEOUT` per step; raises OSError
        (ssl.SSLError included) or ValueError when the broker cannot be reached.
        The CONNACK arrives later through :meth:`read_packets`.
        """
        self._close()
        sock = socket.create_connection((host, port), timeout=self.CONNECT_TIMEOUT)
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(
                    sock, server_hostname=host, do_handshake_on_connect=False
                )
                sock.settimeout(self.CONNECT_TIMEOUT)
                sock.do_handshake()
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._last_in = self._last_out = time.monotonic()
        self._ping_sent = 0.0
        self._wbuf += ConnectPacket(
            self.client_id,
            clean_start=False,
            keep_alive=self.keepalive,
            session_expiry_interval=self.session_expiry,
            receive_max=self.receive_maximum,
        ).write()

    def disconnect(self, session_expiry: int | None = None) -> None:
        """Queue DISCONNECT (setting the session's expiry when given); the connection
        closes once :meth:`flush_output` wrote it."""
        if self._sock is None:
            return
        self._wbuf += DisconnectPacket(session_expiry_interval=session_expiry).write()
        self._closing = True

    def connection_lost(self, reason: str = "connection lost") -> None:
        """Treat the connection as lost now: close it and report it."""
        if self._sock is None:
            return
        self._close()
        self.on_disconnect(reason)

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self.connected = self._closing = self.backlog = False
        self._rbuf, self._wbuf = bytearray(), bytearray()
        # Unacknowledged, so the broker sends them again on the next connection; their
        # packet ids mean nothing there.
        self._held = []

    # --- input ---

    def read_packets(self, limit: int) -> bool:
        """Receive what the socket has, handle its control packets, and hand up to
        ``limit`` PUBLISH packets (held ones first) to ``publish_handler``.

        PUBLISH packets over ``limit`` are held for later calls; ``limit`` may be 0
        or less. The socket is not read while more than :attr:`receive_maximum`
        packets are held (so they stay within that many plus one read).
        Returns False when the connection is gone (``on_disconnect`` has run).
        Never blocks.
        """
        sock = self._sock
        if sock is None:
            return False
        if self._held:
            limit = self._release(limit)
            if not self.wants_read():
                return True
        # Over TLS one recv returns one record, and brokers often send one packet per
        # record: gather several before handling, so one pass (and one write of the
        # PUBACKs it produces) covers many messages.
        rbuf = self._rbuf
        recv = sock.recv
        size = self.READ_SIZE
        received = False
        for _ in range(self.READS_PER_PASS):
            try:
                data = recv(size)
            except _WOULD_BLOCK:
                break
            except OSError:
                self.connection_lost()
                return False
            if not data:
                self.connection_lost()
                return False
            rbuf += data
            received = True
            if len(rbuf) >= size:
                break
        if received:
            self._last_in = time.monotonic()
        return self._handle_buffered(limit)

    def wants_read(self) -> bool:
        """Whether the socket is to be read when it is readable (see :meth:`read_packets`)."""
        return len(self._held) <= self.receive_maximum

    def has_work(self, limit: int) -> bool:
        """Whether :meth:`read_packets` with ``limit`` makes progress without waiting for
        the socket: held packets the caller has room for, or input already received."""
        return (limit > 0 and bool(self._held)) or (self.backlog and self.wants_read())

    def held(self) -> int:
        """PUBLISH packets received and not yet handed to ``publish_handler``."""
        return len(self._held)

    def feed(self, data: bytes, limit: int) -> None:
        """Handle ``data`` as if the socket had delivered it, handing over up to ``limit``
        PUBLISH packets as :meth:`read_packets` does.

        The decoding path alone, without a connection: for benchmarks and tests.
        """
        if self._held:
            limit = self._release(limit)
        self._rbuf += data
        self._handle_buffered(limit)

    def _release(self, limit: int) -> int:
        """Hand up to ``limit`` held packets over; return the limit left."""
        if limit <= 0:
            return limit
        take, self._held = self._held[:limit], self._held[limit:]
        self.publish_handler(take)
        return limit - len(take)

    def _deliver(self, batch: list[PublishPacket], limit: int) -> int:
        """Hand ``batch`` over up to ``limit`` and hold the rest; return the limit left."""
        # Behind held packets nothing is handed over: they go first, once there is room.
        take = 0 if self._held else max(0, min(limit, len(batch)))
        if take == len(batch):
            self.publish_handler(batch)
        else:
            if take:
                self.publish_handler(batch[:take])
            self._held += batch[take:]
        return limit - take

    def _handle_buffered(self, limit: int) -> bool:
        rbuf = self._rbuf
        # bytes, not the bytearray: the buffer is resized below, views of it must not live.
        buf = bytes(rbuf)
        view = memoryview(buf)
        read = mqtt5.read
        pos, end = 0, len(buf)
        batch: list[PublishPacket] = []
        append = batch.append
        self.backlog = False
        while pos < end:
            try:
                packet, size = read(view[pos:])
            except IndexError:
                # The codec's "not enough bytes": normally the rest of the packet is still
                # on its way; if all of it is here, the packet itself is malformed.
                try:
                    incomplete = packet_end(buf, pos, end) < 0
                except MalformedPacket:
                    incomplete = False
                if incomplete:
                    break
                return self._protocol_error("malformed packet")
            except ValueError as exc:
                return self._protocol_error(str(exc))
            pos += size
            # Identity, not ==: the codec hands out its enum's members, and a comparison
            # costs more per message.
            if type(packet) is PublishPacket and packet.qos is not _EXACTLY_ONCE:
                append(packet)
                continue
            if batch:
                limit = self._deliver(batch, limit)
                batch = []
                append = batch.append
            if not self._control(packet) or self._sock is None:
                return False
        del rbuf[:pos]
        if batch:
            self._deliver(batch, limit)
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            self.backlog = True
        return self._sock is not None

    def _control(self, packet: mqtt5.Packet) -> bool:
        """Handle one packet other than PUBLISH; False when it ended the connection."""
        if isinstance(packet, ConnAckPacket):
            if packet.reason_code != ConnAckReasonCode.SUCCESS:
                self.on_connect(packet.session_present, packet.reason_code.name)
                self.connection_lost(f"refused: {packet.reason_code.name}")
                return False
            if packet.server_keep_alive is not None:
                self.keepalive = packet.server_keep_alive  # the broker's word is final
            self.connected = True
            self.on_connect(packet.session_present, None)
        elif isinstance(packet, SubAckPacket):
            # The codes are the codec's own enum type, not int: compare their values.
            self.on_subscribe([code.name for code in packet.reason_codes if int(code) >= 0x80])
        elif isinstance(packet, PingRespPacket):
            self._ping_sent = 0.0
        elif isinstance(packet, PublishPacket):  # QoS 2: above what this client subscribes with
            return self._protocol_error("QoS 2 PUBLISH on a QoS 1 subscription")
        elif isinstance(packet, DisconnectPacket):
            self.connection_lost(f"broker disconnected: {packet.reason_code.name}")
            return False
        else:
            log.debug("ignored MQTT packet", extra={"packet": type(packet).__name__})
        return True

    def _protocol_error(self, what: str) -> bool:
        log.warning("protocol error from broker", extra={"error": what})
        self.connection_lost(f"protocol error: {what}")
        return False

    # --- output ---

    def subscribe(self, topic_filters: Iterable[str], qos: int = 1) -> None:
        """Queue one SUBSCRIBE for ``topic_filters`` at ``qos``; the SUBACK comes to
        ``on_subscribe``."""
        self._last_mid = self._last_mid % 65535 + 1
        filters = [
            TopicFilter(pattern, max_qos=QoS(qos), retain_as_published=False)
            for pattern in topic_filters
        ]
        self._wbuf += SubscribePacket(self._last_mid, filters).write()

    def ack_many(self, mids: list[int]) -> None:
        """Queue the PUBACKs of the QoS 1 messages ``mids``, in order."""
        if mids and self._sock is not None:
            self._wbuf += pubacks(mids)

    def pending_output(self) -> bool:
        return bool(self._wbuf)

    def flush_output(self) -> bool:
        """Hand queued packets to the socket; False when the connection failed."""
        sock = self._sock
        if not self._wbuf or sock is None:
            return True
        try:
            sent = sock.send(self._wbuf)
        except _WOULD_BLOCK:
            return True
        except OSError:
            return False
        del self._wbuf[:sent]
        self._last_out = time.monotonic()
        if self._closing and not self._wbuf:
            self._close()
            self.on_disconnect("disconnected")
        return True

    def loop_misc(self) -> None:
        """Keepalive: a PINGREQ when the line was quiet for the keepalive interval; the
        connection is lost when nothing (not even a CONNACK or PINGRESP) came back in
        another interval."""
        keepalive = self.keepalive
        if self._sock is None or not keepalive:
            return
        now = time.monotonic()
        if now - self._last_out < keepalive and now - self._last_in < keepalive:
            return
        if self.connected and (not self._ping_sent or now - self._last_in < keepalive):
            if not self._ping_sent or now - self._ping_sent >= keepalive:
                self._wbuf += _PINGREQ
                self._ping_sent = now
            self._last_out = self._last_in = now
        else:
            self.connection_lost("keepalive timeout")
