"""The simulated fleet: controllers (one MQTT connection each) and their wired sensors.

:func:`demo_fleet` is the demo wiring of SPEC section 3; :func:`generated_fleet`
makes any number of controllers with one Environmental Sensor each, for load.
A :class:`Sensor` keeps its current values and random-walks them per message.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import struct

from f2pipe.core.frames import crc16_modbus
from f2pipe.runtime.mqttwire import mqtt_string
from f2pipe.tools.simulator.values import (
    Template,
    demo_templates,
    sensor_templates,
    struct_format,
    value_range,
)

__all__ = ["Sensor", "demo_fleet", "generated_fleet"]


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
                lo, hi = value_range(point)
                packer = struct.Struct(struct_format(point))
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
    """The demo wiring of SPEC section 3 (controllers aabbccddee01..04), from the demo
    fleet document the database is seeded with."""
    from f2pipe.metadata.fleet.demo import demo_fleet as demo_document

    document = demo_document()
    templates = sensor_templates(document)
    template_of = {sensor.name: sensor.template for sensor in document.sensors}
    return [
        Sensor(pin.controller, pin.connector, pin.pin, templates[template_of[pin.sensor]])
        for pin in document.wiring
    ]


def generated_fleet(devices: int, prefix: str = "02f2") -> list[Sensor]:
    """``devices`` controllers (locally administered MACs ``<prefix><index>``), one
    Environmental Sensor each on J1 pin 1."""
    env = demo_templates()["Environmental Sensor"]
    width = 12 - len(prefix)
    return [Sensor(f"{prefix}{i:0{width}x}", 1, 1, env) for i in range(1, devices + 1)]
