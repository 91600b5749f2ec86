"""Keeping the CRL alive while certgen serves.

The broker refuses every client once its CRL is past nextUpdate, so the CRL is
renewed when half of its validity has run out, and the broker reloaded. The
renewer must never die: any failure (the CA key unreadable, the disk full, the
register down) is logged and tried again after ``retry_after`` seconds. Without
the register the CRL is still renewed, from the entries it already lists
(every revocation is written to the file as well, so none is lost).
"""

from __future__ import annotations

import logging
import threading

from f2pipe.pki.local import crl_due, load_ca, open_store
from f2pipe.pki.revocation import refresh_crl, reload_and_refresh
from f2pipe.settings import Settings

__all__ = ["CrlRenewer"]

log = logging.getLogger(__name__)


class CrlRenewer:
    """Checks every ``check_every`` seconds whether the CRL is due, and renews it.

    ``run`` blocks until ``stop`` is set (run it in a thread); ``step`` is one
    check and may raise. ``renewals`` and ``failures`` count what happened, for
    the tests and the log.
    """

    def __init__(
        self,
        settings: Settings,
        check_every: float = 3600.0,
        retry_after: float = 60.0,
        reload_first: bool = False,
    ) -> None:
        self.settings = settings
        self.check_every = check_every
        self.retry_after = retry_after
        self.renewals = 0
        self.failures = 0
        # The CRL file was renewed before the server started, the broker not yet told.
        self._reload_pending = reload_first

    def step(self) -> bool:
        """Renew the CRL if due and reload the broker; True if renewed. Raises on failure."""
        if self._reload_pending:
            reload_and_refresh(self.settings)
            self._reload_pending = False
        if not crl_due(self.settings):
            return False
        ca = load_ca(self.settings)
        store = open_store(self.settings, required=False)
        try:
            reloaded = refresh_crl(self.settings, ca, store, force=True)
        finally:
            if store is not None:
                store.close()
        self.renewals += 1
        log.info(
            "CRL renewed",
            extra={"register": store is not None, "broker_reloaded": reloaded},
        )
        return True

    def run(self, stop: threading.Event) -> None:
        """Check at once, then every ``check_every`` s; after a failure, every ``retry_after`` s."""
        delay = 0.0
        while not stop.wait(delay):
            try:
                self.step()
                delay = self.check_every
            except Exception as exc:  # whatever it is, the next try may succeed
                self.failures += 1
                delay = self.retry_after
                log.error(
                    "CRL renewal failed; will retry",
                    extra={
                        "error": f"{type(exc).__name__}: {exc}",
                        "retry_in_s": self.retry_after,
                        "failures": self.failures,
                    },
                )
