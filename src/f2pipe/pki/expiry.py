"""When the PKI runs out: the CRL's nextUpdate and the CA's notAfter.

Either date takes the whole fleet offline when it passes: Mosquitto refuses
every client once its CRL is past nextUpdate, and no certificate outlives the
CA that signed it. certgen exports both as metrics
(``f2pipe_certgen_crl_next_update_seconds``, ``f2pipe_certgen_ca_not_after_seconds``);
:func:`expiry_warnings` is what ``f2pipe status`` prints a week ahead.
Reads files only; never raises.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

__all__ = ["WARN_BEFORE", "PkiExpiry", "expiry_warnings", "pki_expiry"]

#: How long before either date ``f2pipe status`` starts warning.
WARN_BEFORE = dt.timedelta(days=7)


@dataclass(frozen=True)
class PkiExpiry:
    """The two dates (UTC), None where the file is missing or unreadable."""

    crl_next_update: dt.datetime | None
    ca_not_after: dt.datetime | None
    problems: tuple[str, ...] = ()


def pki_expiry(pki_dir: Path) -> PkiExpiry:
    """Read ``<pki_dir>/crl.pem`` and ``ca.pem``; a missing file is a None, not a problem."""
    problems: list[str] = []
    crl_next: dt.datetime | None = None
    ca_after: dt.datetime | None = None
    crl_path, ca_path = pki_dir / "crl.pem", pki_dir / "ca.pem"
    try:
        crl_next = x509.load_pem_x509_crl(crl_path.read_bytes()).next_update_utc
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        problems.append(f"cannot read the CRL {crl_path}: {exc}")
    try:
        ca_after = x509.load_pem_x509_certificate(ca_path.read_bytes()).not_valid_after_utc
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        problems.append(f"cannot read the CA certificate {ca_path}: {exc}")
    return PkiExpiry(crl_next, ca_after, tuple(problems))


def _left(when: dt.datetime, now: dt.datetime) -> str:
    seconds = (when - now).total_seconds()
    if seconds <= 0:
        return f"expired at {when:%Y-%m-%d %H:%M} UTC"
    if seconds < 86400:
        return f"expires in {seconds / 3600:.0f} h ({when:%Y-%m-%d %H:%M} UTC)"
    return f"expires in {seconds / 86400:.0f} days ({when:%Y-%m-%d %H:%M} UTC)"


def expiry_warnings(
    state_dir: Path, now: dt.datetime | None = None, within: dt.timedelta = WARN_BEFORE
) -> list[str]:
    """One line per problem: a CRL or CA that expires within ``within`` (or has), or
    cannot be read, or a CA without a CRL. Empty when all is well or there is no
    PKI yet (``<state>/pki/ca.pem`` missing)."""
    pki_dir = state_dir / "pki"
    now = now or dt.datetime.now(dt.UTC)
    expiry = pki_expiry(pki_dir)
    warnings = list(expiry.problems)
    if expiry.ca_not_after is not None and expiry.ca_not_after - now < within:
        warnings.append(
            f"the CA certificate {pki_dir / 'ca.pem'} {_left(expiry.ca_not_after, now)}: "
            "every certificate it signed stops working then; plan a new CA and re-issue"
        )
    if expiry.crl_next_update is not None and expiry.crl_next_update - now < within:
        warnings.append(
            f"the CRL {pki_dir / 'crl.pem'} {_left(expiry.crl_next_update, now)}: the broker "
            "then refuses every client; certgen renews it when half of it has run out "
            "(see its log), and a restart of certgen renews it and reloads the broker"
        )
    elif (
        expiry.crl_next_update is None
        and (pki_dir / "ca.pem").is_file()
        and not any("CRL" in p for p in expiry.problems)
    ):
        warnings.append(f"no CRL at {pki_dir / 'crl.pem'}: run `f2pipe certgen init`")
    return warnings
