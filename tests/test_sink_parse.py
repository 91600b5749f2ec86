"""The sink's pure part: record value -> row or reason, and the COPY encoding."""

from __future__ import annotations

import struct
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from f2pipe.settings import Settings
from f2pipe.sink.batching import LOW_LATENCY, THROUGHPUT, Batch, CommitPolicy, retry_backoff
from f2pipe.sink.stage import (
    COPY_HEADER,
    COPY_TRAILER,
    encode_copy,
    encode_rows,
    newest_per_key,
    parse_batch,
    parse_reading,
    row_timestamp,
)


def value(**fields: object) -> bytes:
    record: dict[str, object] = {
        "v": 1,
        "ts": "2024-07-15T14:30:25.123456+02:00",
        "device_id": 5,
        "datapoint_id": 1,
        "value": 25.52,
    }
    record.update(fields)
    return orjson.dumps({k: v for k, v in record.items() if v is not ...})


def test_parses_the_processor_record() -> None:
    row = parse_reading(value())
    assert isinstance(row, tuple)
    assert row[1:] == (5, 1, 25.52)
    assert row_timestamp(row) == datetime(2024, 7, 15, 12, 30, 25, 123456, tzinfo=UTC)


def test_integer_values_become_floats_and_z_means_utc() -> None:
    row = parse_reading(value(value=3, ts="2024-07-15T14:30:25Z"))
    assert isinstance(row, tuple)
    assert row[3] == 3.0
    assert type(row[3]) is float
    assert row_timestamp(row) == datetime(2024, 7, 15, 14, 30, 25, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (None, "empty"),
        (b"not json", "invalid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (value(ts=...), "missing field ts"),
        (value(value=...), "missing field value"),
        (value(v=2), "unsupported version"),
        (value(ts="2024-07-15 14:30:25"), "without UTC offset"),
        (value(ts="yesterday"), "invalid ts"),
        (value(ts=1721053825), "ts is not a string"),
        (value(device_id="5"), "device_id"),
        (value(device_id=0), "device_id"),
        (value(device_id=2**31), "device_id"),
        (value(datapoint_id=True), "datapoint_id"),
        (value(value="25.5"), "not a number"),
        (value(value=True), "not a number"),
        (value(value=None), "not a number"),
        (
            b'{"v":1,"ts":"2024-07-15T14:30:25Z","device_id":1,"datapoint_id":1,"value":1e999}',
            "invalid JSON",
        ),
        (
            b'{"v":1,"ts":"2024-07-15T14:30:25Z","device_id":1,"datapoint_id":1,"value":1'
            + b"0" * 400
            + b"}",
            "invalid JSON",
        ),
    ],
)
def test_rejects_with_a_reason(raw: bytes | None, says: str) -> None:
    reason = parse_reading(raw)
    assert isinstance(reason, str)
    assert says in reason


# Examples are judged by their outcome, not their speed: on a shared, loaded box
# the default 200 ms deadline per example can fail a run on timing alone.
no_deadline = settings(deadline=None)


@no_deadline
@given(st.binary(max_size=200))
def test_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    assert isinstance(parse_reading(raw), tuple | str)


@no_deadline
@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    st.integers(1, 2**31 - 1),
    st.integers(1, 2**31 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)
def test_copy_encoding_round_trips(
    ts: datetime, device_id: int, datapoint_id: int, number: float
) -> None:
    raw = orjson.dumps(
        {
            "v": 1,
            "ts": ts.isoformat(),
            "device_id": device_id,
            "datapoint_id": datapoint_id,
            "value": number,
        }
    )
    row = parse_reading(raw)
    assert isinstance(row, tuple)
    assert row_timestamp(row) == ts
    data = encode_copy([row])
    assert data.startswith(b"PGCOPY\n\xff\r\n\x00")
    assert data.endswith(b"\xff\xff")
    fields = struct.unpack("!hiqiiiiid", data[19:-2])
    us = fields[2]
    assert datetime(2000, 1, 1, tzinfo=UTC) + timedelta(microseconds=us) == ts
    assert fields[4] == device_id
    assert fields[6] == datapoint_id
    assert fields[8] == number


