"""The secured local stack (SPEC section 10): generated passwords, server certificates,
the services' own credentials and the operator's ``<state>/admin.env``.

With ``F2PIPE_STACK_SECURED`` (the default) every server the stack starts
requires a password: PostgreSQL scram-sha-256 over TLS only (``hostssl``, no
``trust`` even on loopback), Redis ACL users with the default user switched
off. The rights are those of :mod:`f2pipe.operations.principals`.

Contracts:

- Passwords are generated once into ``<state>/secrets/<name>.password``
  (folder 0700, files 0600) and kept; deleting a file makes the next ``up``
  generate a new one, applied when the server next starts (the services'
  PostgreSQL roles at every ``up``).
- A server records the mode it was started in (``<state>/secrets/<server>.secured``),
  so probes, the services' environments and ``admin.env`` follow the running
  server, not the current settings: a stack started plain stays reachable
  until it is restarted.
- Server certificates come from f2pipe's own CA (:func:`f2pipe.pki.state.ensure_pki`)
  and are re-issued when missing, near expiry or signed by another CA.
- No message here holds a secret.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from pydantic import SecretStr

from f2pipe.errors import StackError
from f2pipe.operations.principals import ADMIN, Names, Principal, principal, principals
from f2pipe.operations.stack.supervise import Paths
from f2pipe.settings import Settings

__all__ = [
    "ADMIN_ENV",
    "KAFKA_CREDENTIAL_FIELDS",
    "PKI_LOCK",
    "PLAIN_KAFKA",
    "admin_env",
    "admin_settings",
    "ca_file",
    "certgen_url",
    "is_secured",
    "kafka_env",
    "kafka_settings",
    "mark",
    "password",
    "pg_admin_password",
    "pg_user",
    "read_admin_env",
    "redis_url",
    "roles",
    "secrets_dir",
    "server_tls",
    "service_env",
    "stack_secured",
    "with_credentials",
    "withheld_fields",
    "write_admin_env",
    "write_owned",
    "write_private_text",
]

#: Held around :func:`f2pipe.pki.state.ensure_pki`: servers are prepared side by side,
#: and two threads creating the CA at once would leave certificates of a lost CA.
PKI_LOCK = threading.Lock()

ADMIN_ENV = "admin.env"


def secrets_dir(paths: Paths) -> Path:
    folder = paths.state / "secrets"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def password(paths: Paths, name: str) -> str:
    """The password ``name`` (generated on first use, 0600); StackError if unreadable."""
    path = secrets_dir(paths) / f"{name}.password"
    for _attempt in range(2):
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise StackError(
                f"cannot read the password file {path} ({exc.strerror}); fix its permissions, "
                "or delete it and run up again to generate a new password"
            ) from None
        if text:
            return text
        _create_secret(path, secrets.token_urlsafe(24))
    raise StackError(f"the password file {path} is empty; delete it and run up again")


def _create_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` (0600) unless another process just did; never half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # the other writer's password stands
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def pg_admin_password(paths: Paths) -> str:
    return password(paths, "postgres-admin")


def mark(paths: Paths, server: str, secured: bool) -> None:
    """Record whether ``server`` is being started secured."""
    marker = secrets_dir(paths) / f"{server}.secured"
    if secured:
        marker.touch(mode=0o600)
    else:
        marker.unlink(missing_ok=True)


def stack_secured(paths: Paths) -> bool:
    """True when any server of this state folder was last started secured."""
    return any((paths.state / "secrets").glob("*.secured"))


def certgen_url(settings: Settings, paths: Paths) -> str:
    """certgen's URL: HTTPS on a secured stack (its certificate is from f2pipe's CA)."""
    if not (settings.certgen_tls or stack_secured(paths)):
        return settings.certgen_url
    host = settings.certgen_host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 - compared
    return f"https://{host}:{settings.certgen_port}"


def is_secured(paths: Paths, server: str) -> bool:
    """True when ``server`` was last started secured from this state folder."""
    return (paths.state / "secrets" / f"{server}.secured").is_file()


def server_tls(
    settings: Settings,
    folder: Path,
    common_name: str,
    owner: pwd.struct_passwd | None,
    host: str | None = None,
) -> tuple[Path, Path]:
    """``folder/server.crt`` and ``server.key`` (0600, owned by ``owner``) from f2pipe's CA,
    naming loopback, ``broker_names`` and ``host`` (where clients reach the server)."""
    from f2pipe.pki.ca import cert_pem, key_pem, write_private, write_public
    from f2pipe.pki.state import ensure_pki, needs_server_cert, server_names

    with PKI_LOCK:
        ca = ensure_pki(settings).ca
    cert, key = folder / "server.crt", folder / "server.key"
    names = server_names(settings, host)
    if needs_server_cert(ca, cert, key, names):
        issued = ca.issue_server(common_name, names, settings.service_cert_days)
        assert issued.private_key is not None
        write_private(key, key_pem(issued.private_key))
        write_public(cert, cert_pem(issued.certificate))
    if owner is not None:
        for path in (cert, key):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    return cert, key


def ca_file(settings: Settings) -> Path:
    from f2pipe.pki.ca import pki_paths

    return pki_paths(settings).ca_cert


def with_credentials(url: str, user: str | None, secret: str | None, **query: str) -> str:
    """``url`` with its user and password replaced (None: left out) and ``query`` added."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    if user is not None:
        userinfo = quote(user, safe="")
        if secret is not None:
            userinfo += ":" + quote(secret, safe="")
        netloc = f"{userinfo}@{netloc}"
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in query]
    joined = urlencode([*kept, *query.items()], safe="/")
    return urlunsplit((parts.scheme, netloc, parts.path, joined, parts.fragment))


