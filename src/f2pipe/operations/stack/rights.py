"""The rights of :mod:`f2pipe.operations.principals` applied to the local servers.

PostgreSQL: authentication and TLS of the cluster before each start, the
services' login roles and their grants; Redis: the ACL file; Kafka: the SCRAM
users and their ACLs. Passwords, certificates and markers come from
:mod:`.security`. Nothing here puts a secret in a message.
"""

from __future__ import annotations

import pwd
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from f2pipe.errors import StackError
from f2pipe.operations.principals import ADMIN, Names, principals
from f2pipe.operations.stack.security import (
    mark,
    password,
    pg_admin_password,
    pg_user,
    roles,
    server_tls,
    write_owned,
)
from f2pipe.operations.stack.supervise import LOOPBACK, Paths, is_loopback
from f2pipe.settings import Settings

__all__ = ["create_roles", "grant", "kafka_users_and_acls", "redis_acl", "secure_postgres"]


_PG_CONF = "f2pipe-security.conf"
_HBA = {
    True: "# Written by `f2pipe stack` at each start: a password (scram-sha-256) over TLS,\n"
    "# on loopback only; no trust, no clear text.\n"
    "hostssl all all 127.0.0.1/32 scram-sha-256\n"
    "hostssl all all ::1/128 scram-sha-256\n",
    False: "# Written by `f2pipe stack` at each start: F2PIPE_STACK_SECURED=false, so trust\n"
    "# on loopback only (experiments); nothing else may connect.\n"
    "host all all 127.0.0.1/32 trust\n"
    "host all all ::1/128 trust\n",
}


def secure_postgres(
    settings: Settings, paths: Paths, data: Path, postgres: Path, owner: pwd.struct_passwd | None
) -> None:
    """Before each start of the cluster in ``data``: authentication and TLS for the mode.

    Secured: ``hostssl`` + scram-sha-256 only, the server certificate from the
    CA, and the superuser's password (run through single-user mode, so the
    server never runs a moment without it). Plain: trust on loopback.
    """
    secured = settings.stack_secured
    host = urlsplit(settings.metadata_dsn).hostname or LOOPBACK
    main = data / "postgresql.conf"
    include = f"include_if_exists = '{_PG_CONF}'\n"
    text = main.read_text()
    if include not in text:
        main.write_text(text + ("" if text.endswith("\n") else "\n") + include)
    if secured:
        server_tls(settings, data, "f2pipe postgres", owner, host)
        conf = (
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
            "ssl_min_protocol_version = 'TLSv1.2'\npassword_encryption = 'scram-sha-256'\n"
        )
    else:
        conf = "ssl = off\n"
    write_owned(data / _PG_CONF, "# Written by `f2pipe stack` at each start.\n" + conf, owner)
    hba = _HBA[secured]
    if secured and not is_loopback(host):
        # Served on another address: clients of the networks it is on, over TLS only.
        hba += f"# F2PIPE_METADATA_DSN names {host}:\nhostssl all all samenet scram-sha-256\n"
    write_owned(data / "pg_hba.conf", hba, owner)
    if secured:
        _set_pg_password(postgres, data, pg_user(settings), pg_admin_password(paths), owner)
    mark(paths, "postgres", secured)


def _set_pg_password(
    postgres: Path, data: Path, user: str, secret: str, owner: pwd.struct_passwd | None
) -> None:
    import subprocess

    from psycopg import sql

    statement = sql.SQL("ALTER ROLE {} PASSWORD {};\n").format(
        sql.Identifier(user), sql.Literal(secret)
    )
    result = subprocess.run(
        # log_min_error_statement=panic: a failing statement is never echoed with its password.
        [str(postgres), "--single", "-D", str(data), "-c", "log_min_error_statement=panic",
         "-c", "ssl=off", "postgres"],
        input=statement.as_string(None).encode(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, cwd=data, check=False,
        user=None if owner is None else owner.pw_uid,
        group=None if owner is None else owner.pw_gid,
        extra_groups=None if owner is None else [],
    )  # fmt: skip
    errors = [line for line in result.stderr.decode(errors="replace").splitlines() if line]
    failed = next((line for line in errors if "ERROR" in line or "FATAL" in line), None)
    if result.returncode != 0 or failed:
        why = failed or (errors[-1] if errors else f"exit code {result.returncode}")
        raise StackError(f"setting the PostgreSQL password of {user} failed: {why}")


def create_roles(conn: object, settings: Settings, paths: Paths) -> None:
    """Each service's login role with its generated password (created or updated)."""
    from psycopg import Connection, sql

    assert isinstance(conn, Connection)
    for who in roles(settings):
        assert who.pg_role is not None
        secret = password(paths, f"postgres-{who.pg_role}")
        found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (who.pg_role,))
        verb = "ALTER" if found.fetchone() else "CREATE"
        conn.execute(
            sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                sql.SQL(verb), sql.Identifier(who.pg_role), sql.Literal(secret)
            )
        )


