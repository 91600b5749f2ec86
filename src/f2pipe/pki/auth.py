"""Who may ask for a certificate: the admin token, and the failure budgets of
claiming codes and admin tokens."""

from __future__ import annotations

import collections
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from f2pipe.errors import ConfigError
from f2pipe.pki.ca import tighten_mode, write_private
from f2pipe.settings import Settings

#: The shortest admin token accepted (the generated one has 43 characters).
MIN_TOKEN_LENGTH = 32
# Fragments of the placeholders that example files and tutorials ship.
_PLACEHOLDERS = (
    "change-me",
    "changeme",
    "change_me",
    "replace-me",
    "replaceme",
    "example",
    "placeholder",
    "your-token",
    "admin-token",
    "password",
    "secret",
    "xxxxxxxx",
    "00000000",
    "12345678",
)
# 32 random hex digits show fewer distinct characters than this about once in
# ten million tokens; a word repeated to length shows fewer every time.
_MIN_DISTINCT = 8


def admin_token_path(settings: Settings) -> Path:
    """Where a generated admin token is kept (``<state>/admin-token``, 0600)."""
    return settings.state_dir / "admin-token"


def check_admin_token(value: str, source: str) -> None:
    """Raise ConfigError (naming ``source``, never the value) unless ``value`` looks random.

    Refused: fewer than 32 characters, a known placeholder, or too few distinct
    characters to be random.
    """
    how = "use at least 32 random characters, e.g. `openssl rand -hex 32`"
    if len(value) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{source}: the admin token is too short ({len(value)} characters); {how}"
        )
    lowered = value.lower()
    if any(fragment in lowered for fragment in _PLACEHOLDERS):
        raise ConfigError(f"{source}: the admin token is a placeholder; {how}")
    if len(set(value)) < _MIN_DISTINCT:
        raise ConfigError(f"{source}: the admin token is not random; {how}")


def admin_token(settings: Settings, create: bool = True) -> SecretStr:
    """The operator's admin token.

    From ``F2PIPE_ADMIN_TOKEN``, else the file ``F2PIPE_ADMIN_TOKEN_FILE``, else
    ``<state>/admin-token``; with ``create`` a random token (256 bits) is written
    there on first use. A generated file found readable by others is made 0600.
    Raises ConfigError for an unreadable or empty source, a weak token
    (:func:`check_admin_token`), or if no token exists and ``create`` is False.
    """
    if settings.admin_token is not None:
        value = settings.admin_token.get_secret_value().strip()
        if not value:
            raise ConfigError("F2PIPE_ADMIN_TOKEN is empty")
        check_admin_token(value, "F2PIPE_ADMIN_TOKEN")
        return SecretStr(value)
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
    if settings.admin_token_file is None:
        tighten_mode(source)  # ours; a mounted secret's mode is its owner's business
    check_admin_token(value, f"admin token file {source}")
    return SecretStr(value)


def tokens_equal(given: str, expected: SecretStr) -> bool:
    """Constant-time comparison (the time taken does not depend on where they differ)."""
    return hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


class FailureLimiter:
    """Counts failed attempts per key in a sliding window.

    ``blocked(key)`` is true once ``limit`` failures happened within ``window``
    seconds; the caller then refuses without checking the attempt (429), so a
    blocked client learns nothing. Memory is bounded: at most ``max_keys`` keys
    are tracked, the stalest dropped first. Not thread-safe: :class:`AttemptLimits`
    serialises its callers.
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

    def fail(self, key: str) -> float:
        """Count one failure for ``key`` now; return its time stamp (for :meth:`forget`)."""
        times = self._recent(key)
        if times is None:
            times = self._failures[key] = collections.deque(maxlen=self.limit)
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(key)
        stamp = self._clock()
        times.append(stamp)
        return stamp

    def forget(self, key: str, stamp: float) -> None:
        """Take back the failure counted at ``stamp`` (the attempt succeeded after all)."""
        times = self._failures.get(key)
        if times is not None and stamp in times:
            times.remove(stamp)


GLOBAL = "*"  # the one key of the global budget


class Attempt:
    """An attempt counted as failed before it is evaluated; :meth:`succeeded` takes it back.

    Counting first is what makes the limits hold under concurrency: a burst of
    requests cannot all pass the check while the first ones are still being
    evaluated, because each one has already used up its share of the budget.
    """

    def __init__(self, lock: threading.Lock, counted: list[tuple[FailureLimiter, str, float]]):
        self._lock = lock
        self._counted = counted

    def succeeded(self) -> None:
        with self._lock:
            for limiter, key, stamp in self._counted:
                limiter.forget(key, stamp)
            self._counted = []


class AttemptLimits:
    """certgen's failure budgets (SPEC section 6), shared by every request of one process.

    Claiming codes: ``max_failures`` per device and per client address, and
    ``global_max_failures`` over all devices and addresses, which a guesser
    spraying many devices from many addresses runs into. Admin tokens:
    ``max_failures`` per client address. All within a sliding ``window``.
    """

    def __init__(
        self,
        max_failures: int,
        global_max_failures: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.by_mac = FailureLimiter(max_failures, window, clock=clock)
        self.by_address = FailureLimiter(max_failures, window, clock=clock)
        self.overall = FailureLimiter(global_max_failures, window, max_keys=1, clock=clock)
        self.admin_by_address = FailureLimiter(max_failures, window, clock=clock)
        self._lock = threading.Lock()

    def _reserve(self, budgets: list[tuple[FailureLimiter, str]]) -> Attempt | None:
        with self._lock:
            if any(limiter.blocked(key) for limiter, key in budgets):
                return None
            counted = [(limiter, key, limiter.fail(key)) for limiter, key in budgets]
        return Attempt(self._lock, counted)

    def claim(self, mac: str, address: str) -> Attempt | None:
        """Reserve a claiming-code attempt, or None when a budget is spent (answer 429)."""
        return self._reserve(
            [(self.by_mac, mac), (self.by_address, address), (self.overall, GLOBAL)]
        )

    def admin(self, address: str) -> Attempt | None:
        """Reserve an admin-token attempt, or None when the address's budget is spent."""
        return self._reserve([(self.admin_by_address, address)])
