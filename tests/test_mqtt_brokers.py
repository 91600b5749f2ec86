"""Devices over several MQTT brokers (SPEC section 10, ``F2PIPE_MQTT_BROKERS``).

The first tests check, without servers, what two or three brokers make of the
brokers' names and ports, the stack's servers, the connector groups and the
ACLs. The others run on a private stack with two brokers (``f2pipe up`` in a
temporary state folder, certgen included), the demo fleet split over them by
``f2pipe fleet import``:

- every public decoding vector, each from a controller of its own, half of
  them assigned to each broker, gets its certificate from certgen (whose
  answer names the controller's broker) and is published to that broker; the
  readings land exactly, the bad frames are dead-lettered. A controller with a
  valid certificate that publishes to the other broker is refused there
  (PUBACK "not authorized") and lands nothing. ``f2pipe status`` shows both
  brokers with their connectors, and ``f2pipe cmnd`` reaches a controller on
  the broker it belongs to;
- while the simulator publishes, the connector of ``mqtt-2`` is killed with
  SIGKILL: rows from ``mqtt-1``'s controllers keep arriving while ``mqtt-2``'s
  stop; started again, its connector drains what the broker queued for it, and
  the table holds every acknowledged reading exactly once;
- revoking a controller of ``mqtt-2`` closes its live session there.
"""

from __future__ import annotations

import json
import math
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from conftest import VECTORS, unique, wait_until
from f2pipe.errors import ConfigError, StackError
from f2pipe.operations import pipeline, services, status
from f2pipe.operations.stack import Paths, commands, security
from f2pipe.operations.stack.mosquitto import acl_path, listed_devices, render_acl
from f2pipe.operations.stack.mqtt_shards import sync_acls
from f2pipe.operations.stack.supervise import port_in_use
from f2pipe.runtime.brokerstats import BrokerMonitor, BrokerMonitors
from f2pipe.runtime.mqttbrokers import broker_named, brokers, device_broker_file
from f2pipe.settings import Settings, load_settings
from f2pipe.testing.stack import free_ports, private_settings, private_state
from f2pipe.tools import cmnd
from f2pipe.tools.simulator.provisioning import device_ssl_context, provision_certificates
from pipeline_helpers import Fleet, env_frame
from test_pipeline import (
    Publisher,
    _kill,
    dead_letters,
    drained,
    expected_rows,
    failure_logs,
    read_ledger,
    stored_rows,
)

# The demo controllers the split moves to the second broker.
SECOND = ("aabbccddee03", "aabbccddee04")
NOT_AUTHORIZED = 135  # MQTT v5 reason code of a PUBACK the broker's ACL refused


