"""Shares: each party gets the CA certificate, the CRL and its own key, never the CA key."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

from f2pipe.pki.ca import pki_paths
from f2pipe.pki.local import load_ca
from f2pipe.pki.state import SHARES, ensure_pki, write_crl
from f2pipe.settings import load_settings


def _files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_every_share_holds_exactly_its_partys_files(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    shares = settings.state_dir / SHARES
    for party in ("broker", "svc-connector", "prometheus"):
        (shares / party).mkdir(parents=True)
    ensure_pki(settings)
    public = {"ca.pem": 0o644, "crl.pem": 0o644}
    assert _files(shares / "broker") == {**public, "broker.pem": 0o644, "broker.key": 0o640}
    assert _files(shares / "svc-connector") == {
        **public,
        "services/svc-connector.pem": 0o644,
        "services/svc-connector.key": 0o640,
    }
    assert _files(shares / "prometheus") == public
    paths = pki_paths(settings)
    assert (shares / "broker/broker.key").read_bytes() == paths.broker_key.read_bytes()
    assert not any(p.name == "ca.key" for p in shares.rglob("*"))

    # A new CRL reaches every share at once; an unchanged one rewrites nothing.
    before = (shares / "broker/crl.pem").stat().st_ino
    assert ensure_pki(settings).created == []
    assert (shares / "broker/crl.pem").stat().st_ino == before
    write_crl(load_ca(settings), paths, [(12345, dt.datetime.now(dt.UTC))], 90)
    for party in ("broker", "svc-connector", "prometheus"):
        assert (shares / party / "crl.pem").read_bytes() == paths.crl.read_bytes()


def test_without_shares_nothing_is_written_beside_the_pki(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    ensure_pki(settings)
    assert not (settings.state_dir / SHARES).exists()
