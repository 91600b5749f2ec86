"""Simulated F2 controllers: sensor telemetry over MQTT, live or as a counted load.

One asyncio event loop drives every device connection (one MQTT connection per
controller, client id ``f2-<mac>``), so one process holds thousands of them.

Frames follow SPEC sections 1 and 2: each sensor's template gives the
datapoints; values random-walk inside a plausible range; the frame is a Modbus
RTU response ``01 03 <count> <data> <crc lo> <crc hi>`` with a valid byte count
and CRC-16/MODBUS (:mod:`f2pipe.core.frames`).

Load mode (``--count M``) publishes exactly M QoS 1 messages (as fast as the
in-flight window allows, or at ``--rate R``), counts the broker's PUBACKs, and
writes a ledger: one JSON line per message the broker acknowledged, with its
topic, payload, timestamp, expected readings and injected fault (if any).
That ledger is the ground truth tests compare the pipeline against. At a
fixed rate each message is made and stamped when it is due and written at
once, so its timestamp is its publish time (latency measured from it is not
inflated by a local queue).

The MQTT client here is a small purpose-built one (CONNECT, PUBLISH QoS 0/1,
PUBACK, SUBSCRIBE, PINGREQ, DISCONNECT; MQTT 3.1.1): a general client spends
most of a publisher's CPU on per-message bookkeeping, and a load generator
that is slower than the system under test measures only itself. Messages are
written in batches (one TLS record per connection per batch), PUBACKs are
parsed in bulk, and a lost connection is reopened with jittered exponential
backoff, its unacknowledged messages published again with the DUP flag.
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
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from f2pipe.core.frames import crc16_modbus, encode_modbus_response
from f2pipe.runtime import tls
from f2pipe.runtime.gctune import quiet_gc
from f2pipe.runtime.logs import setup_logging
from f2pipe.settings import Settings, get_settings
from f2pipe.tools.simulator.client import LeanClient, MqttError, Window, connect_all
from f2pipe.tools.simulator.messages import (
    FAULTS,
    Message,
    format_timestamp,
    make_message,
    mqtt_string,
)

log = logging.getLogger("f2pipe.tools.simulator")

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

    @functools.cached_property
    def has_float(self) -> bool:
        return any(d.data_encoding.startswith("float") for d in self.datapoints)

    @functools.cached_property
    def head(self) -> bytes:
        """The frame's first three bytes: address 1, function 3 (read), byte count."""
        return bytes((1, 3, self.data_length))

    @functools.cached_property
    def layout(self) -> struct.Struct | None:
        """One struct for the frame's data, every datapoint in template order, when they
        follow each other without overlapping; None otherwise.

        Packing the data in one call rather than per datapoint is a good part of what
        keeps the load generator cheap per message.
        """
        fmt = ">"
        end = 0
        for point in self.datapoints:
            if point.byte_offset < end or point.byte_length != struct.calcsize(
                _STRUCT[point.data_encoding]
            ):
                return None
            fmt += "x" * (point.byte_offset - end) + _STRUCT[point.data_encoding][1]
            end = point.byte_offset + point.byte_length
        return struct.Struct(fmt)


def demo_templates() -> dict[str, Template]:
    """The demo templates of SPEC section 3, from the seeding module (one source of truth)."""
    from f2pipe.metadata.database import DEMO_TEMPLATES

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
    last_us: int = 0  # the last timestamp it sent, in microseconds since the epoch (UTC)
    _plan: list[tuple[int, float, float, float, int, struct.Struct, bool]] = dataclasses.field(
        default_factory=list, repr=False
    )

    @functools.cached_property
    def topic(self) -> str:
        return f"tele/f2-{self.mac}/sensor-mode/J{self.connector}/sensor-{self.pin}"

    @functools.cached_property
    def wire_topic(self) -> bytes:
        """The topic as an MQTT UTF-8 string field (length prefix included)."""
        return mqtt_string(self.topic)

    @functools.cached_property
    def labels(self) -> tuple[str, ...]:
        return tuple(point.label for point in self.template.datapoints)

    def step(self, rng: random.Random) -> tuple[bytes, tuple[float, ...]]:
        """Advance the random walk; return the frame and the values a decoder reads from it."""
        plan = self._plan
        if not plan:
            for point in self.template.datapoints:
                lo, hi = point.value_range()
                packer = struct.Struct(_STRUCT[point.data_encoding])
                is_float = point.data_encoding.startswith("float")
                plan.append((point.byte_offset, lo, hi, (hi - lo) / 100, 10**point.decimals,
                             packer, is_float))  # fmt: skip
            self.values = [rng.uniform(lo, hi) for _o, lo, hi, _w, _s, _p, _f in plan]
        values = self.values
        random_ = rng.random
        raw: list[float] = []
        decoded: list[float] = []
        for i, (_offset, lo, hi, width, scale, _packer, is_float) in enumerate(plan):
            walked = values[i] + (random_() - 0.5) * width
            value = values[i] = lo if walked < lo else hi if walked > hi else walked
            if is_float:
                raw.append(value)
                decoded.append(value)  # replaced below by what the bytes hold
            else:
                scaled = round(value * scale)
                raw.append(scaled)
                decoded.append(scaled / scale)
        template = self.template
        layout = template.layout
        if layout is not None:
            frame = template.head + layout.pack(*raw)
            if template.has_float:
                read = layout.unpack_from(frame, 3)
                decoded = [read[i] if p[6] else decoded[i] for i, p in enumerate(plan)]
        else:
            data = bytearray(template.data_length)
            for i, (offset, _lo, _hi, _w, _s, packer, is_float) in enumerate(plan):
                packed = packer.pack(raw[i])
                if is_float:
                    decoded[i] = float(packer.unpack(packed)[0])
                data[offset : offset + len(packed)] = packed
            frame = template.head + data
        return frame + crc16_modbus(frame).to_bytes(2, "little"), tuple(decoded)

    def next_timestamp_us(self, now_us: int) -> int:
        """``now_us``, or just after the previous timestamp: strictly increasing per sensor,
        so two readings of one sensor never share a key."""
        if now_us <= self.last_us:
            now_us = self.last_us + 1
        self.last_us = now_us
        return now_us


