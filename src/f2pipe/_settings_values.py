"""How setting values are read and shown, apart from the model in :mod:`f2pipe.settings`.

Durations with units, variable names and their deprecated spellings, the TOML
file, secret files and URLs with their passwords masked.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BeforeValidator

from f2pipe.errors import ConfigError

ENV_PREFIX = "F2PIPE_"
CONFIG_FILE_VARIABLE = "F2PIPE_CONFIG_FILE"
# Old name -> new name. An old variable or file key still works, with one warning line.
DEPRECATED_NAMES = {
    "connector_shutdown_timeout": "connector_shutdown_timeout_s",
    "connector_session_expiry": "connector_session_expiry_s",
    "simulator_interval": "simulator_interval_s",
    "certgen_failure_window": "certgen_failure_window_s",
    "mqtt_autosave_interval": "mqtt_autosave_interval_s",
    "mqtt_keepalive": "mqtt_keepalive_s",
    "compress_after": "compress_after_days",
    "retention": "retention_days",
}

log = logging.getLogger("f2pipe.settings")

_UNIT_SECONDS = {
    "ms": 0.001,
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 7 * 86400.0),
    **dict.fromkeys(("y", "year", "years"), 365 * 86400.0),
}
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)$")


def parse_duration(value: object, unit_seconds: float) -> object:
    """A duration in the unit of ``unit_seconds``: a bare number is already in it.

    ``"90s"``, ``"5m"``, ``"500ms"``, ``"7d"``, ``"7 days"`` are converted; a
    value that is not text is left for the field's own type check.
    """
    if not isinstance(value, str):
        return value
    match = _DURATION.match(value.strip())
    if match is None or match[2].lower() not in {"", *_UNIT_SECONDS}:
        raise ValueError("expected a number or a duration such as 500ms, 90s, 5m, 2h, 7d")
    number = float(match[1])
    if not match[2]:
        return number
    result = number * _UNIT_SECONDS[match[2].lower()] / unit_seconds
    return int(result) if result.is_integer() else result


Milliseconds = BeforeValidator(functools.partial(parse_duration, unit_seconds=0.001))
Seconds = BeforeValidator(functools.partial(parse_duration, unit_seconds=1.0))
Days = BeforeValidator(functools.partial(parse_duration, unit_seconds=86400.0))


def default_state_dir() -> Path:
    """``var/`` in the checkout when run from one (src layout), else under the working folder."""
    checkout = Path(__file__).resolve().parent.parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "var"
    return Path.cwd() / "var"


def upper(value: object) -> object:
    """Text upper-cased (closed choices are spelled in any case); anything else unchanged."""
    return value.upper() if isinstance(value, str) else value


def os_reason(exc: Exception) -> str:
    """The short cause of a failed read (\"No such file or directory\"), never the content."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


def mask_url(url: str) -> str:
    """``url`` with a password (user info or ``password=`` parameter) replaced by ``****``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "****"
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:****@{hostport}"
    query = parts.query
    if "password" in query.lower():
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "****" if "password" in k.lower() else v) for k, v in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def variable(name: str) -> str:
    """The environment variable of setting ``name``."""
    return ENV_PREFIX + name.upper()


def read_secret_file(path: Path, name: str) -> str:
    """A secret file's text without its final newline; ConfigError naming the variable."""
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{variable(name)}: cannot read {path}: {os_reason(exc)}") from None


_warned: set[str] = set()


def _deprecated(new: str, where: str) -> None:
    # Once per process: commands that read the settings several times still say it once.
    if where not in _warned:
        _warned.add(where)
        log.warning(f"{where} is deprecated: use {new}")


def deprecated_environment() -> dict[str, str]:
    """Values given under an old variable name whose new name is not set, with a warning each."""
    values: dict[str, str] = {}
    for old, new in DEPRECATED_NAMES.items():
        if variable(old) in os.environ and variable(new) not in os.environ:
            _deprecated(variable(new), variable(old))
            values[new] = os.environ[variable(old)]
    return values


def config_file_values(path: str | Path | None, known: Collection[str]) -> dict[str, Any]:
    """The settings in the TOML file at ``path`` (None: no file), old key names renamed.

    ``known`` are the names a file may hold.

    Raises ConfigError for an unreadable file, bad TOML or an unknown key.
    """
    if path is None or str(path) == "":
        return {}
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FILE_VARIABLE}: cannot read {path}: {os_reason(exc)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_FILE_VARIABLE}: {path} is not TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = DEPRECATED_NAMES.get(key, key)
        if name not in known:
            raise ConfigError(f"{CONFIG_FILE_VARIABLE}: {path}: unknown key {key!r}")
        if name != key:
            _deprecated(name, f"key {key!r} in {path}")
        values[name] = value
    return values


