"""``f2pipe certgen``: create the CA, serve the API, issue service identities, revoke."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from f2pipe.errors import CertError, ConfigError
from f2pipe.pki.auth import admin_token, admin_token_path
from f2pipe.pki.ca import check_service_name, parse_serial, pki_paths, serial_text, write_public
from f2pipe.pki.local import (
    issue_device_files,
    load_ca,
    open_store,
    record_local_certificates,
)
from f2pipe.pki.renewal import CrlRenewer
from f2pipe.pki.revocation import refresh_crl
from f2pipe.pki.state import ensure_pki, issue_service_files
from f2pipe.runtime import tls
from f2pipe.runtime.brokerstats import MONITOR_IDENTITY, BrokerMonitor, BrokerMonitors
from f2pipe.runtime.logs import add_log_level_argument, setup_logging
from f2pipe.runtime.metrics import register_build_info
from f2pipe.runtime.mqttbrokers import broker_named, brokers
from f2pipe.settings import Settings, get_settings

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

log = logging.getLogger("f2pipe.pki")


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
        "issue-device",
        help="issue a device certificate and key into a directory (with several brokers, "
        "also f2-<mac>.broker naming its broker's URL)",
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


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, host: str) -> None:
    """Refuse plain HTTP beyond loopback: tokens, claiming codes and keys would cross the
    network in clear. ConfigError unless ``certgen_tls``, or the proxy override (warned)."""
    if settings.certgen_tls or is_loopback(host):
        return
    if not settings.certgen_plain_http_behind_proxy:
        raise ConfigError(
            f"certgen refuses plain HTTP on {host}: admin tokens, claiming codes and private "
            "keys would cross the network in clear text. Set F2PIPE_CERTGEN_TLS=true, bind "
            "to loopback (F2PIPE_CERTGEN_HOST=127.0.0.1), or, behind a TLS-terminating proxy "
            "only, F2PIPE_CERTGEN_PLAIN_HTTP_BEHIND_PROXY=true"
        )
    log.warning(
        "PLAIN HTTP on a non-loopback address: certgen trusts the proxy in front to "
        "terminate TLS (F2PIPE_CERTGEN_PLAIN_HTTP_BEHIND_PROXY); anything reaching "
        "this port directly sends secrets in clear text",
        extra={"host": host},
    )


def server_config(app: FastAPI, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """The uvicorn configuration certgen serves with (loaded, so the TLS context is final).

    Proxy headers are believed only from ``certgen_trusted_proxies`` (uvicorn
    otherwise trusts any loopback peer, so a local caller could mint addresses
    and dodge the per-address limits); HTTPS takes TLS 1.2 and later only.
    """
    import uvicorn

    paths = pki_paths(settings)
    proxies = [p.strip() for p in settings.certgen_trusted_proxies.split(",") if p.strip()]
    tls: dict[str, str] = {}
    if settings.certgen_tls:
        tls = {"ssl_certfile": str(paths.certgen_cert), "ssl_keyfile": str(paths.certgen_key)}
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies,
        **tls,  # type: ignore[arg-type]
    )
    config.load()
    if config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    return config


def start_broker_monitor(settings: Settings) -> BrokerMonitor | BrokerMonitors | None:
    """Keep the broker's ``$SYS`` counters in certgen's /metrics (``f2pipe_broker_*``);
    with several brokers every broker's, labelled ``broker``.

    certgen runs whether or not Kafka and the connectors do, which is exactly when
    the broker queues and may drop, so the counters live here.
    """
    from prometheus_client import REGISTRY

    context = None
    if settings.mqtt_tls:
        try:
            context = tls.service_context(settings.pki_dir, MONITOR_IDENTITY)
        except ConfigError as exc:
            log.warning("broker statistics are not exported", extra={"error": str(exc)})
            return None
    if settings.mqtt_brokers > 1:
        several = BrokerMonitors(
            {b.name: BrokerMonitor(b.host, b.port, context) for b in brokers(settings)}
        )
        REGISTRY.register(several)
        several.start()
        return several
    monitor = BrokerMonitor(settings.mqtt_host, settings.mqtt_port, context)
    REGISTRY.register(monitor)
    monitor.start()
    return monitor


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from f2pipe.pki.api import create_app

    setup_logging("certgen", args.log_level)
    settings = get_settings()
    host = args.host or settings.certgen_host
    port = args.port or settings.certgen_port
    check_bind(settings, host)
    admin_token(settings)  # a weak one is refused before anything is created
    report = ensure_pki(settings)
    store = open_store(settings, required=False)
    if store is not None:
        try:
            record_local_certificates(settings, store)
            refresh_crl(settings, report.ca, store)
        except psycopg.Error as exc:
            # Serve anyway: /healthz and /v1/ca.pem work, issuing answers 503 until fixed.
            log.warning(
                "certificate register not ready (run `f2pipe db migrate`)",
                extra={"error": str(exc).strip()},
            )
        finally:
            store.close()
    config = server_config(create_app(), settings, host, port)
    # A CRL that ensure_pki renewed just now is on disk only: the renewer's first
    # step reloads the broker.
    renewer = CrlRenewer(settings, reload_first=str(pki_paths(settings).crl) in report.created)
    stop = threading.Event()
    thread = threading.Thread(target=renewer.run, args=(stop,), daemon=True, name="crl-renewal")
    thread.start()
    register_build_info()
    monitor = start_broker_monitor(settings)
    try:
        uvicorn.Server(config).run()
    finally:
        stop.set()
        if monitor is not None:
            monitor.stop()
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
        if settings.mqtt_brokers > 1:
            # As certgen's answer names it: the device's broker, beside its certificate.
            device = store.device(cert.stem.removeprefix("f2-"))
            url = broker_named(settings, None if device is None else device.broker).url
            write_public(cert.with_suffix(".broker"), url.encode())
            print(cert.with_suffix(".broker"))
    except (ValueError, ConfigError) as exc:
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
