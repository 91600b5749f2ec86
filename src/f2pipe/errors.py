"""The package's exceptions.

Every error f2pipe raises on purpose derives from :class:`F2PipeError`, so the
CLI can print one line naming the cause and the fix and exit non-zero. The
classes defined here are the ones several parts raise; the others live beside
the one module that raises them (shown after the dash)::

    F2PipeError
    ├── ConfigError             a bad setting or environment variable
    ├── StackError              a local server could not be installed, started or reached
    ├── MigrationError          the database schema could not be brought up to date
    ├── FleetError              a fleet file entry is invalid (names the line)
    ├── CertError               a certificate could not be issued, parsed or revoked
    │   └── ClaimAlreadyUsed    — pki.store: a concurrent request used the claiming code first
    ├── MetadataUnavailable     the metadata database cannot be reached (retry, never guess)
    ├── DatabaseUnavailable     the database cannot take a write now (down, restarting,
    │                           or failing in a way retrying may cure)
    ├── DecodeError             — core.decode: a message cannot become readings; carries
    │                           its dead-letter reason and detail
    ├── Stopping                — runtime.kafka: a wait for Kafka ended by a stop at once
    ├── MalformedPacket         — runtime.mqttwire: bytes that are not an MQTT packet
    ├── DeadLettersUndelivered  — sink.settle: Kafka refused a sink dead letter
    ├── DeadLetterError         — tools.dlqread: dead letters cannot be read or replayed
    ├── CommandError            — tools.cmnd: a command could not be sent
    └── MqttError               — tools.simulator.client: the simulator's broker connection failed

Library exceptions (psycopg, confluent_kafka, paho) are translated into these at
the boundary where a user-facing decision is made; inside the hot paths they are
handled where they occur.
"""


class F2PipeError(Exception):
    """Base of every error f2pipe raises on purpose."""


class ConfigError(F2PipeError):
    """A setting is missing or invalid; the message names the variable."""


class StackError(F2PipeError):
    """A local server could not be installed, started, stopped or reached."""


class MigrationError(F2PipeError):
    """The schema could not be migrated."""


class FleetError(F2PipeError):
    """A fleet description is invalid; nothing of it was written."""


class CertError(F2PipeError):
    """A certificate operation failed."""


class MetadataUnavailable(F2PipeError):
    """The metadata database could not answer; the caller pauses and retries.

    Never a verdict on the message: a lookup that failed is not an unknown device.
    """


class DatabaseUnavailable(F2PipeError):
    """A write could not be done for a reason of the database, not of the data.

    The caller keeps what it was writing and retries later (back-pressure);
    nothing of the failed transaction was committed, or, if the connection
    broke during COMMIT, the outcome is unknown and the write must be idempotent.
    """
