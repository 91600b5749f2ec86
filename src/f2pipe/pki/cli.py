"""``f2pipe certgen``: create the CA, serve the API, issue service identities, revoke."""

from __future__ import annotations

import argparse
import json
import logging
import threading
from pathlib import Path

import psycopg

from f2pipe.errors import CertError
from f2pipe.pki.auth import admin_token, admin_token_path
from f2pipe.pki.ca import check_service_name, parse_serial, pki_paths, serial_text
from f2pipe.pki.local import (
    crl_due,
    issue_device_files,
    load_ca,
    open_store,
    record_local_certificates,
    sync_crl,
)
from f2pipe.pki.state import ensure_pki, issue_service_files
from f2pipe.runtime.logs import add_log_level_argument, setup_logging
from f2pipe.settings import Settings, get_settings

log = logging.getLogger("f2pipe.pki")

# How often the server checks whether the CRL needs renewing.
_CRL_CHECK_SECONDS = 3600.0


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create the CA, broker, certgen and service certificates")
    init.set_defaults(func=_init)

    serve = sub.add_parser("serve", help="serve the certificate API (F2PIPE_CERTGEN_HOST/PORT)")
    serve.add_argument("--host", help="bind address (default F2PIPE_CERTGEN_HOST, loopback)")
    serve.add_argument("--port", type=int, help="port (default F2PIPE_CERTGEN_PORT)")
    add_log_level_argument(serve)
    serve.set_defaults(func=_serve)

    service = sub.add_parser("issue-service", help="issue (or re-issue) a service identity")
    service.add_argument("name", help="identity, e.g. svc-connector")
    service.set_defaults(func=_issue_service)

    device = sub.add_parser(
        "issue-device", help="issue a device certificate and key into a directory"
    )
    device.add_argument("mac", help="controller MAC (aabbccddee01 or aa:bb:...)")
    device.add_argument("--out", type=Path, default=Path("."), help="directory (default .)")
    device.set_defaults(func=_issue_device)

    revoke = sub.add_parser("revoke", help="revoke a certificate by serial (hex)")
    revoke.add_argument("serial")
    revoke.add_argument("--reason", default="unspecified")
    revoke.set_defaults(func=_revoke)


def _init(args: argparse.Namespace) -> int:
    settings = get_settings()
    report = ensure_pki(settings)
    admin_token(settings)  # generated on first start unless given
    store = open_store(settings, required=False)
    if store is not None:
        try:
            record_local_certificates(settings, store)
        except psycopg.Error as exc:
            print(f"certificates not recorded yet (run `f2pipe db migrate`): {exc}".strip())
        finally:
            store.close()
    for path in report.created:
        print(f"created {path}")
    if not report.created:
        print(f"PKI in {pki_paths(settings).root} is complete; nothing to do")
    if settings.admin_token is None and settings.admin_token_file is None:
        print(f"admin token: {admin_token_path(settings)} (0600)")
    return 0


def _renew_crl_forever(settings: Settings, stop: threading.Event) -> None:
    ca = load_ca(settings)
    while not stop.wait(_CRL_CHECK_SECONDS):
        if crl_due(settings):
            store = open_store(settings, required=False)
            if store is None:
                continue
            try:
                sync_crl(settings, ca, store, renew=True)
                log.info("CRL renewed")
            finally:
                store.close()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from f2pipe.pki.api import create_app

    setup_logging("certgen", args.log_level)
    settings = get_settings()
    ensure_pki(settings)
    admin_token(settings)
    store = open_store(settings, required=False)
    if store is not None:
        try:
            record_local_certificates(settings, store)
            sync_crl(settings, load_ca(settings), store)
        except psycopg.Error as exc:
            # Serve anyway: /healthz and /v1/ca.pem work, issuing answers 503 until fixed.
            log.warning(
                "certificate register not ready (run `f2pipe db migrate`)",
                extra={"error": str(exc).strip()},
            )
        finally:
            store.close()
    paths = pki_paths(settings)
    tls: dict[str, str] = {}
    if settings.certgen_tls:
        tls = {"ssl_certfile": str(paths.certgen_cert), "ssl_keyfile": str(paths.certgen_key)}
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew_crl_forever, args=(settings, stop), daemon=True, name="crl-renewal"
    )
    renewer.start()
    try:
        uvicorn.run(
            create_app(),
            host=args.host or settings.certgen_host,
            port=args.port or settings.certgen_port,
            log_config=None,
            access_log=False,
            **tls,  # type: ignore[arg-type]
        )
    finally:
        stop.set()
    return 0


def _issue_service(args: argparse.Namespace) -> int:
    settings = get_settings()
    name = check_service_name(args.name)
    ca = load_ca(settings)
    paths = pki_paths(settings)
    issued = issue_service_files(ca, paths, name, settings.service_cert_days)
    store = open_store(settings, required=False)
    if store is not None:
        try:
            store.record(issued, None, "cli")
        finally:
            store.close()
    print(f"{paths.service_cert(name)} (serial {issued.serial})")
    print(f"{paths.service_key(name)} (0600)")
    return 0


def _issue_device(args: argparse.Namespace) -> int:
    settings = get_settings()
    store = open_store(settings, required=True)
    assert store is not None
    try:
        cert, key = issue_device_files(settings, args.mac, args.out, store=store)
    except ValueError as exc:
        raise CertError(str(exc)) from None
    finally:
        store.close()
    print(cert)
    print(f"{key} (0600)")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from f2pipe.pki.revocation import revoke

    settings = get_settings()
    try:
        serial = serial_text(parse_serial(args.serial))
    except ValueError as exc:
        raise CertError(str(exc)) from None
    ca = load_ca(settings)
    store = open_store(settings, required=True)
    assert store is not None
    try:
        result = revoke(settings, ca, store, serial, args.reason)
    finally:
        store.close()
    if result is None:
        raise CertError(f"no certificate with serial {serial} in the register")
    print(json.dumps(result.__dict__))
    return 0