def demo_fleet() -> list[Sensor]:
    """The demo wiring of SPEC section 3 (controllers aabbccddee01..04)."""
    from f2pipe.metadata.database import DEMO_WIRING

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

    from f2pipe.metadata.database import DEMO_TEMPLATES
    from f2pipe.metadata.fleet import import_fleet

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

    from f2pipe.errors import CertError
    from f2pipe.pki.auth import admin_token
    from f2pipe.pki.ca import generate_key, key_pem, write_private, write_public

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
    reconnects: int = 0  # connections reopened after a loss
    republished: int = 0  # unacknowledged messages sent again (DUP) after a reconnect

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
            "reconnects": self.reconnects,
            "republished": self.republished,
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


# Messages made and written per pass of the load loop at full speed: one write per
# connection per pass, and one pass per wake-up of a publisher waiting for room.
_BATCH = 512
# At a fixed rate the loop sleeps until the next message is due, but not less than this.
_MIN_SLEEP = 0.0005


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
    give_up: float = 120.0,
) -> Summary:
    """Publish exactly ``count`` QoS 1 messages over one connection per controller.

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
    rng = random.Random(seed)  # noqa: S311 -- simulated values, not secrets
    summary = Summary()
    win = Window(window)
    ssl_for = ssl_for or (lambda mac: device_ssl_context(settings, mac))

    def on_acks(messages: list[Message]) -> None:
        summary.acknowledged += len(messages)
        if ledger is not None:
            ledger.write("".join([message.ledger_line() for message in messages]))

    clients: dict[str, LeanClient] = {}
    for sensor in sensors:
        if sensor.mac not in clients:
            clients[sensor.mac] = LeanClient(
                settings.mqtt_host,
                settings.mqtt_port,
                f"f2-{sensor.mac}",
                ssl_for(sensor.mac),
                win,
                on_acks,
                give_up=give_up,
            )
    await connect_all(clients.values())
    start = time.perf_counter()
    written: dict[LeanClient, None] = {}  # connections with unflushed messages, in order

    def flush() -> None:
        for client in written:
            client.flush()
        written.clear()

    async def usable(client: LeanClient) -> None:
        """Wait while ``client`` reconnects; raise MqttError if it gave up."""
        flush()
        await client.usable.wait()
        if client.closed.is_set():
            raise MqttError(f"connection of {client.client_id} lost")

    async def room(need: int) -> None:
        if win.room < need:
            flush()
            await win.wait(need)

    try:
        batch = max(1, min(_BATCH, window // 2))
        schedule = _schedule(sensors, fault_fraction, rng)
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
                        # The same bytes again, as a device retrying after a lost PUBACK would.
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
    rng = random.Random()  # noqa: S311 -- simulated values, not secrets
    summary = Summary()
    win = Window(65535)
    background: set[asyncio.Task[None]] = set()

    def on_acks(messages: list[Message]) -> None:
        summary.acknowledged += len(messages)

    async def publish(client: LeanClient, message: Message, delay: float = 0.0) -> None:
        if delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        await win.wait(1)
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
        win.take()
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
                win,
                on_acks,
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
        "--give-up",
        type=float,
        default=120.0,
        help="load mode: seconds a lost connection keeps retrying before its messages are "
        "abandoned (uncounted)",
    )
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
    # Up to the window of messages waits for its PUBACK.
    quiet_gc(50_000)
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
                        give_up=args.give_up,
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
