"""What the local stack finds installed, what it says while it installs, and where
PostgreSQL's data goes.

The version choice runs over fake ``/usr/lib/postgresql`` trees; the downloads
run fake ``apt-get`` and ``mvn`` programs; the placement starts a real private
PostgreSQL from a state folder its account cannot enter.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from f2pipe.errors import StackError
from f2pipe.operations import stack
from f2pipe.operations.stack import install, pgcluster
from f2pipe.settings import Settings, load_settings
from f2pipe.testing.servers import free_port


def _major(root: Path, major: str, programs: tuple[str, ...] = ("postgres", "initdb")) -> Path:
    bin_dir = root / major / "bin"
    bin_dir.mkdir(parents=True)
    for program in programs:
        (bin_dir / program).write_text("#!/bin/sh\n")
        (bin_dir / program).chmod(0o755)
    return root / major


# --------------------------------------------------------------------------- version
def test_the_newest_complete_major_of_15_or_newer_is_chosen(tmp_path: Path) -> None:
    for major in ("13", "15", "17"):
        _major(tmp_path, major)
    _major(tmp_path, "18", programs=("postgres",))  # half installed: no initdb
    (tmp_path / "notes").mkdir()

    assert pgcluster.installed_majors(tmp_path) == [17, 15]
    release = pgcluster.choose(tmp_path / "nodata", tmp_path)
    assert release is not None
    assert release.major == 17
    assert release.bin == tmp_path / "17" / "bin"


def test_a_cluster_keeps_the_major_that_made_it(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    _major(root, "15")
    _major(root, "17")
    data = tmp_path / "pg"
    data.mkdir()
    (data / "PG_VERSION").write_text("15\n")

    release = pgcluster.choose(data, root)
    assert release is not None
    assert release.major == 15

    (data / "PG_VERSION").write_text("16\n")  # made by a major no longer installed
    assert pgcluster.choose(data, root) is None


def test_nothing_is_chosen_below_15_or_on_a_machine_without_postgresql(tmp_path: Path) -> None:
    _major(tmp_path, "14")
    assert pgcluster.choose(tmp_path / "pg", tmp_path) is None
    assert pgcluster.installed_majors(tmp_path / "missing") == []


def test_timescaledb_is_preloaded_when_its_library_is_installed_for_that_major(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = pgcluster.Release(17, tmp_path)
    _major(tmp_path, "17")
    assert pgcluster.server_options(release) == []

    (tmp_path / "17" / "lib").mkdir()
    (tmp_path / "17" / "lib" / "timescaledb.so").write_bytes(b"")
    options = pgcluster.server_options(release)
    assert "shared_preload_libraries=timescaledb" in options

    # The line reaches the command the stack runs the server with.
    monkeypatch.setattr(pgcluster, "ROOT", tmp_path)
    settings = load_settings(state_dir=tmp_path / "state")
    command = stack.Postgres(settings, stack.Paths(settings.state_dir)).command()
    assert command[0] == str(tmp_path / "17" / "bin" / "postgres")
    assert command[command.index("shared_preload_libraries=timescaledb") - 1] == "-c"


def test_missing_postgresql_names_the_distributions_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgcluster, "ROOT", tmp_path / "none")
    settings = load_settings(state_dir=tmp_path / "state")
    programs = stack.Postgres(settings, stack.Paths(settings.state_dir)).programs()
    assert {p.package for p in programs} == {"postgresql"}
    assert all("15 or newer" in p.name for p in programs)

    with pytest.raises(StackError) as caught:
        install.ensure_programs(programs, stack.Paths(tmp_path), install=False)
    assert "apt-get install -y postgresql " in str(caught.value)

    # Installed afterwards (as apt-get would): the same programs are now found.
    _major(tmp_path / "none", "17")
    assert all(
        p.find() == str(tmp_path / "none" / "17" / "bin" / p.name.split()[0]) for p in programs
    )


# --------------------------------------------------------------------------- progress
def _fake(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!{sys.executable}\n{body}")
    (folder / name).chmod(0o755)


def test_apt_get_says_what_it_installs_and_how_much_it_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake(tmp_path / "bin", "apt-get", 'print("Need to get 1,024 kB/45.2 MB of archives.")\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "apt.log"

    install._apt_install(["redis-server"], log)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("installing redis-server with apt-get")
    assert lines[1].startswith("installed redis-server in ")
    assert lines[1].endswith("(1,024 kB fetched)")  # the rest of the 45.2 MB was cached

    install._apt_install(["redis-server"], log, quiet=True)
    assert capsys.readouterr().err == ""


def test_apt_output_is_read_for_the_size_it_fetched() -> None:
    assert install.apt_fetched("Need to get 45.2 MB of archives.\n") == "45.2 MB fetched"
    two_runs = "Need to get 2,048 B of archives.\nNeed to get 3.1 MB/3.2 MB of archives.\n"
    assert install.apt_fetched(two_runs) == "2,048 B + 3.1 MB fetched"
    assert install.apt_fetched("0 upgraded, 0 newly installed.\n") == "nothing fetched"


def test_the_kafka_fetch_says_how_many_jars_and_how_big(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A fake mvn writes two jars (1.5 MB in all) where the pom's fetch would.
    _fake(
        tmp_path / "bin",
        "mvn",
        "import sys, pathlib\n"
        "out = pathlib.Path(next(a for a in sys.argv if a.startswith('-DoutputDirectory='))"
        ".split('=', 1)[1])\n"
        "out.mkdir(parents=True)\n"
        "(out / 'kafka_2.13-4.1.0.jar').write_bytes(bytes(1_000_000))\n"
        "(out / 'kafka-clients-4.1.0.jar').write_bytes(bytes(500_000))\n",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    libs = tmp_path / "cache" / "libs"

    install.fetch_kafka_libs("4.1.0", libs, tmp_path / "mvn.log")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("fetching the Kafka 4.1.0 jars from Maven Central into ")
    assert lines[1].startswith("fetched 2 jars, 1.5 MB, in ")
    assert install.kafka_libs_current(libs)

    install.fetch_kafka_libs("4.1.0", libs, tmp_path / "mvn.log")  # current: nothing to say
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- placement
def _postgres_account() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("only root runs PostgreSQL as another account")
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres account (PostgreSQL is not installed)")


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """A temporary folder the postgres account may enter (pytest's own is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="f2pipe-place-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_folder_the_account_cannot_enter_moves_the_data_out(reachable_tmp: Path) -> None:
    account = _postgres_account()
    private = reachable_tmp / "private"
    private.mkdir(mode=0o700)
    open_state = reachable_tmp / "open"
    open_state.mkdir(mode=0o755)

    assert not pgcluster.reachable(private / "state" / "pg", account)
    moved = pgcluster.data_folder(private / "state", account)
    assert moved.parent.parent == Path(account.pw_dir)
    assert moved == pgcluster.data_folder(private / "state", account)  # one per state folder
    assert pgcluster.data_folder(open_state, account) == open_state / "pg"
    assert pgcluster.data_folder(private / "state", None) == private / "state" / "pg"


@pytest.fixture
def private_state() -> Iterator[Settings]:
    """Settings whose state folder is mode 0700, like a clone under /root."""
    account = _postgres_account()
    state = Path(tempfile.mkdtemp(prefix="f2pipe-private-"))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    port = free_port()
    settings = load_settings(
        state_dir=state,
        metadata_dsn=f"postgresql://postgres@127.0.0.1:{port}/f2pipe",
        timeseries_dsn=f"postgresql://postgres@127.0.0.1:{port}/f2pipe",
        stack_install=False,
    )
    try:
        yield settings
    finally:
        try:
            stack.down(settings, ["postgres"])
            pgcluster.discard(state, account)
        finally:
            shutil.rmtree(state, ignore_errors=True)


def test_postgresql_runs_from_a_private_state_folder_without_chmod(
    private_state: Settings,
) -> None:
    account = _postgres_account()
    state = private_state.state_dir

    assert stack.up(private_state, ["postgres"]) == ["postgres"]
    data = Path((state / pgcluster.RECORD).read_text().strip())
    assert data.parent == pgcluster.outside(state, account)
    folder = data.parent.stat()
    assert (folder.st_uid, stat.S_IMODE(folder.st_mode)) == (account.pw_uid, 0o700)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700  # no chmod of the user's folder
    assert not (state / "pg").exists()
    assert stack.status(private_state, ["postgres"])
    made = (data / "PG_VERSION").stat().st_ino

    # down stops the server and keeps the data, as it does for <state>/pg; the next up
    # finds the same cluster through the record instead of making another.
    assert stack.down(private_state, ["postgres"]) == ["postgres"]
    assert stack.up(private_state, ["postgres"]) == ["postgres"]
    assert (data / "PG_VERSION").stat().st_ino == made
    assert stack.status(private_state, ["postgres"])
    with pytest.raises(StackError, match="stop it first"):
        pgcluster.discard(state, account)  # never under a running server
    stack.down(private_state, ["postgres"])

    # Removing the cluster removes exactly the folder up made, and the record.
    assert pgcluster.discard(state, account) == data.parent
    assert not data.parent.exists()
    assert not (state / pgcluster.RECORD).exists()
    assert Path(account.pw_dir).is_dir()


def test_discard_refuses_a_record_that_points_at_someone_elses_folder(tmp_path: Path) -> None:
    account = _postgres_account()
    state = tmp_path / "state"
    state.mkdir()
    foreign = tmp_path / "foreign" / "pg"
    foreign.mkdir(parents=True)
    (state / pgcluster.RECORD).write_text(f"{foreign}\n")

    with pytest.raises(StackError):
        pgcluster.discard(state, account)
    assert foreign.is_dir()


def test_nothing_the_postgres_account_planted_is_written_through(reachable_tmp: Path) -> None:
    real = _postgres_account()
    home = reachable_tmp / "home"
    home.mkdir()
    account = pwd.struct_passwd((*real[:5], str(home), real.pw_shell))
    state = reachable_tmp / "state"
    state.mkdir(mode=0o700)
    data = pgcluster.data_folder(state, account)
    assert data.parent.parent == home
    precious = reachable_tmp / "precious"
    precious.write_text("keep\n")

    # The cluster's folder replaced by a link to elsewhere: refused, nothing chowned.
    data.parent.symlink_to(reachable_tmp / "elsewhere")
    (reachable_tmp / "elsewhere").mkdir()
    with pytest.raises(StackError, match="not a folder the stack made"):
        pgcluster.make_outside(state, data, account)
    assert (reachable_tmp / "elsewhere").stat().st_uid == 0
    data.parent.unlink()

    # The note replaced by a link to a file: the link goes, the file stays as it was.
    pgcluster.make_outside(state, data, account)
    note = data.parent / pgcluster.NOTE
    note.unlink()
    note.symlink_to(precious)
    pgcluster.make_outside(state, data, account)
    assert precious.read_text() == "keep\n"
    assert not note.is_symlink()
    assert note.read_text() == f"{state.resolve()}\n"
    assert (state / pgcluster.RECORD).read_text() == f"{data}\n"
