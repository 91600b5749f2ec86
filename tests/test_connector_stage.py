"""The connector's pure stage and its MQTT client's decoding, without servers."""

from __future__ import annotations

import socket
import threading

import mqtt5
from hypothesis import given
from hypothesis import strategies as st
from mqtt5 import QoS

from f2pipe.connector.client import MqttClient
from f2pipe.connector.stage import Record, RecordBuilder
from f2pipe.core.reasons import Reason

GOOD = "tele/f2-aabbccddee01/sensor-mode/J1/sensor-1"


def decoded(packet: mqtt5.PublishPacket) -> mqtt5.PublishPacket:
    """``packet`` as the client receives it: written and read back by the codec."""
    found, _size = mqtt5.read(memoryview(packet.write()))
    assert isinstance(found, mqtt5.PublishPacket)
    return found


def test_a_message_becomes_a_raw_record_and_its_ack() -> None:
    stage = RecordBuilder("raw", "dlq", 64)
    records: list[Record] = []
    acks: list[int] = []
    batch = [
        decoded(mqtt5.PublishPacket(GOOD, b"one", qos=QoS.AT_LEAST_ONCE, packet_id=5)),
        decoded(mqtt5.PublishPacket(GOOD, b"two", qos=QoS.AT_LEAST_ONCE, packet_id=6)),
    ]
    assert stage.add(batch, 1700000000123, records, acks) == (0, [])
    headers = [
        ("mqtt.topic", GOOD.encode()),
        ("mqtt.qos", b"1"),
        ("mqtt.retain", b"0"),
        ("ingest.ts", b"1700000000123"),
    ]
    assert records == [
        ("raw", b"one", b"aabbccddee01", headers),
        ("raw", b"two", b"aabbccddee01", headers),
    ]
    assert acks == [5, 6]


def test_flags_qos0_and_dead_letters() -> None:
    stage = RecordBuilder("raw", "dlq", 4)
    records: list[Record] = []
    acks: list[int] = []
    bad = "tele/f2-AABBCCDDEE01/sensor-mode/J9/sensor-1"
    batch = [
        decoded(mqtt5.PublishPacket(GOOD, b"x", qos=QoS.AT_MOST_ONCE, retain=True)),
        decoded(
            mqtt5.PublishPacket(GOOD, b"y", qos=QoS.AT_LEAST_ONCE, packet_id=9, duplicate=True)
        ),
        decoded(mqtt5.PublishPacket(bad, b"z", qos=QoS.AT_LEAST_ONCE, packet_id=10)),
        decoded(mqtt5.PublishPacket(GOOD, b"large", qos=QoS.AT_LEAST_ONCE, packet_id=11)),
    ]
    redelivered, rejected = stage.add(batch, 42, records, acks)
    assert redelivered == 1
    assert acks == [9, 10, 11]
    assert [(r.reason, topic) for r, topic in rejected] == [
        (Reason.INVALID_TOPIC, bad),
        (Reason.PAYLOAD_TOO_LARGE, GOOD),
    ]
    retained, duplicate, invalid, large = records
    assert retained[3][:3] == [
        ("mqtt.topic", GOOD.encode()),
        ("mqtt.qos", b"0"),
        ("mqtt.retain", b"1"),
    ]
    assert duplicate[0] == "raw"
    assert invalid == (
        "dlq",
        b"z",
        None,
        [
            ("mqtt.topic", bad.encode()),
            ("mqtt.qos", b"1"),
            ("mqtt.retain", b"0"),
            ("ingest.ts", b"42"),
            ("dlq.stage", b"connector"),
            ("dlq.reason", b"invalid_topic"),
            ("dlq.detail", b"not an F2 status or telemetry topic"),
            ("dlq.source", b"mqtt/" + bad.encode()),
            ("dlq.ts", b"42"),
        ],
    )
    assert large[:3] == ("dlq", b"large", b"aabbccddee01")
    assert dict(large[3])["dlq.detail"] == b"5 bytes > 4"


def test_the_client_reads_packets_cut_anywhere() -> None:
    """PUBLISH packets split across reads at every byte reach the handler whole, in order."""
    payloads = [b"p%d" % i * (i + 1) for i in range(20)]
    stream = b"".join(
        mqtt5.PublishPacket(GOOD, p, qos=QoS.AT_LEAST_ONCE, packet_id=i + 1).write()
        for i, p in enumerate(payloads)
    )
    for cut in (1, 2, 3, 7, 64, len(stream)):
        got: list[mqtt5.PublishPacket] = []
        client = _client(got.extend)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        client._sock = ours
        with theirs:
            for start in range(0, len(stream), cut):
                theirs.sendall(stream[start : start + cut])
                assert client.read_packets(1000)
        assert [(m.payload, m.packet_id) for m in got] == [
            (p, i + 1) for i, p in enumerate(payloads)
        ]
        ours.close()


@given(st.binary(min_size=2, max_size=40))
def test_the_client_never_crashes_on_garbage(data: bytes) -> None:
    lost: list[str] = []
    client = _client(lambda _batch: None, lost)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours
    with theirs:
        theirs.sendall(data)
        alive = client.read_packets(1000)
    assert alive == (not lost)
    ours.close()


