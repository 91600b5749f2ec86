"""Attacks on the certificate service, each tried against certgen started the way the
product starts it (``f2pipe certgen serve`` in its own process, with its real
uvicorn configuration) and a real PostgreSQL register."""

from __future__ import annotations

import collections
import logging
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import wait_until
from f2pipe.errors import ConfigError
from f2pipe.pki.api import create_app
from f2pipe.pki.ca import pki_paths
from f2pipe.pki.cli import check_bind, server_config
from f2pipe.settings import Settings, load_settings
from pki_fixtures import (
    ADMIN_TOKEN,
    add_claimable_devices,
    add_device,
    free_port,
    register_database,
    register_dsn,
    settings,
    tls_handshake,
)

__all__ = ["register_database", "register_dsn", "settings"]  # fixtures used by name

pytestmark = pytest.mark.servers

MAC = "aabbccddee01"
CODE = "claim-7f3a9c2e-0b41"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class CertgenProcess:
    """``python -m f2pipe.cli certgen serve`` with the test's settings as variables."""

    def __init__(self, settings: Settings, **variables: str) -> None:
        self.settings = settings
        self.tls = variables.get("F2PIPE_CERTGEN_TLS") == "true"
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://127.0.0.1:{settings.certgen_port}"
        self.log = settings.state_dir / f"certgen-{settings.certgen_port}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("F2PIPE_")},
            "F2PIPE_STATE_DIR": str(settings.state_dir),
            "F2PIPE_METADATA_DSN": settings.metadata_dsn,
            "F2PIPE_MQTT_PORT": str(settings.mqtt_port),
            "F2PIPE_CERTGEN_PORT": str(settings.certgen_port),
            "F2PIPE_ADMIN_TOKEN": ADMIN_TOKEN,
            **variables,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``certgen serve`` to completion (for starts that must be refused)."""
        return subprocess.run(
            [sys.executable, "-m", "f2pipe.cli", "certgen", "serve", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def start(self) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "f2pipe.cli", "certgen", "serve"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._up, timeout=60, what=f"certgen to serve ({self.log})")

    def _up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"certgen exited: {self.log.read_text(errors='replace')}")
        if self.tls and not pki_paths(self.settings).ca_cert.is_file():
            return False  # certgen creates its CA first
        try:
            with self.client() as http:
                return http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def client(self, local_address: str | None = None, **options: Any) -> httpx.Client:
        transport = httpx.HTTPTransport(
            local_address=local_address, verify=self.trust() if self.tls else True
        )
        return httpx.Client(base_url=self.url, transport=transport, timeout=30, **options)

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(pki_paths(self.settings).ca_cert))

    def claim(
        self, mac: str, code: str, headers: dict[str, str] | None = None, source: str | None = None
    ) -> int:
        with self.client(source) as http:
            response = http.post(
                f"/v1/devices/{mac}/certificate",
                json={"claiming_code": code},
                headers=headers or {},
            )
        return response.status_code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def start_certgen(settings: Settings) -> Iterator[Callable[..., CertgenProcess]]:
    started: list[CertgenProcess] = []

    def start(**variables: str) -> CertgenProcess:
        service = CertgenProcess(settings, **variables)
        started.append(service)
        service.start()
        return service

    yield start
    for service in started:
        service.stop()


def _burst(count: int, request: Callable[[int], int]) -> collections.Counter[int]:
    """``count`` requests released at the same moment, one thread each; their statuses."""
    barrier = threading.Barrier(count)
    results: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait(timeout=30)
        code = request(i)
        with lock:
            results.append(code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return collections.Counter(results)


def test_a_burst_of_wrong_codes_for_one_device_is_evaluated_at_most_five_times(
    settings: Settings, start_certgen: Callable[..., CertgenProcess]
) -> None:
    certgen = start_certgen()
    add_device(settings.metadata_dsn, MAC, CODE)
    # Each from its own address: only the per-device limit can stop them.
    statuses = _burst(40, lambda i: certgen.claim(MAC, f"guess-{i}", source=f"127.0.3.{i + 1}"))
    assert statuses == {403: settings.certgen_max_failures, 429: 40 - settings.certgen_max_failures}
    # The device stays locked for the window: even its right code is not looked at.
    assert certgen.claim(MAC, CODE) == 429


def test_forwarded_headers_do_not_mint_addresses(
    settings: Settings, start_certgen: Callable[..., CertgenProcess]
) -> None:
    certgen = start_certgen()
    macs = add_claimable_devices(settings.metadata_dsn, "aabbccdd01", 30)
    statuses = [
        certgen.claim(
            mac, "wrong", {"X-Forwarded-For": f"198.51.100.{i}", "Forwarded": f"for=203.0.113.{i}"}
        )
        for i, mac in enumerate(macs)
    ]
    assert statuses == [403] * 5 + [429] * 25


def test_forwarded_headers_count_once_the_proxy_is_trusted(
    settings: Settings, start_certgen: Callable[..., CertgenProcess]
) -> None:
    certgen = start_certgen(F2PIPE_CERTGEN_TRUSTED_PROXIES="127.0.0.1")
    macs = add_claimable_devices(settings.metadata_dsn, "aabbccdd02", 7)
    behind_proxy = [
        certgen.claim(mac, "wrong", {"X-Forwarded-For": f"198.51.100.{i}"})
        for i, mac in enumerate(macs)
    ]
    assert behind_proxy == [403] * 7  # seven clients behind the proxy, one guess each
    same_client = [
        certgen.claim(mac, "wrong", {"X-Forwarded-For": "198.51.100.200"}) for mac in macs[:6]
    ]
    assert same_client == [403] * 5 + [429]


def test_spraying_many_devices_from_many_addresses_meets_the_global_budget(
    settings: Settings, start_certgen: Callable[..., CertgenProcess]
) -> None:
    certgen = start_certgen(F2PIPE_CERTGEN_GLOBAL_MAX_FAILURES="20")
    macs = add_claimable_devices(settings.metadata_dsn, "aabbccdd03", 31)
    # One guess per device, each from its own address: only the global budget can stop it.
    statuses = [
        certgen.claim(mac, "wrong", source=f"127.0.1.{i + 1}") for i, mac in enumerate(macs[:30])
    ]
    assert statuses == [403] * 20 + [429] * 10
    # Claiming pauses for everyone until the window passes; the operator still issues.
    assert certgen.claim(macs[30], f"code-{macs[30]}", source="127.0.2.1") == 429
    with certgen.client() as http:
        issued = http.post(f"/v1/devices/{macs[30]}/certificate", json={}, headers=ADMIN)
    assert issued.status_code == 201


def test_wrong_admin_tokens_are_limited(
    settings: Settings, start_certgen: Callable[..., CertgenProcess]
) -> None:
    certgen = start_certgen()
    add_device(settings.metadata_dsn, MAC, CODE)

    def issue(token: str, source: str | None = None) -> int:
        with certgen.client(source) as http:
            return http.post(
                f"/v1/devices/{MAC}/certificate",
                json={},
                headers={"Authorization": f"Bearer {token}"},
            ).status_code

    statuses = _burst(20, lambda i: issue(f"guess-{i:02d}-" + "x" * 40, "127.0.0.5"))
    assert statuses == {401: 5, 429: 15}
    assert issue(ADMIN_TOKEN, "127.0.0.5") == 429  # blocked means not compared at all
    with certgen.client("127.0.0.5") as http:
        revoke = http.post("/v1/certificates/abc/revoke", headers=ADMIN)
    assert revoke.status_code == 429  # the revocation endpoint shares the budget
    assert issue(ADMIN_TOKEN, "127.0.0.6") == 201  # another address is unaffected


def test_a_csr_asking_for_more_gets_a_plain_client_certificate(
    settings: Settings, start_certgen: Callable[..., CertgenProcess]
) -> None:
    certgen = start_certgen()
    add_device(settings.metadata_dsn, MAC, CODE)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"f2-{MAC}")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("broker.example"), x509.DNSName("*")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    with certgen.client() as http:
        response = http.post(
            f"/v1/devices/{MAC}/certificate", json={"csr": pem, "claiming_code": CODE}
        )
    assert response.status_code == 201, response.text
    cert = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    extensions = {type(e.value) for e in cert.extensions}
    assert x509.SubjectAlternativeName not in extensions
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not usage.key_cert_sign
    assert not usage.crl_sign
    assert cert.subject.rfc4514_string() == f"CN=f2-{MAC}"


def test_issued_keys_are_not_cached(
    settings: Settings, start_certgen: Callable[..., CertgenProcess]
) -> None:
    certgen = start_certgen()
    add_device(settings.metadata_dsn, MAC, CODE)
    with certgen.client() as http:
        response = http.post(f"/v1/devices/{MAC}/certificate", json={}, headers=ADMIN)
    assert response.status_code == 201
    assert response.json()["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert response.headers["cache-control"] == "no-store"


def _handshake(port: int, version: ssl.TLSVersion, trust: Path) -> str:
    """Offer exactly ``version`` to 127.0.0.1:``port``; "ok" or the TLS error's reason."""
    return tls_handshake(("127.0.0.1", port), version, trust)


