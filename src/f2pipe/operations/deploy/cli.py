"""``f2pipe deploy``: render a deployment's configuration; make the PKI shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from f2pipe.errors import ConfigError
from f2pipe.settings import Settings, get_settings

__all__ = ["configure", "make_shares"]


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    render = sub.add_parser(
        "render",
        help="write the compose file, .env.example and deploy/ from f2pipe's own code",
        description="Write every configuration file of a deployment into OUT (the checkout's "
        "own files are the render of the default settings). No secret is written unless "
        "--with-certificates asks for the broker's key.",
    )
    render.add_argument("out", type=Path, metavar="OUT", help="output folder, e.g. .")
    render.add_argument("--target", choices=["compose"], default="compose")
    render.add_argument(
        "--connectors",
        type=int,
        default=1,
        help="connector identities the broker admits (svc-connector, svc-connector-2, ...); "
        "with several brokers, each broker's from its own group",
    )
    render.add_argument(
        "--broker-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or address devices reach the broker by (repeatable; with several "
        "brokers, one certificate names them all)",
    )
    render.add_argument(
        "--with-certificates",
        action="store_true",
        help="also issue the broker's certificate for those names into OUT/secrets "
        "(run where the CA is; that folder is never committed)",
    )
    render.set_defaults(func=_render)

    shares = sub.add_parser(
        "shares",
        help="make the PKI and a share folder for each party (run where the CA is)",
        description="Create what is missing of the PKI (as `certgen init` does) and a folder "
        "<state>/shares/PARTY for each party, holding the CA certificate, the CRL and the "
        "party's own certificate and key (broker, broker-<n>, svc-<name>, whose identity is "
        "issued if missing; others get the first two).",
    )
    shares.add_argument("parties", nargs="+", metavar="PARTY")
    shares.set_defaults(func=_shares)


def _render(args: argparse.Namespace) -> int:
    from f2pipe.operations.deploy.render import issue_broker_files, render_files, write_files

    if args.connectors < 1:
        raise ConfigError("--connectors must be 1 or more")
    settings = get_settings()
    if args.broker_name:
        names = [*settings.extra_server_names(), *args.broker_name]
        settings = settings.model_copy(update={"broker_names": ",".join(names)})
    files = render_files(settings, args.target, args.connectors)
    for path in write_files(args.out, files):
        print(path)
    if args.with_certificates:
        for path in issue_broker_files(settings, args.out, args.broker_name):
            print(path)
    return 0


def _shares(args: argparse.Namespace) -> int:
    created = make_shares(get_settings(), args.parties)
    for path in created:
        print(f"created {path}")
    if not created:
        print("the PKI and its shares are complete; nothing to do")
    return 0


def make_shares(settings: Settings, parties: list[str]) -> list[str]:
    """Create the PKI's missing parts and a share folder per party; return what was created.

    A party ``svc-<name>`` is a service identity: its certificate is issued if
    missing (``svc-connector-mqtt-2``, a further broker's connector). Raises
    ConfigError for a party name that is not a plain folder name, CertError when
    the PKI cannot be read or a service name is invalid.
    """
    from f2pipe.pki.ca import SERVICE_NAMES
    from f2pipe.pki.state import SHARES, ensure_pki

    root = settings.state_dir / SHARES
    for party in parties:
        if not party or "/" in party or party.startswith("."):
            raise ConfigError(f"not a party name: {party!r}")
        (root / party).mkdir(parents=True, exist_ok=True)
    identities = [p for p in parties if p.startswith("svc-") and p not in SERVICE_NAMES]
    return ensure_pki(settings, [*SERVICE_NAMES, *identities]).created
