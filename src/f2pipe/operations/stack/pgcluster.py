"""Which PostgreSQL runs the local cluster, and where the cluster's files live.

- The server is the newest major (15 or newer) installed by Debian under
  ``/usr/lib/postgresql/<major>/bin``; a cluster already made keeps the major
  that made it (its ``PG_VERSION``), since no other major can open it.
- With TimescaleDB's library installed for that major, the server preloads it.
- The data folder is ``<state>/pg``, unless the server's account (``postgres``
  when the stack runs as root) cannot walk down to it, as in a clone under
  ``/root`` (mode 0700): then it is ``<postgres home>/f2pipe-<hash of the
  state folder>/pg``, a folder the stack makes (mode 0700, owned by
  ``postgres``) and records in ``<state>/pg.location``, so every later ``up``
  finds the same cluster and :func:`discard` removes exactly that folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from f2pipe.errors import StackError

ROOT = Path("/usr/lib/postgresql")
MIN_MAJOR = 15
RECORD = "pg.location"  # in the state folder: the data folder when it is not <state>/pg
NOTE = "state-folder"  # in a folder made outside the state folder: whose it is


# --------------------------------------------------------------------------- version
def installed_majors(root: Path | None = None) -> list[int]:
    """Majors >= 15 with ``postgres`` and ``initdb`` in ``root/<major>/bin``, newest first.

    ``root`` defaults to :data:`ROOT`, where Debian's packages put each major.
    """
    root = ROOT if root is None else root
    try:
        names = [entry.name for entry in root.iterdir()]
    except OSError:
        return []
    majors = [int(name) for name in names if name.isdigit() and int(name) >= MIN_MAJOR]
    return sorted(
        (m for m in majors if all(_executable(root / str(m) / "bin" / p) for p in _PROGRAMS)),
        reverse=True,
    )


_PROGRAMS = ("postgres", "initdb")


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def cluster_major(data: Path) -> int | None:
    """The major that made the cluster in ``data``, None when there is none yet."""
    try:
        text = (data / "PG_VERSION").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class Release:
    """One installed major: where its programs and libraries are."""

    major: int
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / str(self.major) / "bin"

    @property
    def lib(self) -> Path:
        return self.root / str(self.major) / "lib"

    def preload(self) -> list[str]:
        """Libraries the server must preload: TimescaleDB's, when installed for this major."""
        return ["timescaledb"] if (self.lib / "timescaledb.so").is_file() else []


def choose(data: Path, root: Path | None = None) -> Release | None:
    """The release that runs the cluster in ``data``: its own major, else the newest.

    None when that major is not installed (then the caller names what to install).
    """
    root = ROOT if root is None else root
    made_by = cluster_major(data)
    majors = installed_majors(root)
    if made_by is not None:
        return Release(made_by, root) if made_by in majors else None
    return Release(majors[0], root) if majors else None


def server_options(release: Release) -> list[str]:
    """``-c`` options that follow from what is installed (the rest are the server's own)."""
    libraries = release.preload()
    if not libraries:
        return []
    options = ["-c", f"shared_preload_libraries={','.join(libraries)}"]
    if "timescaledb" in libraries:
        # A local stack, often a test one, has no business reporting home.
        options += ["-c", "timescaledb.telemetry_level=off"]
    return options


# --------------------------------------------------------------------------- placement
def _groups(account: pwd.struct_passwd) -> set[int]:
    return set(os.getgrouplist(account.pw_name, account.pw_gid))


def enterable(folder: Path, account: pwd.struct_passwd) -> bool:
    """True when ``account`` may pass through ``folder`` (its execute bit; ACLs not read)."""
    info = folder.stat()
    if account.pw_uid == 0:
        return True
    if info.st_uid == account.pw_uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in _groups(account):
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def reachable(path: Path, account: pwd.struct_passwd) -> bool:
    """True when ``account`` can walk down to ``path`` through the folders that exist.

    Folders still to be made are made by the stack with the usual modes, so
    only the existing ancestors can stand in the way.
    """
    return all(enterable(folder, account) for folder in reversed(path.parents) if folder.exists())


def outside(state: Path, account: pwd.struct_passwd) -> Path:
    """The folder for ``state``'s cluster in the home of ``account``, one per state folder."""
    digest = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:16]
    return Path(account.pw_dir) / f"f2pipe-{digest}"


def data_folder(state: Path, account: pwd.struct_passwd | None) -> Path:
    """Where the cluster of ``state`` lives (see the module docstring); makes nothing."""
    try:
        return Path((state / RECORD).read_text().strip())
    except OSError:
        pass
    inside = state / "pg"
    if account is None or cluster_major(inside) is not None or reachable(inside, account):
        return inside
    return outside(state, account) / "pg"


def make_outside(state: Path, data: Path, account: pwd.struct_passwd) -> None:
    """Make the folder that holds ``data`` outside ``state`` and record it there; idempotent.

    Root writes into a folder ``account`` owns, so nothing is followed there: a
    symbolic link planted in its place is refused, never written through.
    """
    folder = data.parent
    if not (folder.parent.is_dir() and reachable(folder, account)):
        raise StackError(
            f"user {account.pw_name} can enter neither {state} nor {folder.parent}; run "
            f"`chmod o+x` on the folders above {state} or set F2PIPE_STATE_DIR to one it can"
        )
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    if folder.is_symlink() or not folder.is_dir():
        raise StackError(f"{folder} is not a folder the stack made; move it away and run up again")
    os.chown(folder, account.pw_uid, account.pw_gid, follow_symlinks=False)
    folder.chmod(0o700)
    note = folder / NOTE
    note.unlink(missing_ok=True)
    descriptor = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(descriptor, "w") as out:
        out.write(f"{state.resolve()}\n")
    os.chown(note, account.pw_uid, account.pw_gid, follow_symlinks=False)
    record = state / RECORD
    scratch = record.with_name(RECORD + ".new")
    scratch.write_text(f"{data}\n")
    scratch.replace(record)


def discard(state: Path, account: pwd.struct_passwd | None) -> Path | None:
    """Delete the cluster of ``state``; returns what went, None when there was none.

    Raises StackError while a server runs on it (its ``postmaster.pid`` is
    there) and, outside the state folder, unless the folder's note names
    ``state``, so a wrong record can never remove someone else's files.
    """
    data = data_folder(state, account)
    if (data / "postmaster.pid").exists():
        raise StackError(f"PostgreSQL runs on {data}; stop it first (f2pipe stack down postgres)")
    if data == state / "pg":
        if not data.exists():
            return None
        shutil.rmtree(data)
        return data
    folder = data.parent
    if not folder.exists():
        (state / RECORD).unlink(missing_ok=True)
        return None
    try:
        owner = (folder / NOTE).read_text().strip()
    except OSError:
        owner = ""
    if owner != str(state.resolve()):
        raise StackError(f"{folder} is not the cluster of {state}; left in place")
    shutil.rmtree(folder)
    (state / RECORD).unlink(missing_ok=True)
    return folder
