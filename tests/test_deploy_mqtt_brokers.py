"""``F2PIPE_MQTT_BROKERS=2 f2pipe deploy render``: the local stack's brokers, for compose.

The render writes ``mosquitto`` and ``mosquitto-2`` (each its configuration,
port, share, persistence volume and ACL folder), one connector per broker with
its own identity, Kafka user and ops port, and the ``broker-acls`` service that
writes the brokers' ACLs from the metadata as a role that may read two columns.
No container engine runs here: the compose file is read as YAML and checked
against the Compose schema, its commands against the real CLI and its variables
against the settings. The default render (one broker) is the committed files,
byte for byte (tests/test_deploy.py). tests/test_deploy_broker_acls.py runs
the rendered brokers on a real Mosquitto.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from f2pipe.cli import build_parser
from f2pipe.operations.deploy.mqtt import BROKER_ACL
from f2pipe.operations.principals import broker_connector, kafka_acl_arguments, principal
from f2pipe.runtime.mqttbrokers import brokers
from f2pipe.settings import Settings
from test_deploy import F2PIPE_IMAGE, f2pipe_argv, interpolate, schema_errors, volume_sources
from test_deploy_kafka_cluster import render

BROKERS = {"mosquitto": 8883, "mosquitto-2": 8885}
CONNECTORS = {
    "connector": ("svc-connector", 9101),
    "connector-mqtt-2": ("svc-connector-mqtt-2", 9111),
}


@pytest.fixture
def two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("F2PIPE_MQTT_PORT", raising=False)
    monkeypatch.delenv("F2PIPE_CONNECTOR_PORT", raising=False)
    assert render(tmp_path, monkeypatch, F2PIPE_MQTT_BROKERS="2") == 0
    return tmp_path


def compose(out: Path) -> dict[str, Any]:
    data = yaml.safe_load((out / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services(out: Path) -> dict[str, dict[str, Any]]:
    found = compose(out)["services"]
    assert isinstance(found, dict)
    return found


def env_example(out: Path) -> dict[str, str]:
    values = {}
    for line in (out / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value or "x" * 40
    return values


def test_each_broker_has_its_own_configuration_port_share_acl_and_volume(two: Path) -> None:
    found = services(two)
    assert not (two / "deploy/mosquitto/acl").exists()  # broker-acls writes the ACLs
    seen: dict[str, set[str]] = {"conf": set(), "share": set(), "acl": set(), "data": set()}
    for number, (name, port) in enumerate(BROKERS.items(), 1):
        svc = found[name]
        conf = svc["command"][-1]
        text = (two / "deploy/mosquitto" / Path(conf).name).read_text(encoding="utf-8")
        assert f"listener {port}\n" in text, name
        assert f"acl_file {BROKER_ACL}/acl\n" in text, name
        assert svc["ports"] == [f"{port}:{port}"], name
        assert svc["healthcheck"]["test"][-1] == str(port), name
        volumes = volume_sources(svc)
        pki, acl = volumes["shares"], volumes["broker-acls"]
        assert (pki["target"], pki["read_only"]) == ("/mosquitto/pki", True), name
        assert (acl["target"], acl["read_only"]) == (str(BROKER_ACL), True), name
        assert acl["volume"]["subpath"] == f"mqtt-{number}", name
        assert volumes[name]["target"] == "/mosquitto/data", name
        assert svc["depends_on"]["broker-acls"] == {"condition": "service_healthy"}, name
        for kind, value in (
            ("conf", conf),
            ("share", pki["volume"]["subpath"]),
            ("acl", acl["volume"]["subpath"]),
            ("data", name),
        ):
            seen[kind].add(value)
    assert all(len(values) == 2 for values in seen.values()), seen
    assert seen["share"] == {"broker", "broker-2"}
    assert set(BROKERS) | {"broker-acls"} <= set(compose(two)["volumes"])
    # Both brokers reload their ACL and CRL when the files change.
    script = (two / "deploy/mosquitto/broker.sh").read_text(encoding="utf-8")
    assert "s/^acl_file //p" in script
    assert "s/^crlfile //p" in script


def test_the_acl_service_reads_two_columns_and_runs_the_real_command(two: Path) -> None:
    found = services(two)
    acls = found["broker-acls"]
    argv = f2pipe_argv(acls)
    assert argv[:2] == ["fleet", "sync-acls"]
    args = build_parser(argv).parse_args(argv)
    assert (str(args.out), args.every, args.connectors) == ("/var/lib/f2pipe", 10.0, 1)
    assert volume_sources(acls)["broker-acls"]["target"] == str(args.out)
    # Healthy once both brokers' files exist, which is what the brokers wait for.
    assert "/var/lib/f2pipe/mqtt-1/acl" in acls["healthcheck"]["test"][-1]
    assert "/var/lib/f2pipe/mqtt-2/acl" in acls["healthcheck"]["test"][-1]
    assert acls["environment"]["F2PIPE_MQTT_BROKERS"] == "2"
    dsn = acls["environment"]["F2PIPE_METADATA_DSN"]
    assert dsn.startswith("postgresql://f2pipe_aclsync:${ACLSYNC_DB_PASSWORD")
    assert acls["user"] not in {svc.get("user") for n, svc in found.items() if n != "broker-acls"}
    roles = (two / "deploy/postgres/metadata-roles.sql").read_text(encoding="utf-8")
    grants = [line for line in roles.splitlines() if "f2pipe_aclsync" in line and "GRANT" in line]
    assert grants == [
        'GRANT USAGE ON SCHEMA public TO "f2pipe_aclsync";',
        'GRANT SELECT (mac_address, broker) ON "devices" TO "f2pipe_aclsync";',
    ]
    assert '-v aclsync_password="$ACLSYNC_DB_PASSWORD"' in found["db-roles"]["command"][0]
    assert "ACLSYNC_DB_PASSWORD" in found["db-roles"]["environment"]


def test_each_broker_has_a_connector_of_its_own(two: Path) -> None:
    found = services(two)
    setup = (two / "deploy/kafka/setup.sh").read_text(encoding="utf-8")
    users = set()
    for number, (name, (identity, port)) in enumerate(CONNECTORS.items(), 1):
        svc, env = found[name], found[name]["environment"]
        broker = "mosquitto" if number == 1 else f"mosquitto-{number}"
        assert f2pipe_argv(svc) == ["connector"], name
        assert (env["F2PIPE_MQTT_HOST"], env["F2PIPE_MQTT_PORT"]) == (broker, str(BROKERS[broker]))
        assert env.get("F2PIPE_CONNECTOR_IDENTITY", "svc-connector") == identity, name
        assert env.get("F2PIPE_CONNECTOR_PORT", "9101") == str(port), name
        assert svc["ports"] == [f"127.0.0.1:{port}:{port}"], name
        assert f":{port}/readyz" in svc["healthcheck"]["test"][-1], name
        assert svc["depends_on"][broker] == {"condition": "service_healthy"}, name
        assert volume_sources(svc)["shares"]["volume"]["subpath"] == identity, name
        who = principal("connector") if number == 1 else broker_connector(number)
        assert env["F2PIPE_KAFKA_SASL_USERNAME"] == who.kafka_user, name
        users.add(who.kafka_user)
        secret = svc["secrets"][0]
        assert env["F2PIPE_KAFKA_SASL_PASSWORD_FILE"] == f"/run/secrets/{secret}", name
        variable = compose(two)["secrets"][secret]["environment"]
        assert f'user {who.kafka_user} "${{{variable}}}"' in setup, name
        assert variable in found["kafka-setup"]["environment"], name
        for arguments in kafka_acl_arguments(who):
            assert "acl " + " ".join(arguments) in setup, name
    assert len(users) == 2
    # Every connector is scraped, under the one job the alerts watch.
    prometheus = (two / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8")
    assert '- targets: ["connector:9101", "connector-mqtt-2:9111"]' in prometheus
    assert set(CONNECTORS) <= set(found["simulator"]["depends_on"])


def test_certgen_and_the_simulator_know_every_broker(two: Path) -> None:
    found = services(two)
    values = env_example(two)
    assert values["F2PIPE_MQTT_BROKER_URLS"] == "x" * 40  # empty: the operator sets it
    for name in ("certgen", "simulator", "simulator-certs"):
        env = {k: interpolate(str(v), {**values, "F2PIPE_MQTT_BROKER_URLS": ""}) for k, v in
               found[name]["environment"].items()}  # fmt: skip
        fields = {k.removeprefix("F2PIPE_").lower(): v for k, v in env.items()}
        fields.pop("admin_token_file", None)
        settings = Settings.model_validate(fields)
        # Where certgen watches $SYS and tells devices to connect; where the simulator goes.
        assert [(b.name, b.host, b.port) for b in brokers(settings)] == [
            ("mqtt-1", "mosquitto", 8883),
            ("mqtt-2", "mosquitto-2", 8885),
        ], name
        assert [b.url for b in brokers(settings)][1] == "mqtts://mosquitto-2:8885", name
    public = "mqtt-1=mqtts://a.example.net:8883,mqtt-2=mqtts://b.example.net:8885"
    certgen = found["certgen"]["environment"]
    assert interpolate(certgen["F2PIPE_MQTT_BROKER_URLS"], {"F2PIPE_MQTT_BROKER_URLS": public})
    # One certificate names every broker's host; every party has its share.
    for name in ("certgen", "certgen-init"):
        names = found[name]["environment"]["F2PIPE_BROKER_NAMES"].split(",")
        assert {"mosquitto", "mosquitto-2", "certgen"} <= set(names), name
    parties = f2pipe_argv(found["certgen-init"])[2:]
    assert {"broker", "broker-2", "svc-connector", "svc-connector-mqtt-2"} <= set(parties)


def test_the_render_is_valid_and_complete(two: Path) -> None:
    data = compose(two)
    assert schema_errors(data) == []
    found = data["services"]
    for name, svc in found.items():
        for dep in svc.get("depends_on", {}):
            assert dep in found, f"{name} depends on {dep}, which is not a service"
        for volume in volume_sources(svc):
            assert volume.startswith("./") or volume in data["volumes"], (name, volume)
        if svc.get("restart") == "unless-stopped" and "profiles" not in svc:
            assert "healthcheck" in svc or name == "simulator", name
        if svc.get("image") == F2PIPE_IMAGE:
            argv = f2pipe_argv(svc)
            assert callable(getattr(build_parser(argv).parse_args(argv), "func", None)), name
    text = (two / "docker-compose.yml").read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    used |= {s["environment"] for s in data["secrets"].values()}
    assert used <= set(env_example(two)), used - set(env_example(two))
    ports = [p for svc in found.values() for p in svc.get("ports", [])]
    assert len(ports) == len(set(ports))


def test_the_shares_hold_each_brokers_and_connectors_files(two: Path, tmp_path: Path) -> None:
    from f2pipe.operations.deploy.cli import make_shares
    from f2pipe.settings import load_settings

    init = services(two)["certgen-init"]
    state = tmp_path / "state"
    settings = load_settings(
        state_dir=state, broker_names=init["environment"]["F2PIPE_BROKER_NAMES"]
    )
    assert make_shares(settings, f2pipe_argv(init)[2:])
    shares = state / "shares"
    for broker in ("broker", "broker-2"):
        assert sorted(p.name for p in (shares / broker).iterdir()) == [
            "broker.key", "broker.pem", "ca.pem", "crl.pem",
        ], broker  # fmt: skip
    assert (shares / "broker-2/broker.pem").read_bytes() == (
        shares / "broker/broker.pem"
    ).read_bytes()
    own = shares / "svc-connector-mqtt-2" / "services"
    assert sorted(p.name for p in own.iterdir()) == [
        "svc-connector-mqtt-2.key", "svc-connector-mqtt-2.pem",
    ]  # fmt: skip
    assert not (shares / "svc-connector-mqtt-2/services/svc-connector.pem").exists()


def test_a_broker_count_the_settings_refuse_is_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    variables = {"F2PIPE_MQTT_BROKERS": "2", "F2PIPE_MQTT_BROKER_URLS": "mqtt-3=mqtts://c:1"}
    assert render(out, monkeypatch, **variables) != 0
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1, error
    assert "F2PIPE_MQTT_BROKER_URLS" in error
    assert not out.exists()
