"""The secured broker: a dedicated Mosquitto running exactly the configuration
``f2pipe.operations.stack.mosquitto.ensure_config`` writes, probed with real MQTT clients.

Each test asserts what a subscriber actually receives or what the connection
returns. "Nothing arrives" is shown without sleeping: the same publisher sends
an allowed marker after the forbidden message, and once the marker arrives the
forbidden one would have arrived before it (one client's messages stay in order).
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import httpx
import pytest

from conftest import wait_until
from f2pipe.operations.stack.mosquitto import acl_path, conf_path, ensure_config
from f2pipe.pki.ca import CertificateAuthority, key_pem, pki_paths
from f2pipe.settings import Settings
from pki_fixtures import (
    ADMIN_TOKEN,
    Broker,
    Certgen,
    Identity,
    add_device,
    broker,
    certgen,
    connects,
    device_identity,
    expired_identity,
    make_client,
    register_database,
    register_dsn,
    service_identity,
    settings,
    tls_handshake,
    write_identity,
)

__all__ = ["broker", "certgen", "register_database", "register_dsn", "settings"]

pytestmark = pytest.mark.servers

A, B = "aabbccddee01", "aabbccddee02"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _connected(  # type: ignore[no-untyped-def]
    settings: Settings, identity: Identity, client_id: str = "", will: str = "", **options
):
    client = make_client(settings, identity, client_id=client_id, will=will, **options)
    wait_until(client.connected, timeout=10, what=f"{identity.cert.name} to connect")
    return client


def _subscribed(client, topic: str) -> None:  # type: ignore[no-untyped-def]
    before = len(client.subacks)
    client.mqtt.subscribe(topic, qos=1)
    wait_until(lambda: len(client.subacks) > before, timeout=10, what=f"SUBACK for {topic}")


def _telemetry_reader(settings: Settings):  # type: ignore[no-untyped-def]
    """The connector's identity, subscribed to every device's telemetry."""
    connector = _connected(settings, service_identity(settings, "svc-connector"))
    _subscribed(connector, "tele/#")
    return connector


def test_config_has_one_tls_listener_and_the_spec_acl(settings: Settings, broker: Broker) -> None:
    conf = conf_path(settings).read_text()
    assert re.findall(r"^listener .*$", conf, re.M) == [
        f"listener {settings.mqtt_port} {settings.mqtt_host}"
    ]
    for line in [
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        "persistence true",
        "max_packet_size 262144",
    ]:
        assert line in conf.splitlines()
    # The running broker opened exactly that one socket.
    opened = re.findall(r"Opening \S+ listen socket on port (\d+)", broker.log_text())
    assert set(opened) == {str(settings.mqtt_port)}
    acl = acl_path(settings).read_text()
    assert "pattern write tele/%u/+/+/+" in acl
    assert "user svc-connector\ntopic read stat/#\ntopic read tele/#" in acl
    # Idempotent: a second run changes nothing.
    before = {p: p.read_bytes() for p in settings.pki_dir.rglob("*") if p.is_file()}
    assert ensure_config(settings) == conf_path(settings)
    after = {p: p.read_bytes() for p in settings.pki_dir.rglob("*") if p.is_file()}
    assert after == before


def test_device_publish_reaches_the_connector(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    connector = _telemetry_reader(settings)
    device = _connected(settings, device_identity(settings, A, tmp_path))
    topic = f"tele/f2-{A}/sensor-mode/J1/sensor-1"
    payload = b'{"timestamp": "2024-07-15 14:30:25", "data": "01 03 02 00 01 79 84"}'
    device.mqtt.publish(topic, payload, qos=1)
    wait_until(lambda: connector.topics() == [topic], timeout=10, what="the reading")
    assert connector.received[0].payload == payload
    connector.close()
    device.close()


def test_device_cannot_publish_on_another_devices_topic(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    connector = _telemetry_reader(settings)
    _subscribed(connector, "stat/#")
    device = _connected(settings, device_identity(settings, A, tmp_path))
    for forged in [
        f"tele/f2-{B}/sensor-mode/J1/sensor-1",
        f"stat/f2-{B}/access-control-mode/J1/strike-1",
        "tele/svc-connector/x",
    ]:
        device.mqtt.publish(forged, b"{}", qos=1)
    marker = f"tele/f2-{A}/sensor-mode/J1/sensor-1"
    device.mqtt.publish(marker, b"marker", qos=1)
    wait_until(lambda: marker in connector.topics(), timeout=10, what="the marker")
    assert connector.topics() == [marker]
    connector.close()
    device.close()


def test_device_cannot_read_another_devices_commands(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    device = _connected(settings, device_identity(settings, A, tmp_path))
    _subscribed(device, f"cmnd/f2-{B}/#")
    _subscribed(device, f"cmnd/f2-{A}/#")
    # Mosquitto 2.0 grants the subscription and filters at delivery (the ACL's
    # "read"): what counts is that nothing is delivered.
    commander = _connected(settings, service_identity(settings, "svc-commander"))
    commander.mqtt.publish(f"cmnd/f2-{B}/access-control-mode/J1/strike-1", b"open", qos=1)
    own = f"cmnd/f2-{A}/access-control-mode/J1/strike-1"
    commander.mqtt.publish(own, b"open", qos=1)
    wait_until(lambda: own in device.topics(), timeout=10, what="the device's own command")
    assert device.topics() == [own]
    commander.close()
    device.close()


def test_services_are_held_to_their_acl(settings: Settings, broker: Broker, tmp_path: Path) -> None:
    # The connector may not command devices; the commander may not read telemetry.
    device = _connected(settings, device_identity(settings, A, tmp_path))
    _subscribed(device, f"cmnd/f2-{A}/#")
    connector = _connected(settings, service_identity(settings, "svc-connector"))
    connector.mqtt.publish(f"cmnd/f2-{A}/alarm-mode/J1/siren-1", b"on", qos=1)
    commander = _connected(settings, service_identity(settings, "svc-commander"))
    _subscribed(commander, "tele/#")
    marker = f"cmnd/f2-{A}/alarm-mode/J1/siren-2"
    commander.mqtt.publish(marker, b"on", qos=1)
    device.mqtt.publish(f"tele/f2-{A}/sensor-mode/J1/sensor-1", b"{}", qos=1)
    wait_until(lambda: marker in device.topics(), timeout=10, what="the marker")
    assert device.topics() == [marker]
    monitor = _connected(settings, service_identity(settings, "svc-monitor"))
    _subscribed(monitor, "$SYS/broker/clients/connected")
    # $SYS is refreshed every sys_interval (5 s); the first retained value may be older.
    wait_until(
        lambda: any(int(m.payload) == 4 for m in monitor.received),
        timeout=15,
        what="$SYS/broker/clients/connected to count the four clients",
    )
    for client in (device, connector, commander, monitor):
        client.close()


def test_refused_connections(settings: Settings, broker: Broker, tmp_path: Path) -> None:
    assert connects(settings, device_identity(settings, A, tmp_path))
    # No client certificate.
    missing = Identity(tmp_path / "none.pem", tmp_path / "none.key", settings.pki_dir / "ca.pem")
    assert not connects(settings, missing)
    # A certificate from another CA with the right name.
    other = CertificateAuthority.create(days=30).issue_device(A, days=1)
    assert other.private_key is not None
    cert = write_identity(
        tmp_path / "other", f"f2-{A}", other.certificate, key_pem(other.private_key)
    )
    assert not connects(settings, Identity(cert, cert.with_suffix(".key"), missing.ca))
    # An expired certificate from the right CA.
    assert not connects(settings, expired_identity(settings, A, tmp_path))
    # Plain MQTT on the TLS port.
    assert not connects(settings, None, tls=False)


def test_client_id_takeover_is_impossible(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    victim = _connected(settings, device_identity(settings, A, tmp_path), client_id=f"f2-{A}")
    connector = _telemetry_reader(settings)
    attacker = _connected(settings, device_identity(settings, B, tmp_path), client_id=f"f2-{A}")
    # The attacker got its own identity: it may use its own topics only ...
    own = f"tele/f2-{B}/sensor-mode/J1/sensor-1"
    attacker.mqtt.publish(own, b"attacker", qos=1)
    wait_until(lambda: own in connector.topics(), timeout=10, what="the attacker's own reading")
    # ... and the victim's session survived: its publish after the attacker's
    # connect still arrives, and it was never disconnected.
    victim_topic = f"tele/f2-{A}/sensor-mode/J1/sensor-1"
    victim.mqtt.publish(victim_topic, b"victim", qos=1)
    wait_until(lambda: victim_topic in connector.topics(), timeout=10, what="the victim's reading")
    assert victim.disconnects == []
    assert victim.connected()
    log = broker.log_text()
    assert f"as f2-{B} " in log
    assert "closing old connection" not in log
    for client in (victim, connector, attacker):
        client.close()


def _issue(certgen: Certgen, mac: str, directory: Path, settings: Settings) -> tuple[str, Identity]:
    with httpx.Client(base_url=certgen.url) as http:
        response = http.post(f"/v1/devices/{mac}/certificate", json={}, headers=ADMIN)
    assert response.status_code == 201, response.text
    body = response.json()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_text(body["certificate"])
    (directory / "key.pem").write_text(body["private_key"])
    (directory / "key.pem").chmod(0o600)
    return body["serial"], Identity(
        directory / "cert.pem", directory / "key.pem", settings.pki_dir / "ca.pem"
    )


def _revoke(certgen: Certgen, serial: str) -> dict[str, object]:
    with httpx.Client(base_url=certgen.url, timeout=30) as http:
        response = http.post(
            f"/v1/certificates/{serial}/revoke", json={"reason": "lost"}, headers=ADMIN
        )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_revoked_certificate_cannot_reconnect(
    settings: Settings, broker: Broker, certgen: Certgen, tmp_path: Path
) -> None:
    add_device(settings.metadata_dsn, A, "code")
    serial, identity = _issue(certgen, A, tmp_path / "a", settings)
    assert connects(settings, identity)
    result = _revoke(certgen, serial)
    assert result["broker_reloaded"] is True
    # Refused at once, by the same broker process (no restart).
    wait_until(lambda: not connects(settings, identity), timeout=10, what="refusal")
    assert broker.process.poll() is None
    assert broker.log_text().count("mosquitto version 2") == 2  # "starting" and "running" once
    # The CRL served by certgen lists it.
    with httpx.Client(base_url=certgen.url) as http:
        crl = http.get("/v1/crl.pem").text
    from cryptography import x509

    listed = {entry.serial_number for entry in x509.load_pem_x509_crl(crl.encode())}
    assert int(serial, 16) in listed
    # A fresh certificate for the same device still works.
    _, renewed = _issue(certgen, A, tmp_path / "a2", settings)
    assert connects(settings, renewed)


def test_connected_revoked_device_is_disconnected(
    settings: Settings, broker: Broker, certgen: Certgen, tmp_path: Path
) -> None:
    add_device(settings.metadata_dsn, A, "code")
    serial, identity = _issue(certgen, A, tmp_path / "a", settings)
    # The device reconnects on its own, as a real controller would.
    device = make_client(settings, identity, reconnect=True)
    wait_until(device.connected, timeout=10, what="the device to connect")
    result = _revoke(certgen, serial)
    assert result["session_closed"] is True
    wait_until(lambda: device.disconnects, timeout=60, what="the revoked session to close")
    # Its reconnect attempts are refused from now on.
    assert not connects(settings, identity)
    assert not device.connected()
    device.close()


@pytest.mark.parametrize("name", ["svc-connector", "svc-commander", "svc-monitor"])
def test_service_identities_exist(settings: Settings, broker: Broker, name: str) -> None:
    assert connects(settings, service_identity(settings, name))


def _persistent_connector(settings: Settings, identity: Identity):  # type: ignore[no-untyped-def]
    client = make_client(settings, identity, persistent=True)
    wait_until(client.connected, timeout=10, what="the connector to connect")
    return client


def test_rotating_the_connector_certificate_keeps_its_queued_messages(
    settings: Settings, broker: Broker, certgen: Certgen, tmp_path: Path
) -> None:
    from cryptography import x509

    from f2pipe.pki.ca import pki_paths
    from f2pipe.pki.local import load_ca
    from f2pipe.pki.state import issue_service_files

    # certgen is running before the rotation: it has entered the service
    # certificates into its register.
    assert httpx.get(f"{certgen.url}/readyz").status_code == 200
    paths = pki_paths(settings)
    current = service_identity(settings, "svc-connector")
    saved = tmp_path / "old"
    saved.mkdir()
    old = Identity(saved / "old.pem", saved / "old.key", current.ca)
    old.cert.write_bytes(current.cert.read_bytes())
    old.key.write_bytes(current.key.read_bytes())
    old_serial = format(x509.load_pem_x509_certificate(old.cert.read_bytes()).serial_number, "x")
    connector = _persistent_connector(settings, old)
    _subscribed(connector, "tele/#")
    device = _connected(settings, device_identity(settings, A, tmp_path))
    topics = [f"tele/f2-{A}/sensor-mode/J1/sensor-{n}" for n in range(1, 7)]
    device.mqtt.publish(topics[0], b"1", qos=1)
    wait_until(lambda: connector.topics() == topics[:1], timeout=10, what="the first reading")
    # Rotation: a new certificate for the same identity, then revoke the old one
    # while the connector is live and messages keep coming.
    issued = issue_service_files(load_ca(settings), paths, "svc-connector", 30)
    assert issued.serial != old_serial
    for topic in topics[1:3]:
        device.mqtt.publish(topic, b"x", qos=1)
    result = _revoke(certgen, old_serial)
    assert result["session_closed"] is True
    wait_until(lambda: connector.disconnects, timeout=60, what="the old connector session to end")
    connector.close()
    for topic in topics[3:]:
        device.mqtt.publish(topic, b"x", qos=1)
    assert not connects(settings, old)
    successor = _persistent_connector(settings, service_identity(settings, "svc-connector"))
    # Every reading reaches the connector identity exactly once across the two clients
    # (a redelivery of an unacknowledged one is allowed by QoS 1).
    wait_until(
        lambda: set(connector.topics()) | set(successor.topics()) == set(topics),
        timeout=15,
        what="all six readings across the rotation",
    )
    successor.close()
    device.close()


def test_a_revocation_while_the_connector_is_offline_loses_none_of_its_messages(
    settings: Settings, broker: Broker, certgen: Certgen, tmp_path: Path
) -> None:
    # Mosquitto 2.0.11 forgets the user ACL of offline sessions on reload; certgen
    # restores it (revocation.refresh_service_sessions). Without that, the
    # readings published below would be discarded silently.
    add_device(settings.metadata_dsn, B, "code")
    serial, _ = _issue(certgen, B, tmp_path / "b", settings)
    connector = _persistent_connector(settings, service_identity(settings, "svc-connector"))
    _subscribed(connector, "tele/#")
    connector.close()
    device = _connected(settings, device_identity(settings, A, tmp_path))
    topics = [f"tele/f2-{A}/sensor-mode/J2/sensor-{n}" for n in range(1, 5)]
    device.mqtt.publish(topics[0], b"before", qos=1)
    assert _revoke(certgen, serial)["broker_reloaded"] is True
    for topic in topics[1:]:
        device.mqtt.publish(topic, b"after", qos=1)
    successor = _persistent_connector(settings, service_identity(settings, "svc-connector"))
    wait_until(
        lambda: set(successor.topics()) == set(topics), timeout=15, what="all queued readings"
    )
    successor.close()
    device.close()


def test_extra_connector_identities_get_the_connectors_rights(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    from f2pipe.pki.ca import pki_paths
    from f2pipe.pki.local import load_ca
    from f2pipe.pki.revocation import reload_and_refresh
    from f2pipe.pki.state import issue_service_files

    issue_service_files(load_ca(settings), pki_paths(settings), "svc-connector-2", 30)
    ensure_config(settings)
    assert "user svc-connector-2\ntopic read stat/#" in acl_path(settings).read_text()
    assert reload_and_refresh(settings)
    second = _connected(settings, service_identity(settings, "svc-connector-2"))
    _subscribed(second, "$share/connectors/tele/#")
    device = _connected(settings, device_identity(settings, A, tmp_path))
    topic = f"tele/f2-{A}/sensor-mode/J1/sensor-1"
    device.mqtt.publish(topic, b"x", qos=1)
    wait_until(lambda: second.topics() == [topic], timeout=10, what="the shared reading")
    second.close()
    device.close()


def test_packets_over_256_kib_are_refused(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    connector = _telemetry_reader(settings)
    device = _connected(settings, device_identity(settings, A, tmp_path))
    topic = f"tele/f2-{A}/sensor-mode/J1/sensor-1"
    device.mqtt.publish(topic, b"x" * (256 * 1024), qos=1)
    wait_until(lambda: device.disconnects, timeout=10, what="the oversized sender to be dropped")
    device.close()
    # Just under the limit (packet = payload + topic + header) still passes.
    again = _connected(settings, device_identity(settings, A, tmp_path / "again"))
    again.mqtt.publish(topic, b"y" * (200 * 1024), qos=1)
    wait_until(lambda: connector.topics() == [topic], timeout=10, what="the large reading")
    assert connector.received[0].payload == b"y" * (200 * 1024)
    again.close()
    connector.close()


def test_a_server_certificate_is_refused_as_a_client_certificate(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    # The broker's own certificate (serverAuth only), with its key, is not a client identity ...
    paths = pki_paths(settings)
    assert not connects(settings, Identity(paths.broker_cert, paths.broker_key, paths.ca_cert))
    # ... nor is a server certificate from the product CA that names a device.
    ca = CertificateAuthority.load(paths, None)
    server = ca.issue_server(f"f2-{A}", ["localhost"], days=1)
    assert server.private_key is not None
    cert = write_identity(
        tmp_path / "server", f"f2-{A}", server.certificate, key_pem(server.private_key)
    )
    assert not connects(settings, Identity(cert, cert.with_suffix(".key"), paths.ca_cert))
    # The same device name as a client certificate is accepted: the purpose decided.
    assert connects(settings, device_identity(settings, A, tmp_path / "client"))


def _handshake(settings: Settings, version: ssl.TLSVersion, identity: Identity) -> str:
    """Offer exactly ``version`` to the broker with a valid client certificate; "ok" or
    the TLS error's reason."""
    address = (settings.mqtt_host, settings.mqtt_port)
    return tls_handshake(address, version, identity.ca, identity)


