"""The server images of a container deployment: the local stack's servers, pinned.

The local stack runs PostgreSQL 15 (or newer) and Redis 7 from Debian, Mosquitto 2 from
Debian and Kafka from the jars ``deploy/kafka/pom.xml`` pins; a deployment
runs the official images of the same major versions, and of exactly the same
Kafka version, so both exercise the same servers (SPEC sections 8 and 10).
A version bump is made here (or in the pom), and the committed compose file
follows on the next ``f2pipe deploy render``.
"""

from __future__ import annotations

from dataclasses import dataclass

from f2pipe.operations.stack.install import kafka_version
from f2pipe.operations.stack.pgcluster import MIN_MAJOR

__all__ = [
    "MOSQUITTO_MAJOR",
    "POSTGRES_MAJOR",
    "REDIS_MAJOR",
    "Images",
    "images",
]

#: The PostgreSQL major the local stack needs at least (it runs the newest it finds).
POSTGRES_MAJOR = str(MIN_MAJOR)
#: Redis and Mosquitto majors of the local stack (Debian's redis-server and mosquitto).
REDIS_MAJOR = "7"
MOSQUITTO_MAJOR = "2"

# Minor and patch releases within those majors, chosen for the images.
_REDIS = f"{REDIS_MAJOR}.4-bookworm"
_MOSQUITTO = f"{MOSQUITTO_MAJOR}.0.22"
_TIMESCALE = f"2.19.3-pg{POSTGRES_MAJOR}"


@dataclass(frozen=True)
class Images:
    """One pinned image reference per server."""

    postgres: str
    timescaledb: str
    redis: str
    kafka: str
    mosquitto: str
    broker: str  # mosquitto with f2pipe's retain guard plugin, built by compose
    prometheus: str
    grafana: str
    f2pipe: str


def images() -> Images:
    """The images a deployment runs; Kafka's version is the pom's (raises StackError if unread)."""
    return Images(
        postgres=f"postgres:{POSTGRES_MAJOR}-bookworm",
        timescaledb=f"timescale/timescaledb:{_TIMESCALE}",
        redis=f"redis:{_REDIS}",
        kafka=f"apache/kafka:{kafka_version()}",
        mosquitto=f"eclipse-mosquitto:{_MOSQUITTO}",
        broker=f"f2pipe-mosquitto:{_MOSQUITTO}",
        prometheus="prom/prometheus:v3.5.0",
        grafana="grafana/grafana:12.1.0",
        f2pipe="f2pipe:latest",
    )
