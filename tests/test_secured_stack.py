"""The secured local stack (SPEC section 10; issue #14 item 2, #13 item 5).

A private PostgreSQL and Redis in a temporary state folder, started as
``f2pipe stack up`` starts them by default: each test asserts what a client
observes, a refused connection or an authorization error, never a setting.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from cryptography.hazmat.primitives.serialization import Encoding

from f2pipe.errors import StackError
from f2pipe.metadata.database import migrate
from f2pipe.operations import services, stack
from f2pipe.operations.stack import rights, security
from f2pipe.pki.ca import key_pem
from f2pipe.settings import Settings
from f2pipe.testing.stack import private_settings, private_state

pytestmark = pytest.mark.servers

SERVERS = ["postgres", "redis", "kafka"]


def _settings(state: Path, **overrides: object) -> Settings:
    return private_settings(state, stack_install=False, kafka_heap="512m", **overrides)


@pytest.fixture
def state() -> Iterator[Path]:
    """A private stack's state folder, removed after the test."""
    with private_state("f2pipe-secured-") as folder:
        yield folder


@pytest.fixture(scope="module")
def secured() -> Iterator[Settings]:
    """A secured PostgreSQL and Redis of their own, migrated and granted; the caller's
    settings (no password: the stack makes its own)."""
    with private_state("f2pipe-secured-") as state:
        settings = _settings(state)
        try:
            stack.up(settings, SERVERS)
            admin = security.admin_settings(settings)
            migrate(admin.metadata_dsn, admin)
            rights.grant(settings, admin.metadata_dsn)
            yield settings
        finally:
            stack.down(settings, SERVERS)


def _admin(settings: Settings) -> dict[str, str]:
    return security.read_admin_env(settings.state_dir / security.ADMIN_ENV)


def _as(settings: Settings, service: str) -> dict[str, str]:
    return security.service_env(settings, stack.Paths(settings.state_dir), service)


