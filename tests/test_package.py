"""The package as a user gets it: an sdist and a wheel, installed away from the checkout.

Both are built with uv (the wheel from the sdist, as an installer would), the
wheel goes into a fresh virtual environment with the locked dependencies (from
uv's cache, so this takes seconds), and the commands that need no servers run
from a folder outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import f2pipe
from f2pipe.operations.stack import kafka_version

CHECKOUT = Path(__file__).resolve().parents[1]
FRAME = "01 03 06 09 F8 11 A0 01 9F C4 DE"  # 25.52 °C, 45.12 %, 415 ppm, CRC right
TOPIC = "tele/f2-e4fd45f654be/sensor-mode/J1/sensor-1"


def _uv() -> list[str]:
    """uv from PATH, else the module of the Python that `make venv` installed it for."""
    found = shutil.which("uv") or shutil.which("uv", path=str(Path.home() / ".local" / "bin"))
    if found is not None:
        return [found]
    for python in ("python3", sys.executable):
        probe = subprocess.run([python, "-m", "uv", "--version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [python, "-m", "uv"]
    pytest.fail("uv is missing: `make venv` installs it")


@dataclass(frozen=True)
class Installed:
    dist: Path
    venv: Path
    outside: Path  # a working folder outside the checkout

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("F2PIPE_", "PYTHON"))}
        env.update(VIRTUAL_ENV=str(self.venv), PATH=f"{self.venv / 'bin'}:/usr/bin:/bin")
        return subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            input=stdin,
            cwd=self.outside,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("package")
    dist, venv, outside = base / "dist", base / "venv", base / "elsewhere"
    outside.mkdir()
    uv = _uv()

    def call(*args: str) -> None:
        # No VIRTUAL_ENV: uv must act on the folders named here, never on the checkout's .venv.
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        result = subprocess.run(
            [*uv, *args], cwd=CHECKOUT, env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"uv {' '.join(args)}:\n{result.stderr}"

    call("build", "--quiet", "--out-dir", str(dist), str(CHECKOUT))  # the wheel from the sdist
    requirements = base / "requirements.txt"
    call("export", "--quiet", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project",
         "--output-file", str(requirements))  # fmt: skip
    call("venv", "--quiet", "--python", sys.executable, str(venv))
    (wheel,) = dist.glob("f2pipe-*.whl")
    call("pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
         "-r", str(requirements), str(wheel))  # fmt: skip
    return Installed(dist, venv, outside)


def test_the_wheel_runs_without_the_checkout(installed: Installed) -> None:
    where = installed.run("python", "-c", "import f2pipe; print(f2pipe.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(installed.venv)), where.stdout

    version = installed.run("f2pipe", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == (
        f"f2pipe {f2pipe.__version__} (Python {sys.version.split()[0]})"
    )

    payload = f'{{"timestamp": "2024-07-15 14:30:25.123456", "data": "{FRAME}"}}'
    decoded = installed.run("f2pipe", "decode", "--topic", TOPIC, "--payload", "-", "--json",
                            stdin=payload)  # fmt: skip
    assert decoded.returncode == 0, decoded.stderr
    assert '"label": "Temperature", "value": 25.52' in decoded.stdout
    assert '"label": "CO2", "value": 415.0' in decoded.stdout

    checked = installed.run("f2pipe", "config", "check")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("settings are valid")


def test_the_wheel_carries_the_kafka_pom_and_bench_says_it_needs_a_checkout(
    installed: Installed,
) -> None:
    pom = installed.run(
        "python", "-c",
        "from f2pipe.operations.stack import install; "
        "print(install.KAFKA_POM); print(install.kafka_version())",
    )  # fmt: skip
    assert pom.returncode == 0, pom.stderr
    path, version = pom.stdout.split()
    assert path.startswith(str(installed.venv))
    assert version == kafka_version()

    # `stack` reads the pom when it describes Kafka: an installed one needs no checkout.
    status = installed.run("f2pipe", "stack", "status", "kafka")
    assert status.stderr == ""
    assert status.stdout.split()[0] == "kafka"

    bench = installed.run("f2pipe", "bench")
    assert bench.returncode == 1
    assert bench.stdout == ""
    assert bench.stderr.count("\n") == 1
    assert "needs an f2pipe checkout" in bench.stderr

    # The broker plugin's C source comes with the wheel, so `stack up` can build it.
    plugin = installed.run(
        "python", "-c",
        "import sys; from pathlib import Path; from f2pipe.operations.stack import retainguard; "
        "print(retainguard.build(Path(sys.argv[1])))", str(installed.outside),
    )  # fmt: skip
    assert plugin.returncode == 0, plugin.stderr
    assert Path(plugin.stdout.strip()).is_file()


def test_the_sdist_holds_what_a_wheel_is_built_from(installed: Installed) -> None:
    (sdist,) = installed.dist.glob("f2pipe-*.tar.gz")
    listing = subprocess.run(
        ["tar", "-tzf", str(sdist)], capture_output=True, text=True, check=True
    ).stdout.split()
    top = sdist.name.removesuffix(".tar.gz")
    assert f"{top}/deploy/kafka/pom.xml" in listing
    assert f"{top}/src/f2pipe/py.typed" in listing
    assert not [name for name in listing if "/var/" in name or "/.venv/" in name]

    # Installed on its own (uv builds it with hatchling), it is the same package.
    venv = installed.dist.parent / "venv-sdist"
    subprocess.run([*_uv(), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    subprocess.run(
        [*_uv(), "pip", "install", "--quiet", "--no-deps", "--python", str(venv / "bin" / "python"),
         str(sdist)],
        check=True,
    )  # fmt: skip
    shown = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('f2pipe'), "
         "any(f.match('f2pipe/operations/stack/maven/pom.xml') for f in m.files('f2pipe')))"],
        cwd=installed.outside, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert shown.stdout.split() == [f2pipe.__version__, "True"]


def test_every_runtime_dependency_is_bounded_to_the_major_the_lock_tests() -> None:
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]
    lock = tomllib.loads((CHECKOUT / "uv.lock").read_text())
    locked = {canonicalize_name(p["name"]): p["version"] for p in lock["package"]}
    for text in project["dependencies"]:
        requirement = Requirement(text)
        version = locked[canonicalize_name(requirement.name)]
        assert any(spec.operator == "<" for spec in requirement.specifier), text
        assert requirement.specifier.contains(version), f"{text} excludes the locked {version}"


def test_the_image_builds_its_wheel_from_what_dockerignore_lets_in(tmp_path: Path) -> None:
    # The Dockerfile's build stage sees only these (.dockerignore); the pom is not needed
    # in the image, and its absence must not fail the build.
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(CHECKOUT / name, tmp_path / name)
    shutil.copytree(
        CHECKOUT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__")
    )
    result = subprocess.run(
        [*_uv(), "build", "--quiet", "--wheel", "--out-dir", str(tmp_path / "dist")],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "dist").glob("f2pipe-*.whl"))) == 1
