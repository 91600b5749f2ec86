"""Every shared decoding vector (SPEC sections 1, 2 and 7) decodes as it says."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from conftest import SHARED_VECTORS, VECTORS
from f2pipe.core.decode import DecodeError, compile_template, template_from_mapping
from f2pipe.core.topics import parse_topic

# The vectors' far-future cases are relative to a processor clock in 2024-2098.
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def _load() -> list[dict[str, Any]]:
    with VECTORS.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


CASES = _load()


def test_the_vectors_are_there() -> None:
    assert len(CASES) >= 80
    assert any("dead_letter" in case["expect"] for case in CASES)


@pytest.mark.skipif(not SHARED_VECTORS.exists(), reason="no shared/ beside this checkout")
def test_the_copy_equals_the_shared_vectors() -> None:
    # A difference means the contract moved: copy the shared file over tests/data/frames.jsonl
    # and make the new cases pass.
    assert VECTORS.read_bytes() == SHARED_VECTORS.read_bytes(), f"{VECTORS} != {SHARED_VECTORS}"


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_vector(case: dict[str, Any]) -> None:
    topic = parse_topic(f"{case['topic_type']}/f2-aabbccddee01/{case['topic_tail']}")
    assert topic is not None
    spec = template_from_mapping(case["template"])
    template = compile_template(spec)
    expect = case["expect"]
    payload = case["payload"].encode()
    ingest = datetime.fromisoformat(case["ingest_ts"]) if "ingest_ts" in case else None
    if "dead_letter" in expect:
        with pytest.raises(DecodeError) as caught:
            template.decode(topic.kind, payload, ZoneInfo(case["timezone"]), NOW, ingest)
        assert caught.value.reason == expect["dead_letter"], caught.value.detail
        return
    readings = template.decode(topic.kind, payload, ZoneInfo(case["timezone"]), NOW, ingest)
    labels = {dp.datapoint_id: dp.label for dp in spec.datapoints}
    assert [labels[dp_id] for dp_id, _, _ in readings] == [r["label"] for r in expect["readings"]]
    for (_, ts, value), wanted in zip(readings, expect["readings"], strict=True):
        assert ts == datetime.fromisoformat(wanted["ts"])
        assert ts.tzinfo is UTC
        assert math.isclose(value, wanted["value"], rel_tol=1e-9), (value, wanted["value"])
        assert type(value) is float
