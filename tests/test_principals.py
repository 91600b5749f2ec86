"""The security model's data (SPEC sections 6 and 10): pure, so a wrong right shows here first."""

from __future__ import annotations

import pytest

from f2pipe.operations.principals import (
    SERVICES,
    KafkaAcl,
    Names,
    kafka_acl_arguments,
    pg_grant_sql,
    principal,
    principals,
    redis_acl_line,
)


def _kafka(service: str, names: Names | None = None) -> set[tuple[str, str, str]]:
    return {(a.resource, a.name, a.operation) for a in principal(service, names).kafka_acls}


def test_every_service_has_a_principal_in_start_order() -> None:
    assert tuple(p.service for p in principals()) == SERVICES


def test_connector_writes_raw_and_dead_letters_and_reads_nothing() -> None:
    rights = _kafka("connector")
    assert ("topic", "raw-iot-data", "WRITE") in rights
    assert ("topic", "iot-dead-letter", "WRITE") in rights
    assert not {r for r in rights if r[2] == "READ"}
    assert principal("connector").pg_role is None
    assert principal("connector").redis_user is None


def test_processor_cannot_write_raw_nor_the_time_series() -> None:
    rights = _kafka("processor")
    assert ("topic", "raw-iot-data", "READ") in rights
    assert ("topic", "processed-iot-data", "WRITE") in rights
    assert ("topic", "raw-iot-data", "WRITE") not in rights
    tables = {t for g in principal("processor").pg_grants for t in g.tables}
    assert "decoded_data" not in tables
    assert all(g.privileges == ("SELECT",) for g in principal("processor").pg_grants)


def test_sink_cannot_write_raw_nor_read_it() -> None:
    rights = _kafka("sink")
    assert not {r for r in rights if r[1] == "raw-iot-data"}
    assert ("topic", "processed-iot-data", "READ") in rights
    assert ("group", "f2pipe-sink", "READ") in rights


def test_rights_follow_the_configured_names() -> None:
    names = Names(topic_raw="r", topic_processed="p", topic_dead_letter="d",
                  processor_group="pg", sink_group="sg")  # fmt: skip
    assert ("topic", "r", "READ") in _kafka("processor", names)
    assert ("group", "sg", "READ") in _kafka("sink", names)
    assert not any("raw-iot-data" in r[1] for s in SERVICES for r in _kafka(s, names))


def test_unknown_service_is_named() -> None:
    with pytest.raises(ValueError, match="unknown service 'nope'; choose from certgen"):
        principal("nope")


def test_renderers() -> None:
    sql = pg_grant_sql(principal("sink"))
    assert 'GRANT SELECT, INSERT ON "decoded_data" TO "f2pipe_sink"' in sql
    assert pg_grant_sql(principal("connector")) == []
    line = redis_acl_line(principal("processor"), "ab" * 32)
    assert line.startswith("user f2pipe-processor on #" + "ab" * 32)
    assert "~f2pipe:meta:*" in line
    assert "+@all" not in line
    with pytest.raises(ValueError, match="sink has no Redis user"):
        redis_acl_line(principal("sink"), "00")
    first = kafka_acl_arguments(principal("connector"))[0]
    assert first[:4] == ["--add", "--allow-principal", "User:f2pipe-connector", "--operation"]
    acl = KafkaAcl("transactional_id", "g", "IDEMPOTENT_WRITE", "prefixed")
    assert acl.operation.title().replace("_", "") == "IdempotentWrite"
