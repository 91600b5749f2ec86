"""Separate hosts on one machine: a network namespace, an address and a name per host.

:func:`host_network` builds, for a test run, one network namespace per host
(``<prefix>-<host>``), each with its loopback up and one interface on a bridge
that lives in a namespace of its own (``<prefix>-net``), so nothing is added
to the machine's own network and parallel runs never meet: each run has its
own bridge. Every host gets an address in :data:`SUBNET` and a DNS name
``<host>.f2h.test``; ``ip netns exec`` shows each namespace its own
``/etc/hosts`` (``/etc/netns/<namespace>/hosts``), which names every host, so
TLS clients check real names. Leaving the context deletes the namespaces
(their interfaces with them) and the hosts files, also when the test failed.

Building the network takes root (``ip netns add``); :class:`NetworkRefused`
says, in one line, why it could not be built.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DOMAIN", "SUBNET", "HostNetwork", "NetworkRefused", "host_network"]

#: The private network the hosts share (inside their own bridge namespace only).
SUBNET = "10.213.0"
#: The domain of the hosts' names (``.test`` is reserved for testing, RFC 2606).
DOMAIN = "f2h.test"
_NETNS_ETC = Path("/etc/netns")


class NetworkRefused(RuntimeError):
    """The machine refuses to build namespaces (not root, no ``ip``, no permission)."""


@dataclass
class HostNetwork:
    """The namespaces, addresses and names of one run's hosts."""

    prefix: str
    addresses: dict[str, str] = field(default_factory=dict)  # host -> address
    aliases: dict[str, str] = field(default_factory=dict)  # extra name -> host it points at

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def name(self, host: str) -> str:
        """The DNS name of ``host`` (``pg`` -> ``pg.f2h.test``)."""
        return f"{host}.{DOMAIN}"

    def run_in(self, host: str) -> list[str]:
        """The command prefix that runs a program on ``host``."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        lines += [f"{address} {self.name(host)}" for host, address in self.addresses.items()]
        lines += [f"{self.addresses[host]} {alias}" for alias, host in self.aliases.items()]
        return "\n".join(lines) + "\n"


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = (result.stderr.strip() or f"exit code {result.returncode}").splitlines()[0]
        raise NetworkRefused(f"`ip {' '.join(args)}` failed: {message}")


def _end_processes(namespace: str) -> None:
    """SIGKILL whatever still runs in ``namespace`` (this run's own, left by a failure)."""
    found = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    )
    for pid in found.stdout.split():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def host_network(
    hosts: Sequence[str], aliases: dict[str, str] | None = None, prefix: str | None = None
) -> Iterator[HostNetwork]:
    """Namespaces for ``hosts`` on one bridge, named ``<host>.f2h.test`` (``aliases``: more
    names, each pointing at one of the hosts); removed on exit. Raises NetworkRefused."""
    if shutil.which("ip") is None:
        raise NetworkRefused("no `ip` command (iproute2) on this machine")
    if os.geteuid() != 0:
        raise NetworkRefused("network namespaces need root (ip netns add)")
    network = HostNetwork(prefix or f"f2h-{os.getpid()}", aliases=dict(aliases or {}))
    made: list[str] = []
    etc_made = not _NETNS_ETC.exists()
    try:
        bridge = network.namespace("net")
        _ip("netns", "add", bridge)
        made.append(bridge)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for number, host in enumerate(hosts, 10):
            namespace = network.namespace(host)
            _ip("netns", "add", namespace)
            made.append(namespace)
            port = f"h{number}"
            _ip("-n", bridge, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", namespace)  # fmt: skip
            _ip("-n", bridge, "link", "set", port, "master", "br0", "up")
            address = f"{SUBNET}.{number}"
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            network.addresses[host] = address
        for host in hosts:
            folder = _NETNS_ETC / network.namespace(host)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(network.hosts_file())
        # `ip netns exec` also needs a mount namespace of its own, which a container
        # may refuse even to root: find out now, not from a server that will not start.
        entered = subprocess.run(
            [*network.run_in(hosts[0]), "true"], capture_output=True, text=True, check=False
        )
        if entered.returncode != 0:
            why = (entered.stderr.strip() or f"exit code {entered.returncode}").splitlines()[0]
            raise NetworkRefused(f"`ip netns exec` failed: {why}")
        yield network
    finally:
        for namespace in reversed(made):
            _end_processes(namespace)
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False)
            shutil.rmtree(_NETNS_ETC / namespace, ignore_errors=True)
        if etc_made:
            with contextlib.suppress(OSError):
                _NETNS_ETC.rmdir()  # only when empty: another run may be using it
