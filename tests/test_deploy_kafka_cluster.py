"""``F2PIPE_KAFKA_BROKERS=3 f2pipe deploy render``: the local stack's three-node Kafka cluster.

The render writes ``kafka-1`` to ``kafka-3`` (each broker and controller, one
quorum of all three, the single node's security), a kafka-setup that waits for
all of them and creates the topics with the stack's replicas and
``min.insync.replicas``, and containers that bootstrap from every node. No
container engine runs here: the compose file is read as YAML and checked
against the Compose schema, and ``setup.sh`` runs with stand-ins for the Kafka
tools that record what they are asked. The default render (one node) is the
committed files, byte for byte (tests/test_deploy.py).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from f2pipe.operations.deploy.kafka import INTERNAL_PORT, image_environment
from f2pipe.operations.stack.kafka import topic_plan
from f2pipe.operations.stack.kafka_cluster import CLUSTER, MIN_INSYNC, REPLICAS
from f2pipe.settings import Settings, load_settings
from test_deploy import COMPOSE_FILE, F2PIPE_IMAGE, schema_errors

NODES = ["kafka-1", "kafka-2", "kafka-3"]
BOOTSTRAP = [f"{name}:{INTERNAL_PORT}" for name in NODES]
# What a node's security is made of: listeners' protocols, SASL, JAAS and the authorizer.
SECURITY = re.compile(r"PROTOCOL|SASL|JAAS|AUTHORIZER|SUPER_USERS|ALLOW_EVERYONE|INTER_BROKER")


def render(out: Path, monkeypatch: pytest.MonkeyPatch, **variables: str) -> int:
    """``f2pipe deploy render --target compose OUT`` with ``variables`` set, else the defaults'
    Kafka (not the bootstrap a shared stack's tests may set)."""
    from f2pipe.cli import main
    from f2pipe.settings import get_settings

    monkeypatch.delenv("F2PIPE_KAFKA_BOOTSTRAP", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        return main(["deploy", "render", "--target", "compose", str(out)])
    finally:
        get_settings.cache_clear()


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    assert render(tmp_path, monkeypatch, F2PIPE_KAFKA_BROKERS="3") == 0
    return tmp_path


def services(out: Path) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load((out / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data["services"], dict)
    return data["services"]  # type: ignore[no-any-return]


def test_the_cluster_is_three_combined_nodes_with_one_quorum(cluster: Path) -> None:
    found = services(cluster)
    assert [name for name in found if name.startswith("kafka") and name != "kafka-setup"] == NODES
    nodes = {name: found[name]["environment"] for name in NODES}
    assert sorted(env["KAFKA_NODE_ID"] for env in nodes.values()) == ["1", "2", "3"]
    voters = {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in nodes.values()}
    assert voters == {"1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"}
    # The stack's cluster properties: Kafka's own topics are as durable as the data topics.
    cluster_properties = image_environment(CLUSTER)
    single = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]["kafka"]
    single_security = {k: v for k, v in single["environment"].items() if SECURITY.search(k)}
    assert single_security
    for n, (name, env) in enumerate(nodes.items(), 1):
        assert env["KAFKA_NODE_ID"] == str(n), name
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller", name
        assert env["KAFKA_ADVERTISED_LISTENERS"].startswith(f"INTERNAL://{name}:{INTERNAL_PORT},")
        assert env["CLUSTER_ID"] == single["environment"]["CLUSTER_ID"], name
        assert {k: env[k] for k in cluster_properties} == cluster_properties, name
        assert {k: v for k, v in env.items() if SECURITY.search(k)} == single_security, name
        # Each node answers its own probe.
        assert found[name]["healthcheck"]["test"][-1] == f"127.0.0.1:{INTERNAL_PORT}", name
    volumes = [v for name in NODES for v in found[name]["volumes"] if v.endswith("/data")]
    assert volumes == [f"{name}:/var/lib/kafka/data" for name in NODES]
    # EXTERNAL: the host's tools reach each node on its port of the stack's bootstrap.
    stack = load_settings(kafka_brokers=3, kafka_bootstrap="127.0.0.1:9092").kafka_bootstrap
    ports = [f"127.0.0.1:{p}:{p}" for p in (a.rpartition(":")[2] for a in stack.split(","))]
    assert [found[name]["ports"][0] for name in NODES] == ports
    data = yaml.safe_load((cluster / "docker-compose.yml").read_text(encoding="utf-8"))
    assert set(NODES) <= set(data["volumes"])
    assert "kafka" not in data["volumes"]


def run_setup(
    cluster: Path, tmp_path: Path, describe: str, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """The cluster's setup.sh with stand-ins for the image's tools: each records its
    arguments, tab-separated, in ``tmp_path/calls``; a ``--describe`` runs ``describe``."""
    tools, calls = tmp_path / "bin", tmp_path / "calls"
    tools.mkdir()
    calls.touch()
    for tool in ("kafka-configs.sh", "kafka-acls.sh", "kafka-topics.sh"):
        (tools / tool).write_text(
            "#!/bin/bash\n"
            f'if [[ " $* " == *" --describe "* ]]; then {describe}; fi\n'
            f"{{ printf %s {tool}; printf '\\t%s' \"$@\"; printf '\\n'; }} >> \"$CALLS\"\n"
        )
        (tools / tool).chmod(0o755)
    setup = services(cluster)["kafka-setup"]
    env = {
        "PATH": os.environ["PATH"],
        "KAFKA_TOOLS": str(tools),
        "CALLS": str(calls),
        **{name: f"secret-{name.lower()}" for name in setup["environment"]},
    }
    script = cluster / "deploy" / "kafka" / "setup.sh"
    return subprocess.run(
        ["bash", str(script), *setup["command"][-2:]],
        env=env, capture_output=True, text=True, timeout=30, check=check,
    )  # fmt: skip


def test_setup_waits_for_every_node_and_creates_replicated_topics(
    cluster: Path, tmp_path: Path
) -> None:
    setup = services(cluster)["kafka-setup"]
    assert setup["depends_on"] == {name: {"condition": "service_healthy"} for name in NODES}
    assert setup["command"][-2:] == ["apply", ",".join(BOOTSTRAP)]
    run_setup(cluster, tmp_path, describe="exit 0", check=True)  # no topic exists yet
    calls = tmp_path / "calls"
    created = {}
    for line in calls.read_text().splitlines():
        tool, *args = line.split("\t")
        assert args[args.index("--bootstrap-server") + 1] == ",".join(BOOTSTRAP), line
        if tool == "kafka-topics.sh":
            configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
            created[args[args.index("--topic") + 1]] = (
                int(args[args.index("--partitions") + 1]),
                int(args[args.index("--replication-factor") + 1]),
                configs,
            )
    plan = topic_plan(load_settings(kafka_brokers=3, kafka_bootstrap="127.0.0.1:9092"))
    assert set(created) == set(plan)
    assert (REPLICAS, MIN_INSYNC) == (3, 2)
    for topic, (partitions, retention) in plan.items():
        have_partitions, replicas, configs = created[topic]
        assert (have_partitions, replicas) == (partitions, REPLICAS), topic
        assert f"min.insync.replicas={MIN_INSYNC}" in configs, topic
        assert f"retention.ms={retention}" in configs, topic
        assert "cleanup.policy=delete" in configs, topic


@pytest.mark.parametrize(
    ("described", "refusal"),
    [
        ("ReplicationFactor: 1\tConfigs: cleanup.policy=delete", "has 1 replica(s) where 3"),
        (
            "ReplicationFactor: 3\tConfigs: min.insync.replicas=1,cleanup.policy=delete",
            "has min.insync.replicas=1 where 2 are needed",
        ),
    ],
)
def test_setup_refuses_an_existing_topic_less_durable_than_the_cluster_needs(
    cluster: Path, tmp_path: Path, described: str, refusal: str
) -> None:
    """A topic already there with fewer replicas (or a lower min.insync.replicas) stops
    setup.sh in one line naming it and the fix, before any topic is created."""
    described_line = f"printf 'Topic: processed-iot-data\\tPartitionCount: 6\\t{described}\\n'"
    done = run_setup(
        cluster,
        tmp_path,
        describe=f'[[ " $* " == *" processed-iot-data "* ]] && {described_line}; exit 0',
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"setup.sh: topic processed-iot-data {refusal}"), line
    assert "--create" not in (tmp_path / "calls").read_text()


def test_every_container_bootstraps_from_every_node(cluster: Path) -> None:
    found = services(cluster)
    bootstrapped = set()
    for name, svc in found.items():
        for dep in svc.get("depends_on", {}):
            assert dep in found, f"{name} depends on {dep}, which is not a service"
        value = svc.get("environment", {}).get("F2PIPE_KAFKA_BOOTSTRAP")
        if value is None:
            continue
        assert svc["image"] == F2PIPE_IMAGE, name
        assert value.split(",") == BOOTSTRAP, name
        # Valid for the service's own settings, where F2PIPE_KAFKA_BROKERS is unset.
        assert Settings.model_validate({"kafka_bootstrap": value}).kafka_bootstrap == value
        bootstrapped.add(name)
    assert bootstrapped == {"connector", "processor", "sink"}
    assert "kafka" not in found
    text = (cluster / "docker-compose.yml").read_text(encoding="utf-8")
    assert f"kafka:{INTERNAL_PORT}" not in text


def test_the_cluster_compose_file_is_valid_against_the_compose_spec_schema(
    cluster: Path,
) -> None:
    data = yaml.safe_load((cluster / "docker-compose.yml").read_text(encoding="utf-8"))
    assert schema_errors(data) == []


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"F2PIPE_KAFKA_BROKERS": "2"}, "F2PIPE_KAFKA_BROKERS"),
        (
            {"F2PIPE_KAFKA_BROKERS": "3", "F2PIPE_KAFKA_BOOTSTRAP": "a:9092,b:9092"},
            "F2PIPE_KAFKA_BOOTSTRAP",
        ),
    ],
)
def test_a_broker_count_the_stack_refuses_is_one_line_and_writes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variables: dict[str, str],
    named: str,
) -> None:
    out = tmp_path / "out"
    assert render(out, monkeypatch, **variables) != 0
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1, error
    assert named in error
    assert not out.exists()