def test_newest_per_key_keeps_the_newest() -> None:
    rows = [(10, 1, 1, 1.0), (30, 1, 1, 3.0), (20, 1, 1, 2.0), (5, 2, 1, 7.0), (6, 2, 2, 8.0)]
    assert newest_per_key(rows) == {
        (1, 1): (30, 1, 1, 3.0),
        (2, 1): (5, 2, 1, 7.0),
        (2, 2): (6, 2, 2, 8.0),
    }


def test_commit_policy_is_validated() -> None:
    assert CommitPolicy(1000, 0.5).max_rows == 1000
    with pytest.raises(ValueError, match="max_rows"):
        CommitPolicy(0, 0.5)
    with pytest.raises(ValueError, match="max_age_s"):
        CommitPolicy(10, 0)


def test_the_throughput_preset_is_the_default_policy() -> None:
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    assert (
        CommitPolicy(
            defaults["sink_batch_rows"],
            defaults["sink_batch_age_ms"] / 1000,
            defaults["sink_flush_when_caught_up"],
        )
        == THROUGHPUT
    )
    assert LOW_LATENCY.max_rows < THROUGHPUT.max_rows
    assert LOW_LATENCY.max_age_s < THROUGHPUT.max_age_s


def test_the_retry_backoff_grows_to_the_cap_with_jitter() -> None:
    backoff = retry_backoff(2.0)
    first = [backoff.next_delay() for _ in range(12)]
    assert 0.025 <= first[0] <= 0.1
    assert all(0.5 <= d <= 2.0 for d in first[6:])
    assert len(set(first)) > 1
    backoff.reset()  # a new episode of retries starts again from 0.1 s
    assert backoff.next_delay() <= 0.1


class FakeMessage:
    """What a Batch asks of a consumed record."""

    def __init__(self, partition: int, offset: int) -> None:
        self._partition = partition
        self._offset = offset

    def topic(self) -> str:
        return "processed"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


def test_a_batch_forgets_the_partitions_it_lost() -> None:
    kept, lost = FakeMessage(0, 10), FakeMessage(1, 20)
    batch = Batch(
        rows=[(1, 1, 1, 1.0), (2, 2, 2, 2.0)],
        messages=[kept, lost],  # type: ignore[list-item]
        unparsed=[(FakeMessage(1, 21), "invalid JSON"), (FakeMessage(0, 11), "empty")],  # type: ignore[list-item]
        offsets={("processed", 0): 11, ("processed", 1): 21},
        records=4,
    )
    batch.drop_partitions({("processed", 1)})
    assert batch.rows == [(1, 1, 1, 1.0)]
    assert batch.messages == [kept]
    assert [detail for _, detail in batch.unparsed] == ["empty"]
    assert batch.offsets == {("processed", 0): 11}
    assert len(batch) == 2


def test_encode_copy_frames_the_rows() -> None:
    rows = [(0, 1, 2, 3.5), (-1, 2**31 - 1, 1, -0.0)]
    body = encode_rows(rows)
    assert encode_copy(rows) == COPY_HEADER + body + COPY_TRAILER
    assert len(body) == 2 * (2 + 4 + 8 + 4 + 4 + 4 + 4 + 4 + 8)
    assert encode_copy([]) == COPY_HEADER + COPY_TRAILER


def test_the_pure_modules_load_no_client() -> None:
    probe = "import sys, f2pipe.sink.stage, f2pipe.sink.batching\nprint('\\n'.join(sys.modules))\n"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split()
    clients = {"psycopg", "confluent_kafka", "prometheus_client"}
    assert not {name.split(".")[0] for name in loaded} & clients


