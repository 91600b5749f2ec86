"""Kafka client errors that only an operator can fix, named with the setting to change.

A wrong password, a certificate the client cannot verify, or an ACL the
principal lacks do not pass by themselves: the client keeps reconnecting and
the stage would wait forever, ready in name only. :class:`KafkaTrouble` hears
the clients' errors (their ``error_cb``), logs one ERROR line a minute that
names the setting and the fix, and makes the stage's readiness check fail with
that line while the error keeps coming back. No secret is ever part of it.
"""

from __future__ import annotations

import logging
import re
import time

from confluent_kafka import KafkaError

from f2pipe.runtime.opsserver import NotReady
from f2pipe.settings import Settings

__all__ = ["KafkaTrouble", "describe"]

log = logging.getLogger(__name__)

#: An error not heard again for this long is taken as gone (the client retries every
#: few seconds, so a lasting one is heard well within it).
RECENT_S = 30.0
#: The same line is logged at most once per this many seconds.
LOG_EVERY_S = 60.0
#: An error that passes by itself is logged at most once per this many seconds.
WARN_EVERY_S = 5.0

_ADDRESS = re.compile(r"^\S+://\S+: ")
_STATE = re.compile(r" \(after \d+ms in state \w+\)$")

_AUTHORIZATION = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "a topic",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "its consumer group",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "the cluster",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "its transactional id",
}


def describe(err: KafkaError, user: str | None) -> str | None:
    """One line naming what to fix for ``err``; None for an error that passes by itself."""
    code = err.code()
    who = f"SASL user {user!r}" if user else "this client"
    if code in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        return (
            f"Kafka refused the credentials of {who}: check F2PIPE_KAFKA_SASL_USERNAME and"
            " F2PIPE_KAFKA_SASL_PASSWORD (or F2PIPE_KAFKA_SASL_PASSWORD_FILE)"
        )
    if code == KafkaError._SSL:
        # The client's text says which check failed (no secret in it); the broker's
        # address, the connection state and the client's own advice are left out.
        text = _ADDRESS.sub("", _STATE.sub("", err.str()))
        why = text.partition(", ")[0][:200] or "TLS handshake failed"
        return (
            f"TLS to Kafka failed ({why}): check F2PIPE_KAFKA_SSL_CA_LOCATION and that the"
            " broker's certificate names the host in F2PIPE_KAFKA_BOOTSTRAP"
        )
    if code in _AUTHORIZATION:
        return (
            f"Kafka's ACLs refuse {who} access to {_AUTHORIZATION[code]}: grant it"
            " (`f2pipe stack up` does for the local stack; `deploy/kafka` for a deployment)"
        )
    return None


class KafkaTrouble:
    """What an operator must fix in this process's Kafka clients, if anything.

    Pass :meth:`heard` as each client's ``error_cb`` (and give it the errors that
    come with consumed messages), and call :meth:`check` from the readiness check.
    """

    def __init__(self, settings: Settings) -> None:
        self._user = settings.kafka_sasl_username
        self._line: str | None = None
        self._heard_at = 0.0
        self._logged: dict[str, float] = {}

    def heard(self, err: KafkaError) -> None:
        """A client's error: one only an operator can fix is logged as ERROR with the
        fix, at most once a minute; any other as a WARNING, at most once per 5 s for
        each kind (the client retries on its own)."""
        now = time.monotonic()
        line = describe(err, self._user)
        if line is not None:
            self._line, self._heard_at = line, now
            if now - self._logged.get(line, -LOG_EVERY_S) >= LOG_EVERY_S:
                self._logged[line] = now
                log.error(line)
            return
        kind = str(err.code())
        if now - self._logged.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._logged[kind] = now
            log.warning("kafka client error", extra={"error": str(err)})

    def reason(self) -> str | None:
        """The line for an error heard in the last :data:`RECENT_S` seconds, else None."""
        if self._line is not None and time.monotonic() - self._heard_at < RECENT_S:
            return self._line
        return None

    def check(self) -> None:
        """Raise :class:`NotReady` with the line while such an error keeps coming back."""
        if (line := self.reason()) is not None:
            raise NotReady(line)
