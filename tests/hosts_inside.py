"""The inside of ``test_hosts.py``: run by it, in the services' namespace, never collected.

The servers and certgen are started each in its own namespace
(``LAUNCH_PREFIX``), bound to their own address and reached by name; the stages
and the devices run here, in the services' namespace. The tests run in file order on one pipeline:
the public vectors, a refusal per link that only a name check catches, kills
under load, and a stage given a wrong name for PostgreSQL.
Measurements go to the JSON file named by ``F2PIPE_HOSTS_REPORT``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psycopg
import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from paho.mqtt.enums import CallbackAPIVersion

from conftest import VECTORS, wait_until
from f2pipe.operations import pipeline, services, stack
from f2pipe.operations.stack import security
from f2pipe.operations.stack.server import LAUNCH_PREFIX
from f2pipe.runtime.kafka import admin_config
from f2pipe.runtime.tls import client_context
from f2pipe.settings import Settings, load_settings
from f2pipe.testing.stack import free_ports, private_state
from pipeline_helpers import Fleet
from test_pipeline import (
    dead_letters,
    drained,
    expected_rows,
    failure_logs,
    finish,
    read_ledger,
    row_count,
    simulate,
    stored_rows,
)

LAYOUT: dict[str, Any] = json.loads(os.environ.get("F2PIPE_HOSTS_LAYOUT", "{}"))
pytestmark = pytest.mark.skipif(not LAYOUT, reason="run by test_hosts.py in its namespace")

STAGES = ("certgen", "connector", "processor", "sink")
Row = tuple[datetime, int, int, float]
MEASURED: dict[str, float] = {}
#: Messages the demo fleet publishes through the kills: 50 s at 50 a second.
LOAD = 2500


def _report(**values: float) -> None:
    MEASURED.update(values)
    Path(os.environ["F2PIPE_HOSTS_REPORT"]).write_text(json.dumps(MEASURED))


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Settings, Settings]]:
    """(the operator's settings, the services' plain settings) of a pipeline whose
    servers each run on a host of their own."""
    names: dict[str, str] = LAYOUT["names"]
    for server, namespace in LAYOUT["namespaces"].items():
        LAUNCH_PREFIX[server] = ["ip", "netns", "exec", namespace]
    database = f"postgresql://postgres@{names['postgres']}:5432/f2pipe"
    with private_state("f2pipe-hosts-") as state:
        # Every server on its own host, so every one keeps its default port.
        settings = load_settings(
            state_dir=state,
            metadata_dsn=database,
            timeseries_dsn=database,
            redis_url=f"rediss://{names['redis']}:6379/0",
            kafka_bootstrap=f"{names['kafka']}:9092",
            kafka_controller_port=9093,
            mqtt_host=names["mosquitto"],
            mqtt_port=8883,
            mqtt_tls=True,
            certgen_host=names["certgen"],
            certgen_url=f"https://{names['certgen']}:8080",
            stack_install=False,
            kafka_heap="512m",
            data_topic_partitions=2,
            processor_session_timeout_s=6,
            sink_batch_age_ms=200,
        )
        began = time.monotonic()
        try:
            pipeline.up(settings, STAGES, quiet=True)
            _report(start_s=round(time.monotonic() - began, 1))
            yield security.admin_settings(settings), settings
        finally:
            pipeline.down(settings, quiet=True)
            LAUNCH_PREFIX.clear()


def _verified(dsn: str, settings: Settings) -> str:
    """``dsn`` with the server's certificate and name checked against f2pipe's CA."""
    check = f"sslmode=verify-full&sslrootcert={security.ca_file(settings)}"
    return f"{dsn}{'&' if '?' in dsn else '?'}{check}"


def _issue(settings: Settings, mac: str, folder: Path) -> tuple[Path, Path]:
    """A device's certificate and key from certgen over HTTPS, its name checked."""
    token = (settings.state_dir / "admin-token").read_text().strip()
    trust = ssl.create_default_context(cafile=str(security.ca_file(settings)))
    request = urllib.request.Request(  # noqa: S310 - https, the test's own certgen
        f"{settings.certgen_url}/v1/devices/{mac}/certificate", data=b"{}", method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30, context=trust) as response:  # noqa: S310
        issued = json.loads(response.read())
    cert, key = folder / f"{mac}.pem", folder / f"{mac}.key"
    cert.write_text(issued["certificate"])
    key.write_text(issued["private_key"])
    key.chmod(0o600)
    return cert, key


