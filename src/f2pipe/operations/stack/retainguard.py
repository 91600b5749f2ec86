"""The broker plugin that refuses retained messages, and how it is built.

``retain_guard.c`` (next to this module, shipped in the wheel) is a Mosquitto
plugin whose ACL check denies every retained PUBLISH and defers everything
else to the ACL file (the C file says why the broker needs it). The local
stack compiles it with the machine's C compiler against the Debian package
``mosquitto-dev`` into ``<state>/mosquitto``, once per source version; a
container deployment compiles it in the broker's image
(:func:`render_dockerfile`).

What a device sees: an MQTT 5 client gets "not authorized" (0x87) in the PUBACK
of a retained QoS 1 message, an MQTT 3.1.1 client an ordinary PUBACK; either
way the broker neither stores nor forwards the message, and a retained will is
never sent.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from pathlib import Path, PurePosixPath

from f2pipe.errors import StackError
from f2pipe.operations.stack.install import Program

__all__ = ["SOURCE", "build", "plugin_path", "programs", "render_dockerfile"]

SOURCE = Path(__file__).resolve().with_name("retain_guard.c")
#: Where the broker image of a container deployment keeps the built plugin.
IMAGE_PLUGIN = PurePosixPath("/usr/lib/mosquitto/f2pipe_retain_guard.so")
_COMPILE = ["-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared"]


def programs() -> list[Program]:
    """The compiler and the broker's plugin headers (``mosquitto.h`` is libmosquitto-dev's)."""
    return [
        Program("cc", "gcc"),
        _header("mosquitto_plugin.h", "mosquitto-dev"),
        _header("mosquitto.h", "libmosquitto-dev"),
    ]


def _header(name: str, package: str) -> Program:
    return Program(name, package, path=f"/usr/include/{name}", executable=False)


def plugin_path(directory: Path) -> Path:
    """The built plugin in ``directory``, named after its source's digest."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return directory / f"retain_guard-{digest}.so"


def build(directory: Path) -> Path:
    """Compile the plugin into ``directory`` unless this version is there; return its path.

    Raises StackError with the compiler's first error line when it fails.
    """
    target = plugin_path(directory)
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("retain_guard-*.so"):
        if stale != target:  # another broker's start may have built this one meanwhile
            stale.unlink(missing_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    compiled = subprocess.run(
        ["cc", *_COMPILE, "-o", str(tmp), str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if compiled.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((line for line in compiled.stderr.splitlines() if "error" in line), "")
        raise StackError(
            f"cannot build the broker's retain guard plugin from {SOURCE}: "
            f"{first or compiled.stderr.strip()[:200]} (needs gcc and mosquitto-dev)"
        )
    tmp.replace(target)
    return target


def render_dockerfile(base_image: str) -> str:
    """The broker image of a deployment: ``base_image`` with the plugin compiled in.

    Built from the checkout (``src/`` is in the image build context); the
    compiler and headers stay in the first stage.
    """
    source = f"src/{SOURCE.relative_to(SOURCE.parents[3]).as_posix()}"
    flags = " ".join(_COMPILE)
    return f"""# syntax=docker/dockerfile:1
# Written by `f2pipe deploy render`; changes are overwritten.
# The broker image: {base_image} with f2pipe's plugin that refuses retained
# messages (f2pipe.operations.stack.retainguard). Build context: the checkout.
FROM {base_image} AS build
USER root
RUN apk add --no-cache gcc musl-dev mosquitto-dev
COPY {source} /tmp/retain_guard.c
RUN cc {flags} -o /tmp/retain_guard.so /tmp/retain_guard.c

FROM {base_image}
COPY --from=build /tmp/retain_guard.so {IMAGE_PLUGIN}
"""