def test_the_broker_refuses_tls_1_0_and_1_1(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    identity = device_identity(settings, A, tmp_path)
    # A protocol_version alert: the broker refused what the client really offered.
    assert _handshake(settings, ssl.TLSVersion.TLSv1, identity) == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert _handshake(settings, ssl.TLSVersion.TLSv1_1, identity) == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert _handshake(settings, ssl.TLSVersion.TLSv1_2, identity) == "ok"


@pytest.mark.parametrize(("owner", "retain"), [(B, False), (A, False), (A, True)])
def test_a_will_arrives_only_on_the_devices_own_topic_and_never_retained(
    settings: Settings, broker: Broker, tmp_path: Path, owner: str, retain: bool
) -> None:
    connector = _telemetry_reader(settings)
    will = f"tele/f2-{owner}/sensor-mode/J1/sensor-2"
    identity = device_identity(settings, A, tmp_path)
    device = _connected(settings, identity, will=will, will_retain=retain)
    # Dropped without a DISCONNECT: the broker publishes the will, if the ACL lets it.
    device.mqtt.socket().close()  # type: ignore[union-attr]
    wait_until(lambda: device.disconnects, timeout=10, what="the connection to drop")
    device.mqtt.loop_stop()
    marker = f"tele/f2-{A}/sensor-mode/J1/sensor-1"
    again = _connected(settings, device_identity(settings, A, tmp_path / "again"))
    again.mqtt.publish(marker, b"marker", qos=1)
    wait_until(lambda: marker in connector.topics(), timeout=10, what="the marker")
    assert (will in connector.topics()) == (owner == A and not retain)
    again.close()
    connector.close()


def test_a_retained_flood_is_refused_and_nothing_is_retained(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    """A device hoarding broker memory one retained topic at a time gets "not authorized"."""
    connector = _telemetry_reader(settings)
    device = _connected(settings, device_identity(settings, A, tmp_path))
    acks: dict[int, int] = {}
    device.mqtt.on_publish = lambda c, u, mid, reason, p: acks.__setitem__(mid, reason.value)
    flood = [f"tele/f2-{A}/sensor-mode/J{j}/hoard-{n}" for j in (1, 2, 3, 4) for n in range(50)]
    mids = [device.mqtt.publish(topic, b"x" * 1000, qos=1, retain=True).mid for topic in flood]
    wait_until(lambda: set(mids) <= acks.keys(), timeout=20, what="every PUBACK")
    assert {acks[mid] for mid in mids} == {0x87}  # MQTT 5 "Not authorized"
    marker = f"tele/f2-{A}/sensor-mode/J1/sensor-1"
    device.mqtt.publish(marker, b"marker", qos=1)
    wait_until(lambda: marker in connector.topics(), timeout=10, what="the marker")
    assert connector.topics() == [marker]
    connector.close()
    # A new subscriber gets retained messages right after its SUBACK, before anything new.
    fresh = _telemetry_reader(settings)
    device.mqtt.publish(marker, b"again", qos=1)
    wait_until(lambda: marker in fresh.topics(), timeout=10, what="the second marker")
    assert fresh.topics() == [marker]
    device.close()
    fresh.close()


@pytest.mark.parametrize("pattern", ["#", "$SYS/#", f"$share/g/cmnd/f2-{B}/#", f"cmnd/f2-{B}/#"])
def test_a_device_subscribing_wide_gets_only_its_own_commands(
    settings: Settings, broker: Broker, tmp_path: Path, pattern: str
) -> None:
    device = _connected(settings, device_identity(settings, A, tmp_path))
    _subscribed(device, pattern)
    _subscribed(device, f"cmnd/f2-{A}/#")
    commander = _connected(settings, service_identity(settings, "svc-commander"))
    commander.mqtt.publish(f"cmnd/f2-{B}/access-control-mode/J1/strike-1", b"open", qos=1)
    own = f"cmnd/f2-{A}/access-control-mode/J1/strike-1"
    commander.mqtt.publish(own, b"open", qos=1)
    wait_until(lambda: own in device.topics(), timeout=10, what="the device's own command")
    # Retained $SYS values would have come right after the SUBACK, before the marker.
    assert set(device.topics()) == {own}, device.topics()
    commander.close()
    device.close()


def test_a_publish_deeper_than_the_topic_grammar_is_dropped(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    connector = _telemetry_reader(settings)
    device = _connected(settings, device_identity(settings, A, tmp_path))
    marker = f"tele/f2-{A}/sensor-mode/J1/sensor-1"
    device.mqtt.publish(f"{marker}/deeper/still", b"x" * 1000, qos=1)
    device.mqtt.publish(f"tele/f2-{A}/sensor-mode", b"shallow", qos=1)
    device.mqtt.publish(marker, b"marker", qos=1)
    wait_until(lambda: marker in connector.topics(), timeout=10, what="the marker")
    assert connector.topics() == [marker]
    device.close()
    connector.close()