def _publish(
    settings: Settings, mac: str, identity: tuple[Path, Path], topic: str, payload: bytes
) -> None:
    """One QoS 1 message as device ``mac`` over mutual TLS, the broker's name checked."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"f2-{mac}", protocol=mqtt.MQTTv5)
    client.tls_set_context(client_context(security.ca_file(settings), *identity))
    client.connect(settings.mqtt_host, settings.mqtt_port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=30)
        assert info.is_published(), f"{topic} was not acknowledged"
    finally:
        client.disconnect()
        client.loop_stop()


def test_the_public_vectors_cross_every_host(
    hosts: tuple[Settings, Settings], tmp_path: Path
) -> None:
    """Each vector is published by a device of its own; its readings land as rows, its
    faults as dead letters. Left out: the ambiguous local times, which the ingest time
    resolves (SPEC section 2), and over MQTT that is the connector's receive time."""
    settings, _ = hosts
    vectors = [json.loads(line) for line in VECTORS.read_text().splitlines() if line.strip()]
    vectors = [v for v in vectors if "ingest_ts" not in v and "dst_ambiguous" not in v["name"]]
    fleet = Fleet(_verified(settings.metadata_dsn, settings))
    expected: set[Row] = set()
    malformed: list[tuple[bytes, str]] = []
    devices = []
    try:
        for i, vector in enumerate(vectors):
            mac = f"cd{i:010x}"
            _mode, connector, component = vector["topic_tail"].split("/")
            index = int(component.rsplit("-", 1)[1]) if component[-1].isdigit() else 1
            template = fleet.template(
                f"hosts {vector['name']}",
                vector["template"]["frame_check"],
                vector["template"]["datapoints"],
            )
            fleet.controller(mac, vector["timezone"])
            sensor = fleet.sensor(f"hosts {vector['name']} sensor", template)
            fleet.wire(mac, int(connector[1:]), index, sensor)
            ids = fleet.datapoint_ids(template)
            for reading in vector["expect"].get("readings", []):
                ts = datetime.fromisoformat(reading["ts"]).astimezone(UTC)
                expected.add((ts, sensor, ids[reading["label"]], float(reading["value"])))
            if "dead_letter" in vector["expect"]:
                malformed.append((vector["payload"].encode(), vector["expect"]["dead_letter"]))
            devices.append((mac, f"{vector['topic_type']}/f2-{mac}/{vector['topic_tail']}", vector))
    finally:
        fleet.close()
    began = time.monotonic()
    for mac, topic, vector in devices:
        _publish(settings, mac, _issue(settings, mac, tmp_path), topic, vector["payload"].encode())
    dsn = settings.timeseries_dsn
    wait_until(lambda: len(stored_rows(dsn)) >= len(expected), timeout=120, what="every row")
    stored = stored_rows(dsn)
    assert stored == expected, f"{len(expected - stored)} missing, {len(stored - expected)} extra"
    found = dead_letters(settings, len(malformed), timeout=60)
    assert sorted((value, reason) for value, _stage, reason in found) == sorted(malformed)
    # Each reaches PostgreSQL from its own host, over TLS, as itself.
    with psycopg.connect(_verified(settings.metadata_dsn, settings)) as conn:
        sessions = conn.execute(
            "SELECT a.usename, host(a.client_addr), s.ssl FROM pg_stat_activity a"
            " JOIN pg_stat_ssl s USING (pid) WHERE a.usename LIKE 'f2pipe_%'"
        ).fetchall()
    stages = socket.gethostbyname(LAYOUT["services"])
    certgen = socket.gethostbyname(LAYOUT["names"]["certgen"])
    origin = {"f2pipe_processor": stages, "f2pipe_sink": stages, "f2pipe_certgen": certgen}
    assert {"f2pipe_processor", "f2pipe_sink", "f2pipe_certgen"} <= {u for u, _, _ in sessions}
    assert {(user, address, tls) for user, address, tls in sessions} == {
        (user, origin[user], True) for user, _, _ in sessions
    }
    # The processor reached its cache over TLS (with none it would have read PostgreSQL).
    cache = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    try:
        assert any(key.endswith(devices[0][0].encode()) for key in cache.scan_iter(count=1000))
    finally:
        cache.close()
    _report(
        vectors=len(devices), vector_rows=len(stored), dead_letters=len(found),
        vectors_s=round(time.monotonic() - began, 1),
    )  # fmt: skip


