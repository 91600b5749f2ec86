"""Kafka client security settings: they reach every client f2pipe creates (SPEC section 8).

No broker is contacted: the configuration dicts are checked, and librdkafka is
asked to build clients from them (it validates properties at construction).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

import f2pipe
from f2pipe.errors import ConfigError
from f2pipe.runtime.kafka import (
    admin_config,
    client_config,
    consumer_config,
    producer_config,
    read_properties,
)
from f2pipe.settings import load_settings

SRC = Path(f2pipe.__file__).resolve().parent
BENCH = SRC.parent.parent / "bench"
# Every confluent-kafka client class. A configuration built into a variable first is
# flagged too: the check reads the call, so the config function is called inside it.
CLIENTS = {
    "Producer", "Consumer", "AdminClient", "SerializingProducer", "DeserializingConsumer",
}  # fmt: skip
CONFIG_FUNCTIONS = {"consumer_config", "producer_config", "admin_config"}
# f2pipe.testing starts private plaintext Kafka servers for tests and talks to them
# directly: it has no settings to secure, and no product path reaches it.
EXEMPT = {SRC / "testing"}

SECRET = "s3cr3t-pa55"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("F2PIPE_KAFKA_") or name == "F2PIPE_CONFIG_FILE":
            monkeypatch.delenv(name)


def _constructions(path: Path) -> list[tuple[int, str]]:
    """Client constructions in ``path`` whose configuration is not one of the config functions."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name not in CLIENTS:
            continue
        arg = node.args[0] if node.args else None
        ok = (
            isinstance(arg, ast.Call)
            and (arg.func.id if isinstance(arg.func, ast.Name) else None) in CONFIG_FUNCTIONS
        )
        if not ok:
            bad.append((node.lineno, ast.unparse(node)[:80]))
    return bad


def test_every_kafka_client_in_the_product_and_benchmarks_uses_the_config_functions() -> None:
    files = [
        p
        for p in [*SRC.rglob("*.py"), *BENCH.glob("*.py")]
        if not any(p.is_relative_to(e) for e in EXEMPT)
    ]
    bypassing = {f"{p}:{line}": code for p in files for line, code in _constructions(p)}
    assert not bypassing, f"Kafka clients built without runtime.kafka's config: {bypassing}"


def test_the_bypass_check_catches_a_raw_dict(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "p = Producer({'bootstrap.servers': 'x:1'})\n"
        "c = confluent_kafka.Consumer(consumer_config(s, 'g'))\n"
        "a = AdminClient(config)\n"
    )
    assert [line for line, _ in _constructions(sample)] == [1, 3]


