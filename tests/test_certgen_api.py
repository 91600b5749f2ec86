"""certgen's HTTP contract (SPEC section 6) against the real app, served by uvicorn,
with a real PostgreSQL register."""

from __future__ import annotations

import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from f2pipe.core.topics import normalize_mac
from f2pipe.pki.auth import FailureLimiter, admin_token
from f2pipe.pki.ca import pki_paths
from f2pipe.settings import Settings, load_settings
from pki_fixtures import (
    ADMIN_TOKEN,
    Certgen,
    add_claimable_devices,
    add_device,
    certgen,
    register_database,
    register_dsn,
    settings,
)

__all__ = ["certgen", "register_database", "register_dsn", "settings"]  # fixtures used by name

pytestmark = pytest.mark.servers

MAC = "aabbccddee01"
CODE = "claim-7f3a9c2e"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_csr(common_name: str, key: Any = None) -> tuple[str, Any]:
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def post(
    service: Certgen,
    mac: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    **client: Any,
) -> httpx.Response:
    with httpx.Client(base_url=service.url, **client) as http:
        return http.post(f"/v1/devices/{mac}/certificate", json=body, headers=headers or {})


def certificate_rows(settings: Settings) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.metadata_dsn) as conn:
        return conn.execute(
            "SELECT serial, common_name, mac, issued_by, revoked_at FROM certificates "
            "WHERE issued_by IN ('admin', 'claiming_code') ORDER BY issued_at"
        ).fetchall()


