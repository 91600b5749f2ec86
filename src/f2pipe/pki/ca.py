"""The certificate authority: keys, certificates and the CRL (SPEC section 6).

Everything here is synchronous and CPU-bound; callers on an event loop run it in
a worker thread. Keys are generated with ``cryptography`` only (EC P-256,
SHA-256 signatures). Private keys are written 0600 through a temporary file and
an atomic rename, so a reader never sees half a key and a crash never leaves one
readable by others.

Layout under ``<state>/pki/`` (a contract with the broker, the connector and the
simulator): ``ca.pem``, ``ca.key``, ``crl.pem``, ``broker.pem``/``broker.key``,
``certgen.pem``/``certgen.key`` (HTTPS) and ``services/svc-<name>.pem``/``.key``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from f2pipe.errors import CertError
from f2pipe.settings import Settings

log = logging.getLogger(__name__)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
Purpose = Literal["client", "server"]

#: Service identities created by ``certgen init``: the connector reads device
#: data, the commander sends commands, the monitor reads ``$SYS`` for status.
SERVICE_NAMES: tuple[str, ...] = ("svc-connector", "svc-commander", "svc-monitor")

_SERVICE_NAME = re.compile(r"svc-[a-z0-9][a-z0-9-]{0,30}")
# Strong enough curves; secp256k1 is 256 bits but not a TLS signature curve.
_EC_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
_MIN_RSA_BITS = 2048
# Re-issue a server or service certificate this long before it expires.
RENEW_BEFORE = dt.timedelta(days=30)
# A certificate's notBefore is backdated a little so clients with a slightly slow
# clock do not refuse a certificate issued a second ago.
_BACKDATE = dt.timedelta(minutes=5)


def device_common_name(mac: str) -> str:
    """The MQTT identity of the controller with this (normalised) MAC."""
    return f"f2-{mac}"


def check_service_name(name: str) -> str:
    """Return ``name`` if it is a valid service identity (``svc-<lowercase>``), else raise."""
    if not _SERVICE_NAME.fullmatch(name):
        raise CertError(f"service name must look like 'svc-connector', got {name!r}")
    return name


def serial_text(serial: int) -> str:
    """The serial as the API and the database spell it: lowercase hex, no separators."""
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """Parse a serial in hex (``4f3a...``, ``4F:3A:...``, ``0x4f3a``); raise ValueError."""
    cleaned = text.strip().lower().replace(":", "")
    cleaned = cleaned.removeprefix("0x")
    if not re.fullmatch(r"[0-9a-f]{1,40}", cleaned):
        raise ValueError(f"not a certificate serial: {text[:60]!r} (expected up to 40 hex digits)")
    return int(cleaned, 16)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def check_public_key(key: object) -> PublicKey:
    """Return ``key`` if it is EC P-256/384/521 or RSA >= 2048 bits; raise ValueError."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_CURVES:
            raise ValueError(f"EC curve {key.curve.name} is not accepted (use P-256 or stronger)")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits is too weak (at least 2048)")
        return key
    raise ValueError(f"{type(key).__name__} keys are not accepted (use EC P-256 or RSA 2048+)")


def parse_device_csr(pem: str, mac: str) -> PublicKey:
    """Validate a device's CSR and return its public key.

    The CSR must be PEM, correctly self-signed, have exactly one subject CN equal
    to ``f2-<mac>``, and carry an acceptable key (:func:`check_public_key`).
    Everything else in it (other subject fields, requested extensions) is ignored:
    the certificate's contents are decided here, not by the requester.
    Raises ValueError with the reason.
    """
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError("malformed CSR: expected one PEM 'CERTIFICATE REQUEST'") from exc
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature, x509.UnsupportedGeneralNameType):
        valid = False
    if not valid:
        raise ValueError("malformed CSR: its signature does not verify")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    wanted = device_common_name(mac)
    if len(names) != 1 or names[0].value != wanted:
        got = ", ".join(str(n.value) for n in names) or "none"
        raise ValueError(f"CSR common name must be {wanted!r}, got {got!r}")
    try:
        key = csr.public_key()
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise ValueError("CSR key type is not supported") from exc
    return check_public_key(key)


@dataclass(frozen=True)
class PkiPaths:
    """Where the PKI files live (``<state>/pki``)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def broker_cert(self) -> Path:
        return self.root / "broker.pem"

    @property
    def broker_key(self) -> Path:
        return self.root / "broker.key"

    @property
    def certgen_cert(self) -> Path:
        return self.root / "certgen.pem"

    @property
    def certgen_key(self) -> Path:
        return self.root / "certgen.key"

    @property
    def services(self) -> Path:
        return self.root / "services"

    def service_cert(self, name: str) -> Path:
        return self.services / f"{check_service_name(name)}.pem"

    def service_key(self, name: str) -> Path:
        return self.services / f"{check_service_name(name)}.key"


def pki_paths(settings: Settings) -> PkiPaths:
    return PkiPaths(settings.pki_dir)


def ca_passphrase(settings: Settings) -> bytes | None:
    """The CA key's passphrase from ``F2PIPE_CA_PASSPHRASE`` or ``..._FILE``, or None."""
    if settings.ca_passphrase is not None:
        value = settings.ca_passphrase.get_secret_value()
    elif settings.ca_passphrase_file is not None:
        try:
            value = settings.ca_passphrase_file.read_text().strip()
        except OSError as exc:
            raise CertError(
                f"F2PIPE_CA_PASSPHRASE_FILE={str(settings.ca_passphrase_file)!r}: {exc.strerror}"
            ) from None
    else:
        return None
    if not value:
        raise CertError("the CA passphrase is empty")
    return value.encode()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file + rename)."""
    write_file(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0644, atomically."""
    write_file(path, data, 0o644)