# Values the batch path must agree on with parse_reading: well-formed readings
# (any offset, naive and odd timestamps, integer and extreme values, extra and
# missing keys, wrong types), then the same bytes truncated or corrupted.
_anything = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
)
_field_values = {
    "v": st.just(1) | _anything,
    "ts": st.datetimes(
        timezones=st.none()
        | st.builds(timezone, st.timedeltas(timedelta(hours=-23), timedelta(hours=23)))
    ).map(datetime.isoformat)
    | st.just("2024-07-15T14:30:25.123456+00:00")
    | _anything,
    "device_id": st.integers(1, 2**31 - 1) | _anything,
    "datapoint_id": st.integers(1, 2**31 - 1) | _anything,
    "value": st.floats(allow_nan=False, allow_infinity=False) | _anything,
}
_record = st.fixed_dictionaries(
    {},
    optional={
        **{k: s for k, s in _field_values.items()},
        "extra": _anything,
    },
).map(orjson.dumps)
_typical = st.fixed_dictionaries(_field_values).map(orjson.dumps)


@st.composite
def _hostile(draw: st.DrawFn) -> bytes | None:
    raw = draw(_typical | _record)
    how = draw(st.sampled_from(["keep", "keep", "cut", "flip", "none", "bytes", "array"]))
    if how == "cut":
        return raw[: draw(st.integers(0, len(raw)))]
    if how == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    if how == "none":
        return None
    if how == "bytes":
        return draw(st.binary(max_size=100))
    if how == "array":
        return b"[" + raw + b"]"
    return raw


@no_deadline
@given(st.lists(_typical | _hostile(), max_size=8))
def test_the_batch_path_agrees_with_the_record_path(values: list[bytes | None]) -> None:
    expected = [parse_reading(v) for v in values]
    rows = parse_batch(values)
    if rows is not None:
        # The same rows, bit for bit (-0.0 and 0.0 differ in COPY).
        assert [struct.pack("!qiid", *r) for r in rows] == [
            struct.pack("!qiid", *r) for r in expected if isinstance(r, tuple)
        ]
        assert len(rows) == len(values)


