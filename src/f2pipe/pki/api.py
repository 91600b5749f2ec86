"""certgen's HTTP API (SPEC section 6), one router per resource.

- ``POST /v1/devices/{mac}/certificate``: issue a device certificate to the
  operator (admin bearer token) or to the device itself (its one-time claiming
  code). A CSR is preferred; without one a key pair is generated here and
  returned once, never stored. The answer also names the MQTT broker the
  device belongs to (``broker_url``, from its metadata; SPEC section 10).
- ``POST /v1/certificates/{serial}/revoke`` (admin): revoke, rewrite the CRL,
  reload the broker, close the identity's live session.
- ``GET /v1/ca.pem``, ``GET /v1/crl.pem``, ``GET /healthz``, ``GET /readyz``,
  ``GET /metrics``.

Every refusal carries its reason in ``detail`` and is logged with the caller's
address; tokens, claiming codes, CSRs and keys are never logged. Failed
claiming codes and admin tokens are counted before they are evaluated
(:class:`~f2pipe.pki.auth.AttemptLimits`); the caller's address is the peer's,
or what a trusted proxy forwards (``F2PIPE_CERTGEN_TRUSTED_PROXIES``, applied
by the server). Answers that carry a certificate or key are ``Cache-Control:
no-store``. Blocking work
(key generation, signing, the database, revocation) runs in worker threads so
the event loop keeps serving. Settings come from :func:`get_settings`, which
tests override through ``app.dependency_overrides``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, generate_latest
from pydantic import BaseModel, Field, SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from f2pipe import settings as settings_module
from f2pipe.core.models import CertificateRequest, CertificateResponse
from f2pipe.core.topics import normalize_mac
from f2pipe.errors import CertError, ConfigError
from f2pipe.pki import revocation
from f2pipe.pki.auth import Attempt, AttemptLimits, admin_token, tokens_equal
from f2pipe.pki.ca import (
    CertificateAuthority,
    Issued,
    PublicKey,
    ca_passphrase,
    cert_pem,
    device_common_name,
    parse_device_csr,
    parse_serial,
    pki_paths,
    serial_text,
)
from f2pipe.pki.expiry import pki_expiry
from f2pipe.pki.local import record_local_certificates
from f2pipe.pki.store import CertificateStore, ClaimAlreadyUsed, DeviceRow
from f2pipe.runtime.mqttbrokers import broker_named
from f2pipe.settings import Settings

log = logging.getLogger("f2pipe.pki")

MAX_BODY_BYTES = 64 * 1024

# Metric names live here, one line each.
ISSUED = Counter(
    "f2pipe_certgen_certificates_issued",  # device certificates issued, by auth and key origin
    "Device certificates issued",
    ["auth", "key"],
)
REFUSED = Counter(
    "f2pipe_certgen_requests_refused",  # refused requests by HTTP status
    "Requests refused",
    ["status"],
)
REVOKED = Counter("f2pipe_certgen_certificates_revoked", "Certificates revoked")  # revocations
CRL_NEXT_UPDATE = Gauge(
    "f2pipe_certgen_crl_next_update_seconds",  # unix time the broker starts refusing everyone
    "nextUpdate of the CRL on disk, unix seconds (0: no readable CRL)",
)
CA_NOT_AFTER = Gauge(
    "f2pipe_certgen_ca_not_after_seconds",  # unix time every certificate of the CA dies
    "notAfter of the CA certificate, unix seconds (0: no readable CA)",
)
NO_STORE = {"Cache-Control": "no-store"}


def get_settings() -> Settings:
    """The settings the app runs with (cached process-wide; tests override this)."""
    return settings_module.get_settings()


class Runtime:
    """What the handlers share: the CA, the register, the admin token, the limiters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ca = CertificateAuthority.load(pki_paths(settings), ca_passphrase(settings))
        self.ca_pem = cert_pem(self.ca.certificate).decode()
        self.token = admin_token(settings)
        self.store = CertificateStore(settings.metadata_dsn)
        self.store.open()
        # Server and service certificates made before the database was up (stack up)
        # enter the register here, so they can be revoked by serial like any other.
        record_local_certificates(settings, self.store)
        self.limits = AttemptLimits(
            settings.certgen_max_failures,
            settings.certgen_global_max_failures,
            settings.certgen_failure_window_s,
        )

    def close(self) -> None:
        self.store.close()


