"""Who may ask for a certificate: the admin token and the claiming-code rate limit."""

from __future__ import annotations

import collections
import hmac
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from f2pipe.errors import ConfigError
from f2pipe.pki.ca import write_private
from f2pipe.settings import Settings


def admin_token_path(settings: Settings) -> Path:
    """Where a generated admin token is kept (``<state>/admin-token``, 0600)."""
    return settings.state_dir / "admin-token"


def admin_token(settings: Settings, create: bool = True) -> SecretStr:
    """The operator's admin token.

    From ``F2PIPE_ADMIN_TOKEN``, else the file ``F2PIPE_ADMIN_TOKEN_FILE``, else
    ``<state>/admin-token``; with ``create`` a random token (256 bits) is written
    there on first use. Raises ConfigError for an unreadable or empty source, or
    if no token exists and ``create`` is False.
    """
    if settings.admin_token is not None:
        if not settings.admin_token.get_secret_value().strip():
            raise ConfigError("F2PIPE_ADMIN_TOKEN is empty")
        return SecretStr(settings.admin_token.get_secret_value().strip())
    source = settings.admin_token_file or admin_token_path(settings)
    try:
        value = source.read_text().strip()
    except FileNotFoundError:
        if settings.admin_token_file is not None or not create:
            raise ConfigError(
                f"no admin token: {source} does not exist (set F2PIPE_ADMIN_TOKEN or "
                "F2PIPE_ADMIN_TOKEN_FILE, or start certgen once to generate it)"
            ) from None
        value = secrets.token_urlsafe(32)
        write_private(source, (value + "\n").encode())
        return SecretStr(value)
    except OSError as exc:
        raise ConfigError(f"F2PIPE_ADMIN_TOKEN_FILE={str(source)!r}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"the admin token file {source} is empty")
    return SecretStr(value)


def tokens_equal(given: str, expected: SecretStr) -> bool:
    """Constant-time comparison (the time taken does not depend on where they differ)."""
    return hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


class FailureLimiter:
    """Counts failed attempts per key in a sliding window.

    ``blocked(key)`` is true once ``limit`` failures happened within ``window``
    seconds; the caller then refuses without checking the attempt (429), so a
    blocked client learns nothing. Memory is bounded: at most ``max_keys`` keys
    are tracked, the stalest dropped first.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def _recent(self, key: str) -> collections.deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = self._clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def blocked(self, key: str) -> bool:
        times = self._recent(key)
        return times is not None and len(times) >= self.limit

    def fail(self, key: str) -> None:
        times = self._recent(key)
        if times is None:
            times = self._failures[key] = collections.deque(maxlen=self.limit)
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(key)
        times.append(self._clock())