@no_deadline
@given(
    st.lists(
        st.tuples(
            st.datetimes(timezones=st.just(UTC)),
            st.integers(1, 2**31 - 1),
            st.integers(1, 2**31 - 1),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        max_size=8,
    )
)
def test_the_batch_path_takes_what_the_processor_writes(
    readings: list[tuple[datetime, int, int, float]],
) -> None:
    values = [
        orjson.dumps({"v": 1, "ts": ts, "device_id": d, "datapoint_id": p, "value": x})
        for ts, d, p, x in readings
    ]
    assert parse_batch(values) == [parse_reading(v) for v in values]


def test_the_batch_path_takes_the_processor_shape() -> None:
    values = [value(ts=f"2024-07-15T14:30:{s:02d}.123456+00:00", value=s + 0.5) for s in range(60)]
    assert parse_batch(values) == [parse_reading(v) for v in values]
    assert parse_batch([]) == []


def _agree(values: list[bytes | None]) -> list[tuple[int, int, int, float]] | None:
    """parse_batch(values), after checking it equals the record path bit for bit."""
    rows = parse_batch(values)
    if rows is not None:
        expected = [parse_reading(v) for v in values]
        assert all(isinstance(r, tuple) for r in expected)
        assert [struct.pack("!qiid", *r) for r in rows] == [
            struct.pack("!qiid", *r) for r in expected if isinstance(r, tuple)
        ]
    return rows


_OK = b'{"v":1,"ts":"2026-01-01T00:00:00.123000+00:00","device_id":5,"datapoint_id":6,"value":1.5'


# Inputs where the batch decoder (msgspec) and the record path (orjson) could
# part ways. Each must come out of the batch path either as the record path's
# rows or as None (the record path then gives the reason).
@pytest.mark.parametrize(
    ("raw", "fast"),
    [
        # orjson refuses these, and msgspec would skip them unchecked in an unknown key.
        (_OK + b',"x":"\xff"}', False),
        (_OK + b',"\xff":1}', False),
        (_OK + b',"x":1e400}', False),
        (_OK + b',"x":1' + b"0" * 400 + b"}", False),
        # extra keys are valid (SPEC: ignored), but take the record path
        (_OK + b',"x":[1,{"y":null}]}', False),
        # duplicate keys: the last one wins in both
        (_OK + b',"value":2.5,"device_id":7}', True),
        (_OK + b',"device_id":"x"}', False),
        (_OK.replace(b'"device_id":5', b'"device_id":"x"') + b',"device_id":5}', False),
        # booleans and integral floats are not ints
        (_OK.replace(b'"v":1', b'"v":true') + b"}", False),
        (_OK.replace(b'"v":1', b'"v":1.0') + b"}", False),
        (_OK.replace(b'"device_id":5', b'"device_id":true') + b"}", False),
        (_OK.replace(b'"device_id":5', b'"device_id":5.0') + b"}", False),
        (_OK.replace(b'"device_id":5', b'"device_id":5e0') + b"}", False),
        (_OK.replace(b'"device_id":5', b'"device_id":-0') + b"}", False),
        (_OK.replace(b'"device_id":5', b'"device_id":2147483648') + b"}", False),
        (_OK.replace(b'"device_id":5', b'"device_id":' + b"9" * 30) + b"}", False),
        (_OK.replace(b'"value":1.5', b'"value":true') + b"}", False),
        # integer values of every size: converted to the nearest double by both
        (_OK.replace(b"1.5", b"18446744073709551615") + b"}", True),
        (_OK.replace(b"1.5", b"-9223372036854775809") + b"}", True),
        (_OK.replace(b"1.5", b"9007199254740993") + b"}", True),
        (_OK.replace(b"1.5", b"1" + b"0" * 300) + b"}", True),
        (_OK.replace(b"1.5", b"1" + b"0" * 400) + b"}", False),
        (_OK.replace(b"1.5", b"-0") + b"}", True),
        (_OK.replace(b"1.5", b"-0.0") + b"}", True),
        (_OK.replace(b"1.5", b"1e400") + b"}", False),
        (_OK.replace(b"1.5", b"4.9e-324") + b"}", True),
        (_OK.replace(b"1.5", b"1e-400") + b"}", True),
        (_OK.replace(b"1.5", b"NaN") + b"}", False),
        # strings: escapes, invalid UTF-8 and lone surrogates in ts
        (_OK.replace(b'"value"', b'"valu\\u0065"') + b"}", True),
        (_OK.replace(b"+00:00", b"\\u002b00:00") + b"}", True),
        (_OK.replace(b'+00:00"', b'+00:00\xff"') + b"}", False),
        (_OK.replace(b'+00:00"', b'+00:00\\ud800"') + b"}", False),
        (_OK.replace(b"2026-01-01T", b"2026-01-01 ") + b"}", True),
        (_OK.replace(b"+00:00", b"") + b"}", False),
        # framing
        (b"\xef\xbb\xbf" + _OK + b"}", False),
        (b" \n\t\r" + _OK + b"} \n\t\r", True),
        (_OK + b"}\x00", False),
        (_OK + b"},", False),
        (b"[" + _OK + b"}]", False),
    ],
)
def test_the_batch_path_agrees_where_the_decoders_differ(raw: bytes, fast: bool) -> None:
    rows = _agree([raw])
    assert (rows is not None) is fast


_number_text = (
    st.integers().map(str)
    | st.floats(allow_nan=False, allow_infinity=False).map(repr)
    | st.from_regex(r"\A-?(0|[1-9][0-9]{0,400})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?\Z")
).map(str.encode)
_fragment = st.sampled_from(
    [b'"\xff"', b'"\\ud800"', b'"\\udc00\\ud800"', b"1e400", b"-1e999", b"NaN", b"[" * 1100]
) | st.binary(max_size=12)


@no_deadline
@given(_number_text, st.none() | _fragment | _number_text)
def test_the_batch_path_agrees_on_number_text_and_extra_keys(
    number: bytes, extra: bytes | None
) -> None:
    raw = _OK.replace(b"1.5", number)
    raw += b"}" if extra is None else b',"x":' + extra + b"}"
    rows = _agree([raw])
    if extra is None and isinstance(parse_reading(raw), tuple):
        assert rows is not None  # every valid reading of the processor's shape is taken whole
