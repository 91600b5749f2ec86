"""Supervision of the processes the stack starts: pid files, reaping, locks and ports.

A process is *ours* when its pid file names a live process whose kernel start
time equals the one recorded next to the pid, so a recycled pid is never
mistaken for ours and nothing here ever signals a foreign process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import pwd
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from f2pipe.errors import StackError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Paths:
    """Where the stack keeps things; everything is under the one state folder."""

    state: Path

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def log(self) -> Path:
        return self.state / "log"

    def make(self) -> None:
        for folder in (self.state, self.run, self.log):
            folder.mkdir(parents=True, exist_ok=True)


def start_time(pid: int) -> str | None:
    """The process's kernel start time (clock ticks since boot), None if gone or a zombie.

    A killed process's first thread may be a zombie while its others still exit (a
    JVM's hundreds take a moment), holding its sockets until the last is gone: it
    counts as running until then.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # Fields after the command name, which is in parentheses and may contain spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X") and len(os.listdir(f"/proc/{pid}/task")) <= 1:
            return None
    except OSError:
        return None
    return fields[19]


# Every server or service this process started, kept until it exits: so it is reaped
# (a killed child never lingers as a zombie that still holds its pid) and so its Popen
# is never dropped while it runs, which Python reports as a leak.
_CHILDREN: list[subprocess.Popen[bytes]] = []


def adopt(child: subprocess.Popen[bytes]) -> None:
    """Keep ``child`` until it has exited and :func:`reap` collected it."""
    _CHILDREN.append(child)


def reap() -> None:
    """Collect the exit status of children that ended; cheap, never blocks."""
    _CHILDREN[:] = [child for child in _CHILDREN if child.poll() is None]


def wait_gone(pid: int, timeout: float) -> bool:
    """Block until process ``pid`` is gone (reaping our own children); False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        reap()  # our own children must not linger as zombies
        if start_time(pid) is None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


class PidFile:
    """``<pid> <start time>`` of a process we started; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, pid: int) -> None:
        started = start_time(pid)
        if started is None:
            raise StackError(f"process {pid} exited right after it was started")
        self.path.write_text(f"{pid} {started}\n")

    def live_pid(self) -> int | None:
        """The recorded pid if that very process is still running, else None."""
        try:
            pid_text, started = self.path.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        return pid if start_time(pid) == started else None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(paths: Paths, name: str = "stack") -> Iterator[None]:
    """One `up` or `down` of ``name`` at a time per state folder.

    flock locks belong to an open file, so a process holding ``services`` may
    still take ``stack`` (a different file) without deadlocking on itself.
    """
    paths.make()
    with (paths.run / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def is_loopback(host: str) -> bool:
    """True for a loopback name or address (``localhost``, ``127.x``, ``::1``)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_of(host: str) -> str:
    """The IPv4 (else IPv6) address ``host`` resolves to here; StackError if it does not."""
    host = host.strip("[]")
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise StackError(f"{host} does not resolve on this machine; fix its name") from None
    found.sort(key=lambda entry: entry[0] != socket.AF_INET)
    return str(found[0][4][0])


def is_local(host: str) -> bool:
    """True when ``host`` is loopback or an address of this machine (one a server can bind)."""
    if is_loopback(host):
        return True
    try:
        address = address_of(host)
    except StackError:
        return False
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True when something listens on (or holds) ``host:port``; an address that is not
    this machine's is held by no process here."""
    address = host if host == LOOPBACK else address_of(host)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR so that our own recent connections in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return False


def port_accepts(port: int, timeout: float = 0.5, host: str = LOOPBACK) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def running_as_root() -> bool:
    return os.geteuid() == 0


def user_account(name: str) -> pwd.struct_passwd | None:
    """The account ``name``, None when it does not exist."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def log_tail(path: Path) -> str:
    """``": <last non-empty line>"`` of a log for a one-line error, "" if there is none."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    last = next((line for line in reversed(lines) if line), "")
    return f": {last[:200]}" if last else ""
