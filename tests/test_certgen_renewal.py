"""The CRL kept alive while certgen serves, and what tells the operator it is running out."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path

import pytest

from conftest import wait_until
from f2pipe.pki import renewal
from f2pipe.pki.ca import CertificateAuthority, pki_paths
from f2pipe.pki.state import ensure_pki, write_crl
from f2pipe.settings import Settings
from pki_fixtures import assert_crl_keeps, register_database, register_dsn, settings

__all__ = ["register_database", "register_dsn", "settings"]  # fixtures used by name

pytestmark = pytest.mark.servers


def test_crl_renewal_survives_every_failure_and_renews_once_it_can(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ensure_pki(settings)
    paths = pki_paths(settings)
    ca = CertificateAuthority.load(paths, None)
    revoked_at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    write_crl(ca, paths, [(4242, revoked_at)], days=1)  # due: far less than half of 90 days
    # First the CA key is missing (CertError), then something unforeseen (RuntimeError).
    aside = tmp_path / "ca.key.aside"
    paths.ca_key.rename(aside)
    real_refresh = renewal.refresh_crl
    surprises = [RuntimeError("disk on fire"), OSError(28, "No space left on device")]

    def refresh(*args: object, **kwargs: object) -> bool:
        if surprises:
            raise surprises.pop(0)
        return real_refresh(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(renewal, "refresh_crl", refresh)
    renewer = renewal.CrlRenewer(settings, check_every=0.05, retry_after=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=renewer.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.ERROR, logger="f2pipe.pki.renewal"):
        thread.start()
        try:
            wait_until(lambda: renewer.failures >= 3, timeout=30, what="failed attempts")
            assert thread.is_alive()
            assert renewer.renewals == 0
            aside.rename(paths.ca_key)
            wait_until(lambda: renewer.renewals == 1, timeout=30, what="the CRL renewed")
            assert thread.is_alive()
        finally:
            stop.set()
            thread.join(timeout=10)
    errors = [r.error for r in caplog.records if r.getMessage() == "CRL renewal failed; will retry"]  # type: ignore[attr-defined]
    assert any("CertError" in e and "ca.key" in e for e in errors), errors
    assert any("RuntimeError: disk on fire" in e for e in errors), errors
    assert any("OSError" in e for e in errors), errors
    assert_crl_keeps(paths.crl, 4242, revoked_at, valid_days=89)


def test_a_crl_that_is_not_due_is_left_alone(settings: Settings) -> None:
    ensure_pki(settings)
    before = pki_paths(settings).crl.read_bytes()
    assert renewal.CrlRenewer(settings).step() is False
    assert pki_paths(settings).crl.read_bytes() == before


def test_a_crl_with_nothing_new_to_list_is_not_rewritten(settings: Settings) -> None:
    # certgen start-up brings the CRL in line with the register: with nothing newly
    # revoked the file stays byte for byte, so a broker reloading on change does not.
    from f2pipe.pki.revocation import refresh_crl

    ensure_pki(settings)
    paths = pki_paths(settings)
    before = paths.crl.read_bytes()
    ca = CertificateAuthority.load(paths, None)
    assert refresh_crl(settings, ca, None) is False
    assert paths.crl.read_bytes() == before
    paths.crl.unlink()  # none at all: one is written
    assert refresh_crl(settings, ca, None) is False
    assert paths.crl.is_file()