def tighten_mode(path: Path) -> None:
    """Make an existing file that holds a secret owner-only if others may read or write it.

    Files this package writes are 0600 from the start (:func:`write_private`);
    this catches one left from elsewhere: copied in, restored from a backup, or
    written by an older version. Logged; never raises.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
            log.warning(
                "secret file was open to others; made owner-only",
                extra={"path": str(path), "mode": oct(mode)},
            )
    except OSError as exc:
        log.warning(
            "cannot check a secret file's mode", extra={"path": str(path), "error": str(exc)}
        )


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``, atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates 0600 already; chmod makes public files readable before the rename.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(path: Path) -> x509.Certificate:
    """Read one PEM certificate; raise CertError naming the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"cannot read certificate {path}: {exc}") from None


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Issued:
    """A certificate just signed, with its private key when it was generated here."""

    certificate: x509.Certificate
    private_key: PrivateKey | None

    @property
    def serial(self) -> str:
        return serial_text(self.certificate.serial_number)

    @property
    def common_name(self) -> str:
        return common_name(self.certificate)

    def certificate_pem(self) -> str:
        return cert_pem(self.certificate).decode()

    def private_key_pem(self) -> str | None:
        return None if self.private_key is None else key_pem(self.private_key).decode()


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


class CertificateAuthority:
    """A CA certificate with its private key; signs certificates and CRLs."""

    def __init__(self, certificate: x509.Certificate, key: PrivateKey) -> None:
        self.certificate = certificate
        self.key = key

    @classmethod
    def create(cls, days: int, name: str = "f2pipe CA") -> CertificateAuthority:
        """A new self-signed CA (EC P-256, SHA-256, path length 0), in memory."""
        key = generate_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "f2pipe"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        now = utc_now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, paths: PkiPaths, passphrase: bytes | None) -> CertificateAuthority:
        """Read ``ca.pem`` and ``ca.key``; raise CertError if missing, unreadable or mismatched."""
        cert = load_cert(paths.ca_cert)
        tighten_mode(paths.ca_key)
        try:
            key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), passphrase)
        except OSError as exc:
            raise CertError(f"cannot read CA key {paths.ca_key}: {exc.strerror}") from None
        except TypeError:
            raise CertError(
                f"CA key {paths.ca_key} is encrypted: set F2PIPE_CA_PASSPHRASE(_FILE)"
                if passphrase is None
                else f"CA key {paths.ca_key} is not encrypted but a passphrase is set"
            ) from None
        except ValueError:
            raise CertError(f"cannot decrypt or parse CA key {paths.ca_key}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CertError(f"CA key {paths.ca_key} is not an EC or RSA key")
        if key.public_key() != cert.public_key():
            raise CertError(f"CA key {paths.ca_key} does not belong to {paths.ca_cert}")
        return cls(cert, key)

    def save(self, paths: PkiPaths, passphrase: bytes | None) -> None:
        write_private(paths.ca_key, key_pem(self.key, passphrase))
        write_public(paths.ca_cert, cert_pem(self.certificate))

    def issued_by_me(self, cert: x509.Certificate) -> bool:
        """True if ``cert`` carries a valid signature of this CA."""
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def sign(
        self,
        *,
        common_name: str,
        public_key: PublicKey,
        days: float,
        purpose: Purpose,
        names: Iterable[str] = (),
    ) -> x509.Certificate:
        """Sign an end-entity certificate with a fresh random serial.

        ``purpose`` decides the extended key usage: ``client`` gets clientAuth
        only, ``server`` serverAuth only. ``names`` become subjectAltNames
        (IP addresses where they parse as one, DNS names otherwise). The
        validity never reaches past the CA's own.
        """
        now = utc_now()
        not_after = min(now + dt.timedelta(days=days), self.certificate.not_valid_after_utc)
        eku = (
            ExtendedKeyUsageOID.CLIENT_AUTH
            if purpose == "client"
            else ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # RSA key exchange needs it; harmless for EC keys.
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        alt = [general_name(name) for name in dict.fromkeys(names)]
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_device(
        self, mac: str, public_key: PublicKey | None = None, days: float = 365
    ) -> Issued:
        """A device certificate for ``f2-<mac>`` (clientAuth only).

        With ``public_key`` (from a CSR) no private key exists here; without it a
        fresh P-256 key is generated and returned with the certificate.
        """
        key = None if public_key is not None else generate_key()
        public = public_key if public_key is not None else key.public_key()  # type: ignore[union-attr]
        cert = self.sign(
            common_name=device_common_name(mac), public_key=public, days=days, purpose="client"
        )
        return Issued(cert, key)

    def issue_client(self, common_name: str, days: float) -> Issued:
        """A client certificate with a fresh key (services and short-lived identities)."""
        key = generate_key()
        cert = self.sign(
            common_name=common_name, public_key=key.public_key(), days=days, purpose="client"
        )
        return Issued(cert, key)

    def issue_server(self, common_name: str, names: Iterable[str], days: float) -> Issued:
        """A server certificate (serverAuth) with a fresh key and the given SANs."""
        key = generate_key()
        cert = self.sign(
            common_name=common_name,
            public_key=key.public_key(),
            days=days,
            purpose="server",
            names=names,
        )
        return Issued(cert, key)

    def build_crl(
        self, revoked: Iterable[tuple[int, dt.datetime]], days: int
    ) -> x509.CertificateRevocationList:
        """A CRL listing ``(serial, revoked_at)`` pairs, valid for ``days``."""
        now = utc_now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + dt.timedelta(days=days))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        )
        for serial, when in sorted(dict(revoked).items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(when.astimezone(dt.UTC))
                .build()
            )
        return builder.sign(self.key, hashes.SHA256())


def general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
