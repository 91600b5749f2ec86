"""Fixtures for the certificate and broker tests: a register database, a state
directory with its PKI, a dedicated Mosquitto running the product's own
configuration, the certgen app under uvicorn, and MQTT client helpers."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from conftest import unique, wait_until
from f2pipe.metadata.database import create_database, migrate
from f2pipe.operations.stack.mosquitto import ensure_config
from f2pipe.operations.stack.supervise import port_accepts
from f2pipe.pki import api
from f2pipe.pki.ca import (
    CertificateAuthority,
    cert_pem,
    generate_key,
    key_pem,
    pki_paths,
    write_private,
    write_public,
)
from f2pipe.pki.state import broker_pid_path
from f2pipe.runtime.tls import client_context
from f2pipe.settings import Settings, load_settings

# The stack's server (F2PIPE_METADATA_DSN), its maintenance database.
SERVER_DSN = load_settings().metadata_dsn.rsplit("/", 1)[0]
ADMIN_DSN = f"{SERVER_DSN}/postgres"
ADMIN_TOKEN = "q8Vz3Lr1Tn7Kd5Wm2Xc9Hb4Pf6Js0GyA"  # 32 random characters, the least accepted


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def register_database() -> Iterator[str]:
    """One migrated database per test run, with a controller template for test devices.

    Creating a database takes seconds on a busy machine, so tests share this one
    and :func:`register_dsn` empties it before each test.
    """
    name = unique("certgen")
    create_database(ADMIN_DSN, name)
    dsn = f"{SERVER_DSN}/{name}"
    try:
        migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO device_types (name, is_controller) VALUES ('F2 Controller', true)"
            )
            conn.execute(
                "INSERT INTO device_templates (name, device_type_id) "
                "SELECT 'F2 Controller', device_type_id FROM device_types"
            )
        yield dsn
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def register_dsn(register_database: str) -> str:
    """The shared register database, emptied of devices and certificates for this test."""
    with psycopg.connect(register_database, autocommit=True) as conn:
        conn.execute("TRUNCATE certificates, device_claims, devices RESTART IDENTITY CASCADE")
    return register_database


def add_device(dsn: str, mac: str, claiming_code: str | None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO devices (name, device_template_id, mac_address, claiming_code) "
            "SELECT %s, device_template_id, %s, %s FROM device_templates",
            (f"controller {mac}", mac, claiming_code),
        )


def add_claimable_devices(dsn: str, prefix: str, count: int) -> list[str]:
    """``count`` devices ``{prefix}00``, ``{prefix}01``, ..., each with the claiming
    code ``code-{mac}``; their MACs."""
    macs = [f"{prefix}{i:02x}" for i in range(count)]
    for mac in macs:
        add_device(dsn, mac, f"code-{mac}")
    return macs


@pytest.fixture
def settings(tmp_path: Path, register_dsn: str) -> Settings:
    return load_settings(
        state_dir=tmp_path / "state",
        metadata_dsn=register_dsn,
        mqtt_port=free_port(),
        certgen_port=free_port(),
        admin_token=ADMIN_TOKEN,
    )


@dataclass
class Broker:
    settings: Settings
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def broker(settings: Settings) -> Iterator[Broker]:
    """Mosquitto started with exactly the configuration ``ensure_config`` writes."""
    conf = ensure_config(settings)
    log = settings.state_dir / "mosquitto.log"
    with log.open("wb") as out:
        process = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=out, stdout=out)
    try:
        wait_until(
            lambda: broker_pid_path(settings).is_file() and port_accepts(settings.mqtt_port),
            timeout=10,
            what="mosquitto to listen",
        )
        yield Broker(settings, process, log)
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class Identity:
    cert: Path
    key: Path
    ca: Path


def assert_crl_keeps(path: Path, serial: int, revoked_at: dt.datetime, valid_days: int) -> None:
    """The CRL file ``path`` is valid for more than ``valid_days`` days from now and still
    lists ``serial`` as revoked at ``revoked_at``."""
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=valid_days)
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None
    assert entry.revocation_date_utc == revoked_at


def tls_handshake(
    address: tuple[str, int], version: ssl.TLSVersion, trust: Path, identity: Identity | None = None
) -> str:
    """Offer exactly ``version`` to ``address``, trusting ``trust`` (and presenting
    ``identity``'s certificate, if given); "ok" or the TLS error's reason."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(trust))
    if identity is not None:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    context.check_hostname = False
    # Let this client offer the old versions at all (OpenSSL's default forbids them).
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 / TLSv1_1 are the point
        context.minimum_version = version
        context.maximum_version = version
    try:
        with (
            socket.create_connection(address, timeout=10) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.version()
            return "ok"
    except ssl.SSLError as exc:
        return str(exc.reason)


def write_identity(directory: Path, name: str, cert: x509.Certificate, key_bytes: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_public(directory / f"{name}.pem", cert_pem(cert))
    write_private(directory / f"{name}.key", key_bytes)
    return directory / f"{name}.pem"


def device_identity(settings: Settings, mac: str, directory: Path) -> Identity:
    """A valid device certificate from the product CA, as files."""
    ca = CertificateAuthority.load(pki_paths(settings), None)
    issued = ca.issue_device(mac, days=1)
    assert issued.private_key is not None
    cert = write_identity(directory, f"f2-{mac}", issued.certificate, key_pem(issued.private_key))
    return Identity(cert, cert.with_suffix(".key"), pki_paths(settings).ca_cert)


def service_identity(settings: Settings, name: str) -> Identity:
    paths = pki_paths(settings)
    return Identity(paths.service_cert(name), paths.service_key(name), paths.ca_cert)


def expired_identity(settings: Settings, mac: str, directory: Path) -> Identity:
    ca = CertificateAuthority.load(pki_paths(settings), None)
    key = generate_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"f2-{mac}")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    path = write_identity(directory, f"expired-{mac}", cert, key_pem(key))
    return Identity(path, path.with_suffix(".key"), pki_paths(settings).ca_cert)


@dataclass
class Client:
    """A paho MQTT v5 client that records what happens to it."""

    mqtt: mqtt.Client
    received: list[mqtt.MQTTMessage] = field(default_factory=list)
    connack: list[ReasonCode] = field(default_factory=list)
    disconnects: list[ReasonCode] = field(default_factory=list)
    subacks: list[list[ReasonCode]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def topics(self) -> list[str]:
        with self.lock:
            return [m.topic for m in self.received]

    def connected(self) -> bool:
        return bool(self.connack) and self.connack[-1] == 0 and self.mqtt.is_connected()

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


def make_client(
    settings: Settings,
    identity: Identity | None,
    client_id: str = "",
    tls: bool = True,
    reconnect: bool = False,
    persistent: bool = False,
    will: str = "",
    will_retain: bool = False,
) -> Client:
    """Connect (asynchronously) and return; poll ``connected()`` or ``connack``.

    ``will``: a topic for a QoS 1 will message (payload ``will``), retained if
    ``will_retain``."""
    paho = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=reconnect,
    )
    client = Client(paho)
    if tls:
        assert identity is not None
        if identity.cert.exists():
            context = client_context(identity.ca, identity.cert, identity.key)
        else:  # no client certificate at all
            import ssl

            context = ssl.create_default_context(cafile=str(identity.ca))
        paho.tls_set_context(context)

    def on_connect(c: object, u: object, flags: object, reason: ReasonCode, p: object) -> None:
        client.connack.append(reason)

    def on_disconnect(c: object, u: object, flags: object, reason: ReasonCode, p: object) -> None:
        client.disconnects.append(reason)

    def on_message(c: object, u: object, message: mqtt.MQTTMessage) -> None:
        with client.lock:
            client.received.append(message)

    def on_subscribe(c: object, u: object, mid: int, codes: list[ReasonCode], p: object) -> None:
        client.subacks.append(codes)

    paho.on_connect = on_connect
    paho.on_disconnect = on_disconnect
    paho.on_message = on_message
    paho.on_subscribe = on_subscribe
    paho.reconnect_delay_set(1, 2)
    if will:
        paho.will_set(will, b"will", qos=1, retain=will_retain)
    properties = None
    if persistent:  # a session that outlives the connection, as the connector's does
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
    paho.connect_async(
        settings.mqtt_host,
        settings.mqtt_port,
        keepalive=30,
        clean_start=not persistent,
        properties=properties,
    )
    paho.loop_start()
    return client


def connects(settings: Settings, identity: Identity | None, tls: bool = True) -> bool:
    """True if the broker accepts this identity (CONNACK success), False if refused."""
    client = make_client(settings, identity, tls=tls)
    try:
        wait_until(
            lambda: client.connack or client.disconnects,
            timeout=10,
            what="CONNACK or disconnect",
        )
        return client.connected()
    finally:
        client.close()


@dataclass
class Certgen:
    url: str
    server: uvicorn.Server
    app: object


@pytest.fixture
def certgen(settings: Settings) -> Iterator[Certgen]:
    """The certgen app served by uvicorn on a free loopback port, settings overridden."""
    ensure_config(settings)
    app = api.create_app()
    app.dependency_overrides[api.get_settings] = lambda: settings
    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.certgen_port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=10, what="certgen to start")
        yield Certgen(f"http://127.0.0.1:{settings.certgen_port}", server, app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
