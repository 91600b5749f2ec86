"""Simulated F2 controllers: sensor telemetry over MQTT, live or as a counted load.

One asyncio event loop drives every device connection (one MQTT connection per
controller, client id ``f2-<mac>``), so one process holds thousands of them.

Frames follow SPEC sections 1 and 2: each sensor's template gives the
datapoints; values random-walk inside a plausible range; the frame is a Modbus
RTU response ``01 03 <count> <data> <crc lo> <crc hi>`` with a valid byte count
and CRC-16/MODBUS (:mod:`f2pipe.frames`).

Load mode (``--count M``) publishes exactly M QoS 1 messages (as fast as the
in-flight window allows, or at ``--rate R``), counts the broker's PUBACKs, and
writes a ledger: one JSON line per message the broker acknowledged, with its
topic, payload, timestamp, expected readings and injected fault (if any).
That ledger is the ground truth tests compare the pipeline against.

The MQTT client here is a small purpose-built one (CONNECT, PUBLISH QoS 0/1,
PUBACK, PINGREQ, DISCONNECT; MQTT 3.1.1): a general client spends most of a
publisher's CPU on per-message bookkeeping, and a load generator that is
slower than the system under test measures only itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import random
import signal
import ssl
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from f2pipe import tls
from f2pipe.frames import encode_modbus_response
from f2pipe.logs import setup_logging
from f2pipe.mqttwire import decode_length, encode_length
from f2pipe.settings import Settings, get_settings

log = logging.getLogger("f2pipe.simulator")

# --- frames (SPEC section 2) ---


def modbus_frame(data: bytes, address: int = 1, function: int = 3) -> bytes:
    """A Modbus RTU read response carrying ``data``, CRC appended low byte first."""
    return encode_modbus_response(address, function, data)


# --- templates and values ---

_STRUCT = {
    "int8": ">b",
    "uint8": ">B",
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "int64": ">q",
    "uint64": ">Q",
    "float32": ">f",
    "float64": ">d",
}

# Plausible ranges by datapoint label (engineering units); others use the encoding's range.
_RANGES = {
    "temperature": (15.0, 30.0),
    "humidity": (30.0, 70.0),
    "co2": (400.0, 2000.0),
    "voltage": (220.0, 240.0),
    "current": (0.0, 16.0),
}


@dataclasses.dataclass(frozen=True)
class Datapoint:
    """What the simulator needs of one template datapoint (big-endian, ABCD)."""

    label: str
    data_encoding: str
    byte_offset: int
    byte_length: int
    decimals: int

    def value_range(self) -> tuple[float, float]:
        known = _RANGES.get(self.label.lower())
        if known:
            return known
        enc = self.data_encoding
        if enc.startswith("float"):
            return (0.0, 100.0)
        bits = struct.calcsize(_STRUCT[enc]) * 8
        lo, hi = (
            (0, 2**bits - 1) if enc.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        )
        scale = 10**self.decimals
        return (lo / scale, hi / scale)

    def encode(self, value: float) -> tuple[bytes, float]:
        """The bytes of ``value`` and the value a decoder reads back from them."""
        fmt = _STRUCT[self.data_encoding]
        if self.data_encoding.startswith("float"):
            raw = struct.pack(fmt, value)
            return raw, float(struct.unpack(fmt, raw)[0])
        scaled = round(value * 10**self.decimals)
        return struct.pack(fmt, scaled), scaled / 10**self.decimals


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    datapoints: tuple[Datapoint, ...]

    @functools.cached_property
    def data_length(self) -> int:
        return max(d.byte_offset + d.byte_length for d in self.datapoints)


def demo_templates() -> dict[str, Template]:
    """The demo templates of SPEC section 3, from the seeding module (one source of truth)."""
    from f2pipe.db import DEMO_TEMPLATES

    return {
        name: Template(
            name,
            tuple(
                Datapoint(d.label, d.data_encoding, d.byte_offset, d.byte_length, d.decimals)
                for d in points
            ),
        )
        for name, points in DEMO_TEMPLATES.items()
    }


@dataclasses.dataclass
class Sensor:
    """One RS-485 sensor wired to a controller pin, with its current values."""

    mac: str
    connector: int
    pin: int
    template: Template
    values: list[float] = dataclasses.field(default_factory=list)
    last_ts: datetime | None = None
    _plan: list[tuple[Datapoint, float, float, struct.Struct]] = dataclasses.field(
        default_factory=list, repr=False
    )

    @property
    def topic(self) -> str:
        return f"tele/f2-{self.mac}/sensor-mode/J{self.connector}/sensor-{self.pin}"

    def step(self, rng: random.Random) -> tuple[bytes, list[dict[str, Any]]]:
        """Advance the random walk; return the frame and the readings it encodes."""
        plan = self._plan
        if not plan:
            plan.extend(
                (point, *point.value_range(), struct.Struct(_STRUCT[point.data_encoding]))
                for point in self.template.datapoints
            )
            self.values = [rng.uniform(lo, hi) for _p, lo, hi, _s in plan]
        data = bytearray(self.template.data_length)
        readings = []
        values = self.values
        for i, (point, lo, hi, packer) in enumerate(plan):
            walked = values[i] + (rng.random() - 0.5) * (hi - lo) / 100
            value = values[i] = lo if walked < lo else hi if walked > hi else walked
            if point.data_encoding[0] == "f":
                raw = packer.pack(value)
                decoded = float(packer.unpack(raw)[0])
            else:
                scale = 10**point.decimals
                scaled = round(value * scale)
                raw = packer.pack(scaled)
                decoded = scaled / scale
            data[point.byte_offset : point.byte_offset + len(raw)] = raw
            readings.append({"label": point.label, "value": decoded})
        return modbus_frame(bytes(data)), readings

    def next_timestamp(self, now: datetime) -> datetime:
        # Strictly increasing per sensor: two readings of one sensor never share a key.
        if self.last_ts is not None and now <= self.last_ts:
            now = self.last_ts + timedelta(microseconds=1)
        self.last_ts = now
        return now


def demo_fleet() -> list[Sensor]:
    """The demo wiring of SPEC section 3 (controllers aabbccddee01..04)."""
    from f2pipe.db import DEMO_WIRING

    templates = demo_templates()
    return [
        Sensor(mac, connector, pin, templates[template])
        for _name, template, mac, connector, pin in DEMO_WIRING
    ]


def generated_fleet(devices: int, prefix: str = "02f2") -> list[Sensor]:
    """``devices`` controllers (locally administered MACs ``<prefix><index>``), one
    Environmental Sensor each on J1 pin 1."""
    env = demo_templates()["Environmental Sensor"]
    width = 12 - len(prefix)
    return [Sensor(f"{prefix}{i:0{width}x}", 1, 1, env) for i in range(1, devices + 1)]


def provision_fleet(settings: Settings, sensors: Sequence[Sensor]) -> None:
    """Register the simulated controllers and their wired sensors in the metadata.

    Goes through ``f2pipe fleet import`` (one transaction, idempotent), so a
    re-run changes nothing and the processor sees the fleet at once (metadata
    notifications). Templates are the demo ones of SPEC section 3.
    """
    import tempfile

    import yaml

    from f2pipe.db import DEMO_TEMPLATES
    from f2pipe.fleet import import_fleet

    names = sorted({sensor.template.name for sensor in sensors})
    document = {
        "version": 1,
        "device_types": [
            {"name": "F2 Controller", "is_controller": True, "is_sensor": False},
            {"name": "RS-485 Sensor", "is_controller": False, "is_sensor": True},
        ],
        "templates": [
            {"name": "F2 Controller", "device_type": "F2 Controller", "model": "F2",
             "datapoints": []},
            *(
                {"name": name, "device_type": "RS-485 Sensor", "model": name,
                 "datapoints": [dataclasses.asdict(point) for point in DEMO_TEMPLATES[name]]}
                for name in names
            ),
        ],
        "controllers": [
            {"name": f"Simulated F2 {mac}", "mac": mac, "template": "F2 Controller"}
            for mac in dict.fromkeys(sensor.mac for sensor in sensors)
        ],
        "sensors": [
            {"name": f"Simulated {s.template.name} {s.mac} J{s.connector}/{s.pin}",
             "template": s.template.name}
            for s in sensors
        ],
        "wiring": [
            {"controller": s.mac, "connector": s.connector, "pin": s.pin,
             "sensor": f"Simulated {s.template.name} {s.mac} J{s.connector}/{s.pin}"}
            for s in sensors
        ],
    }  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", encoding="utf-8") as out:
        yaml.safe_dump(document, out, allow_unicode=True, sort_keys=False)
        out.flush()
        import_fleet(settings.metadata_dsn, Path(out.name))


# --- faults ---

FAULTS = ("bad_crc", "bad_json", "unknown_mac", "duplicate", "clock_skew")


@dataclasses.dataclass
class Message:
    topic: str
    payload: bytes
    timestamp: str
    readings: list[dict[str, Any]]
    fault: str | None = None
    client: str = ""  # MAC of the connection it is published on


def format_timestamp(ts: datetime) -> str:
    """``YYYY-MM-DD HH:MM:SS.ffffff``: the controller's format (SPEC section 1)."""
    return ts.isoformat(" ", "microseconds")