# Settings whose URL may carry a password: each may also be read from the file its
# variable plus _FILE names (as container secrets are mounted), keeping it out of the
# process environment.
URL_SECRETS = ("metadata_dsn", "timeseries_dsn", "redis_url")


def secret_file_environment() -> dict[str, str]:
    """Values of ``URL_SECRETS`` read from ``F2PIPE_<NAME>_FILE``; ConfigError naming it."""
    values: dict[str, str] = {}
    for name in URL_SECRETS:
        file_variable = variable(name) + "_FILE"
        if file_variable not in os.environ:
            continue
        if variable(name) in os.environ:
            raise ConfigError(f"{variable(name)} and {file_variable} are both set: keep one")
        values[name] = read_secret_file(Path(os.environ[file_variable]), name + "_file")
    return values


def _bootstrap(value: str) -> str:
    for server in value.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("expected host:port[,host:port...]")
    return value


def _postgres(value: str) -> str:
    if value and urlsplit(value).scheme not in ("postgresql", "postgres"):
        raise ValueError("expected a postgresql:// URL")
    return value


def _redis(value: str) -> str:
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return value


def broker_urls(value: str) -> dict[str, str]:
    """``mqtt-1=mqtts://host:port,...`` as {name: URL}; ValueError naming what is wrong."""
    found: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, url = item.partition("=")
        parts = urlsplit(url.strip())
        if not re.fullmatch(r"mqtt-[1-9][0-9]?", name.strip()):
            raise ValueError(f"{item!r}: expected mqtt-<n>=mqtts://host:port")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.port is None:
            raise ValueError(f"{item!r}: expected an mqtts://host:port URL")
        found[name.strip()] = url.strip()
    return found


def _broker_urls(value: str) -> str:
    broker_urls(value)
    return value


def broker_hosts(value: str) -> dict[str, str]:
    """``mqtt-2=host,...`` as {name: host}; ValueError naming what is wrong."""
    found: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, host = (part.strip() for part in item.partition("="))
        if not re.fullmatch(r"mqtt-[1-9][0-9]?", name):
            raise ValueError(f"{item!r}: expected mqtt-<n>=host")
        if not host or re.search(r"[\s/:@]", host):
            raise ValueError(f"{item!r}: expected a host name or IPv4 address after '='")
        found[name] = host
    return found


def _broker_hosts(value: str) -> str:
    broker_hosts(value)
    return value


#: Settings holding an address, and the check of its shape (ValueError says what is expected).
URL_CHECKS = {
    "kafka_bootstrap": _bootstrap,
    "metadata_dsn": _postgres,
    "timeseries_dsn": _postgres,
    "redis_url": _redis,
    "mqtt_broker_urls": _broker_urls,
    "mqtt_broker_hosts": _broker_hosts,
}


def every_broker(settings: Any) -> str:
    """The bootstrap naming every broker of a local cluster: one address given, brokers 2
    and 3 listen on its port + 2 and + 4 (their controllers on the controller port's)."""
    bootstrap, brokers = settings.kafka_bootstrap, settings.kafka_brokers
    if brokers == 1 or "," in bootstrap:
        return str(bootstrap)
    host, _, port = bootstrap.rpartition(":")
    return ",".join(f"{host}:{int(port) + 2 * node}" for node in range(brokers))