async def get_runtime(
    request: Request, settings: Annotated[Settings, Depends(get_settings)]
) -> Runtime:
    """The app's Runtime, built on first use (in a worker thread: it reads files and connects)."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is not None:
        return runtime
    async with request.app.state.runtime_lock:
        runtime = getattr(request.app.state, "runtime", None)
        if runtime is None:
            try:
                runtime = await run_in_threadpool(Runtime, settings)
            except (CertError, ConfigError) as exc:
                raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
            request.app.state.runtime = runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
_bearer = HTTPBearer(auto_error=False)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _too_many(runtime: Runtime, what: str) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        f"too many failed {what}; try again later",
        headers={"Retry-After": str(int(runtime.settings.certgen_failure_window_s))},
    )


async def require_admin(
    request: Request,
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Pass only with ``Authorization: Bearer <admin token>``; else 401.

    A wrong token counts against the caller's address; once it has
    ``certgen_max_failures`` in the window, any token is refused with 429
    before it is compared.
    """
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing admin token (Authorization: Bearer ...)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    attempt = runtime.limits.admin(_client(request))
    if attempt is None:
        raise _too_many(runtime, "admin token attempts")
    if not tokens_equal(credentials.credentials, runtime.token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "bad admin token", headers={"WWW-Authenticate": "Bearer"}
        )
    attempt.succeeded()


def device_mac(mac: str) -> str:
    """The path's MAC, normalised; 400 if it is not one."""
    try:
        return normalize_mac(mac)
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None


class RevokeRequest(BaseModel):
    reason: str = Field(default="unspecified", min_length=1, max_length=200)


class RevokeResponse(BaseModel):
    serial: str
    common_name: str
    revoked_at: str
    broker_reloaded: bool
    session_closed: bool


@dataclass(frozen=True)
class Grant:
    """An authorised issuing request: by whom, for which device."""

    auth: Literal["admin", "claiming_code"]
    mac: str
    device: DeviceRow


async def authorize_issue(
    request: Request,
    runtime: RuntimeDep,
    mac: Annotated[str, Depends(device_mac)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    body: CertificateRequest | None = None,
) -> Grant:
    """Admin token, or the device's own unused claiming code (rate-limited failures).

    A bearer header, if present, decides (a wrong one is 401 even with a code).
    A claiming-code attempt is counted as failed against the MAC, the caller's
    address and the global budget before the code is looked at, and taken back
    only if the code is right; once a budget is spent, requests are refused
    with 429 unevaluated. So of any burst at most ``certgen_max_failures``
    guesses per device are ever compared.
    """
    body = body or CertificateRequest()
    if credentials is not None or body.claiming_code is None:
        await require_admin(request, runtime, credentials)
        device = await run_in_threadpool(runtime.store.device, mac)
        if device is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {mac} is not in the metadata")
        return Grant("admin", mac, device)

    attempt = runtime.limits.claim(mac, _client(request))
    if attempt is None:
        raise _too_many(runtime, "claiming attempts")
    try:
        device = await run_in_threadpool(runtime.store.device, mac)
    except BaseException:
        attempt.succeeded()  # not evaluated: the register was unreachable
        raise
    return _check_claim(attempt, mac, device, body.claiming_code)


def _check_claim(attempt: Attempt, mac: str, device: DeviceRow | None, code: str) -> Grant:
    """The device's own unused code passes (its attempt is taken back); else 403/404."""
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {mac} is not in the metadata")
    if not device.claiming_code or not tokens_equal(code, SecretStr(device.claiming_code)):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong claiming code")
    if device.claimed_at is not None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "claiming code already used; ask the operator to re-issue with the admin token",
        )
    attempt.succeeded()
    return Grant("claiming_code", mac, device)


devices = APIRouter(prefix="/v1/devices", tags=["devices"])


@devices.post("/{mac}/certificate", status_code=status.HTTP_201_CREATED)
async def issue_device_certificate(
    grant: Annotated[Grant, Depends(authorize_issue)],
    runtime: RuntimeDep,
    response: Response,
    body: CertificateRequest | None = None,
) -> CertificateResponse:
    """Issue ``f2-<mac>``'s certificate (see the module docstring for who may).

    No body (or ``{}``) means: generate the key here, admin token required.
    The answer may carry a private key: no cache may keep it.
    """
    response.headers.update(NO_STORE)
    body = body or CertificateRequest()
    public_key: PublicKey | None = None
    if body.csr is not None:
        try:
            public_key = await run_in_threadpool(parse_device_csr, body.csr, grant.mac)
        except ValueError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    settings = runtime.settings
    issued: Issued = await run_in_threadpool(
        runtime.ca.issue_device, grant.mac, public_key, settings.device_cert_days
    )
    claim = (
        (grant.device.device_id, body.claiming_code)
        if grant.auth == "claiming_code" and body.claiming_code is not None
        else None
    )
    try:
        await run_in_threadpool(runtime.store.record, issued, grant.mac, grant.auth, claim)
    except ClaimAlreadyUsed:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "claiming code already used; ask the operator to re-issue with the admin token",
        ) from None
    ISSUED.labels(grant.auth, "csr" if public_key is not None else "generated").inc()
    cert = issued.certificate
    log.info(
        "certificate issued",
        extra={
            "mac": grant.mac,
            "serial": issued.serial,
            "auth": grant.auth,
            "csr": public_key is not None,
        },
    )
    return CertificateResponse(
        mac=grant.mac,
        common_name=device_common_name(grant.mac),
        serial=issued.serial,
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        certificate=issued.certificate_pem(),
        ca_certificate=runtime.ca_pem,
        private_key=issued.private_key_pem(),
        broker_url=_broker_url(settings, grant.mac, grant.device.broker),
    )


