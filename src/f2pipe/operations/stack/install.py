"""What the servers need on the machine: Debian packages, Java 17+, the Kafka jars.

Run as root on Debian, missing packages are installed with apt-get unless
``F2PIPE_STACK_INSTALL=false``; otherwise the error says what to install. The
Kafka broker is not a Debian package: its jars come from Maven Central through
``deploy/kafka/pom.xml`` into a cache outside the checkout. The wheel carries a
copy of that pom (``maven/pom.xml`` next to this module), so an installed
``f2pipe stack up`` needs no checkout. Each download says what it fetches
before it starts, and how long it took and how much it fetched once done.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from f2pipe.errors import StackError
from f2pipe.operations.stack.supervise import Paths, log_tail, running_as_root

# src/f2pipe/operations/stack/install.py -> the checkout that holds deploy/. The
# checkout's pom wins, so an edit to it takes effect in a checkout without a rebuild;
# an installed wheel reads its own copy (pyproject.toml's wheel sources).
_CHECKOUT_POM = Path(__file__).resolve().parents[4] / "deploy" / "kafka" / "pom.xml"
_PACKAGED_POM = Path(__file__).resolve().with_name("maven") / "pom.xml"
KAFKA_POM = _CHECKOUT_POM if _CHECKOUT_POM.is_file() else _PACKAGED_POM


def _say(text: str, quiet: bool = False) -> None:
    """One progress line on stderr, where it never mixes with a command's output."""
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def human_size(count: float) -> str:
    """``12.3 MB``: a size for a person, in decimal units as apt-get prints them."""
    for unit in ("B", "kB", "MB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


# --------------------------------------------------------------------------- Debian packages
@dataclass(frozen=True)
class Program:
    """A program a server needs, and the Debian package that provides it."""

    name: str
    package: str
    path: str = ""  # absolute path when it is not looked up on PATH
    executable: bool = True  # False for a file that is only read (a C header)
    # Where it is once installed, asked again after apt-get (PostgreSQL's folder
    # names the major, which is known only once the package is in).
    locate: Callable[[], str | None] | None = field(default=None, compare=False)

    def find(self) -> str | None:
        if self.locate is not None:
            found = self.locate()
            return found if found is not None and os.access(found, os.X_OK) else None
        if self.path:
            mode = os.X_OK if self.executable else os.R_OK
            return self.path if os.path.isfile(self.path) and os.access(self.path, mode) else None
        # /usr/sbin holds mosquitto, and is not on a normal user's PATH.
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        return shutil.which(self.name, path=search)


def _is_debian() -> bool:
    return Path("/etc/debian_version").is_file() and shutil.which("apt-get") is not None


def ensure_programs(programs: Sequence[Program], paths: Paths, install: bool) -> None:
    """Install missing programs' packages (root on Debian) or raise naming what to install."""
    missing = list(dict.fromkeys(p for p in programs if p.find() is None))
    if not missing:
        return
    names = ", ".join(p.name for p in missing)
    packages = list(dict.fromkeys(p.package for p in missing))
    if not (install and running_as_root() and _is_debian()):
        prefix = "" if running_as_root() else "sudo "
        hint = "" if install else " (automatic install is off: F2PIPE_STACK_INSTALL=false)"
        raise StackError(
            f"missing {names}; install with: {prefix}apt-get install -y {' '.join(packages)}"
            f" (Debian package names){hint}"
        )
    _apt_install(packages, paths.log / "apt.log")
    still = [p.name for p in missing if p.find() is None]
    if still:
        raise StackError(f"{', '.join(still)} still missing after apt-get install (see apt.log)")


def _apt_install(packages: list[str], log: Path, quiet: bool = False) -> None:
    _say(f"installing {' '.join(packages)} with apt-get (log: {log}) ...", quiet)
    began, logged = time.monotonic(), log.stat().st_size if log.exists() else 0
    postgres = any(p == "postgresql" or p.startswith("postgresql-") for p in packages)
    if postgres and not Path("/etc/postgresql-common").exists():
        # The postgresql package creates and starts a system cluster on 5432 unless told
        # not to, which would take the port our own cluster needs.
        _apt(["postgresql-common"], log)
        conf = Path("/etc/postgresql-common/createcluster.conf")
        conf.parent.mkdir(parents=True, exist_ok=True)
        with conf.open("a") as out:
            out.write("\ncreate_main_cluster = false\n")
    _apt(packages, log)
    with log.open("rb") as written:
        written.seek(logged)
        fetched = apt_fetched(written.read().decode(errors="replace"))
    _say(f"installed {' '.join(packages)} in {time.monotonic() - began:.0f} s ({fetched})", quiet)


def apt_fetched(output: str) -> str:
    """How much apt-get downloaded, in its own words from ``output``.

    apt-get prints ``Need to get 45.2 MB of archives.`` before it downloads, or
    ``Need to get 1,024 kB/45.2 MB of archives.`` when the rest is cached: the
    first size is the download. Each run's size is kept, joined by ``+``.
    """
    sizes = re.findall(r"^Need to get ([\d.,]+ \w?B)(?:/[\d.,]+ \w?B)? of archives", output, re.M)
    return f"{' + '.join(sizes)} fetched" if sizes else "nothing fetched"


def _apt(packages: list[str], log: Path) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    with log.open("ab") as out:
        if subprocess.run(command, stdout=out, stderr=out, env=env, check=False).returncode == 0:
            return
        # Most often the package lists were never downloaded (fresh container): update once.
        subprocess.run(["apt-get", "update"], stdout=out, stderr=out, env=env, check=False)
        if subprocess.run(command, stdout=out, stderr=out, env=env, check=False).returncode == 0:
            return
    raise StackError(
        f"apt-get install {' '.join(packages)} failed{log_tail(log)} (full log: {log})"
    )


# --------------------------------------------------------------------------- Java
def _java_version_text() -> str:
    """What ``java -version`` would say, read from the JDK's release file when possible."""
    java = shutil.which("java")
    if java is not None:
        # bin/java -> <java home>/bin/java; the release file avoids starting a JVM (seconds).
        release = Path(java).resolve().parent.parent / "release"
        with contextlib.suppress(OSError):
            found = re.search(r'JAVA_VERSION="([^"]+)"', release.read_text())
            if found:
                return f'version "{found.group(1)}"'
    result = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    return result.stderr


def check_java() -> None:
    """Raise StackError unless ``java`` is version 17 or newer (Kafka 4 needs it)."""
    match = re.search(r'version "(\d+)', _java_version_text())
    major = int(match.group(1)) if match else 0
    if major < 17:
        raise StackError(
            f"Kafka 4 needs Java 17 or newer, found {match.group(1) if match else 'none'}; "
            "install it with: apt-get install -y default-jre-headless"
        )


# --------------------------------------------------------------------------- Kafka jars
def kafka_version() -> str:
    """The Kafka version the broker pom pins."""
    try:
        pom = KAFKA_POM.read_text()
    except OSError:
        raise StackError(
            f"{KAFKA_POM} is missing: reinstall f2pipe, or run it from its checkout"
        ) from None
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    if match is None:
        raise StackError(f"{KAFKA_POM} does not set <kafka.version>")
    return match.group(1).strip()


def kafka_libs(version: str) -> Path:
    """``~/.cache/f2pipe/kafka-<version>/libs``: outside the clone, shared by checkouts."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "f2pipe" / f"kafka-{version}" / "libs"


def _pom_digest() -> str:
    return hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()


def kafka_libs_current(libs: Path) -> bool:
    """True when ``libs`` holds the jars of the pom as it is now (no Maven run needed)."""
    stamp = libs / ".pom-sha256"
    return stamp.is_file() and stamp.read_text().strip() == _pom_digest()


def fetch_kafka_libs(version: str, libs: Path, log: Path) -> None:
    """Copy the broker's jars from Maven Central into ``libs`` unless the pom is unchanged.

    The jars land in a fresh folder that then replaces ``libs`` in one rename, so
    a broker started from the old folder keeps running and no stale jar remains.
    """
    if kafka_libs_current(libs):
        return
    fresh = libs.with_name("libs.new")
    shutil.rmtree(fresh, ignore_errors=True)
    _say(f"fetching the Kafka {version} jars from Maven Central into {libs} (log: {log}) ...")
    began = time.monotonic()
    with log.open("ab") as out:
        result = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
             f"-DoutputDirectory={fresh}"],
            stdout=out, stderr=out, check=False,
        )  # fmt: skip
    if result.returncode != 0 or not any(fresh.glob("kafka_*.jar")):
        raise StackError(
            f"mvn could not fetch the Kafka jars (log: {log}); check access to Maven Central"
        )
    (fresh / ".pom-sha256").write_text(_pom_digest() + "\n")
    old = libs.with_name("libs.old")
    shutil.rmtree(old, ignore_errors=True)
    if libs.exists():
        libs.rename(old)
    fresh.rename(libs)
    shutil.rmtree(old, ignore_errors=True)
    jars = list(libs.glob("*.jar"))
    size = human_size(sum(jar.stat().st_size for jar in jars))
    _say(f"fetched {len(jars)} jars, {size}, in {time.monotonic() - began:.0f} s")