def test_certgen_https_refuses_tls_1_0_and_1_1(
    settings: Settings, start_certgen: Callable[..., CertgenProcess]
) -> None:
    certgen = start_certgen(F2PIPE_CERTGEN_TLS="true")
    ca = pki_paths(settings).ca_cert
    port = settings.certgen_port
    # The client really offers the old version (it completes against a server that allows
    # it); asyncio's TLS server hangs up on it without sending an alert.
    refused = {"TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING"}
    assert _handshake(port, ssl.TLSVersion.TLSv1, ca) in refused
    assert _handshake(port, ssl.TLSVersion.TLSv1_1, ca) in refused
    assert _handshake(port, ssl.TLSVersion.TLSv1_2, ca) == "ok"
    with certgen.client() as http:
        assert http.get("/healthz").status_code == 200
    # Whatever the machine's OpenSSL defaults, certgen asks for 1.2 itself.
    tls_settings = settings.model_copy(update={"certgen_tls": True})
    config = server_config(create_app(), tls_settings, "127.0.0.1", free_port())
    assert config.ssl is not None
    assert config.ssl.minimum_version == ssl.TLSVersion.TLSv1_2


def test_plain_http_beyond_loopback_is_refused(settings: Settings) -> None:
    service = CertgenProcess(settings)
    refused = service.run("--host", "0.0.0.0", "--port", str(free_port()))  # noqa: S104
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, refused.stderr
    assert "refuses plain HTTP on 0.0.0.0" in lines[0]
    assert "F2PIPE_CERTGEN_TLS=true" in lines[0]


