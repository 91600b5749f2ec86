"""What the whole-pipeline benchmark adds to its stack to measure a fleet and a scaling step.

- :func:`provision` registers ``N`` generated controllers (one Environmental
  Sensor each) and gives each a device certificate, so every controller
  publishes on its own mTLS connection and the processor decodes its frames
  (an unregistered controller's frames would be dead letters, ``unknown_device``).
- :func:`replica` is a second processor or sink: the same service, with its own
  ops port, pid file and log, in the same consumer group as the first.
- :func:`broker_connections` counts the TCP connections the broker has accepted,
  from ``/proc/net/tcp``: what the report gives as the fleet's connections.
"""

from __future__ import annotations

import time
from pathlib import Path

from f2pipe.operations import services, stack
from f2pipe.settings import Settings
from f2pipe.tools.simulator import generated_fleet, provision_fleet


def provision(admin: Settings, devices: int) -> dict[str, float]:
    """Register ``devices`` generated controllers and issue their certificates.

    ``admin``: settings with the operator's credentials (the certificate register
    and the fleet tables need them on a secured stack). Certificates come from
    the stack's own CA, as ``f2pipe up`` issues the demo controllers' (recorded in
    the register, key and certificate under ``<state>/pki/devices``); one that
    exists is kept. Returns the seconds each step took.
    """
    from f2pipe.pki.local import issue_device_files, load_ca, open_store

    began = time.monotonic()
    sensors = generated_fleet(devices)
    provision_fleet(admin, sensors)
    registered = time.monotonic()
    folder = admin.pki_dir / "devices"
    folder.mkdir(parents=True, exist_ok=True)
    store = open_store(admin, required=True)
    assert store is not None
    try:
        ca = load_ca(admin)
        for sensor in sensors:
            if not (folder / f"f2-{sensor.mac}.pem").is_file():
                issue_device_files(admin, sensor.mac, folder, ca=ca, store=store)
    finally:
        store.close()
    return {
        "metadata_s": round(registered - began, 1),
        "certificates_s": round(time.monotonic() - registered, 1),
    }


def replica(
    kind: type[services.Service], settings: Settings, index: int, port: int
) -> services.Service:
    """Replica ``index`` (2, 3, ...) of the service ``kind``, its ops server on ``port``.

    It keeps the service's name, so it runs with that service's own credentials
    and in its consumer group; its pid file and log are ``<name>-<index>``.
    """
    own = settings.model_copy(update={kind.port_field: port})
    service = kind(own, stack.Paths(settings.state_dir))
    label = f"{kind.name}-{index}"
    service.pidfile = stack.PidFile(service.paths.run / f"{label}.pid")
    service.log_file = service.paths.log / f"{label}.log"
    return service


def start(replicas: list[services.Service]) -> None:
    """Start each replica and wait until it answers ``/healthz``; raises StackError."""
    for service in replicas:
        service.pidfile.remove()
        service.check_ports()
        service.start()
    for service in replicas:
        service.wait_healthy()


def broker_connections(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (the broker's side)."""
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 01 is ESTABLISHED.
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count