def _kafka_errors(settings: Settings) -> list[str]:
    """The errors an operator's Kafka client meets asking for the topics ([]: none)."""
    errors: list[str] = []
    config = admin_config(settings, log_level=0) | {"error_cb": lambda e: errors.append(str(e))}
    admin = AdminClient(config)
    try:
        admin.list_topics(timeout=10)
    except KafkaException as exc:
        admin.poll(1)  # serves the error callbacks of what happened meanwhile
        return [*errors, str(exc)]
    return []


def test_each_link_refuses_the_right_address_under_a_wrong_name(
    hosts: tuple[Settings, Settings],
) -> None:
    """Each server's own address, reached by a name its certificate does not carry."""
    settings, _ = hosts
    names, aliases = LAYOUT["names"], LAYOUT["aliases"]
    # PostgreSQL: verify-full.
    dsn = _verified(settings.metadata_dsn, settings)
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        assert conn.pgconn.ssl_in_use
    elsewhere = dsn.replace(f"@{names['postgres']}:", f"@{aliases['postgres']}:")
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(elsewhere, connect_timeout=5).close()
    # Redis: TLS only, its name checked.
    for url, refusal in (
        (settings.redis_url, None),
        (settings.redis_url.replace(names["redis"], aliases["redis"]), "Hostname mismatch"),
        (settings.redis_url.replace("rediss://", "redis://").split("?")[0], "Connection"),
    ):
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            if refusal is None:
                assert client.ping()
            else:
                with pytest.raises(redis.ConnectionError, match=refusal):
                    client.ping()
        finally:
            client.close()
    # Kafka: librdkafka checks the broker's name (ssl.endpoint.identification.algorithm).
    assert _kafka_errors(settings) == []
    wrong = settings.model_copy(update={"kafka_bootstrap": f"{aliases['kafka']}:9092"})
    assert any("certificate verify failed" in error for error in _kafka_errors(wrong))
    # MQTT: a device's TLS context checks the broker's name.
    devices = settings.pki_dir / "devices"
    mac = "aabbccddee01"  # a demo controller, its certificate issued by `up`
    context = client_context(
        security.ca_file(settings), devices / f"f2-{mac}.pem", devices / f"f2-{mac}.key"
    )
    for host in (names["mosquitto"], aliases["mosquitto"]):
        with socket.create_connection((host, settings.mqtt_port), timeout=10) as sock:
            if host == names["mosquitto"]:
                context.wrap_socket(sock, server_hostname=host).close()
                continue
            with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
                context.wrap_socket(sock, server_hostname=host)
    # certgen: HTTPS with its name checked.
    trust = ssl.create_default_context(cafile=str(security.ca_file(settings)))
    port = settings.certgen_port
    with urllib.request.urlopen(
        f"https://{names['certgen']}:{port}/healthz", timeout=10, context=trust
    ) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.URLError, match="Hostname mismatch"):
        urllib.request.urlopen(
            f"https://{aliases['certgen']}:{port}/healthz", timeout=10, context=trust
        )


def _rows_flow(dsn: str, what: str) -> None:
    base = row_count(dsn)
    wait_until(lambda: row_count(dsn) > base + 20, timeout=120, what=f"rows to flow {what}")