def _pem(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text("placeholder\n")
    return path


def test_sasl_ssl_settings_reach_every_client_config(tmp_path: Path) -> None:
    ca = _pem(tmp_path, "ca.pem")
    settings = load_settings(
        kafka_bootstrap="k1:9093,k2:9093",
        kafka_security_protocol="sasl_ssl",
        kafka_sasl_username="svc-sink",
        kafka_sasl_password=SECRET,
        kafka_ssl_ca_location=ca,
    )
    expected = {
        "bootstrap.servers": "k1:9093,k2:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",  # SPEC section 8: the default when SASL is used
        "sasl.username": "svc-sink",
        "sasl.password": SECRET,
        "ssl.ca.location": str(ca),
    }
    for config in (
        consumer_config(settings, "g"),
        producer_config(settings),
        admin_config(settings),
    ):
        assert expected.items() <= config.items()
    assert consumer_config(settings, "g")["enable.auto.commit"] is False


def test_mtls_files_and_password_file_reach_the_config(tmp_path: Path) -> None:
    cert, key = _pem(tmp_path, "svc.pem"), _pem(tmp_path, "svc.key")
    password_file = tmp_path / "password"
    password_file.write_text(SECRET + "\n")
    config = client_config(
        load_settings(
            kafka_security_protocol="SSL",
            kafka_ssl_certificate_location=cert,
            kafka_ssl_key_location=key,
        )
    )
    assert config["ssl.certificate.location"] == str(cert)
    assert config["ssl.key.location"] == str(key)
    assert "sasl.username" not in config
    sasl = client_config(
        load_settings(
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="scram-sha-256",
            kafka_sasl_username="u",
            kafka_sasl_password_file=password_file,
        )
    )
    assert sasl["sasl.password"] == SECRET
    assert sasl["sasl.mechanism"] == "SCRAM-SHA-256"


def test_variables_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("F2PIPE_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("F2PIPE_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("F2PIPE_KAFKA_SASL_USERNAME", "svc-processor")
    monkeypatch.setenv("F2PIPE_KAFKA_SASL_PASSWORD", SECRET)
    config = producer_config(load_settings())
    assert config["sasl.mechanism"] == "PLAIN"
    assert config["sasl.username"] == "svc-processor"
    assert config["sasl.password"] == SECRET


def test_librdkafka_accepts_the_security_configuration() -> None:
    settings = load_settings(
        kafka_bootstrap="127.0.0.1:1",  # nothing listens: construction alone is checked
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="u",
        kafka_sasl_password=SECRET,
    )
    Producer(producer_config(settings)).flush(0)
    Consumer(consumer_config(settings, "g")).close()
    AdminClient(admin_config(settings))


def test_a_properties_file_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text(
        "# tuning for the WAN link\n"
        "! also a comment\n"
        "\n"
        "  socket.keepalive.enable = true\n"
        "ssl.endpoint.identification.algorithm=https\n"
        "client.id=f2pipe=a\n"
    )
    assert read_properties(path) == {
        "socket.keepalive.enable": "true",
        "ssl.endpoint.identification.algorithm": "https",
        "client.id": "f2pipe=a",
    }
    config = producer_config(load_settings(kafka_properties_file=path), **{"linger.ms": 7})
    assert config["socket.keepalive.enable"] == "true"
    assert config["linger.ms"] == 7  # a stage's own setting still wins
    assert config["acks"] == "all"


def test_properties_file_overrides_tuning_defaults(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text("compression.type=zstd\n")
    config = producer_config(load_settings(kafka_properties_file=path))
    assert config["compression.type"] == "zstd"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("just-a-key\n", "line 1: expected key=value"),
        (
            "# ok\nsasl.password=" + SECRET + "\n",
            "line 2: sasl.password is set by F2PIPE_KAFKA_SASL_PASSWORD",
        ),
        ("acks=1\n", "line 1: acks is fixed"),
    ],
)
def test_a_bad_properties_file_is_one_line_without_its_values(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "client.properties"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        client_config(load_settings(kafka_properties_file=path))
    message = str(caught.value)
    assert message.startswith("F2PIPE_KAFKA_PROPERTIES_FILE")
    assert expected in message
    assert SECRET not in message
    assert "\n" not in message


def test_missing_files_name_their_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    cases = {
        "F2PIPE_KAFKA_SSL_CA_LOCATION": {"kafka_ssl_ca_location": missing},
        "F2PIPE_KAFKA_PROPERTIES_FILE": {"kafka_properties_file": missing},
        "F2PIPE_KAFKA_SASL_PASSWORD_FILE": {
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_username": "u",
            "kafka_sasl_password_file": missing,
        },
    }
    for variable, overrides in cases.items():
        settings = load_settings(
            **{"kafka_security_protocol": "SSL", **overrides}  # type: ignore[arg-type]
        )
        with pytest.raises(ConfigError) as caught:
            client_config(settings)
        assert str(caught.value) == f"{variable}: cannot read {missing}: No such file or directory"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_password": SECRET},
            "F2PIPE_KAFKA_SASL_USERNAME is required with SASL_SSL",
        ),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "u"},
            "F2PIPE_KAFKA_SASL_PASSWORD or F2PIPE_KAFKA_SASL_PASSWORD_FILE is required",
        ),
        (
            {"kafka_sasl_username": "u", "kafka_sasl_password": SECRET},
            "F2PIPE_KAFKA_SASL_USERNAME is set but F2PIPE_KAFKA_SECURITY_PROTOCOL=PLAINTEXT",
        ),
        (
            {"kafka_ssl_ca_location": Path("/etc/hostname")},
            "F2PIPE_KAFKA_SSL_CA_LOCATION is set but F2PIPE_KAFKA_SECURITY_PROTOCOL=PLAINTEXT",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_key_location": Path("/etc/hostname")},
            "F2PIPE_KAFKA_SSL_CERTIFICATE_LOCATION and F2PIPE_KAFKA_SSL_KEY_LOCATION go together",
        ),
    ],
)
def test_inconsistent_security_settings_are_one_line(
    overrides: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        client_config(load_settings(**overrides))
    assert str(caught.value).startswith(expected)
    assert SECRET not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unknown_mechanism_names_the_variable_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("F2PIPE_KAFKA_SASL_MECHANISM", "GSSAPI")
    monkeypatch.setenv("F2PIPE_KAFKA_SASL_PASSWORD", SECRET)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("F2PIPE_KAFKA_SASL_MECHANISM='GSSAPI' is invalid")
    assert "SCRAM-SHA-512" in message
    assert SECRET not in message


def test_an_unknown_protocol_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("F2PIPE_KAFKA_SECURITY_PROTOCOL", "TLS")
    with pytest.raises(ConfigError, match=r"^F2PIPE_KAFKA_SECURITY_PROTOCOL='TLS' is invalid"):
        load_settings()