def make_message(
    sensor: Sensor, rng: random.Random, fault: str | None, skew: timedelta = timedelta(hours=48)
) -> Message:
    """One telemetry message of ``sensor``, with ``fault`` injected when given.

    ``readings`` are what the pipeline must produce; they are empty for a fault
    that makes the message a dead letter (``duplicate`` keeps them: the copy
    must not create second readings; ``clock_skew`` puts the timestamp 48 h
    ahead, which is ``timestamp_out_of_range``).
    """
    frame, readings = sensor.step(rng)
    ts = sensor.next_timestamp(datetime.now(UTC).replace(tzinfo=None))
    topic = sensor.topic
    if fault == "bad_crc":
        frame = frame[:-1] + bytes((frame[-1] ^ 0xFF,))
        readings = []
    elif fault == "clock_skew":
        ts = ts + skew
        readings = []
    elif fault == "unknown_mac":
        topic = f"tele/f2-ffffff{rng.randrange(16**6):06x}/sensor-mode/J1/sensor-1"
        readings = []
    stamp = format_timestamp(ts)
    hexdata = frame.hex(" ").upper()
    if fault == "bad_json":
        payload = f'{{"timestamp": "{stamp}", "data": "{hexdata}"'.encode()
        readings = []
    else:
        payload = f'{{"timestamp": "{stamp}", "data": "{hexdata}"}}'.encode()
    return Message(topic, payload, stamp, readings, fault, sensor.mac)


