"""Simulated F2 controllers: sensor telemetry over MQTT, live or as a counted load.

One asyncio event loop drives every device connection (one MQTT connection per
controller, client id ``f2-<mac>``), so one process holds thousands of them.

- :mod:`.values`: templates, value ranges and Modbus frames (SPEC sections 2, 3);
- :mod:`.fleet`: the demo and generated fleets, a :class:`Sensor`'s random walk;
- :mod:`.messages`: a PUBLISH and what the pipeline must make of it, faults, the ledger;
- :mod:`.client`: the lean MQTT 3.1.1 client (batched writes, bulk PUBACKs, reconnects);
- :mod:`.load`: load mode, exactly M QoS 1 messages counted by their PUBACKs;
- :mod:`.live`: live mode, telemetry and status until stopped;
- :mod:`.commands`: status components and the answers to commands;
- :mod:`.provisioning`: fleet metadata and device certificates;
- :mod:`.cli`: ``f2pipe simulate``.
"""

from f2pipe.tools.simulator.commands import command_response
from f2pipe.tools.simulator.fleet import Sensor, demo_fleet, generated_fleet
from f2pipe.tools.simulator.live import Live, run_live
from f2pipe.tools.simulator.load import Load, run_load
from f2pipe.tools.simulator.messages import FAULTS, Summary, make_message
from f2pipe.tools.simulator.provisioning import (
    device_cert_paths,
    provision_certificates,
    provision_fleet,
)
from f2pipe.tools.simulator.values import modbus_frame

__all__ = [
    "FAULTS",
    "Live",
    "Load",
    "Sensor",
    "Summary",
    "command_response",
    "demo_fleet",
    "device_cert_paths",
    "generated_fleet",
    "make_message",
    "modbus_frame",
    "provision_certificates",
    "provision_fleet",
    "run_live",
    "run_load",
]
