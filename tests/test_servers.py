"""Each real server of the local stack answers a round trip.

These tests fail (never skip) when a server is down: ``make test`` starts the
stack first, and a suite that silently skipped its servers would prove nothing.
Settings come from the same ``F2PIPE_*`` variables the stack reads.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import psycopg
import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from conftest import unique, wait_until
from f2pipe.pki.ca import pki_paths
from f2pipe.pki.local import load_ca
from f2pipe.runtime.kafka import admin_config, consumer_config, producer_config
from f2pipe.runtime.tls import client_context, service_context
from f2pipe.settings import Settings, load_settings

pytestmark = pytest.mark.servers

MqttConnect = Callable[[str], mqtt.Client]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings()


@pytest.fixture
def mqtt_connect(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MqttConnect]:
    """Connects MQTT clients to the stack's Mosquitto over mutual TLS; disconnects them after.

    ``identity`` is a service name (``svc-commander``) whose certificate the stack
    made, or a device MAC, for which a short-lived certificate is signed here by
    the stack's CA (not recorded: the test device exists only for this test).
    """
    clients: list[mqtt.Client] = []
    ca = load_ca(settings)
    pki = pki_paths(settings)

    def connect(identity: str) -> mqtt.Client:
        if identity.startswith("svc-"):
            context = service_context(settings.pki_dir, identity)
        else:
            issued = ca.issue_device(identity, days=1)
            folder = tmp_path_factory.mktemp("device")
            cert, key = folder / "device.pem", folder / "device.key"
            cert.write_text(issued.certificate_pem())
            key.write_text(issued.private_key_pem() or "")
            context = client_context(pki.ca_cert, cert, key)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=identity)
        client.tls_set_context(context)
        connected = threading.Event()

        def on_connect(
            _c: mqtt.Client, _u: object, _f: object, code: ReasonCode, _p: object
        ) -> None:
            if not code.is_failure:
                connected.set()

        client.on_connect = on_connect
        client.connect(settings.mqtt_host, settings.mqtt_port, keepalive=30)
        client.loop_start()
        clients.append(client)
        assert connected.wait(10), f"MQTT CONNACK from {settings.mqtt_port} not received"
        return client

    yield connect
    for client in clients:
        client.disconnect()
        client.loop_stop()


def test_kafka_round_trip(settings: Settings) -> None:
    topic = unique("stack_roundtrip")
    admin = AdminClient(admin_config(settings))
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(
        timeout=30
    )
    try:
        producer = Producer(producer_config(settings))
        producer.produce(topic, key=b"k", value=b"hello kafka")
        assert producer.flush(30) == 0, "the record was not acknowledged"

        consumer = Consumer(consumer_config(settings, unique("stack_group")))
        consumer.subscribe([topic])
        try:
            received: list[bytes] = []

            def poll() -> bool:
                message = consumer.poll(0.5)
                if message is not None and message.error() is None:
                    received.append(message.value())
                return bool(received)

            wait_until(poll, timeout=60, interval=0, what=f"a record on {topic}")
        finally:
            consumer.close()
        assert received == [b"hello kafka"]
    finally:
        admin.delete_topics([topic])


def test_postgres_query(settings: Settings) -> None:
    with psycopg.connect(settings.metadata_dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_database(), current_setting('server_version_num')")
        database, version = row.fetchone() or ("", "0")
    assert database == settings.metadata_dsn.rsplit("/", 1)[1]
    assert int(version) // 10000 == 15


def test_redis_round_trip(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    key = unique("stack_key")
    try:
        client.set(key, b"hello redis", ex=60)
        assert client.get(key) == b"hello redis"
    finally:
        client.delete(key)
        client.close()


def test_mqtt_publish_subscribe(mqtt_connect: MqttConnect) -> None:
    """An operator's command reaches its device over mTLS (and only through the ACL)."""
    mac = uuid.uuid4().hex[:12]
    topic = f"cmnd/f2-{mac}/access-control-mode/J1/strike-1"
    received: list[bytes] = []
    subscribed = threading.Event()

    device = mqtt_connect(mac)
    device.on_message = lambda _c, _u, message: received.append(message.payload)
    device.on_subscribe = lambda *_args: subscribed.set()
    device.subscribe(f"cmnd/f2-{mac}/#", qos=1)
    assert subscribed.wait(10), "SUBACK not received"

    commander = mqtt_connect("svc-commander")
    commander.publish(topic, b'{"power-flag": 1}', qos=1).wait_for_publish(10)

    wait_until(lambda: received, timeout=10, what=f"a message on {topic}")
    assert received == [b'{"power-flag": 1}']
