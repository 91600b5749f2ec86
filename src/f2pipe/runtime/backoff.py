"""Jittered exponential backoff for reconnecting MQTT clients (connector, simulated devices).

Random jitter keeps a fleet of clients that lost the same broker from
reconnecting in lockstep: thousands of TLS handshakes at the same instant
overflow the broker's accept queue and its CPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Delays in ``[ceiling / 4, ceiling]``, ``ceiling = min(cap, base * 2**attempts)``.

    The lower bound keeps a retry from coming back almost at once after a
    refused attempt; :meth:`reset` after a success starts again from ``base``.
    """

    base: float = 0.25
    cap: float = 30.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempts))
        self.attempts = min(self.attempts + 1, 30)
        return self.rng.uniform(ceiling / 4, ceiling)

    def reset(self) -> None:
        self.attempts = 0
