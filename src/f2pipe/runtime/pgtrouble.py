"""PostgreSQL connection errors that only an operator can fix, named with the setting.

A wrong password, a server certificate the client cannot trust, or one that
does not name the host the DSN reaches it by do not pass by themselves: the
stage retries forever, and libpq's message says what failed but not which
setting to change. :func:`describe` turns such an error into one line naming
the DSN's variable and the fix; the line holds nothing of the DSN itself, so
no password can be part of it. :func:`probe` is the readiness check of a
stage that needs PostgreSQL.
"""

from __future__ import annotations

import psycopg

from f2pipe.runtime.opsserver import NotReady

__all__ = ["describe", "probe"]


def describe(error: BaseException, variable: str) -> str | None:
    """One line naming what to fix in ``variable`` for ``error``; None for an error that
    passes by itself (the server restarting, the network gone for a while)."""
    text = str(error)
    if "password authentication failed" in text or "no password supplied" in text:
        return (
            f"PostgreSQL refused the login: check the user and password in {variable}"
            f" (or {variable}_FILE)"
        )
    if "does not match host name" in text:
        return (
            f"PostgreSQL's certificate does not name the host in {variable}: use a name it"
            " carries, or issue it one that names this host (F2PIPE_BROKER_NAMES)"
        )
    if "certificate verify failed" in text or "root certificate file" in text:
        return (
            f"TLS to PostgreSQL failed: its certificate is not trusted; check sslrootcert"
            f" in {variable} (the CA that signed the server's certificate)"
        )
    return None


def probe(dsn: str, variable: str) -> None:
    """Connect to ``dsn`` (2 s at most) and run ``SELECT 1``.

    Raises NotReady with :func:`describe`'s line for an error only an operator
    can fix; any other psycopg error propagates.
    """
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        line = describe(exc, variable)
        if line is None:
            raise
        raise NotReady(line) from None
