"""Stages scaled out: replicas of the connector, the processor and the sink (SPEC 7, 10).

The first tests check what ``F2PIPE_<STAGE>_REPLICAS`` makes of the services
(:mod:`f2pipe.operations.services`) without running them. The last one, under
load: ``f2pipe up`` on dedicated servers runs two connectors on one shared MQTT
subscription, two processors and two sinks in their consumer groups
(``F2PIPE_<STAGE>_REPLICAS=2``). While the simulator publishes without a
pause, one replica of each stage is killed with SIGKILL and another process
started: for the processor and the sink a third replica joins the group (the
dead one's partitions move once its session times out); for the connector the
killed replica is started again under its own number, since the broker queues
that MQTT session's share of the messages until it returns, and a third
connector is added with ``f2pipe up`` while the broker runs. Then the table
equals the ledger, every reading exactly once, and the rebalances show in the
replicas' ``f2pipe_rebalances_total``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import wait_until
from f2pipe.errors import ConfigError, StackError
from f2pipe.operations import pipeline, services, status
from f2pipe.operations.stack import Paths, PidFile
from f2pipe.settings import Settings, load_settings
from test_pipeline import (
    Publisher,
    _kill,
    drained,
    expected_rows,
    failure_logs,
    own_stack,
    read_ledger,
    row_count,
    stored_rows,
)

STAGES = ("connector", "processor", "sink")
# The first count of each stage's own traffic in its /metrics.
INPUT = {
    "connector": "f2pipe_connector_received",
    "processor": "f2pipe_processor_consumed",
    "sink": "f2pipe_sink_records_consumed",
}
# The partitions a consuming replica owns.
OWNED = {
    "processor": "f2pipe_processor_assigned_partitions",
    "sink": "f2pipe_sink_assigned_partitions",
}


def replica(settings: Settings, stage: str, number: int) -> services.Service:
    kind = next(cls for cls in services.SERVICES if cls.name == stage)
    return kind(settings, Paths(settings.state_dir), number)


def metric(service: services.Service, family: str, **labels: str) -> float:
    return status.total(status.scrape(service.url("/metrics")), family, **labels)


def rebalances(service: services.Service, kind: str) -> float:
    return metric(service, "f2pipe_rebalances", stage=service.name, kind=kind)


def replace_consumer(
    settings: Settings, stage: str, flowing: Callable[[str], None]
) -> services.Service:
    """SIGKILL ``stage``-2; once the survivor owns every partition, start ``stage``-3 and
    wait until the survivor hands it some. Returns ``stage``-3."""
    survivor, killed = replica(settings, stage, 1), replica(settings, stage, 2)
    assigned, revoked = rebalances(survivor, "assigned"), rebalances(survivor, "revoked")
    _kill(killed)
    # Once the dead replica's session times out, its partitions go to the survivor.
    wait_until(
        lambda: metric(survivor, OWNED[stage]) == settings.data_topic_partitions,
        timeout=90,
        what=f"{stage} to take over the partitions of the killed {stage}-2",
    )
    assert rebalances(survivor, "assigned") > assigned
    flowing(f"kill -9 {stage}-2")
    new = replica(settings, stage, 3)
    new.start()
    new.wait_healthy()
    wait_until(
        lambda: rebalances(survivor, "revoked") > revoked and metric(new, OWNED[stage]) > 0,
        timeout=60,
        what=f"{stage}-3 to be handed partitions by the survivor",
    )
    assert rebalances(new, "assigned") > 0
    flowing(f"{stage}-3 joined")
    return new


def test_one_replica_each_is_the_pipeline_as_before(tmp_path: Path) -> None:
    found = services.services(load_settings(state_dir=tmp_path))
    assert [s.label for s in found] == list(services.NAMES)
    connector = found[1]
    assert connector.settings.connector_share_group == ""
    assert connector.settings.connector_identity == "svc-connector"
    assert connector.pidfile.path == tmp_path / "run" / "connector.pid"


def test_each_replica_has_its_own_port_files_and_mqtt_identity(tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path, connector_replicas=2, processor_replicas=3, sink_replicas=2
    )
    found = {s.label: s for s in services.services(settings, ["connector", "processor", "sink"])}
    assert list(found) == [
        "connector", "connector-2", "processor", "processor-2", "processor-3", "sink", "sink-2",
    ]  # fmt: skip
    third = found["processor-3"]
    assert third.port() == settings.processor_port + 2 * services.REPLICA_PORT_STEP
    assert third.pidfile.path == tmp_path / "run" / "processor-3.pid"
    assert third.log_file == tmp_path / "log" / "processor-3.log"
    env = third.environment()
    assert env["F2PIPE_PROCESSOR_PORT"] == str(third.port())
    assert env["F2PIPE_PROCESSOR_GROUP"] == settings.processor_group  # one consumer group
    first, second = found["connector"].settings, found["connector-2"].settings
    assert first.connector_share_group == second.connector_share_group == services.SHARE_GROUP
    assert (first.connector_identity, second.connector_identity) == (
        "svc-connector",
        "svc-connector-2",
    )
    assert second.connector_client_id == "svc-connector-2"
    own = load_settings(state_dir=tmp_path, connector_replicas=2, connector_share_group="mine")
    assert services.services(own, ["connector"])[1].settings.connector_share_group == "mine"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"connector_port": 9101, "processor_port": 9201}, "F2PIPE_PROCESSOR_PORT"),
        ({"connector_port": 65500}, "F2PIPE_CONNECTOR_REPLICAS"),
    ],
)
def test_replica_ports_that_clash_or_overflow_are_refused_in_one_line(
    tmp_path: Path, overrides: dict[str, int], named: str
) -> None:
    settings = load_settings(state_dir=tmp_path, connector_replicas=2, **overrides)
    with pytest.raises(StackError, match=named) as error:
        services.services(settings)
    assert "\n" not in str(error.value)


def test_each_connector_replica_gets_a_certificate_once(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, connector_replicas=3)
    issued = services.ensure_connector_identities(settings)
    assert issued == ["svc-connector-2", "svc-connector-3"]
    assert (tmp_path / "pki" / "services" / "svc-connector-3.pem").is_file()
    assert services.ensure_connector_identities(settings) == []
    plain = load_settings(state_dir=tmp_path, connector_replicas=4, mqtt_tls=False)
    assert services.ensure_connector_identities(plain) == []


def test_fewer_connectors_than_have_identities_are_refused(tmp_path: Path) -> None:
    # Nothing listens on port 1: were the refusal missing, `up` would fail elsewhere.
    dsn = "postgresql://postgres@127.0.0.1:1/f2pipe"
    three = load_settings(state_dir=tmp_path, connector_replicas=3, metadata_dsn=dsn)
    services.ensure_connector_identities(three)
    services.check_connector_count(three)
    one = three.model_copy(update={"connector_replicas": 1})
    with pytest.raises(StackError, match=r"set F2PIPE_CONNECTOR_REPLICAS=3$") as error:
        pipeline.up(one, ["connector"], quiet=True, servers=[])
    assert "svc-connector-2, svc-connector-3" in str(error.value)
    assert not (tmp_path / "run" / "connector.pid").exists()
    # The second broker's group counts as well.
    two = three.model_copy(update={"connector_replicas": 2, "mqtt_brokers": 2})
    services.ensure_connector_identities(two)
    with pytest.raises(StackError, match=r"set F2PIPE_CONNECTOR_REPLICAS=3$") as error:
        services.check_connector_count(two)
    assert str(error.value).count("svc-connector-") == 1
    services.ensure_connector_identities(two.model_copy(update={"connector_replicas": 3}))
    with pytest.raises(StackError, match=r"set F2PIPE_CONNECTOR_REPLICAS=3$") as error:
        services.check_connector_count(two)
    assert "svc-connector-3, svc-connector-mqtt-2-3" in str(error.value)


def test_a_bad_replica_count_names_its_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="F2PIPE_SINK_REPLICAS='0' is invalid"):
        load_settings(state_dir=tmp_path, sink_replicas=0)


def test_a_replica_past_the_count_is_shown_while_it_runs_and_down_stops_it(
    tmp_path: Path,
) -> None:
    # Started with F2PIPE_SINK_REPLICAS=3, which has since been lowered to 1.
    settings = load_settings(state_dir=tmp_path)
    Paths(tmp_path).make()
    running = subprocess.Popen(["sleep", "60"])
    PidFile(tmp_path / "run" / "sink-3.pid").write(running.pid)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "run" / "sink-2.pid").write_text(f"{gone.pid} 1\n")
    try:
        labels = [s.label for s in services.services(settings, ["sink"], past_count=True)]
        assert labels == ["sink", "sink-3"]
        assert [s.label for s in services.services(settings, ["sink"])] == ["sink"]
        assert pipeline.down(settings, quiet=True) == ["sink-3"]
        assert running.wait(10) is not None
    finally:
        running.kill()
        running.wait()


@pytest.mark.servers
@pytest.mark.slow
def test_replicas_killed_and_started_under_load_lose_and_repeat_nothing(tmp_path: Path) -> None:
    replicas = {f"{stage}_replicas": 2 for stage in STAGES}
    with own_stack(**replicas) as settings:
        dsn = settings.timeseries_dsn
        health = {h.name: h for h in status.Observer(settings).health()}
        labels = [f"{stage}{suffix}" for stage in STAGES for suffix in ("", "-2")]
        assert all(health[label].up for label in labels), health

        publisher = Publisher(settings, tmp_path, minimum=3000, rate=60)
        publisher.start()

        def flowing(after: str) -> None:
            publisher.rows_flow(after, more=100)

        # Both replicas of every stage carry part of the load: the shared subscription
        # and the consumer groups split it.
        first = {stage: replica(settings, stage, 1) for stage in STAGES}
        second = {stage: replica(settings, stage, 2) for stage in STAGES}
        for stage in STAGES:
            for service in (first[stage], second[stage]):
                wait_until(
                    lambda service=service, stage=stage: metric(service, INPUT[stage]) > 0,
                    timeout=90,
                    what=f"{service.label} to take part of the load",
                )

        _kill(second["connector"])
        flowing("kill -9 connector-2")
        revived = replica(settings, "connector", 2)
        revived.start()
        revived.wait_healthy()
        wait_until(
            lambda: metric(revived, INPUT["connector"]) > 0,
            timeout=60,
            what="the restarted connector-2 to receive its share",
        )
        # And a third connector while all run: the running broker admits its new
        # identity once it re-read its ACL (and the others' sessions were taken over once,
        # so that the broker looks up their rights again: they reconnect).
        wider = settings.model_copy(update={"connector_replicas": 3})
        assert pipeline.up(wider, ["connector"], quiet=True, servers=[]).services == ["connector-3"]
        third = replica(wider, "connector", 3)
        wait_until(
            lambda: metric(third, INPUT["connector"]) > 0,
            timeout=60,
            what="connector-3 to receive its share",
        )
        assert metric(first["connector"], "f2pipe_connector_reconnects") > 0
        flowing("connector-3 joined")
        joined = {stage: replace_consumer(settings, stage, flowing) for stage in OWNED}

        publisher.stop.set()
        publisher.join(timeout=600)
        assert publisher.failure is None, publisher.failure
        expected = expected_rows(read_ledger(*publisher.ledgers), dsn)
        assert publisher.published >= 3000
        try:
            wait_until(
                lambda: drained(settings, expected),
                timeout=180,
                interval=1.0,
                what="every stage to commit its input",
            )
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n{failure_logs(settings)}")
        stored = stored_rows(dsn)
        missing, extra = expected - stored, stored - expected
        assert not missing, f"{len(missing)} readings lost\n{failure_logs(settings)}"
        assert not extra, f"{len(extra)} rows not in the ledger"
        assert row_count(dsn) == len(expected)

        for stage, new in joined.items():
            assert metric(new, INPUT[stage]) > 0, f"{new.label} consumed nothing"
        # `f2pipe status` shows every replica, the one started past the count included.
        shown = {h.name: h.up for h in status.Observer(settings).health()}
        for label in ("connector-2", "connector-3", "processor", "processor-3", "sink-3"):
            assert shown.get(label), shown
        assert not shown["processor-2"]
        assert not shown["sink-2"]
        print(f"{publisher.published} messages, {len(expected)} readings, each stored once")
