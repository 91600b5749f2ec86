"""The two-broker render's brokers on a real Mosquitto, their ACLs written by ``fleet sync-acls``.

``F2PIPE_MQTT_BROKERS=2 f2pipe deploy render`` gives mosquitto.conf,
mosquitto-2.conf and broker.sh; here they run as the compose file runs them
(the start script, each broker's share made by ``deploy shares``, the retain
guard), on free loopback ports, with the ACL folders the broker-acls service
writes (:class:`f2pipe.operations.aclsync.AclSync`):

- without its ACL file a broker waits, saying so, instead of failing to start;
  the first files admit no device;
- a controller the metadata assigns to mqtt-1 publishes on mqtt-1 and is
  refused ("not authorized") on mqtt-2; reassigned, mqtt-2's start script
  reloads the rewritten file by itself and the controller is admitted there.

The first test stands in for the metadata (the assignments the database
would answer); the last reads them from a real PostgreSQL database.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from conftest import unique, wait_until
from f2pipe.errors import StackError
from f2pipe.operations import aclsync
from f2pipe.operations.aclsync import AclSync
from f2pipe.operations.deploy.cli import make_shares
from f2pipe.operations.stack import retainguard
from f2pipe.pki.ca import key_pem, pki_paths, write_private, write_public
from f2pipe.pki.local import load_ca
from f2pipe.settings import Settings, load_settings
from test_deploy import f2pipe_argv
from test_deploy_kafka_cluster import render
from test_deploy_mqtt_brokers import services

MAC = "aabbccddee01"
DEVICE = f"f2-{MAC}"
TOPIC = f"tele/{DEVICE}/sensor-mode/J1/sensor-1"
NOT_AUTHORIZED = 135  # MQTT v5 reason code 0x87


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Deployment:
    """The rendered brokers run from a temporary folder: shares, ACL folders, data."""

    def __init__(self, root: Path, rendered: Path) -> None:
        self.root, self.rendered = root, rendered
        found = services(rendered)
        init = found["certgen-init"]
        self.settings = load_settings(
            state_dir=root / "state",
            broker_names=init["environment"]["F2PIPE_BROKER_NAMES"],
            mqtt_brokers=2,
        )
        assert make_shares(self.settings, f2pipe_argv(init)[2:])
        ca = load_ca(self.settings)
        self.shares = root / "state" / "shares"
        self.acls = root / "acls"
        self.plugin = retainguard.build(root)
        self.ports = {name: free_port() for name in ("mosquitto", "mosquitto-2")}
        self.commands = {name: found[name]["command"] for name in self.ports}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.clients: list[mqtt.Client] = []
        issued = ca.issue_device(MAC, None, 1)
        assert issued.private_key is not None
        write_private(root / "clients" / f"{DEVICE}.key", key_pem(issued.private_key))
        write_public(root / "clients" / f"{DEVICE}.pem", issued.certificate_pem().encode())

    def start(self, name: str) -> None:
        """Broker ``name`` as compose starts it, its paths and port made local."""
        number = 1 if name == "mosquitto" else int(name.rpartition("-")[2])
        shell, script, conf_path = self.commands[name]
        port = self.ports[name]
        conf = (self.rendered / "deploy/mosquitto" / Path(conf_path).name).read_text("utf-8")
        data = self.root / "data" / name
        data.mkdir(parents=True)
        share = self.shares / ("broker" if number == 1 else f"broker-{number}")
        listener = next(line for line in conf.splitlines() if line.startswith("listener "))
        conf = (
            conf.replace("/mosquitto/pki/", f"{share}/")
            .replace("/mosquitto/acl/", f"{self.acls / f'mqtt-{number}'}/")
            .replace("/mosquitto/data/", f"{data}/")
            .replace(f"{listener}\n", f"listener {port} 127.0.0.1\n")
            .replace(str(retainguard.IMAGE_PLUGIN), str(self.plugin))
        )
        conf += f"user {getpass.getuser()}\n"
        local = self.root / f"{name}.conf"
        local.write_text(conf, encoding="utf-8")
        assert Path(script).name == "broker.sh"
        with (self.root / f"{name}.err").open("wb") as said:
            self.processes[name] = subprocess.Popen(
                [shell, str(self.rendered / "deploy/mosquitto/broker.sh"), str(local)],
                stdout=subprocess.DEVNULL,
                stderr=said,
                env={**os.environ, "MOSQUITTO": "/usr/sbin/mosquitto"},
                start_new_session=True,
            )

    def said(self, name: str) -> str:
        return (self.root / f"{name}.err").read_text(encoding="utf-8", errors="replace")

    def listening(self, name: str) -> bool:
        assert self.processes[name].poll() is None, f"{name} exited: {self.said(name)}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.ports[name])) == 0

    def context(self, identity: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.shares / "broker" / "ca.pem"))
        if identity.startswith("svc-"):
            paths = pki_paths(self.settings)
            context.load_cert_chain(paths.service_cert(identity), paths.service_key(identity))
        else:
            clients = self.root / "clients"
            context.load_cert_chain(clients / f"{identity}.pem", clients / f"{identity}.key")
        return context

    def client(self, identity: str, broker: str) -> tuple[mqtt.Client, dict[int, int]]:
        """A connected MQTT v5 client; the PUBACK reason code of each message id."""
        acked: dict[int, int] = {}
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=identity,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        c.tls_set_context(self.context(identity))
        connected = threading.Event()
        c.on_connect = lambda *args: connected.set()
        c.on_publish = lambda _c, _u, mid, reason, _p: acked.__setitem__(mid, int(reason.value))
        self.clients.append(c)
        c.connect("127.0.0.1", self.ports[broker])
        c.loop_start()
        wait_until(connected.is_set, timeout=15, what=f"{identity} to connect to {broker}")
        return c, acked

    def publish(self, broker: str) -> int:
        """The device connects to ``broker``, publishes once at QoS 1, disconnects: the
        PUBACK's reason code (0: accepted)."""
        c, acked = self.client(DEVICE, broker)
        try:
            mid = c.publish(TOPIC, b"{}", qos=1).mid
            return wait_until(lambda: acked.get(mid, -1) + 1, timeout=15, what="PUBACK") - 1
        finally:
            c.loop_stop()
            c.disconnect()

    def subscriber(self, identity: str, broker: str) -> list[str]:
        """``identity`` reading telemetry on ``broker``: the topics it receives."""
        received: list[str] = []
        c, _ = self.client(identity, broker)
        c.on_message = lambda _c, _u, msg: received.append(msg.topic)
        subscribed = threading.Event()
        c.on_subscribe = lambda *args: subscribed.set()
        c.subscribe("tele/#", qos=1)
        wait_until(subscribed.is_set, timeout=10, what=f"{identity}'s subscription")
        return received

    def stop(self) -> None:
        for c in self.clients:
            c.loop_stop()
            c.disconnect()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    rendered = tmp_path / "render"
    monkeypatch.delenv("F2PIPE_MQTT_PORT", raising=False)
    assert render(rendered, monkeypatch, F2PIPE_MQTT_BROKERS="2") == 0
    running = Deployment(tmp_path, rendered)
    try:
        yield running
    finally:
        running.stop()