def _broker_url(settings: Settings, mac: str, broker: str | None) -> str | None:
    """Where device ``mac`` connects: its broker's URL (None, logged, for an unknown broker)."""
    try:
        return broker_named(settings, broker).url
    except ConfigError as exc:
        log.warning("device assigned to an unknown broker", extra={"mac": mac, "error": str(exc)})
        return None


certificates = APIRouter(
    prefix="/v1/certificates", tags=["certificates"], dependencies=[Depends(require_admin)]
)


@certificates.post("/{serial}/revoke")
async def revoke_certificate(
    serial: str, runtime: RuntimeDep, body: RevokeRequest | None = None
) -> RevokeResponse:
    """Revoke a certificate by serial (hex); 404 if this CA never issued it."""
    try:
        canonical = serial_text(parse_serial(serial))
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    reason = body.reason if body is not None else "unspecified"
    result = await run_in_threadpool(
        revocation.revoke, runtime.settings, runtime.ca, runtime.store, canonical, reason
    )
    if result is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no certificate with serial {canonical}")
    REVOKED.inc()
    return RevokeResponse(**result.__dict__)


pki = APIRouter(prefix="/v1", tags=["pki"])


@pki.get("/ca.pem")
async def ca_certificate(runtime: RuntimeDep) -> Response:
    return Response(runtime.ca_pem, media_type="application/x-pem-file")


@pki.get("/crl.pem")
async def crl(runtime: RuntimeDep) -> Response:
    data = await run_in_threadpool(pki_paths(runtime.settings).crl.read_bytes)
    return Response(data, media_type="application/x-pem-file")


ops = APIRouter(tags=["ops"])


@ops.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz")
async def readyz(runtime: RuntimeDep) -> dict[str, str]:
    try:
        await run_in_threadpool(runtime.store.ping)
    except psycopg.Error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "database unreachable") from None
    return {"status": "ready"}


@ops.get("/metrics")
async def metrics(settings: Annotated[Settings, Depends(get_settings)]) -> Response:
    # Read from the files at each scrape: `stack up` or the CLI may renew them too.
    expiry = await run_in_threadpool(pki_expiry, settings.pki_dir)
    for gauge, when in (
        (CRL_NEXT_UPDATE, expiry.crl_next_update),
        (CA_NOT_AFTER, expiry.ca_not_after),
    ):
        gauge.set(when.timestamp() if when is not None else 0)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before the app sees them.

    A declared Content-Length over the limit is refused without reading; a
    chunked body is read up to the limit and then refused.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, send)
            return
        messages: list[MutableMapping[str, Any]] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> MutableMapping[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: MutableMapping[str, Any], send: Send) -> None:
        client = scope.get("client")
        _log_refusal(413, "request body too large", client[0] if client else "unknown", scope)
        response = JSONResponse(
            {"detail": f"request body larger than {self.limit} bytes"}, status_code=413
        )
        await response(scope, _no_receive, send)


async def _no_receive() -> MutableMapping[str, Any]:
    return {"type": "http.disconnect"}


def _log_refusal(code: int, detail: str, client: str, scope: MutableMapping[str, Any]) -> None:
    REFUSED.labels(str(code)).inc()
    log.warning(
        "request refused",
        extra={
            "status": code,
            "detail": detail,
            "client": client,
            "method": scope.get("method"),
            "path": scope.get("path"),
        },
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    _log_refusal(exc.status_code, str(exc.detail), _client(request), request.scope)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        dict.fromkeys(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in exc.errors()
        )
    )
    detail = f"bad request: {problems}"
    _log_refusal(400, detail, _client(request), request.scope)
    return JSONResponse({"detail": detail}, status_code=400)


async def _database_error(request: Request, exc: Exception) -> Response:
    detail = "metadata database unavailable"
    _log_refusal(503, detail, _client(request), request.scope)
    log.error("database error", extra={"error": type(exc).__name__})
    return JSONResponse({"detail": detail}, status_code=503)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    runtime: Runtime | None = getattr(app.state, "runtime", None)
    if runtime is not None:
        await run_in_threadpool(runtime.close)
        app.state.runtime = None


def create_app() -> FastAPI:
    """A fresh certgen application (its runtime is built on the first request)."""
    app = FastAPI(title="f2pipe certgen", version="1", lifespan=_lifespan)
    app.state.runtime = None
    app.state.runtime_lock = asyncio.Lock()
    for router in (devices, certificates, pki, ops):
        app.include_router(router)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(psycopg.Error, _database_error)
    app.add_middleware(BodyLimit)
    return app