def pg_user(settings: Settings) -> str:
    """The cluster's owner: the user of ``F2PIPE_METADATA_DSN`` (default ``postgres``)."""
    return unquote(urlsplit(settings.metadata_dsn).username or "postgres")


def redis_url(settings: Settings, user: str | None, secret: str | None) -> str:
    """``F2PIPE_REDIS_URL`` with ``user``'s credentials; over TLS, checked against f2pipe's CA."""
    trust = {"ssl_ca_certs": str(ca_file(settings))}
    tls = urlsplit(settings.redis_url).scheme == "rediss"
    return with_credentials(settings.redis_url, user, secret, **(trust if tls else {}))


def _pg_dsn(settings: Settings, dsn: str, user: str | None, secret: str | None) -> str:
    return with_credentials(
        dsn, user, secret, sslmode="verify-full", sslrootcert=str(ca_file(settings))
    )


def service_env(settings: Settings, paths: Paths, service: str) -> dict[str, str]:
    """The ``F2PIPE_*`` credentials ``service`` runs with: its own, and no one else's.

    Only for servers this state folder started secured; for the others the
    caller's settings stand (a test stack sharing servers started elsewhere).
    """
    env: dict[str, str] = {}
    try:
        who: Principal | None = principal(service, Names.from_settings(settings))
    except ValueError:
        who = None  # the simulator: no server rights at all
    if is_secured(paths, "postgres"):
        role = None if who is None else who.pg_role
        secret = None if role is None else password(paths, f"postgres-{role}")
        for name, dsn in (
            ("METADATA_DSN", settings.metadata_dsn),
            ("TIMESERIES_DSN", settings.timeseries_dsn),
        ):
            env[f"F2PIPE_{name}"] = _pg_dsn(settings, dsn, role, secret)
    if is_secured(paths, "redis"):
        user = None if who is None else who.redis_user
        secret = None if user is None else password(paths, f"redis-{user}")
        env["F2PIPE_REDIS_URL"] = redis_url(settings, user, secret)
    if is_secured(paths, "kafka"):
        env |= kafka_env(settings, paths, None if who is None else who.kafka_user)
    if stack_secured(paths):
        env["F2PIPE_CERTGEN_URL"] = certgen_url(settings, paths)
        if service == "certgen":
            env["F2PIPE_CERTGEN_TLS"] = "true"
    return env


def withheld_fields(paths: Paths) -> frozenset[str]:
    """Settings a service must not take from its caller: credentials it gets its own of."""
    return KAFKA_CREDENTIAL_FIELDS if is_secured(paths, "kafka") else frozenset()


def admin_env(settings: Settings, paths: Paths) -> dict[str, str]:
    """The operator's full-rights settings for the servers this state folder runs."""
    env = {"F2PIPE_STATE_DIR": str(paths.state)}
    if is_secured(paths, "postgres"):
        # No sslrootcert here: tools cut DSNs at their last "/" to change the database.
        # The server takes TLS only (hostssl), which libpq's default sslmode negotiates.
        user, secret = pg_user(settings), pg_admin_password(paths)
        for key, dsn in (
            ("F2PIPE_METADATA_DSN", settings.metadata_dsn),
            ("F2PIPE_TIMESERIES_DSN", settings.timeseries_dsn),
        ):
            env[key] = with_credentials(dsn, user, secret)
    else:
        env["F2PIPE_METADATA_DSN"] = settings.metadata_dsn
        env["F2PIPE_TIMESERIES_DSN"] = settings.timeseries_dsn
    if is_secured(paths, "redis"):
        secret = password(paths, f"redis-{ADMIN}")
        env["F2PIPE_REDIS_URL"] = redis_url(settings, ADMIN, secret)
    else:
        env["F2PIPE_REDIS_URL"] = settings.redis_url
    env["F2PIPE_KAFKA_BOOTSTRAP"] = settings.kafka_bootstrap
    if is_secured(paths, "kafka"):
        env |= kafka_env(settings, paths, ADMIN)
    else:
        env["F2PIPE_KAFKA_SECURITY_PROTOCOL"] = "PLAINTEXT"
    env["F2PIPE_CERTGEN_URL"] = certgen_url(settings, paths)
    env["F2PIPE_MQTT_HOST"] = settings.mqtt_host
    env["F2PIPE_MQTT_PORT"] = str(settings.mqtt_port)
    return env