def assigned(monkeypatch: pytest.MonkeyPatch, answer: dict[str, list[str]]) -> None:
    """The metadata, as far as the sync reads it: broker name -> its controllers."""
    monkeypatch.setattr(aclsync, "assignments", lambda settings: answer)


def test_a_controller_publishes_only_on_its_broker_and_follows_a_reassignment(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = AclSync(deployment.settings, deployment.acls)
    # No ACL yet: the start script waits for it rather than failing again and again.
    deployment.start("mosquitto")
    deployment.start("mosquitto-2")
    for name in deployment.ports:
        wait_until(lambda n=name: "waiting for" in deployment.said(n), timeout=15, what="a wait")
        assert not deployment.listening(name)
    # The service's first files admit no device; the brokers start on them.
    assert job.deny_missing() == ["mqtt-1", "mqtt-2"]
    for name in deployment.ports:
        wait_until(lambda n=name: deployment.listening(n), timeout=20, what=f"{name} to listen")
    assert deployment.publish("mosquitto") == NOT_AUTHORIZED

    assigned(monkeypatch, {"mqtt-1": [MAC], "mqtt-2": []})
    assert job.sync() == ["mqtt-1"]
    assert job.sync() == []  # unchanged: not written again
    first = deployment.subscriber("svc-connector", "mosquitto")
    second = deployment.subscriber("svc-connector-mqtt-2", "mosquitto-2")
    wait_until(lambda: deployment.publish("mosquitto") == 0, timeout=30, what="mqtt-1 to admit")
    wait_until(lambda: first, timeout=10, what="mqtt-1's connector to receive")
    assert deployment.publish("mosquitto-2") == NOT_AUTHORIZED
    assert second == []

    # Reassigned to mqtt-2: both files change, and each broker reloads by itself.
    assigned(monkeypatch, {"mqtt-1": [], "mqtt-2": [MAC]})
    assert job.sync() == ["mqtt-1", "mqtt-2"]
    wait_until(lambda: deployment.publish("mosquitto-2") == 0, timeout=30, what="mqtt-2 to admit")
    wait_until(lambda: second, timeout=10, what="mqtt-2's connector to receive")
    assert second == [TOPIC]
    assert deployment.publish("mosquitto") == NOT_AUTHORIZED

    # A controller of a broker the settings do not run: nothing is written.
    before = {name: path.read_text() for name, path in job.files.items()}

    def refuse(settings: Settings) -> dict[str, list[str]]:
        raise StackError("controller x is assigned to broker 'mqtt-3'")

    monkeypatch.setattr(aclsync, "assignments", refuse)
    with pytest.raises(StackError):
        job.sync()
    assert {name: path.read_text() for name, path in job.files.items()} == before


@pytest.mark.servers
def test_the_sync_reads_the_real_metadata_with_two_columns_only(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a real metadata database: the files follow devices.broker, an unknown broker is
    one error line and writes nothing, and the aclsync grant lets read exactly that."""
    import dataclasses

    import psycopg
    from psycopg import sql

    from f2pipe.cli import main
    from f2pipe.metadata.database import seed_demo
    from f2pipe.operations.principals import ACL_SYNC, pg_grant_sql

    macs = sorted(seed_demo(fresh_db, tmp_path / "state"))
    moved = macs[0]
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("UPDATE devices SET broker = 'mqtt-2' WHERE mac_address = %s", (moved,))
    settings = load_settings(state_dir=tmp_path, metadata_dsn=fresh_db, mqtt_brokers=2)
    job = AclSync(settings, tmp_path / "acls", connectors=2)
    assert job.sync() == ["mqtt-1", "mqtt-2"]
    listed = {
        name: [line[len("user f2-") :] for line in path.read_text().splitlines()
               if line.startswith("user f2-")]
        for name, path in job.files.items()
    }  # fmt: skip
    assert listed == {"mqtt-1": macs[1:], "mqtt-2": [moved]}
    assert "user svc-connector-mqtt-2-2\n" in job.files["mqtt-2"].read_text()

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("UPDATE devices SET broker = 'mqtt-3' WHERE mac_address = %s", (macs[1],))
    before = {name: path.read_text() for name, path in job.files.items()}
    env = {"F2PIPE_METADATA_DSN": fresh_db, "F2PIPE_MQTT_BROKERS": "2"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        from f2pipe.settings import get_settings

        get_settings.cache_clear()
        try:
            assert main(["fleet", "sync-acls", "--out", str(tmp_path / "acls")]) == 1
        finally:
            get_settings.cache_clear()
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1, error
    assert "'mqtt-3'" in error
    assert {name: path.read_text() for name, path in job.files.items()} == before

    # The role's grant, on the real schema: the two columns, nothing else of devices.
    role = unique("f2t_aclsync")
    who = dataclasses.replace(ACL_SYNC, pg_role=role)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        try:
            for statement in pg_grant_sql(who):
                conn.execute(statement.encode())
            with conn.transaction(force_rollback=True):
                conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
                rows = conn.execute("SELECT mac_address, broker FROM devices").fetchall()
                assert sorted(mac for mac, _ in rows if mac) == macs
            with conn.transaction(force_rollback=True):
                conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("SELECT claiming_code FROM devices")
        finally:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