def test_admin_env_is_private_and_reaches_everything(secured: Settings) -> None:
    path = secured.state_dir / security.ADMIN_ENV
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    env = _admin(secured)
    with psycopg.connect(env["F2PIPE_METADATA_DSN"]) as conn:
        assert conn.pgconn.ssl_in_use
        user, superuser = conn.execute(
            "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() or ("", False)
        assert (user, superuser) == ("postgres", True)
    client = redis.Redis.from_url(env["F2PIPE_REDIS_URL"])
    try:
        client.set("anything", "1")
        assert client.get("anything") == b"1"
    finally:
        client.close()
    passwords = secured.state_dir / "secrets"
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o700
    for secret in passwords.glob("*.password"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def _refusal(dsn: str) -> str:
    with pytest.raises(psycopg.OperationalError) as failure:
        psycopg.connect(dsn, connect_timeout=5).close()
    return str(failure.value)


def test_postgres_refuses_no_password_a_wrong_one_and_clear_text(secured: Settings) -> None:
    dsn = _admin(secured)["F2PIPE_METADATA_DSN"]
    assert "no password supplied" in _refusal(secured.metadata_dsn)
    wrong = security.with_credentials(dsn, "postgres", "not-the-password")
    assert "password authentication failed" in _refusal(wrong)
    assert "no encryption" in _refusal(dsn + "?sslmode=disable")


def test_services_verify_the_server_certificate(secured: Settings) -> None:
    dsn = _as(secured, "processor")["F2PIPE_METADATA_DSN"]
    assert "sslmode=verify-full" in dsn
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
    # Another CA's view of the same server: verification fails.
    other = security.with_credentials(dsn, None, None, sslrootcert="system")
    assert "certificate verify failed" in _refusal(other)


def test_each_role_gets_only_its_grants(secured: Settings) -> None:
    with psycopg.connect(_as(secured, "processor")["F2PIPE_METADATA_DSN"]) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="decoded_data"):
            conn.execute("INSERT INTO decoded_data VALUES (now(), 1, 1, 1)")
    with psycopg.connect(_as(secured, "sink")["F2PIPE_METADATA_DSN"]) as conn:
        conn.execute("INSERT INTO decoded_data VALUES (now(), 1, 1, 1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="devices"):
            conn.execute("SELECT claiming_code FROM devices")
    with (
        psycopg.connect(_as(secured, "certgen")["F2PIPE_METADATA_DSN"]) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="decoded_data"),
    ):
        conn.execute("SELECT * FROM decoded_data")
    # The connector holds no database credentials at all.
    assert "no password supplied" in _refusal(_as(secured, "connector")["F2PIPE_METADATA_DSN"])


def test_redis_refuses_the_default_user_and_bounds_the_processor(secured: Settings) -> None:
    anonymous = redis.Redis.from_url(secured.redis_url)
    processor = redis.Redis.from_url(_as(secured, "processor")["F2PIPE_REDIS_URL"])
    try:
        with pytest.raises(redis.RedisError):
            anonymous.get("f2pipe:meta:x")
        processor.set("f2pipe:meta:x", "1", ex=60)
        assert processor.get("f2pipe:meta:x") == b"1"
        with pytest.raises(redis.exceptions.NoPermissionError):
            processor.set("elsewhere", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            processor.flushall()
    finally:
        anonymous.close()
        processor.close()


def test_each_service_is_given_only_its_own_secrets(secured: Settings) -> None:
    admin = security.pg_admin_password(stack.Paths(secured.state_dir))
    for service in services.services(secured):
        env = service.environment()
        joined = "\n".join(env.values())
        assert admin not in joined, f"{service.name} holds the operator's password"
        for other in services.services(secured):
            mine = _as(secured, service.name)
            theirs = _as(secured, other.name)
            if other.name != service.name and theirs.get("F2PIPE_REDIS_URL") != mine.get(
                "F2PIPE_REDIS_URL"
            ):
                assert theirs["F2PIPE_REDIS_URL"] not in joined


def test_an_unreadable_password_file_is_named_without_its_content(tmp_path: Path) -> None:
    paths = stack.Paths(tmp_path)
    secret = security.password(paths, "example")
    path = tmp_path / "secrets" / "example.password"
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make it unreadable another way
        path.unlink()
        path.mkdir()
    with pytest.raises(StackError) as failure:
        security.password(paths, "example")
    message = str(failure.value)
    assert str(path) in message
    assert "delete it" in message
    assert secret not in message
    assert "\n" not in message


def test_a_password_is_generated_once(tmp_path: Path) -> None:
    paths = stack.Paths(tmp_path)
    first = security.password(paths, "example")
    assert len(first) >= 32
    assert security.password(paths, "example") == first


def test_restarts_keep_the_passwords_and_plain_mode_turns_security_off(state: Path) -> None:
    settings = _settings(state)
    try:
        stack.up(settings, ["postgres"])
        dsn = _admin(settings)["F2PIPE_METADATA_DSN"]
        stack.down(settings, ["postgres"])
        stack.up(settings, ["postgres"])
        assert _admin(settings)["F2PIPE_METADATA_DSN"] == dsn
        psycopg.connect(dsn).close()
        assert "no password supplied" in _refusal(settings.metadata_dsn)
        stack.down(settings, ["postgres"])
        plain = settings.model_copy(update={"stack_secured": False})
        stack.up(plain, ["postgres"])
        psycopg.connect(plain.metadata_dsn).close()  # trust, for experiments
        assert _admin(plain)["F2PIPE_METADATA_DSN"] == plain.metadata_dsn
    finally:
        stack.down(settings, ["postgres"])


def _answers(url: str) -> bool:
    """True when ``url`` gives any HTTP answer."""
    try:
        urllib.request.urlopen(url, timeout=10).close()  # noqa: S310 - the test's own URL
    except urllib.error.HTTPError:
        return True
    except (OSError, http.client.HTTPException):
        return False
    return True


@pytest.mark.slow
def test_the_pipeline_runs_secured_each_stage_as_itself(tmp_path: Path, state: Path) -> None:
    """Readings land through certgen, connector, processor and sink, each with its own role."""
    from conftest import wait_until
    from f2pipe.operations import pipeline
    from test_pipeline import expected_rows, finish, read_ledger, simulate, stored_rows

    settings = _settings(state, stages=True, data_topic_partitions=2, sink_batch_age_ms=200)
    certgen = settings.certgen_port
    try:
        pipeline.up(settings, ("certgen", "connector", "processor", "sink"), quiet=True)
        admin = security.admin_settings(settings)
        ledger = tmp_path / "ledger.jsonl"
        finish(simulate(admin, ledger, 200), timeout=120)
        expected = expected_rows(read_ledger(ledger), admin.timeseries_dsn)
        assert expected
        wait_until(
            lambda: stored_rows(admin.timeseries_dsn) == expected, timeout=120, what="every row"
        )
        with psycopg.connect(admin.metadata_dsn) as conn:
            users = {
                row[0]
                for row in conn.execute(
                    "SELECT usename FROM pg_stat_activity WHERE datname = 'f2pipe'"
                )
            }
        assert {"f2pipe_processor", "f2pipe_sink"} <= users
        # certgen serves HTTPS only, and issues and records a certificate as f2pipe_certgen.
        assert admin.certgen_url == f"https://127.0.0.1:{certgen}"
        assert not _answers(f"http://127.0.0.1:{certgen}/healthz")
        token = (state / "admin-token").read_text().strip()
        trust = ssl.create_default_context(cafile=str(security.ca_file(settings)))
        request = urllib.request.Request(  # noqa: S310 - https to loopback
            f"{admin.certgen_url}/v1/devices/aabbccddee01/certificate",
            data=b"{}", method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30, context=trust) as response:  # noqa: S310
            serial = json.loads(response.read())["serial"]
        with psycopg.connect(admin.metadata_dsn) as conn:
            found = conn.execute("SELECT 1 FROM certificates WHERE serial = %s", (serial,))
            assert found.fetchone() == (1,)
        # `f2pipe status` run by the state folder's owner, with no credentials of its own,
        # sees every server and service, the lag through SASL_SSL and certgen over HTTPS.
        env = {k: v for k, v in os.environ.items() if not k.startswith("F2PIPE_")}
        env.update(services.settings_env(settings))
        out = subprocess.run(
            [sys.executable, "-m", "f2pipe.cli", "status", "--json", "--interval", "1"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        report = json.loads(out.stdout)
        health = {h["name"]: h for h in report["health"]}
        for name in ("postgres", "redis", "kafka", "certgen", "connector", "processor", "sink"):
            assert health[name]["up"], health[name]
        ready_expected = ("certgen", "connector", "processor", "sink")
        assert all(health[n]["ready"] for n in ready_expected), health
        assert report["lag"]["sink"] == 0, report["lag"]
    finally:
        pipeline.down(settings, quiet=True)


# --------------------------------------------------------------------------- Kafka
def _kafka(settings: Settings, service: str | None) -> dict[str, object]:
    """A client configuration with what ``service`` is given (None: ``admin.env``)."""
    env = _admin(settings) if service is None else _as(settings, service)
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": env["F2PIPE_KAFKA_SECURITY_PROTOCOL"],
        "sasl.mechanism": env["F2PIPE_KAFKA_SASL_MECHANISM"],
        "sasl.username": env["F2PIPE_KAFKA_SASL_USERNAME"],
        "sasl.password": env["F2PIPE_KAFKA_SASL_PASSWORD"],
        "ssl.ca.location": env["F2PIPE_KAFKA_SSL_CA_LOCATION"],
        "log_level": 0,
    }


def _produce(config: dict[str, object], topic: str) -> str:
    """The delivery error of one record (``""``: delivered)."""
    producer = Producer({**config, "message.timeout.ms": 10_000})
    errors: list[str] = []
    producer.produce(
        topic, b"probe", on_delivery=lambda e, _m: errors.append(e.name() if e else "")
    )
    producer.flush(15)
    return errors[0] if errors else "no delivery report"


def _consume(config: dict[str, object], topic: str, group: str) -> str:
    """The first error a consumer of ``topic`` in ``group`` meets (``""``: none in 10 s)."""
    consumer = Consumer({**config, "group.id": group, "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is not None:
                return str(message.error().name())
        return ""
    finally:
        consumer.close()


def test_each_kafka_principal_is_refused_what_it_must_not_do(secured: Settings) -> None:
    raw, processed, dead = secured.topic_raw, secured.topic_processed, secured.topic_dead_letter
    sink = _kafka(secured, "sink")
    assert _produce(sink, raw) == "TOPIC_AUTHORIZATION_FAILED"
    assert _produce(sink, dead) == ""
    assert _consume(sink, raw, secured.sink_group) == "TOPIC_AUTHORIZATION_FAILED"
    processor = _kafka(secured, "processor")
    assert _produce(processor, raw) == "TOPIC_AUTHORIZATION_FAILED"
    assert _produce(processor, processed) == ""
    # Its own topic, but another group's offsets: refused too.
    assert _consume(processor, raw, secured.sink_group) == "GROUP_AUTHORIZATION_FAILED"
    connector = _kafka(secured, "connector")
    assert _produce(connector, raw) == ""
    assert _produce(connector, processed) == "TOPIC_AUTHORIZATION_FAILED"
    assert _consume(connector, raw, secured.processor_group) != ""
    # The operator may do anything.
    assert _produce(_kafka(secured, None), processed) == ""


def _session_errors(config: dict[str, object]) -> set[str]:
    """The client errors met while asking for the topics; empty when it got them."""
    errors: set[str] = set()
    admin = AdminClient({**config, "error_cb": lambda e: errors.add(e.name())})
    try:
        admin.list_topics(timeout=8)
    except KafkaException as exc:
        errors.add(exc.args[0].name())
        admin.poll(2)  # serves the error callbacks of what happened meanwhile
        return errors
    return set()


def test_kafka_refuses_clear_text_a_wrong_password_and_a_device(secured: Settings) -> None:
    from f2pipe.pki.local import load_ca

    bootstrap = secured.kafka_bootstrap
    assert _session_errors(_kafka(secured, None)) == set()
    assert _session_errors({"bootstrap.servers": bootstrap, "log_level": 0})
    wrong = {**_kafka(secured, None), "sasl.password": "not-the-password"}
    assert "_AUTHENTICATION" in _session_errors(wrong)
    # A device has no Kafka user: its name with any password is refused ...
    as_device = {**_kafka(secured, None), "sasl.username": "f2-aabbccddee01"}
    assert "_AUTHENTICATION" in _session_errors(as_device)
    # ... and its certificate from the same CA opens TLS but no Kafka session.
    ca = load_ca(security.admin_settings(secured))
    device = ca.issue_device("aabbccddee01")
    assert device.private_key is not None
    cert, key = secured.state_dir / "device.pem", secured.state_dir / "device.key"
    cert.write_bytes(device.certificate.public_bytes(Encoding.PEM))
    key.write_bytes(key_pem(device.private_key))
    tls_only = {
        "bootstrap.servers": bootstrap, "security.protocol": "SSL", "log_level": 0,
        "ssl.ca.location": str(security.ca_file(secured)),
        "ssl.certificate.location": str(cert), "ssl.key.location": str(key),
    }  # fmt: skip
    assert _session_errors(tls_only)


def test_stack_secured_false_turns_security_off_for_experiments(state: Path) -> None:
    settings = _settings(state, stack_secured=False)
    try:
        stack.up(settings, ["redis", "kafka"])
        env = _admin(settings)
        assert env["F2PIPE_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
        assert env["F2PIPE_REDIS_URL"] == settings.redis_url
        assert env["F2PIPE_CERTGEN_URL"] == settings.certgen_url
        assert _session_errors({"bootstrap.servers": settings.kafka_bootstrap}) == set()
        client = redis.Redis.from_url(settings.redis_url)
        try:
            assert client.ping()
        finally:
            client.close()
        assert not security.stack_secured(stack.Paths(state))
    finally:
        stack.down(settings, ["redis", "kafka"])


def test_a_password_file_changed_under_a_running_server_is_named_with_the_fix(
    secured: Settings,
) -> None:
    paths = stack.Paths(secured.state_dir)
    path = secured.state_dir / "secrets" / "postgres-admin.password"
    kept = path.read_text()
    server = stack.Postgres(secured, paths)
    try:
        path.write_text("a-password-the-server-never-saw\n")
        assert not server.healthy()
        assert str(path) in server.last_error
        assert "restart it" in server.last_error
        assert "a-password-the-server-never-saw" not in server.last_error
    finally:
        path.write_text(kept)
    assert server.healthy()


def test_a_stage_with_a_wrong_kafka_password_is_not_ready_and_names_the_setting(
    secured: Settings, tmp_path: Path
) -> None:
    """Not ready with one line naming the setting and the fix; the password in neither."""
    from conftest import wait_until
    from f2pipe.testing.stack import free_ports

    wrong = "not-the-kafka-password-4711"
    running = {}
    try:
        for name, port in zip(("processor", "sink"), free_ports(2), strict=True):
            env = {k: v for k, v in os.environ.items() if not k.startswith("F2PIPE_")}
            env.update(services.settings_env(secured))
            env.update(_as(secured, name))
            env.pop("F2PIPE_KAFKA_SASL_PASSWORD_FILE", None)
            env |= {"F2PIPE_KAFKA_SASL_PASSWORD": wrong, f"F2PIPE_{name.upper()}_PORT": str(port)}
            log = tmp_path / f"{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "f2pipe.cli", name], env=env, stdout=out, stderr=out
                )
            running[name] = (process, port, log)
        for name, (process, port, log) in running.items():
            answer: list[str] = []

            def refused(port: int = port, answer: list[str] = answer) -> bool:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
                except urllib.error.HTTPError as exc:
                    answer[:] = [exc.read().decode()]
                    return "F2PIPE_KAFKA_SASL_PASSWORD" in answer[0]
                except OSError:
                    return False
                return False

            wait_until(refused, timeout=60, what=f"{name} to name the wrong password")
            assert "check F2PIPE_KAFKA_SASL_USERNAME" in answer[0], answer
            text = log.read_text(errors="replace")
            lines = [line for line in text.splitlines() if "Kafka refused the credentials" in line]
            assert len(lines) == 1, lines  # once, not once per reconnection
            assert '"level":"error"' in lines[0]
            assert wrong not in text
            assert wrong not in answer[0]
            assert process.poll() is None  # it waits for the fix, nothing half-written
    finally:
        for process, _port, _log in running.values():
            process.terminate()
            process.wait(30)