def grant(settings: Settings, dsn: str) -> None:
    """Give each service's role its grants on the tables that exist in ``dsn``'s database."""
    import dataclasses

    import psycopg

    from f2pipe.operations.principals import pg_grant_sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        known = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
        existing = {
            row[0]
            for row in conn.execute(
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            )
        }
        for who in roles(settings):
            if who.pg_role not in known:
                continue
            grants = tuple(
                dataclasses.replace(g, tables=tables)
                for g in who.pg_grants
                if (tables := tuple(t for t in g.tables if t in existing))
            )
            with conn.transaction():
                for statement in pg_grant_sql(dataclasses.replace(who, pg_grants=grants)):
                    conn.execute(statement.encode())


# --------------------------------------------------------------------------- Redis
def redis_acl(settings: Settings, paths: Paths) -> str:
    """The Redis ACL file: the default user off, the operator, each service's user."""
    import hashlib

    from f2pipe.operations.principals import redis_acl_line

    def digest(name: str) -> str:
        return hashlib.sha256(password(paths, f"redis-{name}").encode()).hexdigest()

    lines = ["user default off resetkeys resetchannels -@all"]
    lines.append(f"user {ADMIN} on #{digest(ADMIN)} ~* &* +@all")
    for who in principals(Names.from_settings(settings)):
        if who.redis_user is not None:
            lines.append(redis_acl_line(who, digest(who.redis_user)))
    return "\n".join(lines) + "\n"


def kafka_users_and_acls(admin: Any, settings: Settings, paths: Paths) -> None:
    """SCRAM-SHA-512 credentials of the operator and every service, and exactly their ACLs.

    Idempotent; an ACL of one of these principals that the model no longer
    names is deleted. Raises StackError naming what Kafka refused.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AclBinding,
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    from f2pipe.operations.principals import KafkaAcl

    resources = {
        "topic": ResourceType.TOPIC,
        "group": ResourceType.GROUP,
        "transactional_id": ResourceType.TRANSACTIONAL_ID,
        "cluster": ResourceType.BROKER,
    }

    def binding(user: str, acl: KafkaAcl) -> AclBinding:
        return AclBinding(
            resources[acl.resource],
            "kafka-cluster" if acl.resource == "cluster" else acl.name,
            ResourcePatternType[acl.pattern.upper()],
            f"User:{user}",
            "*",
            AclOperation[acl.operation],
            AclPermissionType.ALLOW,
        )

    who = [p for p in principals(Names.from_settings(settings)) if p.kafka_user is not None]
    users = [ADMIN, *(p.kafka_user for p in who if p.kafka_user is not None)]
    upserts = [
        UserScramCredentialUpsertion(
            user,
            ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
            password(paths, f"kafka-{user}").encode(),
        )
        for user in users
    ]
    wanted = {binding(p.kafka_user, acl) for p in who if p.kafka_user for acl in p.kafka_acls}
    client = admin
    try:
        for future in client.alter_user_scram_credentials(upserts).values():
            future.result(30)
        for p in who:
            found = client.describe_acls(
                AclBindingFilter(
                    ResourceType.ANY,
                    None,  # type: ignore[arg-type]  # None: any name (librdkafka's filter)
                    ResourcePatternType.ANY,
                    f"User:{p.kafka_user}",
                    None,  # type: ignore[arg-type]  # any host
                    AclOperation.ANY,
                    AclPermissionType.ANY,
                )
            ).result(30)
            # delete_acls takes filters; each of these matches exactly one binding.
            stale = [
                AclBindingFilter(
                    b.restype, b.name, b.resource_pattern_type, b.principal, b.host,
                    b.operation, b.permission_type,
                )
                for b in found
                if b not in wanted
            ]  # fmt: skip
            if stale:
                for future in client.delete_acls(stale).values():
                    future.result(30)
        for future in client.create_acls(list(wanted)).values():
            future.result(30)
    except KafkaException as exc:
        raise StackError(f"setting Kafka's users and ACLs failed: {exc.args[0].str()}") from None