def write_admin_env(settings: Settings, paths: Paths) -> Path:
    """Write :func:`admin_env` to ``<state>/admin.env`` (0600, atomically); its path."""
    from f2pipe.pki.ca import write_private

    lines = [
        "# Written by `f2pipe stack up`: an operator's full rights on this stack.",
        "# `set -a; . ./admin.env; set +a` gives a shell (and every f2pipe command) the same.",
        f"# CA certificate: {ca_file(settings)}",
    ]
    lines += [f"{key}={_shell_quote(value)}" for key, value in admin_env(settings, paths).items()]
    path = paths.state / ADMIN_ENV
    write_private(path, ("\n".join(lines) + "\n").encode())
    return path


def _shell_quote(value: str) -> str:
    # Generated passwords are URL-safe, so only paths or URLs could need quoting.
    if all(ch.isalnum() or ch in "@%+=:,./-_?&[]" for ch in value):
        return value
    return "'" + value.replace("'", "'\"'\"'") + "'"


def read_admin_env(path: Path) -> dict[str, str]:
    """The ``F2PIPE_*`` lines of an ``admin.env`` (comments and blanks skipped)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1].replace("'\"'\"'", "'")
        env[key.strip()] = value
    return env


def roles(settings: Settings) -> Iterator[Principal]:
    """The principals holding a PostgreSQL role."""
    return (p for p in principals(Names.from_settings(settings)) if p.pg_role is not None)


def admin_settings(settings: Settings) -> Settings:
    """``settings`` with the operator's credentials of the servers its state folder runs."""
    paths = Paths(settings.state_dir)
    env = admin_env(settings, paths)
    update: dict[str, object] = {
        "metadata_dsn": env["F2PIPE_METADATA_DSN"],
        "timeseries_dsn": env["F2PIPE_TIMESERIES_DSN"],
        "redis_url": env["F2PIPE_REDIS_URL"],
        "certgen_url": env["F2PIPE_CERTGEN_URL"],
    }
    if is_secured(paths, "kafka"):
        update |= kafka_settings(settings, paths, ADMIN)
    return settings.model_copy(update=update)


def write_owned(path: Path, text: str, owner: pwd.struct_passwd | None) -> None:
    from f2pipe.pki.ca import write_private

    write_private(path, text.encode())
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def write_private_text(path: Path, text: str) -> None:
    """``text`` to ``path``, mode 0600, atomically."""
    write_owned(path, text, None)


# --------------------------------------------------------------------------- Kafka
#: Settings updates for a client of a Kafka without security.
PLAIN_KAFKA: dict[str, object] = {
    "kafka_security_protocol": "PLAINTEXT",
    "kafka_sasl_mechanism": None,
    "kafka_sasl_username": None,
    "kafka_sasl_password": None,
    "kafka_sasl_password_file": None,
    "kafka_ssl_ca_location": None,
    "kafka_ssl_certificate_location": None,
    "kafka_ssl_key_location": None,
}

#: Settings no service inherits from its caller once Kafka is secured.
KAFKA_CREDENTIAL_FIELDS = frozenset(name for name in PLAIN_KAFKA if name.startswith("kafka_s"))


def kafka_settings(
    settings: Settings, paths: Paths, user: str, mechanism: str = "SCRAM-SHA-512"
) -> dict[str, object]:
    """Settings updates for a client of the secured stack's Kafka as ``user``."""
    return PLAIN_KAFKA | {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": mechanism,
        "kafka_sasl_username": user,
        "kafka_sasl_password": SecretStr(password(paths, f"kafka-{user}")),
        "kafka_ssl_ca_location": ca_file(settings),
    }


def kafka_env(settings: Settings, paths: Paths, user: str | None) -> dict[str, str]:
    """``F2PIPE_KAFKA_*`` for ``user`` (None: TLS to the broker, but no credentials)."""
    env = {
        "F2PIPE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "F2PIPE_KAFKA_SSL_CA_LOCATION": str(ca_file(settings)),
    }
    if user is not None:
        env["F2PIPE_KAFKA_SASL_MECHANISM"] = "SCRAM-SHA-512"
        env["F2PIPE_KAFKA_SASL_USERNAME"] = user
        env["F2PIPE_KAFKA_SASL_PASSWORD"] = password(paths, f"kafka-{user}")
    return env
