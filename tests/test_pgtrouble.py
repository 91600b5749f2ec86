"""PostgreSQL errors only an operator can fix are one line naming the setting and the fix.

The messages are libpq's own (PostgreSQL 15-17); the separate-hosts test
(``tests/hosts_inside.py``) meets the name mismatch on a real server.
"""

from __future__ import annotations

import socket
import threading

import psycopg
import pytest

from f2pipe.runtime.opsserver import NotReady
from f2pipe.runtime.pgtrouble import describe, probe
from f2pipe.testing.stack import free_ports

SECRET = "not-a-password-4711"


@pytest.mark.parametrize(
    ("libpq", "fix"),
    [
        ('FATAL:  password authentication failed for user "f2pipe_sink"', "user and password"),
        ("fe_sendauth: no password supplied", "user and password"),
        ('server certificate for "pg.f2h.test" does not match host name "other"', "name"),
        ("SSL error: certificate verify failed", "sslrootcert"),
        ('root certificate file "/missing/ca.pem" does not exist', "sslrootcert"),
    ],
)
def test_an_operators_error_names_the_variable_and_the_fix(libpq: str, fix: str) -> None:
    line = describe(psycopg.OperationalError(f"connection failed: {libpq}"), "F2PIPE_X_DSN")
    assert line is not None
    assert "F2PIPE_X_DSN" in line
    assert fix in line
    assert "\n" not in line


def test_an_error_that_passes_by_itself_is_left_alone() -> None:
    assert describe(psycopg.OperationalError("Connection refused"), "F2PIPE_X_DSN") is None


def test_probe_says_not_ready_without_the_dsn_and_passes_other_errors_on() -> None:
    (port,) = free_ports(1)
    dsn = f"postgresql://sink:{SECRET}@127.0.0.1:{port}/f2pipe"
    with pytest.raises(psycopg.OperationalError):  # nothing listens: it may pass by itself
        probe(dsn, "F2PIPE_TIMESERIES_DSN")
    # A server that agrees to TLS: libpq then looks for the CA file the DSN names.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def agree() -> None:
            client, _ = server.accept()
            with client:
                client.recv(8)  # the SSLRequest
                client.sendall(b"S")
                client.recv(1)  # until libpq gives up

        thread = threading.Thread(target=agree, daemon=True)
        thread.start()
        port = server.getsockname()[1]
        missing = (
            f"postgresql://sink:{SECRET}@127.0.0.1:{port}/f2pipe"
            "?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
        )
        with pytest.raises(NotReady) as refused:
            probe(missing, "F2PIPE_TIMESERIES_DSN")
        thread.join(5)
    assert "F2PIPE_TIMESERIES_DSN" in str(refused.value)
    assert SECRET not in str(refused.value)