def _f2pipe(environment: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``f2pipe ARGS`` as an operator runs it, with ``environment`` over this one's."""
    return subprocess.run(
        [sys.executable, "-m", "f2pipe.cli", *args],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------- no servers
def test_brokers_are_named_and_listen_two_ports_apart(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, mqtt_port=8883, mqtt_brokers=3)
    assert [(b.name, b.port, b.url) for b in brokers(settings)] == [
        ("mqtt-1", 8883, "mqtts://127.0.0.1:8883"),
        ("mqtt-2", 8885, "mqtts://127.0.0.1:8885"),
        ("mqtt-3", 8887, "mqtts://127.0.0.1:8887"),
    ]
    assert broker_named(settings, None).name == "mqtt-1"
    with pytest.raises(ConfigError, match=r"unknown broker 'mqtt-4'.*mqtt-1, mqtt-2, mqtt-3"):
        broker_named(settings, "mqtt-4")


def test_devices_may_reach_a_broker_at_another_address(tmp_path: Path) -> None:
    urls = "mqtt-2=mqtts://broker-b.example.net:8883"
    settings = load_settings(
        state_dir=tmp_path, mqtt_port=8883, mqtt_brokers=2, mqtt_broker_urls=urls
    )
    assert [b.url for b in brokers(settings)] == [
        "mqtts://127.0.0.1:8883",
        "mqtts://broker-b.example.net:8883",
    ]
    assert brokers(settings)[1].port == 8885  # the stack and the connectors stay local
    with pytest.raises(ConfigError, match=r"F2PIPE_MQTT_BROKER_URLS='mqtt-2=http://b:1' is"):
        load_settings(state_dir=tmp_path, mqtt_broker_urls="mqtt-2=http://b:1")
    past = settings.model_copy(update={"mqtt_brokers": 1})
    with pytest.raises(ConfigError, match="names mqtt-2, but F2PIPE_MQTT_BROKERS=1"):
        brokers(past)


def test_services_may_reach_each_broker_on_a_host_of_its_own(tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path,
        mqtt_host="mosquitto",
        mqtt_port=8883,
        mqtt_brokers=3,
        mqtt_broker_hosts="mqtt-2=mosquitto-2, mqtt-3=mosquitto-3",
    )
    assert [(b.host, b.port) for b in brokers(settings)] == [
        ("mosquitto", 8883),
        ("mosquitto-2", 8885),
        ("mosquitto-3", 8887),
    ]
    # What a connector of mqtt-2 or certgen's monitor connects to; devices are told the same.
    second = broker_named(settings, "mqtt-2").settings(settings)
    assert (second.mqtt_host, second.mqtt_port) == ("mosquitto-2", 8885)
    assert brokers(settings)[1].url == "mqtts://mosquitto-2:8885"
    for wrong in ("mqtt-2=", "mqtt-2=h:1", "broker-2=h"):
        with pytest.raises(ConfigError, match="F2PIPE_MQTT_BROKER_HOSTS"):
            load_settings(state_dir=tmp_path, mqtt_broker_hosts=wrong)
    past = settings.model_copy(update={"mqtt_brokers": 2})
    with pytest.raises(ConfigError, match="HOSTS names mqtt-3, but F2PIPE_MQTT_BROKERS=2"):
        brokers(past)


def test_the_stack_runs_one_mosquitto_per_broker_with_its_own_folder(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, mqtt_port=8883, mqtt_brokers=2)
    found = {server.name: server for server in commands.servers(settings)}
    assert list(found)[-2:] == ["mosquitto", "mosquitto-2"]
    second = found["mosquitto-2"]
    assert second.ports() == {8885: "F2PIPE_MQTT_PORT + 2"}
    assert second.pidfile.path == tmp_path / "run" / "mosquitto-2.pid"
    assert second.home == tmp_path / "mosquitto-2"  # type: ignore[attr-defined]
    # A broker's port taken by another server is refused before anything starts.
    clash = settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:8885"})
    with pytest.raises(ConfigError, match=r"mqtt-2\) and F2PIPE_KAFKA_BOOTSTRAP both use port"):
        commands._check_settings(clash)


def test_a_broker_port_held_elsewhere_is_named_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        if port_in_use(held - 2):
            pytest.skip(f"port {held - 2}, mqtt-1's here, is taken by chance")
        settings = load_settings(state_dir=tmp_path, mqtt_port=held - 2, mqtt_brokers=2)
        with pytest.raises(StackError) as error:
            commands.up(settings, ["mosquitto"])
    assert str(error.value) == (
        f"port {held} for mosquitto-2 is already in use by another process; stop that"
        " process or choose another port with F2PIPE_MQTT_PORT + 2"
    )
    assert not list((tmp_path / "run").glob("*.pid"))


def test_each_broker_has_its_connector_group(tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path, mqtt_port=8883, mqtt_brokers=2, connector_replicas=2
    )
    found = {s.label: s for s in services.services(settings, ["connector"])}
    assert list(found) == ["connector", "connector-2", "connector-mqtt-2", "connector-mqtt-2-2"]
    second = found["connector-mqtt-2-2"]
    assert second.settings.mqtt_port == 8885
    assert second.settings.connector_identity == "svc-connector-mqtt-2-2"
    assert second.settings.connector_client_id == "svc-connector-mqtt-2-2"
    assert second.settings.connector_share_group == services.SHARE_GROUP
    assert second.port() == (
        settings.connector_port + services.BROKER_PORT_STEP + services.REPLICA_PORT_STEP
    )
    assert second.pidfile.path == tmp_path / "run" / "connector-mqtt-2-2.pid"
    assert found["connector-2"].settings.mqtt_port == 8883
    issued = services.ensure_connector_identities(settings)
    assert issued == ["svc-connector-2", "svc-connector-mqtt-2", "svc-connector-mqtt-2-2"]
    # A connector left from a larger broker count is still known by its label, to stop it.
    one = settings.model_copy(update={"mqtt_brokers": 1})
    stray = services.Connector(one, Paths(tmp_path), 2, broker=3)
    assert stray.label == "connector-mqtt-3-2"
    assert stray.settings.mqtt_port == 8887


def test_certgen_exports_each_brokers_counters_under_its_name() -> None:
    monitors = BrokerMonitors(
        {name: BrokerMonitor("127.0.0.1", 1, None) for name in ("mqtt-1", "mqtt-2")}
    )
    up = next(f for f in monitors.collect() if f.name == "f2pipe_broker_up")
    assert [(s.labels, s.value) for s in up.samples] == [
        ({"broker": "mqtt-1"}, 0.0),
        ({"broker": "mqtt-2"}, 0.0),
    ]
    # One broker: the families as before, without a label.
    single = next(f for f in BrokerMonitor("127.0.0.1", 1, None).collect())
    assert [(s.labels, s.value) for s in single.samples] == [({}, 0.0)]


def test_with_several_brokers_each_acl_lists_its_own_devices_only() -> None:
    acl = render_acl(["svc-connector-mqtt-2"], ["aabbccddee03"])
    assert "pattern" not in acl
    assert "user f2-aabbccddee03\ntopic write stat/f2-aabbccddee03/+/+/+\n" in acl
    assert "topic read cmnd/f2-aabbccddee03/#\n" in acl
    assert "user svc-connector-mqtt-2\ntopic read stat/#\ntopic read tele/#\n" in acl
    # One broker: the patterns, as before.
    assert "pattern write tele/%u/+/+/+" in render_acl(["svc-connector"])


def test_the_simulator_names_a_broker_it_cannot_reach_in_one_line(tmp_path: Path) -> None:
    (mqtt,) = free_ports(1)
    settings = load_settings(state_dir=tmp_path, mqtt_port=mqtt, mqtt_brokers=2, mqtt_tls=False)
    second = broker_named(settings, "mqtt-2")
    for mac in ("aabbccddee01", "aabbccddee02", "aabbccddee03", "aabbccddee04"):
        device_broker_file(settings, mac).parent.mkdir(parents=True, exist_ok=True)
        device_broker_file(settings, mac).write_text(second.url)
    done = _f2pipe(services.settings_env(settings), "simulate", "--count", "4")
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert f"cannot reach the broker at 127.0.0.1:{second.port}" in line
    assert "F2PIPE_MQTT_BROKERS" in line


def test_the_deployment_render_runs_every_broker(tmp_path: Path) -> None:
    """The compose render follows F2PIPE_MQTT_BROKERS (tests/test_deploy_mqtt_brokers.py
    checks it in detail); its brokers' ACLs are written from the metadata, not rendered."""
    environment = {
        "F2PIPE_MQTT_BROKERS": "2",
        "F2PIPE_MQTT_PORT": "8883",
        "F2PIPE_STATE_DIR": str(tmp_path),
    }
    done = _f2pipe(environment, "deploy", "render", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    rendered = tmp_path / "out" / "deploy" / "mosquitto"
    assert "listener 8885\n" in (rendered / "mosquitto-2.conf").read_text(encoding="utf-8")
    assert not (rendered / "acl").exists()


# --------------------------------------------------------------------------- two brokers
@pytest.fixture(scope="module")
def two_brokers() -> Iterator[Settings]:
    """``f2pipe up`` with two brokers; the demo fleet split over them by ``fleet import``."""
    with private_state("f2pipe-brokers-") as state:
        settings = private_settings(
            state,
            stages=True,
            kafka_heap="512m",
            mqtt_tls=True,
            mqtt_brokers=2,
            data_topic_partitions=3,
            processor_group=unique("processor"),
            sink_group=unique("sink"),
            sink_batch_age_ms=200,
        )
        try:
            pipeline.up(settings, ("certgen", "connector", "processor", "sink"), quiet=True)
            yield security.admin_settings(settings)
        finally:
            pipeline.down(settings, quiet=True)


def split_demo_fleet(settings: Settings, folder: Path) -> str:
    """``f2pipe fleet import`` of the demo fleet with :data:`SECOND` on mqtt-2; its output."""
    demo = yaml.safe_load(
        (resources.files("f2pipe.metadata") / "demo-fleet.yaml").read_text(encoding="utf-8")
    )
    for controller in demo["controllers"]:
        if controller["mac"] in SECOND:
            controller["broker"] = "mqtt-2"
    path = folder / "split.yaml"
    path.write_text(yaml.safe_dump(demo, sort_keys=False))
    done = _f2pipe(services.settings_env(settings), "fleet", "import", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Device:
    """One controller's MQTT v5 connection with its own certificate, to a broker of choice."""

    def __init__(self, settings: Settings, mac: str, host: str, port: int) -> None:
        self.acked: dict[int, int] = {}  # message id -> PUBACK reason code
        self.done = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"f2-{mac}", protocol=mqtt.MQTTv5
        )
        context = device_ssl_context(settings, mac)
        assert context is not None
        self.client.tls_set_context(context)
        self.client.on_publish = self._on_publish
        self.received: list[tuple[str, bytes]] = []
        self.gone = threading.Event()
        self.client.on_disconnect = lambda *args: self.gone.set()
        self.client.on_message = lambda client, userdata, m: self.received.append(
            (m.topic, m.payload)
        )
        connected = threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(15), f"f2-{mac} not connected to {host}:{port}"

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self.done:
            self.acked[mid] = int(reason.value)
            self.done.notify_all()

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and wait for the PUBACK; its reason code (0: accepted)."""
        mid = self.client.publish(topic, payload, qos=1).mid
        with self.done:
            assert self.done.wait_for(lambda: mid in self.acked, timeout=15), topic
            return self.acked[mid]

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1 and wait for the SUBACK; its reason code (< 128: granted)."""
        granted: list[int] = []
        done = threading.Event()

        def on_subscribe(client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
            granted.extend(int(code.value) for code in codes)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos=1)
        assert done.wait(15), topic
        return granted[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def register_vectors(settings: Settings) -> list[dict[str, Any]]:
    """One controller per public vector, every second one on mqtt-2; with each vector its
    ``mac``, ``broker``, ``sensor`` id and datapoint ``ids``.

    Left to the processor's tests: the ambiguous local times, which resolve by the
    record's ingest time (here the connector's clock, not one the vector chose)."""
    vectors = [json.loads(line) for line in VECTORS.read_text().splitlines() if line.strip()]
    chosen = [v for v in vectors if "dst_ambiguous" not in v["name"]]
    fleet = Fleet(settings.metadata_dsn)
    try:
        for i, vector in enumerate(chosen):
            vector["mac"] = f"bb{i:010x}"
            vector["broker"] = "mqtt-2" if i % 2 else "mqtt-1"
            _, connector, component = vector["topic_tail"].split("/")
            pin = int(component.rsplit("-", 1)[1]) if component[-1].isdigit() else 1
            template = fleet.template(
                f"{vector['name']} template",
                vector["template"]["frame_check"],
                vector["template"]["datapoints"],
            )
            fleet.controller(vector["mac"], vector["timezone"])
            vector["sensor"] = fleet.sensor(f"{vector['name']} sensor", template)
            fleet.wire(vector["mac"], int(connector[1:]), pin, vector["sensor"])
            vector["ids"] = fleet.datapoint_ids(template)
        fleet.conn.execute(
            "UPDATE devices SET broker = 'mqtt-2' WHERE mac_address = ANY(%s)",
            ([v["mac"] for v in chosen if v["broker"] == "mqtt-2"],),
        )
    finally:
        fleet.close()
    return chosen


def readings_of(dsn: str, sensors: list[int]) -> dict[tuple[int, int, datetime], float]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT device_id, datapoint_id, timestamp, value FROM decoded_data"
            " WHERE device_id = ANY(%s)",
            (sensors,),
        ).fetchall()
    return {(int(d), int(p), ts): float(v) for d, p, ts, v in rows}


@pytest.mark.servers
def test_the_vectors_land_through_both_brokers_and_the_other_broker_refuses(
    two_brokers: Settings, tmp_path: Path
) -> None:
    settings = two_brokers
    out = split_demo_fleet(settings, tmp_path)
    assert "broker ACLs rewritten: mqtt-1, mqtt-2" in out
    assert listed_devices(acl_path(settings, 2)) == list(SECOND)
    # The simulator's identities follow: the demo controllers' broker files.
    second = broker_named(settings, "mqtt-2").url
    assert device_broker_file(settings, SECOND[0]).read_text() == second

    vectors = register_vectors(settings)
    sync_acls(settings)
    assert provision_certificates(settings, [v["mac"] for v in vectors]) == len(vectors)
    for vector in vectors:  # certgen's answer named each controller's broker
        url = broker_named(settings, vector["broker"]).url
        assert device_broker_file(settings, vector["mac"]).read_text() == url

    # A valid certificate on the broker its controller does not belong to: refused there.
    stray = vectors[0]
    assert stray["broker"] == "mqtt-1"
    elsewhere = broker_named(settings, "mqtt-2")
    device = Device(settings, stray["mac"], elsewhere.host, elsewhere.port)
    payload = json.dumps({"timestamp": "2025-01-02 03:04:05", "data": env_frame(2000, 5000, 600)})
    topic = f"tele/f2-{stray['mac']}/sensor-mode/J1/sensor-1"
    try:
        assert device.publish(topic, payload.encode()) == NOT_AUTHORIZED
    finally:
        device.close()

    for vector in vectors:
        broker = broker_named(settings, vector["broker"])
        device = Device(settings, vector["mac"], broker.host, broker.port)
        try:
            topic = f"{vector['topic_type']}/f2-{vector['mac']}/{vector['topic_tail']}"
            assert device.publish(topic, vector["payload"].encode()) == 0, vector["name"]
        finally:
            device.close()

    want = {
        (v["sensor"], v["ids"][r["label"]], datetime.fromisoformat(r["ts"])): r["value"]
        for v in vectors
        for r in v["expect"].get("readings", [])
    }
    sensors = [v["sensor"] for v in vectors]
    try:
        wait_until(
            lambda: readings_of(settings.timeseries_dsn, sensors).keys() >= want.keys(),
            timeout=90,
            what="every vector's readings",
        )
    except pytest.fail.Exception as exc:
        missing = want.keys() - readings_of(settings.timeseries_dsn, sensors).keys()
        pytest.fail(f"{exc}: {len(missing)} of {len(want)} missing\n{failure_logs(settings)}")
    wait_until(lambda: drained(settings, set()), timeout=60, what="every stage to commit")
    got = readings_of(settings.timeseries_dsn, sensors)
    assert got.keys() == want.keys(), f"rows the vectors do not hold\n{failure_logs(settings)}"
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-9), key
    assert {v["broker"] for v in vectors if v["expect"].get("readings")} == {"mqtt-1", "mqtt-2"}
    bad = sorted(
        (v["payload"].encode(), v["expect"]["dead_letter"])
        for v in vectors
        if "dead_letter" in v["expect"]
    )
    assert len(bad) == 25
    found = dead_letters(settings, len(bad), timeout=30)
    assert sorted((value, reason) for value, _stage, reason in found) == bad

    # certgen watches both brokers, and `f2pipe status` shows both up, each with its
    # connector group.
    certgen = next(s for s in services.services(settings, ["certgen"]))
    wait_until(
        lambda: all(
            status.total(status.scrape(certgen.url("/metrics"), cafile=certgen.cafile()),
                         "f2pipe_broker_up", broker=name) == 1
            for name in ("mqtt-1", "mqtt-2")
        ),
        timeout=30,
        what="certgen's monitor on both brokers",
    )  # fmt: skip
    report = status.report(settings, interval=1.0)
    assert {name: (b["up"], b["connectors"]) for name, b in report.brokers.items()} == {
        "mqtt-1": (True, ["connector"]),
        "mqtt-2": (True, ["connector-mqtt-2"]),
    }
    assert all(b["connected_clients"] for b in report.brokers.values())
    assert not [p for p in report.problems if "broker" in p], report.problems


@pytest.mark.servers
def test_a_command_goes_to_the_broker_of_its_controller(
    two_brokers: Settings, tmp_path: Path
) -> None:
    settings = two_brokers
    split_demo_fleet(settings, tmp_path)
    mac = SECOND[0]
    broker = broker_named(settings, "mqtt-2")
    device = Device(settings, mac, broker.host, broker.port)
    try:
        assert device.subscribe(f"cmnd/f2-{mac}/#") == 1
        # The commander connects to mqtt-1 by its settings: only routing by the
        # controller's broker brings the command to mqtt-2.
        command = ("cmnd", mac, "J1", "strike-1", '{"power-flag": 1}')
        done = _f2pipe(services.settings_env(settings), *command)
        assert done.returncode == 0, done.stderr[-2000:]
        wait_until(lambda: device.received, timeout=15, what="the command on mqtt-2")
        assert device.received == [
            (f"cmnd/f2-{mac}/access-control-mode/J1/strike-1", b'{"power-flag":1}')
        ]
        # A controller of mqtt-1 on mqtt-2 may subscribe, but nothing is delivered to it:
        # its command, sent first on the same connection, never arrives, the next one does.
        stray = Device(settings, "aabbccddee01", broker.host, broker.port)
        try:
            stray.subscribe("cmnd/f2-aabbccddee01/#")
            send = broker.settings(settings)
            cmnd.send(send, "cmnd/f2-aabbccddee01/access-control-mode/J1/strike-1", b"{}")
            cmnd.send(send, f"cmnd/f2-{mac}/access-control-mode/J1/strike-2", b"{}")
            wait_until(lambda: len(device.received) == 2, timeout=15, what="the second command")
            assert stray.received == []
        finally:
            stray.close()
    finally:
        device.close()


def demo_sensors(settings: Settings) -> dict[str, list[int]]:
    """Broker name -> the sensors wired to the demo controllers it serves."""
    with psycopg.connect(settings.metadata_dsn) as conn:
        rows = conn.execute(
            "SELECT coalesce(ctl.broker, 'mqtt-1'), p.device_id FROM pins p"
            " JOIN connectors c USING (connector_id)"
            " JOIN devices ctl ON ctl.device_id = c.controller_id"
            " WHERE ctl.mac_address LIKE 'aabbccddee%%'"
        ).fetchall()
    found: dict[str, list[int]] = {}
    for broker, sensor in rows:
        found.setdefault(broker, []).append(int(sensor))
    return found


@pytest.mark.servers
@pytest.mark.slow
def test_a_killed_connector_stops_only_its_broker_and_loses_nothing(
    two_brokers: Settings, tmp_path: Path
) -> None:
    settings = two_brokers
    split_demo_fleet(settings, tmp_path)  # already split: nothing changes
    sensors = demo_sensors(settings)
    assert sorted(sensors) == ["mqtt-1", "mqtt-2"]

    def count(broker: str) -> int:
        return len(readings_of(settings.timeseries_dsn, sensors[broker]))

    def grows(broker: str, by: int, label: str) -> None:
        base = count(broker)
        wait_until(
            lambda: publisher.failure is not None or count(broker) >= base + by,
            timeout=90,
            what=f"{by} rows from {broker}'s controllers {label}",
        )
        assert publisher.failure is None, publisher.failure

    publisher = Publisher(settings, tmp_path, minimum=1200, rate=40)
    publisher.start()
    connector = next(
        s for s in services.services(settings, ["connector"]) if s.label == "connector-mqtt-2"
    )
    try:
        grows("mqtt-1", 60, "before the kill")
        grows("mqtt-2", 60, "before the kill")
        _kill(connector)
        # Meanwhile what mqtt-2's connector had handed to Kafka lands (about 6 s).
        grows("mqtt-1", 300, "after mqtt-2's connector was killed")
        stalled = count("mqtt-2")
        grows("mqtt-1", 200, "while mqtt-2's connector is dead")
        assert count("mqtt-2") == stalled, "mqtt-2's rows kept coming without its connector"
        connector.start()
        connector.wait_healthy()
        grows("mqtt-2", 60, "after its connector was started again")
    finally:
        publisher.stop.set()
        publisher.join(timeout=300)
    assert publisher.failure is None, publisher.failure
    demo = {s for group in sensors.values() for s in group}
    expected = expected_rows(read_ledger(*publisher.ledgers), settings.timeseries_dsn)
    assert {row[1] for row in expected} == demo
    wait_until(lambda: drained(settings, set()), timeout=120, what="every stage to commit")
    stored = {row for row in stored_rows(settings.timeseries_dsn) if row[1] in demo}
    assert not expected - stored, f"readings lost\n{failure_logs(settings)}"
    assert not stored - expected, "readings no ledger holds"
    assert Paths(settings.state_dir).run.joinpath("connector-mqtt-2.pid").is_file()


@pytest.mark.servers
def test_revoking_a_device_closes_its_session_on_its_own_broker(two_brokers: Settings) -> None:
    import httpx
    from cryptography import x509

    from f2pipe.pki.auth import admin_token
    from f2pipe.pki.revocation import accepts

    settings, mac = two_brokers, "cc0000000001"
    fleet = Fleet(settings.metadata_dsn)
    try:
        fleet.controller(mac)
        fleet.conn.execute("UPDATE devices SET broker = 'mqtt-2' WHERE mac_address = %s", (mac,))
    finally:
        fleet.close()
    sync_acls(settings)
    provision_certificates(settings, [mac])
    broker = broker_named(settings, "mqtt-2")
    device = Device(settings, mac, broker.host, broker.port)
    cert = x509.load_pem_x509_certificate((settings.pki_dir / f"devices/f2-{mac}.pem").read_bytes())
    token = admin_token(settings, False).get_secret_value()
    try:
        trust = ssl.create_default_context(cafile=str(settings.pki_dir / "ca.pem"))
        with httpx.Client(verify=trust, timeout=120) as http:
            answer = http.post(
                f"{settings.certgen_url}/v1/certificates/{cert.serial_number:x}/revoke",
                headers={"Authorization": f"Bearer {token}"},
            )
        assert answer.status_code == 200, answer.text
        assert answer.json()["session_closed"] is True
        wait_until(device.gone.is_set, timeout=60, what="the revoked session on mqtt-2 to close")
    finally:
        device.close()
    context = device_ssl_context(settings, mac)
    assert context is not None
    # Refused, not merely unanswered: a probe that finds the broker busy (None) asks again.
    wait_until(
        lambda: accepts(broker.settings(settings), context) is False,
        timeout=60,
        what="mqtt-2 to refuse the revoked certificate",
    )


@pytest.mark.servers
def test_a_controller_on_a_broker_the_settings_do_not_run_is_refused(
    two_brokers: Settings,
) -> None:
    one = two_brokers.model_copy(update={"mqtt_brokers": 1})
    assert sync_acls(one) == []  # one broker: patterns, nothing listed
    with psycopg.connect(two_brokers.metadata_dsn, autocommit=True) as conn:
        conn.execute("UPDATE devices SET broker = 'mqtt-3' WHERE mac_address = 'aabbccddee04'")
        try:
            before = acl_path(two_brokers, 2).read_text()
            with pytest.raises(StackError, match=r"aabbccddee04 .* 'mqtt-3'.*F2PIPE_MQTT_BROKERS"):
                sync_acls(two_brokers)
            assert acl_path(two_brokers, 2).read_text() == before  # nothing half-written
        finally:
            conn.execute("UPDATE devices SET broker = 'mqtt-2' WHERE mac_address = 'aabbccddee04'")
