"""The package's shape: a pure core, no import cycles, a guarded public surface, small modules.

These are the rules of the layout the README draws ("How the code is laid
out"); each test names what broke it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import f2pipe

SRC = Path(f2pipe.__file__).resolve().parent
PACKAGE = "f2pipe"

# Third-party libraries that talk to a network, a database, a broker or the web.
IO_LIBRARIES = frozenset(
    {
        "confluent_kafka", "psycopg", "psycopg_pool", "redis", "paho", "mqtt5", "httpx",
        "httpcore", "fastapi", "starlette", "uvicorn", "prometheus_client", "cryptography",
    }
)  # fmt: skip

# Modules over the size limit that hold one idea, with the reason.
LARGE_MODULES_ALLOWED = {
    "f2pipe.core.decode": "one idea: a message to readings or one reason (SPEC sections 1, 2, 7)",
}
MODULE_LINES_MAX = 550


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


MODULES = dict(_modules())


def _resolve(name: str) -> str | None:
    """The f2pipe module an imported name lives in (a module, else its package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """f2pipe modules ``module`` imports anywhere in its body, except for type checking."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
        else:
            names = []
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name)
                if target is not None and target != module:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_the_core_imports_no_io_library_and_nothing_outside_it() -> None:
    core = sorted(name for name in MODULES if name.startswith("f2pipe.core."))
    probe = (
        "import sys\n"
        f"for name in {core!r}:\n"
        "    __import__(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split()
    roots = {name.split(".")[0] for name in loaded}
    assert not roots & IO_LIBRARIES, f"the core loads {sorted(roots & IO_LIBRARIES)}"
    outside = [
        name
        for name in loaded
        if name.startswith("f2pipe.")
        and not name.startswith("f2pipe.core")
        and name != "f2pipe.errors"
    ]
    assert not outside, f"the core loads {outside}"


def test_no_import_cycles() -> None:
    graph = {module: _imports(module, path) for module, path in MODULES.items()}
    # A package importing its own submodules to re-export them is not a cycle of ideas;
    # a submodule importing its package back is, so only the downward edge is dropped.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not t.startswith(module + ".")}
    cycles = _strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm; the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_modules_stay_small_unless_they_hold_one_idea() -> None:
    large = {
        module: lines
        for module, path in MODULES.items()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MODULE_LINES_MAX
        and module not in LARGE_MODULES_ALLOWED
    }
    assert not large, f"split along the jobs, or say why it is one idea: {large}"


# What a user may import from the package itself; everything else is private by
# convention. Changing this list is changing the public API.
PUBLIC = [
    "CompiledTemplate", "DatapointSpec", "DecodeError", "F2PipeError", "Reason", "Rejected",
    "Settings", "TemplateSpec", "Topic", "check_modbus_frame", "compile_template",
    "crc16_modbus", "get_settings", "load_settings", "parse_timestamp", "parse_topic",
    "reading_key", "reading_value", "template_from_mapping", "__version__",
]  # fmt: skip


def test_the_public_surface_is_exactly_all() -> None:
    assert sorted(f2pipe.__all__) == sorted(PUBLIC)
    assert set(f2pipe.__all__) == {"__version__", *f2pipe._EXPORTS}
    for name in f2pipe.__all__:
        assert getattr(f2pipe, name) is not None, name
    children = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    # Besides submodules (attributes once imported), nothing public is outside __all__.
    public = {name for name in dir(f2pipe) if not name.startswith("_")} - children
    assert public <= set(f2pipe.__all__), f"public but not in __all__: {public - set(PUBLIC)}"


def test_importing_the_package_loads_no_io_library() -> None:
    # `f2pipe decode` and the other quick tools must not pay for the servers' clients.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, f2pipe; print('\\n'.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert not {name.split(".")[0] for name in loaded} & IO_LIBRARIES