# --- a lean MQTT 3.1.1 client ---


def _utf8(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">H", len(raw)) + raw


class MqttError(Exception):
    """The broker refused or dropped a connection."""


class LeanClient:
    """One MQTT 3.1.1 connection that publishes and counts PUBACKs.

    ``publish`` never blocks on the network (writes are buffered by asyncio);
    callers bound the number of unacknowledged messages through ``window``.
    ``on_ack(message)`` runs for each PUBACK, in the event loop.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        ssl_context: ssl.SSLContext | None,
        window: asyncio.Semaphore,
        on_ack: Any,
        keepalive: int = 60,
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.ssl_context = ssl_context
        self.window = window
        self.on_ack = on_ack
        self.keepalive = keepalive
        self._inflight: dict[int, Message] = {}
        self._next_mid = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._out = bytearray()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()
        # Called as on_command(client, topic, payload) for each PUBLISH the broker sends.
        self.on_command: Callable[[LeanClient, str, bytes], None] | None = None

    async def connect(self, clean: bool = True) -> None:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ssl_context, limit=1 << 20
        )
        flags = 0x02 if clean else 0x00
        body = _utf8("MQTT") + bytes((4, flags)) + struct.pack(">H", self.keepalive)
        body += _utf8(self.client_id)
        writer.write(b"\x10" + encode_length(len(body)) + body)
        head = await reader.readexactly(4)
        if head[0] != 0x20 or head[3] != 0:
            writer.close()
            raise MqttError(f"{self.client_id}: CONNACK refused (code {head[3]})")
        self._reader, self._writer = reader, writer
        self._tasks = [
            asyncio.create_task(self._read_loop()),
            asyncio.create_task(self._ping_loop()),
        ]

    def _mid(self) -> int:
        for _ in range(65535):
            self._next_mid = self._next_mid % 65535 + 1
            if self._next_mid not in self._inflight:
                return self._next_mid
        raise MqttError("65,535 messages unacknowledged on one connection")

    def publish(self, message: Message, qos: int = 1) -> None:
        """Queue one PUBLISH; the caller holds one unit of ``window`` for QoS 1."""
        writer = self._writer
        if writer is None or self.closed.is_set():
            raise MqttError(f"{self.client_id}: not connected")
        topic = message.topic.encode()
        payload = message.payload
        if qos:
            mid = self._mid()
            self._inflight[mid] = message
            header = struct.pack(">H", len(topic)) + topic + struct.pack(">H", mid)
            fixed = 0x32
        else:
            header = struct.pack(">H", len(topic)) + topic
            fixed = 0x30
        out = self._out
        out.append(fixed)
        out += encode_length(len(header) + len(payload))
        out += header
        out += payload

    def flush(self) -> None:
        """Hand the queued packets to the transport in one write."""
        if self._out and self._writer is not None:
            self._writer.write(bytes(self._out))
            self._out.clear()

    async def drain(self) -> None:
        self.flush()
        if self._writer is not None:
            await self._writer.drain()

    async def _read_loop(self) -> None:
        # Read in bulk and split packets here: one await per chunk, not two per PUBACK.
        reader = self._reader
        assert reader is not None
        buf = b""
        try:
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    return
                buf = buf + chunk if buf else chunk
                pos, end = 0, len(buf)
                while end - pos >= 2:
                    length, i = decode_length(buf, pos + 1, end)
                    if length < 0 or end - i < length:
                        break
                    kind = buf[pos] & 0xF0
                    if kind == 0x40:  # PUBACK
                        message = self._inflight.pop((buf[i] << 8) | buf[i + 1], None)
                        if message is not None:
                            self.window.release()
                            self.on_ack(message)
                    elif kind == 0x30:  # PUBLISH (a command for this device)
                        self._incoming(buf[pos], bytes(buf[i : i + length]))
                    pos = i + length
                buf = buf[pos:]
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()

    def _incoming(self, command: int, body: bytes) -> None:
        qos = (command >> 1) & 0x03
        topic_end = 2 + ((body[0] << 8) | body[1])
        topic = body[2:topic_end].decode("utf-8", "replace")
        start = topic_end
        if qos:
            start += 2
            if self._writer is not None:  # PUBACK (QoS 1; commands are not sent with QoS 2)
                self._writer.write(b"\x40\x02" + body[topic_end:start])
        if self.on_command is not None:
            self.on_command(self, topic, body[start:])

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Send SUBSCRIBE (the SUBACK is not awaited: commands simply start arriving)."""
        if self._writer is None:
            raise MqttError(f"{self.client_id}: not connected")
        raw = topic_filter.encode()
        body = struct.pack(">H", self._mid()) + struct.pack(">H", len(raw)) + raw + bytes((qos,))
        self.flush()
        self._writer.write(b"\x82" + encode_length(len(body)) + body)

    async def _ping_loop(self) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(self.keepalive / 2)
            if self._writer is not None:
                self.flush()
                self._writer.write(b"\xc0\x00")

    @property
    def unacknowledged(self) -> int:
        return len(self._inflight)

    async def close(self) -> None:
        if self._writer is not None and not self.closed.is_set():
            with contextlib.suppress(Exception):
                self._writer.write(b"\xe0\x00")
                await self._writer.drain()
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        for task in self._tasks:
            task.cancel()
        # Whatever stays unacknowledged is not counted; give its window back.
        for _ in range(len(self._inflight)):
            self.window.release()
        self._inflight.clear()


