"""The CA on disk: passphrases, idempotence, CRL renewal and expiry, secret files and
the admin token. Pure files, no servers."""

from __future__ import annotations

import datetime as dt
import secrets
import stat
from pathlib import Path

import pytest
from cryptography import x509

from f2pipe.errors import CertError, ConfigError
from f2pipe.pki.auth import admin_token, check_admin_token
from f2pipe.pki.ca import CertificateAuthority, parse_serial, pki_paths, serial_text
from f2pipe.pki.expiry import expiry_warnings
from f2pipe.pki.state import ensure_pki, write_crl
from f2pipe.settings import load_settings
from pki_fixtures import assert_crl_keeps


def test_passphrase_protects_the_ca_key(tmp_path: Path) -> None:
    protected = load_settings(state_dir=tmp_path, ca_passphrase="correct horse")
    ensure_pki(protected)
    key = pki_paths(protected).ca_key.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in key
    with pytest.raises(CertError, match="F2PIPE_CA_PASSPHRASE"):
        ensure_pki(load_settings(state_dir=tmp_path))
    with pytest.raises(CertError, match="cannot decrypt"):
        ensure_pki(load_settings(state_dir=tmp_path, ca_passphrase="wrong"))
    secret = tmp_path / "passphrase"
    secret.write_text("correct horse\n")
    assert ensure_pki(load_settings(state_dir=tmp_path, ca_passphrase_file=secret)).created == []


def test_broker_names_reissue_the_server_certificate(tmp_path: Path) -> None:
    ensure_pki(load_settings(state_dir=tmp_path))
    report = ensure_pki(load_settings(state_dir=tmp_path, broker_names="mosquitto, 10.0.0.5"))
    assert str(pki_paths(load_settings(state_dir=tmp_path)).broker_cert) in report.created
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "broker.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "mosquitto"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "::1",
        "10.0.0.5",
    }


def test_each_server_certificate_names_the_host_its_clients_use(tmp_path: Path) -> None:
    from f2pipe.operations.stack.security import server_tls

    settings = load_settings(
        state_dir=tmp_path, mqtt_host="mqtt.example.test",
        certgen_host="0.0.0.0",  # noqa: S104 - an unspecified address names nothing
        certgen_url="https://certgen.example.test:8080",
    )  # fmt: skip
    ensure_pki(settings)

    def names(path: Path) -> set[str]:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(name) for name in san.get_values_for_type(x509.DNSName)} | {
            str(ip) for ip in san.get_values_for_type(x509.IPAddress)
        }

    loopback = {"localhost", "127.0.0.1", "::1"}
    assert names(tmp_path / "pki" / "broker.pem") == loopback | {"mqtt.example.test"}
    assert names(tmp_path / "pki" / "certgen.pem") == loopback | {"certgen.example.test"}
    folder = tmp_path / "pg"
    folder.mkdir()
    cert, _key = server_tls(settings, folder, "f2pipe postgres", None, "pg.example.test")
    assert names(cert) == loopback | {"pg.example.test"}
    issued = cert.read_bytes()
    server_tls(settings, folder, "f2pipe postgres", None, "pg.example.test")
    assert cert.read_bytes() == issued  # kept while it names the host
    server_tls(settings, folder, "f2pipe postgres", None, "10.0.0.7")
    assert names(cert) == loopback | {"10.0.0.7"}


def test_crl_is_renewed_at_half_life_and_keeps_its_entries(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, crl_days=10)
    ensure_pki(settings)
    paths = pki_paths(settings)
    ca = CertificateAuthority.load(paths, None)
    revoked_at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    write_crl(ca, paths, [(12345, revoked_at)], days=4)  # less than half of 10 days left
    report = ensure_pki(settings)
    assert str(paths.crl) in report.created
    assert_crl_keeps(paths.crl, 12345, revoked_at, valid_days=9)


def test_serials_are_unique_and_parse_in_openssl_form(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(days=1)
    serials = {ca.issue_device("aabbccddee01", days=1).serial for _ in range(200)}
    assert len(serials) == 200
    serial = next(iter(serials))
    colon = ":".join(serial.upper().zfill(40)[i : i + 2] for i in range(0, 40, 2))
    assert serial_text(parse_serial(colon)) == serial
    assert serial_text(parse_serial("0x" + serial)) == serial
    for bad in ["", "xyz", "1" * 41]:
        with pytest.raises(ValueError, match="not a certificate serial"):
            parse_serial(bad)


def test_expiry_warnings_come_a_week_ahead(tmp_path: Path) -> None:
    assert expiry_warnings(tmp_path) == []  # no PKI yet: nothing to warn about
    settings = load_settings(state_dir=tmp_path)
    ensure_pki(settings)
    assert expiry_warnings(tmp_path) == []
    paths = pki_paths(settings)
    ca = CertificateAuthority.load(paths, None)
    write_crl(ca, paths, [], days=6)
    (crl_warning,) = expiry_warnings(tmp_path)
    assert "crl.pem expires in 6 days" in crl_warning
    assert "refuses every client" in crl_warning
    assert expiry_warnings(tmp_path, within=dt.timedelta(days=5)) == []
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=7)
    assert "expired at" in expiry_warnings(tmp_path, now=later)[0]
    # The CA: ten years by default, so a week before its end.
    assert ca.certificate.not_valid_after_utc is not None
    near_end = ca.certificate.not_valid_after_utc - dt.timedelta(days=3)
    warnings = expiry_warnings(tmp_path, now=near_end)
    assert any("ca.pem expires in 3 days" in w for w in warnings), warnings
    paths.crl.unlink()
    assert expiry_warnings(tmp_path) == [f"no CRL at {paths.crl}: run `f2pipe certgen init`"]
    paths.crl.write_text("not a CRL")
    assert expiry_warnings(tmp_path)[0].startswith(f"cannot read the CRL {paths.crl}")


def test_secret_files_left_open_to_others_are_made_owner_only(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    ensure_pki(settings)
    token = admin_token(settings).get_secret_value()
    paths = pki_paths(settings)
    token_file = tmp_path / "admin-token"
    for path in (paths.ca_key, token_file):
        path.chmod(0o644)
    CertificateAuthority.load(paths, None)
    assert admin_token(settings).get_secret_value() == token
    for path in (paths.ca_key, token_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("change-me-admin-token", "too short"),
        ("change-me-admin-token-0123456789abcdef", "placeholder"),
        ("please-replace-me-with-a-real-token-now", "placeholder"),
        ("abcabcabcabcabcabcabcabcabcabcabcabc", "not random"),
    ],
)
def test_weak_admin_tokens_are_refused(tmp_path: Path, token: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as refused:
        admin_token(load_settings(state_dir=tmp_path, admin_token=token))
    assert token not in str(refused.value)
    secret = tmp_path / "token"
    secret.write_text(token + "\n")
    with pytest.raises(ConfigError, match=why):
        admin_token(load_settings(state_dir=tmp_path, admin_token_file=secret))


def test_generated_and_openssl_tokens_are_accepted(tmp_path: Path) -> None:
    generated = admin_token(load_settings(state_dir=tmp_path)).get_secret_value()
    check_admin_token(generated, "generated")
    for _ in range(200):
        check_admin_token(secrets.token_hex(16), "openssl rand -hex 16")
        check_admin_token(secrets.token_hex(32), "openssl rand -hex 32")