def test_kills_under_load_lose_and_repeat_nothing(
    hosts: tuple[Settings, Settings], tmp_path: Path
) -> None:
    """SIGKILL the processor, then the sink, then PostgreSQL on its own host (all its
    processes) while the demo fleet publishes; the rows of the demo sensors equal what
    the broker acknowledged, none twice."""
    settings, plain = hosts
    dsn = settings.timeseries_dsn
    before = stored_rows(dsn)
    ledger = tmp_path / "ledger.jsonl"
    began = time.monotonic()
    load = simulate(settings, ledger, LOAD, "--rate", "50", "--window", "200")
    try:
        for name in ("processor", "sink"):
            _rows_flow(dsn, f"before {name} is killed")
            service = services.services(plain, [name])[0]
            pid = service.pid()
            assert pid is not None, f"{name} is not running"
            assert load.poll() is None, f"the load ended before {name} was killed"
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda s=service: s.pid() is None, timeout=30, what=f"{name} to die")
            service.pidfile.remove()
            service.start()
            service.wait_healthy()
        _rows_flow(dsn, "before PostgreSQL is killed")
        database = next(server for server in stack.servers(plain) if server.name == "postgres")
        pid = database.pid()
        assert pid is not None, "PostgreSQL is not running"
        assert load.poll() is None, "the load ended before PostgreSQL was killed"
        os.killpg(pid, signal.SIGKILL)  # its own session: every backend with it
        wait_until(lambda: database.pid() is None, timeout=30, what="PostgreSQL to die")
        database.pidfile.remove()
        database.prepare()
        database.start()  # through `ip netns exec`, on its own host again
        database.wait_healthy()
        _rows_flow(dsn, "after PostgreSQL's restart")
        summary = finish(load, timeout=300)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert summary["acknowledged"] == summary["published"] == LOAD
    expected = expected_rows(read_ledger(ledger), dsn)
    try:
        wait_until(lambda: drained(settings, expected | before), timeout=180, interval=1.0,
                   what="every stage to commit its input")  # fmt: skip
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}\n{failure_logs(settings)}")
    stored = stored_rows(dsn)
    assert stored - before == expected, (
        f"{len(expected - stored)} lost, {len(stored - before - expected)} extra"
    )
    assert row_count(dsn) == len(stored), "a reading stored twice"
    _report(crash_rows=len(expected), crash_s=round(time.monotonic() - began, 1))


def _not_ready_because(port: int, answer: list[str]) -> bool:
    """True once ``/readyz`` on ``port`` answers 503; its body goes to ``answer``."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).close()
    except urllib.error.HTTPError as exc:
        answer[:] = [exc.read().decode()]
        return exc.code == 503 and "DSN" in answer[0]
    except OSError:
        return False
    return False


def test_a_stage_reaching_the_database_by_a_wrong_name_says_which_setting(
    hosts: tuple[Settings, Settings], tmp_path: Path
) -> None:
    """The bad-input rule on a link between hosts: not ready, one line naming the
    setting and the fix, and neither the line nor the log holds the password."""
    _, plain = hosts
    name, alias = LAYOUT["names"]["postgres"], LAYOUT["aliases"]["postgres"]
    running: dict[str, tuple[subprocess.Popen[bytes], int, Path, str]] = {}
    try:
        for stage, port in zip(("sink", "processor"), free_ports(2), strict=True):
            env = {k: v for k, v in os.environ.items() if not k.startswith("F2PIPE_")}
            env.update(services.services(plain, [stage])[0].environment())
            for variable in ("F2PIPE_METADATA_DSN", "F2PIPE_TIMESERIES_DSN"):
                env[variable] = env[variable].replace(f"@{name}:", f"@{alias}:")
            env[f"F2PIPE_{stage.upper()}_PORT"] = str(port)
            secret = urlsplit(env["F2PIPE_METADATA_DSN"]).password or ""
            assert secret, f"{stage} has no database password"
            log = tmp_path / f"{stage}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "f2pipe.cli", stage], env=env, stdout=out, stderr=out
                )
            running[stage] = (process, port, log, secret)
        for stage, (process, port, log, secret) in running.items():
            answer: list[str] = []
            wait_until(
                lambda port=port, answer=answer: _not_ready_because(port, answer),
                timeout=60,
                what=f"{stage} to say why it is not ready",
            )
            variable = "F2PIPE_TIMESERIES_DSN" if stage == "sink" else "F2PIPE_METADATA_DSN"
            assert answer[0].strip().splitlines() == [answer[0].strip()], answer
            assert f"certificate does not name the host in {variable}" in answer[0], answer
            assert secret not in answer[0]
            assert secret not in log.read_text(errors="replace")
            assert process.poll() is None, f"{stage} exited instead of waiting for the fix"
    finally:
        for process, _port, _log, _secret in running.values():
            process.terminate()
            process.wait(30)