async def connect_all(clients: Iterable[LeanClient], concurrency: int = 64) -> None:
    """Connect every client, at most ``concurrency`` handshakes at a time (a burst of
    thousands of TLS handshakes overflows the broker's accept queue and its CPU)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(client: LeanClient) -> None:
        async with gate:
            await client.connect()

    await asyncio.gather(*(one(c) for c in clients))


# --- certificates ---


def device_cert_paths(settings: Settings, mac: str) -> tuple[Path, Path]:
    """Where a simulated device keeps its identity: ``<state>/pki/devices/f2-<mac>.pem/.key``."""
    devices = settings.pki_dir / "devices"
    return devices / f"f2-{mac}.pem", devices / f"f2-{mac}.key"


def provision_certificates(
    settings: Settings, macs: Iterable[str], claiming_codes: dict[str, str] | None = None
) -> int:
    """Give every device in ``macs`` a certificate from certgen; return how many were issued.

    The private key is generated here and never leaves (0600); certgen gets a
    CSR for ``f2-<mac>`` with the device's claiming code when one is given, else
    the operator's admin token. A device whose certificate and key already
    exist is left alone, so a second run reuses them. The CA certificate from
    the answer is written to ``<state>/pki/ca.pem`` if that file is missing.
    Raises CertError naming the device and certgen's answer on a refusal.
    """
    import httpx
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from f2pipe.certgen.auth import admin_token
    from f2pipe.certgen.ca import generate_key, key_pem, write_private, write_public
    from f2pipe.errors import CertError

    codes = claiming_codes or {}
    missing = [m for m in macs if not all(p.is_file() for p in device_cert_paths(settings, m))]
    if not missing:
        return 0
    token = None if codes and all(m in codes for m in missing) else admin_token(settings, False)
    ca_file = settings.pki_dir / "ca.pem"
    verify: bool | ssl.SSLContext = (
        ssl.create_default_context(cafile=str(ca_file)) if ca_file.is_file() else True
    )
    issued = 0
    with httpx.Client(base_url=settings.certgen_url, verify=verify, timeout=30) as http:
        for mac in missing:
            key = generate_key()
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"f2-{mac}")]))
                .sign(key, hashes.SHA256())
            )
            body: dict[str, str] = {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
            headers = {}
            if mac in codes:
                body["claiming_code"] = codes[mac]
            elif token is not None:
                headers["Authorization"] = f"Bearer {token.get_secret_value()}"
            try:
                answer = http.post(f"/v1/devices/{mac}/certificate", json=body, headers=headers)
            except httpx.HTTPError as exc:
                raise CertError(f"certgen at {settings.certgen_url} unreachable: {exc}") from None
            if answer.status_code != 201:
                detail = answer.json().get("detail") if answer.content else ""
                raise CertError(f"certgen refused f2-{mac}: {answer.status_code} {detail}")
            issued_cert = answer.json()
            cert_path, key_path = device_cert_paths(settings, mac)
            write_private(key_path, key_pem(key))
            write_public(cert_path, issued_cert["certificate"].encode())
            if not ca_file.is_file():
                write_public(ca_file, issued_cert["ca_certificate"].encode())
            issued += 1
    log.info("device certificates issued", extra={"issued": issued})
    return issued


# --- load mode ---


@dataclasses.dataclass
class Summary:
    published: int = 0
    acknowledged: int = 0
    elapsed: float = 0.0
    faults: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.acknowledged / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "acknowledged": self.acknowledged,
            "elapsed_s": round(self.elapsed, 3),
            "rate_per_s": round(self.rate, 1),
            "faults": self.faults,
        }


def device_ssl_context(settings: Settings, mac: str) -> ssl.SSLContext | None:
    """A device's mTLS context from ``<state>/pki/devices/f2-<mac>.pem``/``.key``."""
    if not settings.mqtt_tls:
        return None
    cert, key = device_cert_paths(settings, mac)
    return tls.client_context(settings.pki_dir / "ca.pem", cert, key)


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