@pytest.mark.parametrize(
    "token",
    [
        "change-me-admin-token",  # what .env.example used to ship
        "short-but-random-Xq3v",
        "ab" * 20,
        "my-admin-password-for-production-use",
    ],
)
def test_weak_admin_tokens_are_refused_at_start(settings: Settings, token: str) -> None:
    service = CertgenProcess(settings, F2PIPE_ADMIN_TOKEN=token)
    refused = service.run()
    assert refused.returncode != 0
    assert "F2PIPE_ADMIN_TOKEN" in refused.stderr
    assert token not in refused.stderr


def test_settings_errors_do_not_echo_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("F2PIPE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("F2PIPE_METADATA_DSN", "mysql://app:hunter2-db-pass@db:3306/f2pipe")
    with pytest.raises(ConfigError) as bad_dsn:
        load_settings()
    assert "F2PIPE_METADATA_DSN" in str(bad_dsn.value)
    assert "hunter2-db-pass" not in str(bad_dsn.value)
    monkeypatch.delenv("F2PIPE_METADATA_DSN")
    monkeypatch.setenv("F2PIPE_REDIS_URL", "http://default:redis-pass-77@cache:6379/0")
    with pytest.raises(ConfigError) as bad_redis:
        load_settings()
    assert "F2PIPE_REDIS_URL" in str(bad_redis.value)
    assert "redis-pass-77" not in str(bad_redis.value)


class _EnvironmentDump:
    """A service whose process prints the environment it was given, then exits."""

    @staticmethod
    def command() -> list[str]:
        return [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]


def test_only_certgen_receives_the_admin_token_and_the_ca_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from f2pipe.operations import services
    from f2pipe.operations.stack import Paths

    for key in [k for k in os.environ if k.startswith("F2PIPE_")]:
        monkeypatch.delenv(key)
    # In the caller's environment as well as in its settings.
    monkeypatch.setenv("F2PIPE_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("F2PIPE_CA_PASSPHRASE", "ca-passphrase-4d1c")
    settings = load_settings(state_dir=tmp_path, metadata_dsn="postgresql://u:db-pw@h/d")
    paths = Paths(tmp_path)
    paths.make()
    seen: dict[str, dict[str, str]] = {}
    for cls in services.SERVICES:
        dump = type(cls.__name__, (_EnvironmentDump, cls), {})
        service = dump(settings, paths)
        service.start()
        wait_until(
            lambda s=service: s.log_file.is_file() and s.log_file.read_text().strip(), timeout=30
        )  # type: ignore[misc]
        seen[cls.name] = json.loads(service.log_file.read_text().splitlines()[0])
    assert seen["certgen"]["F2PIPE_ADMIN_TOKEN"] == ADMIN_TOKEN
    assert seen["certgen"]["F2PIPE_CA_PASSPHRASE"] == "ca-passphrase-4d1c"
    for name in ("connector", "processor", "sink", "simulator"):
        assert "F2PIPE_ADMIN_TOKEN" not in seen[name], name
        assert "F2PIPE_CA_PASSPHRASE" not in seen[name], name
        assert seen[name]["F2PIPE_METADATA_DSN"] == settings.metadata_dsn  # what it needs stays


def test_plain_http_behind_a_proxy_is_an_explicit_loud_choice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain = load_settings(state_dir=tmp_path)
    for host in ("127.0.0.1", "127.0.0.9", "localhost", "::1"):
        check_bind(plain, host)
    for host in ("0.0.0.0", "10.1.2.3", "certgen.example", "::"):  # noqa: S104
        with pytest.raises(ConfigError, match="refuses plain HTTP"):
            check_bind(plain, host)
    check_bind(load_settings(state_dir=tmp_path, certgen_tls=True), "0.0.0.0")  # noqa: S104
    assert caplog.records == []
    proxied = load_settings(state_dir=tmp_path, certgen_plain_http_behind_proxy=True)
    with caplog.at_level(logging.WARNING, logger="f2pipe.pki"):
        check_bind(proxied, "0.0.0.0")  # noqa: S104
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "PLAIN HTTP" in caplog.records[0].getMessage()


def test_a_bad_secret_in_the_settings_file_is_not_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("F2PIPE_")]:
        monkeypatch.delenv(key)
    config = tmp_path / "f2pipe.toml"
    config.write_text("admin_token = 918273645546372819918273645546372819\n")  # not a string
    monkeypatch.setenv("F2PIPE_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert "admin_token" in str(refused.value)
    assert "918273645546372819" not in str(refused.value)