def test_connect_subscribe_and_ack_over_a_socket() -> None:
    """CONNECT, CONNACK, SUBSCRIBE, SUBACK and PUBACKs as a broker sees them."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    seen: list[object] = []
    client = _client(lambda _b: None)

    def on_connect(present: bool, refusal: str | None) -> None:
        seen.append((present, refusal))
        client.subscribe(["tele/+/+/+/+"])

    client.on_connect = on_connect
    client.on_subscribe = lambda refusals: seen.append(refusals)
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]))
    thread.start()
    client.connect("127.0.0.1", port)
    thread.join(5)
    broker = accepted[0]
    broker.settimeout(5)
    with broker, server:
        assert client.flush_output()
        connect, _ = mqtt5.read(memoryview(broker.recv(1000)))
        assert isinstance(connect, mqtt5.ConnectPacket)
        assert (connect.client_id, connect.clean_start, connect.session_expiry_interval) == (
            "test",
            False,
            300,
        )
        assert connect.receive_max == 100
        broker.sendall(mqtt5.ConnAckPacket(session_present=True).write())
        _wait_read(client)
        assert client.flush_output()
        subscribe, _ = mqtt5.read(memoryview(broker.recv(1000)))
        assert isinstance(subscribe, mqtt5.SubscribePacket)
        assert [
            (f.pattern, int(f.max_qos), f.retain_as_published) for f in subscribe.topic_filters
        ] == [("tele/+/+/+/+", 1, False)]
        broker.sendall(
            mqtt5.SubAckPacket(
                subscribe.packet_id, [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE]
            ).write()
        )
        _wait_read(client)
        assert seen == [(True, None), []]
        client.ack_many([3, 4])
        client.disconnect(session_expiry=300)
        assert client.flush_output()
        assert client.socket() is None
        tail = broker.recv(1000)
        assert tail[:8] == bytes.fromhex("40020003 40020004")
        end, _ = mqtt5.read(memoryview(tail[8:]))
        assert isinstance(end, mqtt5.DisconnectPacket)
        assert end.session_expiry_interval == 300


def _publish(mid: int) -> bytes:
    return mqtt5.PublishPacket(GOOD, b"m%d" % mid, qos=QoS.AT_LEAST_ONCE, packet_id=mid).write()


_SUBACK = mqtt5.SubAckPacket(1, [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE]).write()
_PINGRESP = mqtt5.PingRespPacket().write()


def _connected(client: MqttClient) -> socket.socket:
    """Give ``client`` one end of a socket pair; return the broker's end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours
    client.connected = True
    return theirs


def _send(broker: socket.socket, client: MqttClient, data: bytes, limit: int) -> None:
    broker.sendall(data)
    assert client.read_packets(limit)


def test_control_packets_pass_messages_waiting_for_room() -> None:
    """With no room for messages the client still handles SUBACK and PINGRESP; the
    messages wait, in order, until there is room."""
    got: list[int | None] = []
    subacks: list[list[str]] = []
    client = _client(lambda batch: got.extend(p.packet_id for p in batch), receive_maximum=3)
    client.on_subscribe = subacks.append
    broker = _connected(client)
    with broker:
        _send(broker, client, _publish(1) + _publish(2) + _SUBACK + _publish(3) + _PINGRESP, 0)
        assert subacks == [[]]
        assert got == []
        assert client.held() == 3
        assert client.read_packets(2)
        assert got == [1, 2]
        _send(broker, client, _publish(4), 1)
        assert got == [1, 2, 3]
        assert client.read_packets(5)
        assert got == [1, 2, 3, 4]
        assert client.held() == 0
    client.connection_lost()


def test_the_socket_rests_only_past_the_receive_maximum() -> None:
    """As many waiting messages as the broker may send unacknowledged, and the socket is
    still read; past that (a broker ignoring the limit, or QoS 0), not until there is room."""
    got: list[int | None] = []
    subacks: list[list[str]] = []
    client = _client(lambda batch: got.extend(p.packet_id for p in batch), receive_maximum=2)
    client.on_subscribe = subacks.append
    broker = _connected(client)
    with broker:
        _send(broker, client, _publish(1) + _publish(2), 0)
        _send(broker, client, _SUBACK, 0)
        assert subacks == [[]]
        assert client.wants_read()
        _send(broker, client, _publish(3), 0)
        assert not client.wants_read()
        _send(broker, client, _SUBACK, 0)
        assert subacks == [[]]  # not read
        assert client.read_packets(1)
        assert got == [1]
        assert subacks == [[], []]
        assert client.read_packets(10)
        assert got == [1, 2, 3]
    client.connection_lost()


def test_waiting_messages_go_with_their_connection() -> None:
    """Messages never handed over are not handed over after the connection is lost: their
    packet ids belong to it, and the broker sends them again on the next one."""
    got: list[int | None] = []
    lost: list[str] = []
    client = _client(lambda batch: got.extend(p.packet_id for p in batch), lost)
    broker = _connected(client)
    _send(broker, client, _publish(1) + _publish(2), 0)
    broker.close()
    assert not client.read_packets(0)
    assert lost == ["connection lost"]
    assert client.held() == 0
    assert not client.read_packets(10)
    assert got == []


def _wait_read(client: MqttClient) -> None:
    sock = client.socket()
    assert sock is not None
    sock.settimeout(5)
    data = sock.recv(65536, socket.MSG_PEEK)
    assert data
    sock.setblocking(False)
    assert client.read_packets(1000)


def _client(
    handler: object, lost: list[str] | None = None, receive_maximum: int = 100
) -> MqttClient:
    return MqttClient(
        "test",
        ssl_context=None,
        keepalive=60,
        session_expiry=300,
        receive_maximum=receive_maximum,
        publish_handler=handler,  # type: ignore[arg-type]
        on_connect=lambda _present, _refusal: None,
        on_subscribe=lambda _refusals: None,
        on_disconnect=(lost.append if lost is not None else lambda _reason: None),
    )