async def run_load(
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
    progress: Any = None,
) -> Summary:
    """Publish exactly ``count`` QoS 1 messages over one connection per controller.

    A ``duplicate`` fault publishes the same message twice; both copies count
    toward ``count``. ``unknown_mac`` publishes on another MAC's topic from the
    sensor's own connection: a broker with the product's ACL drops it (and
    still acknowledges it, as MQTT 3.1.1 requires), so use that fault against a
    broker without the ACL or expect those ledger entries to be missing.

    Returns once every message is acknowledged or its connection is lost; the
    summary counts what the broker acknowledged. ``window`` bounds the
    unacknowledged messages across all connections.
    """
    rng = random.Random(seed)  # noqa: S311 -- simulated values, not secrets
    summary = Summary()
    sem = asyncio.Semaphore(window)
    ssl_for = ssl_for or (lambda mac: device_ssl_context(settings, mac))

    def on_ack(message: Message) -> None:
        summary.acknowledged += 1
        if ledger is not None:
            ledger.write(
                json.dumps(
                    {
                        "topic": message.topic,
                        "timestamp": message.timestamp,
                        "payload": message.payload.decode(),
                        "readings": message.readings,
                        "fault": message.fault,
                    }
                )
                + "\n"
            )

    clients: dict[str, LeanClient] = {}
    for sensor in sensors:
        if sensor.mac not in clients:
            clients[sensor.mac] = LeanClient(
                settings.mqtt_host,
                settings.mqtt_port,
                f"f2-{sensor.mac}",
                ssl_for(sensor.mac),
                sem,
                on_ack,
            )
    await connect_all(clients.values())
    start = time.perf_counter()
    try:
        batch = 0
        schedule = _schedule(sensors, fault_fraction, rng)
        while summary.published < count:
            sensor, fault = next(schedule)
            if sem.locked():
                # About to wait for PUBACKs: send what is queued first.
                for c in clients.values():
                    c.flush()
            await sem.acquire()
            message = make_message(sensor, rng, fault)
            client = clients[sensor.mac]
            if client.closed.is_set():
                sem.release()
                raise MqttError(f"connection of f2-{sensor.mac} lost")
            client.publish(message)
            summary.published += 1
            if fault:
                summary.faults[fault] = summary.faults.get(fault, 0) + 1
            if fault == "duplicate" and summary.published < count:
                # The same bytes again, as a device retrying after a lost PUBACK would.
                if sem.locked():
                    client.flush()
                await sem.acquire()
                client.publish(dataclasses.replace(message))
                summary.published += 1
            batch += 1
            if rate:
                ahead = summary.published / rate - (time.perf_counter() - start)
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
            if batch >= 256:
                batch = 0
                await client.drain()
                if progress is not None:
                    progress(summary)
        for c in clients.values():
            await c.drain()
        # Wait for the last acknowledgements (or a lost connection).
        while summary.acknowledged < summary.published:
            if all(c.closed.is_set() or not c.unacknowledged for c in clients.values()):
                break
            await asyncio.sleep(0.005)
        if progress is not None:
            progress(summary)
    finally:
        summary.elapsed = time.perf_counter() - start
        await asyncio.gather(*(c.close() for c in clients.values()))
    return summary


