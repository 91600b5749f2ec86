"""Shared test fixtures.

Tests talk to the real local servers that ``f2pipe stack up`` starts (PostgreSQL,
Redis, Kafka, Mosquitto). Each test gets unique names (databases, topics,
consumer groups) so tests never see each other's data. Synchronise by polling
with a deadline (:func:`wait_until`), never by sleeping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import hypothesis
import pytest

from f2pipe import testing

# The shared helpers hold assertions moved out of the tests: report them as pytest does.
pytest.register_assert_rewrite("pipeline_helpers", "pki_fixtures")

# Property tests are judged by their examples, not their speed: a loaded machine (the
# suite runs the servers beside them) must not fail one on Hypothesis's 200 ms deadline.
hypothesis.settings.register_profile("f2pipe", deadline=None)
hypothesis.settings.load_profile("f2pipe")

T = TypeVar("T")


def _operator_settings() -> None:
    """The shared stack's operator credentials (``<state>/admin.env``) for every test.

    The secured stack refuses a client without a password; tests act as the
    operator. Only what differs from the settings in effect is set (a plain
    stack on the default ports adds nothing), and a variable already set in the
    environment wins, so a run pointed at other servers keeps its own.
    """
    from f2pipe.operations.stack.security import ADMIN_ENV, read_admin_env
    from f2pipe.settings import load_settings

    current = load_settings()
    path = current.state_dir / ADMIN_ENV
    if path.is_file():
        for key, value in read_admin_env(path).items():
            now = getattr(current, key.removeprefix("F2PIPE_").lower(), None)
            if now is None or value != str(now):
                os.environ.setdefault(key, value)


_operator_settings()

# The decoding vectors (SPEC sections 1, 2 and 7 in examples): the repository's own copy,
# and the shared original it must equal whenever a checkout has it beside it.
VECTORS = Path(__file__).resolve().parent / "data" / "frames.jsonl"
SHARED_VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "frames.jsonl"


def wait_until(
    probe: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Call ``probe`` until it returns a truthy value; return it, or fail the test after
    ``timeout`` s (:func:`f2pipe.testing.wait_until` as a test failure)."""
    try:
        return testing.wait_until(probe, timeout, interval, what)
    except TimeoutError as exc:
        pytest.fail(str(exc))


def unique(prefix: str) -> str:
    """A name no other test uses: ``<prefix>_<12 hex>`` (valid as a topic, group or database)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def new_db() -> Iterator[Callable[[], str]]:
    """Makes new, fully migrated databases (DSNs) on demand; drops them all afterwards."""
    import psycopg
    from psycopg import sql

    from f2pipe.metadata.database import create_database, migrate
    from f2pipe.settings import get_settings

    admin = get_settings().metadata_dsn.rsplit("/", 1)[0] + "/postgres"
    names: list[str] = []

    def make() -> str:
        name = unique("f2t")
        create_database(admin, name)
        names.append(name)
        dsn = admin.rsplit("/", 1)[0] + "/" + name
        migrate(dsn)
        return dsn

    yield make
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in names:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def fresh_db(new_db: Callable[[], str]) -> str:
    """A new, fully migrated database for one test; its DSN. Dropped afterwards."""
    return new_db()