def test_admin_token_issues_key_and_certificate(settings: Settings, certgen: Certgen) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    response = post(certgen, MAC, {}, ADMIN)
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {
        "mac",
        "common_name",
        "serial",
        "not_before",
        "not_after",
        "certificate",
        "ca_certificate",
        "private_key",
        "broker_url",
    }
    assert body["mac"] == MAC
    # One broker: every device's is mqtt-1 (several: tests/test_mqtt_brokers.py).
    assert body["broker_url"] == f"mqtts://127.0.0.1:{settings.mqtt_port}"
    assert body["common_name"] == f"f2-{MAC}"
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    ca = x509.load_pem_x509_certificate(body["ca_certificate"].encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"f2-{MAC}"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 365 <= lifetime.days <= 366
    key = serialization.load_pem_private_key(body["private_key"].encode(), None)
    assert key.public_key() == cert.public_key()
    assert format(cert.serial_number, "x") == body["serial"]
    assert certificate_rows(settings) == [(body["serial"], f"f2-{MAC}", MAC, "admin", None)]


def test_csr_returns_no_private_key(settings: Settings, certgen: Certgen) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    csr, key = make_csr(f"f2-{MAC}")
    response = post(certgen, MAC, {"csr": csr}, ADMIN)
    assert response.status_code == 201, response.text
    assert response.json()["private_key"] is None
    cert = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    assert cert.public_key() == key.public_key()


def test_claiming_code_works_once(settings: Settings, certgen: Certgen) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    csr, _ = make_csr(f"f2-{MAC}")
    first = post(certgen, MAC, {"csr": csr, "claiming_code": CODE})
    assert first.status_code == 201, first.text
    assert first.json()["private_key"] is None
    second = post(certgen, MAC, {"csr": csr, "claiming_code": CODE})
    assert second.status_code == 403
    assert "already used" in second.json()["detail"]
    # Afterwards only the operator re-issues.
    assert post(certgen, MAC, {"csr": csr}, ADMIN).status_code == 201
    assert [row[3] for row in certificate_rows(settings)] == ["claiming_code", "admin"]


@pytest.mark.parametrize("form", ["aabbccddee01", "AA:BB:CC:DD:EE:01", "aa-bb-cc-dd-ee-01"])
def test_mac_forms_issue_the_same_identity(settings: Settings, certgen: Certgen, form: str) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    response = post(certgen, form, {}, ADMIN)
    assert response.status_code == 201, response.text
    assert response.json()["common_name"] == "f2-aabbccddee01"
    assert response.json()["mac"] == "aabbccddee01"


@pytest.mark.parametrize(
    ("headers", "why"),
    [({}, "missing admin token"), ({"Authorization": "Bearer wrong"}, "bad admin token")],
)
def test_401_without_a_valid_token(
    settings: Settings, certgen: Certgen, headers: dict[str, str], why: str
) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    response = post(certgen, MAC, {}, headers)
    assert response.status_code == 401
    assert why in response.json()["detail"]
    assert certificate_rows(settings) == []


def test_403_wrong_claiming_code(settings: Settings, certgen: Certgen) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    response = post(certgen, MAC, {"claiming_code": "not-the-code"})
    assert response.status_code == 403
    assert response.json()["detail"] == "wrong claiming code"
    assert certificate_rows(settings) == []


def test_404_unknown_device(settings: Settings, certgen: Certgen) -> None:
    response = post(certgen, "aabbccddee99", {}, ADMIN)
    assert response.status_code == 404
    assert "aabbccddee99" in response.json()["detail"]


def _weak_csr() -> str:
    return make_csr(f"f2-{MAC}", rsa.generate_private_key(public_exponent=65537, key_size=1024))[0]  # noqa: S505 - the point


@pytest.mark.parametrize(
    ("mac", "body", "why"),
    [
        ("aabbccddee0", {}, "not a MAC address"),
        ("aa:bb:cc-dd:ee:01", {}, "not a MAC address"),
        ("gabbccddee01", {}, "not a MAC address"),
        (
            MAC,
            {
                "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE "
                "REQUEST-----\n"
            },
            "malformed CSR",
        ),
        (MAC, {"csr": "hello"}, "malformed CSR"),
        (MAC, {"csr": make_csr("f2-aabbccddee02")[0]}, "CSR common name must be"),
        (MAC, {"csr": make_csr("svc-connector")[0]}, "CSR common name must be"),
        (MAC, {"csr": "WEAK"}, "too weak"),
        (
            MAC,
            {"csr": make_csr(f"f2-{MAC}", ec.generate_private_key(ec.SECP192R1()))[0]},
            "not accepted",
        ),
        (MAC, {"csr": 5}, "bad request"),
    ],
)
def test_400_bad_mac_or_csr(
    settings: Settings, certgen: Certgen, mac: str, body: dict[str, Any], why: str
) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    if body.get("csr") == "WEAK":
        body = {"csr": _weak_csr()}
    response = post(certgen, mac, body, ADMIN)
    assert response.status_code == 400, response.text
    assert why in response.json()["detail"]
    assert certificate_rows(settings) == []


def test_bad_csr_does_not_consume_the_claiming_code(settings: Settings, certgen: Certgen) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    bad = post(certgen, MAC, {"csr": make_csr("f2-000000000000")[0], "claiming_code": CODE})
    assert bad.status_code == 400
    good = post(certgen, MAC, {"csr": make_csr(f"f2-{MAC}")[0], "claiming_code": CODE})
    assert good.status_code == 201


def test_413_body_over_64_kib(settings: Settings, certgen: Certgen) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    response = post(certgen, MAC, {"csr": "A" * (64 * 1024)}, ADMIN)
    assert response.status_code == 413
    assert "larger than 65536" in response.json()["detail"]

    def chunks() -> Any:  # no Content-Length: the limit holds for streamed bodies too
        for _ in range(80):
            yield b"x" * 1024

    with httpx.Client(base_url=certgen.url) as http:
        streamed = http.post(f"/v1/devices/{MAC}/certificate", content=chunks(), headers=ADMIN)
    assert streamed.status_code == 413


def test_sixth_wrong_code_in_a_minute_is_429(settings: Settings, certgen: Certgen) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    codes = [post(certgen, MAC, {"claiming_code": f"guess-{i}"}).status_code for i in range(6)]
    assert codes == [403] * 5 + [429]
    # Blocked means blocked: even the right code is not looked at now.
    blocked = post(certgen, MAC, {"claiming_code": CODE})
    assert blocked.status_code == 429
    assert "too many failed" in blocked.json()["detail"]
    # The limit is per MAC: another device from another address is unaffected.
    add_device(settings.metadata_dsn, "aabbccddee02", "other-code")
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    other = post(certgen, "aabbccddee02", {"claiming_code": "other-code"}, transport=transport)
    assert other.status_code == 201


def test_failures_are_limited_per_client_address(settings: Settings, certgen: Certgen) -> None:
    macs = add_claimable_devices(settings.metadata_dsn, "aabbccdd00", 7)
    transport = httpx.HTTPTransport(local_address="127.0.0.3")
    codes = [
        post(certgen, mac, {"claiming_code": "wrong"}, transport=transport).status_code
        for mac in macs[:6]
    ]
    assert codes == [403] * 5 + [429]
    # A right code for a fresh MAC from the same address is still refused ...
    again = httpx.HTTPTransport(local_address="127.0.0.3")
    assert (
        post(certgen, macs[6], {"claiming_code": f"code-{macs[6]}"}, transport=again).status_code
        == 429
    )
    # ... while another address is served.
    assert post(certgen, macs[6], {"claiming_code": f"code-{macs[6]}"}).status_code == 201


def test_limiter_window_slides() -> None:
    now = [0.0]
    limiter = FailureLimiter(limit=5, window=60, clock=lambda: now[0])
    for _ in range(5):
        assert not limiter.blocked("k")
        limiter.fail("k")
    assert limiter.blocked("k")
    now[0] = 60.5
    assert not limiter.blocked("k")


def test_pki_and_ops_endpoints(settings: Settings, certgen: Certgen) -> None:
    with httpx.Client(base_url=certgen.url) as http:
        ca = http.get("/v1/ca.pem")
        crl = http.get("/v1/crl.pem")
        health = http.get("/healthz")
        ready = http.get("/readyz")
        post(certgen, MAC, {}, ADMIN)  # a refusal, counted
        metrics = http.get("/metrics")
    assert ca.status_code == 200
    assert ca.content == pki_paths(settings).ca_cert.read_bytes()
    assert x509.load_pem_x509_crl(crl.content).is_signature_valid(
        x509.load_pem_x509_certificate(ca.content).public_key()  # type: ignore[arg-type]
    )
    assert health.json() == {"status": "ok"}
    assert ready.json() == {"status": "ready"}
    assert 'f2pipe_certgen_requests_refused_total{status="404"}' in metrics.text


def test_revoke_needs_admin_and_known_serial(settings: Settings, certgen: Certgen) -> None:
    with httpx.Client(base_url=certgen.url) as http:
        assert http.post("/v1/certificates/abc/revoke").status_code == 401
        unknown = http.post("/v1/certificates/abc/revoke", headers=ADMIN)
        bad = http.post("/v1/certificates/xyz/revoke", headers=ADMIN)
    assert unknown.status_code == 404
    assert bad.status_code == 400


def test_admin_token_generated_once_with_mode_0600(tmp_path: Any) -> None:
    settings = load_settings(state_dir=tmp_path)
    first = admin_token(settings).get_secret_value()
    path = tmp_path / "admin-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) >= 40
    assert admin_token(settings).get_secret_value() == first


def test_keys_are_written_0600(settings: Settings, certgen: Certgen) -> None:
    paths = pki_paths(settings)
    keys = [paths.ca_key, paths.broker_key, paths.certgen_key, *paths.services.glob("*.key")]
    assert len(keys) >= 6
    assert {stat.S_IMODE(os.stat(key).st_mode) for key in keys} == {0o600}


def test_normalize_mac_refuses_mixed_forms() -> None:
    assert normalize_mac("AA-BB-CC-DD-EE-01") == "aabbccddee01"
    for bad in ["", "aabbccddee01 x", "aa:bbccddee01", "aa.bb.cc.dd.ee.01", "aabbccddee0g"]:
        with pytest.raises(ValueError, match="not a MAC"):
            normalize_mac(bad)


def test_a_new_claiming_code_can_be_used_once_more(settings: Settings, certgen: Certgen) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    assert post(certgen, MAC, {"claiming_code": CODE}).status_code == 201
    with psycopg.connect(settings.metadata_dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE devices SET claiming_code = 'fresh-code' WHERE mac_address = %s", (MAC,)
        )
    assert post(certgen, MAC, {"claiming_code": CODE}).status_code == 403
    assert post(certgen, MAC, {"claiming_code": "fresh-code"}).status_code == 201
    assert post(certgen, MAC, {"claiming_code": "fresh-code"}).status_code == 403


def test_concurrent_claims_issue_exactly_once(settings: Settings, certgen: Certgen) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    with ThreadPoolExecutor(max_workers=5) as pool:
        codes = sorted(
            pool.map(lambda _: post(certgen, MAC, {"claiming_code": CODE}).status_code, range(5))
        )
    assert codes == [201, 403, 403, 403, 403]
    assert len(certificate_rows(settings)) == 1


def test_refusals_are_logged_with_the_caller_and_no_secret(
    settings: Settings, certgen: Certgen, caplog: pytest.LogCaptureFixture
) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    secret_guess = "guess-" + "z" * 20
    with caplog.at_level(logging.INFO, logger="f2pipe.pki"):
        post(certgen, MAC, {"claiming_code": secret_guess})
        post(certgen, MAC, {}, {"Authorization": "Bearer wrong-token-xyz"})
        post(certgen, MAC, {"claiming_code": CODE})
    refusals = [r for r in caplog.records if r.getMessage() == "request refused"]
    assert [(r.status, r.client, r.detail) for r in refusals] == [  # type: ignore[attr-defined]
        (403, "127.0.0.1", "wrong claiming code"),
        (401, "127.0.0.1", "bad admin token"),
    ]
    text = "\n".join(str(r.__dict__) for r in caplog.records)
    for secret in (secret_guess, "wrong-token-xyz", CODE, ADMIN_TOKEN):
        assert secret not in text


def test_admin_may_send_no_body_and_bad_json_is_400(settings: Settings, certgen: Certgen) -> None:
    add_device(settings.metadata_dsn, MAC, CODE)
    with httpx.Client(base_url=certgen.url) as http:
        empty = http.post(f"/v1/devices/{MAC}/certificate", headers=ADMIN)
        anonymous = http.post(f"/v1/devices/{MAC}/certificate")
        garbage = http.post(f"/v1/devices/{MAC}/certificate", headers=ADMIN, content=b"{nope")
    assert empty.status_code == 201
    assert empty.json()["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert anonymous.status_code == 401
    assert garbage.status_code == 400
    assert garbage.json()["detail"].startswith("bad request")


def _metric(text: str, name: str) -> float:
    values = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not exported once"
    return float(values[0])


def test_metrics_export_when_the_crl_and_the_ca_run_out(
    settings: Settings, certgen: Certgen
) -> None:
    with httpx.Client(base_url=certgen.url) as http:
        text = http.get("/metrics").text
    paths = pki_paths(settings)
    crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    assert crl.next_update_utc is not None
    next_update = _metric(text, "f2pipe_certgen_crl_next_update_seconds")
    assert abs(next_update - crl.next_update_utc.timestamp()) < 1
    not_after = _metric(text, "f2pipe_certgen_ca_not_after_seconds")
    assert abs(not_after - ca.not_valid_after_utc.timestamp()) < 1
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    ours = {name for name in names if "certgen" in name}
    assert ours
    assert all(name.startswith("f2pipe_certgen_") for name in ours), ours