# --- status components and commands (live mode) ---

# The status components every simulated controller has, on a connector its sensors
# leave free: (mode, component). Strikes and sirens obey commands; the rest change
# on their own now and then.
STATUS_CONNECTOR = 3
STATUS_COMPONENTS = (
    ("access-control-mode", "strike-1"),
    ("access-control-mode", "door-sensors"),
    ("access-control-mode", "exit-buttons"),
    ("alarm-mode", "siren-1"),
    ("alarm-mode", "motion-sensor-1"),
)
_SPONTANEOUS = ("door-sensors", "exit-buttons", "motion-sensor-1")


def status_payload(component: str, state: bool, rng: random.Random) -> dict[str, Any]:
    """The F2 status JSON of ``component`` (SPEC section 1), without its timestamp."""
    if component == "door-sensors":
        return {"door-sensor-1": state, "door-sensor-2": rng.random() < 0.5}
    if component == "exit-buttons":
        return {"exit-button-1": state, "exit-button-2": False}
    return {"status": state}


def status_message(mac: str, mode: str, component: str, body: dict[str, Any]) -> Message:
    stamp = format_timestamp(datetime.now(UTC).replace(tzinfo=None))
    topic = f"stat/f2-{mac}/{mode}/J{STATUS_CONNECTOR}/{component}"
    payload = json.dumps({"timestamp": stamp, **body}).encode()
    return Message(topic, payload, stamp, [], None, mac)


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
    ``cmnd/f2-<mac>/#`` by publishing the new status.
    """
    rng = random.Random()  # noqa: S311 -- simulated values, not secrets
    summary = Summary()
    sem = asyncio.Semaphore(65535)
    background: set[asyncio.Task[None]] = set()

    def on_ack(_m: Message) -> None:
        summary.acknowledged += 1

    async def publish(client: LeanClient, message: Message, delay: float = 0.0) -> None:
        if delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        await sem.acquire()
        if client.closed.is_set():
            sem.release()
            return
        client.publish(message)
        client.flush()
        summary.published += 1

    def spawn(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    def on_command(client: LeanClient, topic: str, payload: bytes) -> None:
        mac = client.client_id.removeprefix("f2-")
        steps = command_response(topic, payload)
        log.info("command", extra={"topic": topic, "answered": bool(steps)})
        for delay, mode, component, state in steps:
            message = status_message(mac, mode, component, status_payload(component, state, rng))
            spawn(publish(client, message, delay))

    clients: dict[str, LeanClient] = {}
    for sensor in sensors:
        if sensor.mac not in clients:
            client = LeanClient(
                settings.mqtt_host,
                settings.mqtt_port,
                f"f2-{sensor.mac}",
                device_ssl_context(settings, sensor.mac),
                sem,
                on_ack,
            )
            client.on_command = on_command
            clients[sensor.mac] = client
    await connect_all(clients.values())
    for mac, client in clients.items():
        client.subscribe(f"cmnd/f2-{mac}/#")
    log.info("devices connected", extra={"connections": len(clients), "sensors": len(sensors)})
    start = time.perf_counter()

    async def sensor_loop(sensor: Sensor) -> None:
        # Spread the sensors over the interval so the load is even.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(0, interval))
        while not stop.is_set():
            await publish(clients[sensor.mac], make_message(sensor, rng, None))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def status_loop(mac: str, client: LeanClient) -> None:
        states = dict.fromkeys(_SPONTANEOUS, False)
        while status_interval > 0 and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.expovariate(1 / status_interval))
            if stop.is_set():
                return
            component = rng.choice(_SPONTANEOUS)
            states[component] = not states[component]
            mode = "alarm-mode" if component.startswith("motion") else "access-control-mode"
            body = status_payload(component, states[component], rng)
            await publish(client, status_message(mac, mode, component, body))

    try:
        await asyncio.gather(
            *(sensor_loop(s) for s in sensors),
            *(status_loop(mac, c) for mac, c in clients.items()),
        )
    finally:
        summary.elapsed = time.perf_counter() - start
        for task in list(background):
            task.cancel()
        await asyncio.gather(*(c.close() for c in clients.values()))
    return summary


# --- command line ---


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, help="load mode: publish exactly this many messages")
    parser.add_argument("--rate", type=float, help="load mode: messages per second (default: max)")
    parser.add_argument("--window", type=int, default=20000, help="max unacknowledged messages")
    parser.add_argument(
        "--devices", type=int, help="simulate N generated controllers instead of the demo fleet"
    )
    parser.add_argument(
        "--interval", type=float, default=30.0, help="live mode: seconds per sensor"
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=60.0,
        help="live mode: mean seconds between status changes per controller (0: none)",
    )
    parser.add_argument("--faults", type=float, default=0.0, help="fraction of faulty messages")
    parser.add_argument(
        "--ledger", type=Path, help="load mode: write acknowledged messages (JSONL)"
    )
    parser.add_argument("--seed", type=int, help="random seed (reproducible values and faults)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--provision",
        action="store_true",
        help="first register the simulated controllers and sensors in the metadata",
    )
    parser.add_argument(
        "--provision-certs",
        action="store_true",
        help="first obtain missing device certificates from certgen (CSR, admin token)",
    )
    parser.add_argument("--log-level", default="WARNING")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    setup_logging("simulator", args.log_level)
    settings = get_settings()
    if not 1 <= args.window <= 65535:
        # 65,535 is the packet-id space of one connection, so no single one overflows it.
        print("--window must be between 1 and 65535", file=sys.stderr)
        return 2
    sensors = generated_fleet(args.devices) if args.devices else demo_fleet()
    if args.provision:
        provision_fleet(settings, sensors)
    if args.provision_certs:
        provision_certificates(settings, dict.fromkeys(s.mac for s in sensors))
    if args.count is None:
        stop = asyncio.Event()

        async def live() -> Summary:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            return await run_live(settings, sensors, args.interval, stop, args.status_interval)

        summary = asyncio.run(live())
    else:
        ledger = args.ledger.open("w") if args.ledger else None
        try:
            with contextlib.ExitStack() as stack:
                progress = None
                if sys.stderr.isatty() and not args.json:
                    # A live bar for a person at a terminal; logs stay quiet and structured.
                    from rich.console import Console
                    from rich.progress import Progress

                    bar = stack.enter_context(Progress(console=Console(stderr=True)))
                    task = bar.add_task("acknowledged by the broker", total=args.count)

                    def progress(summary: Summary) -> None:
                        bar.update(task, completed=summary.acknowledged)

                summary = asyncio.run(
                    run_load(
                        settings,
                        sensors,
                        args.count,
                        rate=args.rate,
                        window=args.window,
                        fault_fraction=args.faults,
                        ledger=ledger,
                        seed=args.seed,
                        progress=progress,
                    )
                )
        finally:
            if ledger is not None:
                ledger.close()
    out = summary.as_dict()
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"published {out['published']}, acknowledged {out['acknowledged']}, "
            f"{out['elapsed_s']} s, {out['rate_per_s']} msg/s"
        )
    return 0 if summary.acknowledged == summary.published else 1
