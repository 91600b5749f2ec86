"""The base of every process the stack supervises: a server, or a service (``f2pipe up``).

A subclass describes the process (ports, programs, command, health probe);
the base starts it in its own session with its log under ``<state>/log``,
records its pid, waits until it is healthy and stops it, never touching a
process it did not start (see :mod:`.supervise`).
"""

from __future__ import annotations

import abc
import contextlib
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path
from typing import ClassVar

from f2pipe.errors import StackError
from f2pipe.operations.stack.install import Program
from f2pipe.operations.stack.supervise import (
    LOOPBACK,
    Paths,
    PidFile,
    adopt,
    log_tail,
    port_in_use,
    reap,
    wait_gone,
)
from f2pipe.settings import Settings

#: Server (or service) name -> a command its process is started through, such as
#: ``ip netns exec NAME``: how tests run each on a host of its own on one machine.
#: Empty in use.
LAUNCH_PREFIX: dict[str, list[str]] = {}


class Server(abc.ABC):
    """One local server: what it needs, how it starts, how it is probed and stopped.

    Subclasses set ``name`` and implement :meth:`ports`, :meth:`programs`,
    :meth:`command` and :meth:`healthy`; :meth:`prepare` and :meth:`after_healthy`
    are idempotent one-time set-up steps.
    """

    name: ClassVar[str]
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    start_timeout: ClassVar[float] = 60.0
    stop_timeout: ClassVar[float] = 60.0

    def __init__(self, settings: Settings, paths: Paths) -> None:
        self.settings = settings
        self.paths = paths
        self.pidfile = PidFile(paths.run / f"{self.name}.pid")
        self.log_file = paths.log / f"{self.name}.log"
        self.last_error = ""
        #: Why the last stop had to kill the process ("" when it stopped by itself).
        self.killed = ""
        self._proc: subprocess.Popen[bytes] | None = None

    # -- what subclasses describe
    @abc.abstractmethod
    def ports(self) -> dict[int, str]:
        """Each port this server listens on, mapped to the variable that sets it."""

    @abc.abstractmethod
    def programs(self) -> list[Program]:
        """Programs that must be installed before :meth:`prepare`."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The foreground command that runs the server."""

    @abc.abstractmethod
    def healthy(self) -> bool:
        """One quick probe; sets ``last_error`` when it fails."""

    def prepare(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Create data folders and configuration; idempotent."""

    def after_healthy(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Create what must exist inside the running server (database, topics)."""

    def run_as(self) -> pwd.struct_passwd | None:
        """The account to run as (None: the caller's)."""
        return None

    def environment(self) -> dict[str, str]:
        """Variables set for the process on top of the caller's environment."""
        return {}

    def withheld(self) -> frozenset[str]:
        """Variables of the caller's environment the process must not inherit."""
        return frozenset()

    def host(self) -> str:
        """Where it listens and is probed: its client setting's host (loopback by default)."""
        return LOOPBACK

    def describe(self) -> str:
        return ", ".join(f"{self.host()}:{port}" for port in self.ports())

    def workdir(self) -> Path:
        """The server's own folder under the state folder (its working directory)."""
        return self.paths.state / self.name

    # -- shared behaviour
    def pid(self) -> int | None:
        reap()
        return self.pidfile.live_pid()

    def foreign_port(self) -> int | None:
        """A port of ours that some other process holds, if any."""
        return next((port for port in self.ports() if port_in_use(port, self.host())), None)

    def check_ports(self) -> None:
        port = self.foreign_port()
        if port is not None:
            variable = self.ports()[port]
            raise StackError(
                f"port {port} for {self.name} is already in use by another process; "
                f"stop that process or choose another port with {variable}"
            )

    def start(self) -> None:
        """Start the server in the background and record its pid (does not wait)."""
        user = self.run_as()
        withheld = self.withheld()
        env = {k: v for k, v in os.environ.items() if k not in withheld}
        env.update(self.environment())
        if user is not None:
            env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
        command = self.command()
        prefix = LAUNCH_PREFIX.get(self.name, [])
        if prefix and user is not None:
            # The prefix enters a namespace, which takes root: the server drops to its
            # account only after it.
            drop = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
            command = ["setpriv", *drop, "--", *command]
            user = None
        with self.log_file.open("ab") as out:
            self._proc = subprocess.Popen(
                [*prefix, *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir(),
                env=env,
                # Its own session: a Ctrl-C in the terminal that ran `up` must not reach it.
                start_new_session=True,
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [],
            )
        adopt(self._proc)
        self.pidfile.write(self._proc.pid)
        self.on_started(self._proc.pid)

    def on_started(self, pid: int) -> None:  # noqa: B027 - optional hook
        """Hook after the pid is recorded."""

    def on_stopped(self) -> None:  # noqa: B027 - optional hook
        """Hook after the process is gone."""

    def wait_healthy(self) -> None:
        """Block until :meth:`healthy`; raise StackError if it dies or times out."""
        deadline = time.monotonic() + self.start_timeout
        while not self.healthy():
            if self._proc is not None and self._proc.poll() is not None:
                raise StackError(
                    f"{self.name} exited with code {self._proc.returncode} while starting"
                    f"{self.failure_hint()}"
                )
            if self.pid() is None and self._proc is None:
                raise StackError(f"{self.name} is not running (log: {self.log_file})")
            if time.monotonic() > deadline:
                raise StackError(
                    f"{self.name} not healthy after {self.start_timeout:.0f}s: {self.last_error}"
                    f" (log: {self.log_file})"
                )
            time.sleep(0.2)

    def failure_hint(self) -> str:
        """The last line the server logged, and where its log is."""
        return f"{log_tail(self.log_file)} (log: {self.log_file})"

    def stop(self) -> bool:
        """Stop the process recorded in our pid file; False if it was not running."""
        pid = self.begin_stop()
        if pid is None:
            return False
        self.end_stop(pid, time.monotonic() + self.stop_timeout)
        return True

    def begin_stop(self) -> int | None:
        """Send the stop signal; the pid signalled, None if it was not running."""
        pid = self.pid()
        if pid is None:
            self.pidfile.remove()
            return None
        os.kill(pid, self.stop_signal)
        return pid

    def end_stop(self, pid: int, deadline: float, why: str = "") -> None:
        """Wait until ``pid`` is gone, or kill it at ``deadline`` and say so in ``killed``
        (``why``: the reason it could not stop by itself, if known)."""
        self.killed = ""
        if not wait_gone(pid, deadline - time.monotonic()):
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 10.0)
            self.killed = (
                why or f"still running {self.stop_timeout:.0f} s after {self.stop_signal.name}"
            )
        self.pidfile.remove()
        self.on_stopped()
