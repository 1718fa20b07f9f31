"""The import rules of the tree (docs/architecture.md, "Import rules"), read from the source.

The module graph is built from the AST of every module under ``src/ipcbus`` (imports inside
functions included, ``if TYPE_CHECKING:`` blocks excluded: they never run), and the rules are
checked on what each module loads *transitively*. ``make check`` runs this file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "ipcbus"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _import_nodes_of(child))
            continue
        yield from _import_nodes_of(node)


def _import_nodes_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node):
        return
    for child in ast.iter_child_nodes(node):
        yield from _import_nodes_of(child)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


@cache
def direct_imports(module: str) -> frozenset[str]:
    """Modules ``module`` imports: ipcbus modules by full name, others by top-level name.
    Importing ``a.b.c`` also runs ``a`` and ``a.b`` (their ``__init__``)."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = _resolve(module, node)
            targets = [base]
            # ``from . import x`` / ``from .pkg import mod`` may name submodules.
            targets += [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target.split(".")[0] != PACKAGE:
                found.add(target.split(".")[0])
                continue
            parts = target.split(".")
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if prefix in MODULES and prefix != module:
                    found.add(prefix)
    return frozenset(found)


@cache
def loads(module: str) -> frozenset[str]:
    """Everything importing ``module`` loads (its packages' ``__init__`` included)."""
    seen: set[str] = set()
    parts = module.split(".")
    stack = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in MODULES:
            stack.extend(direct_imports(current))
    seen.discard(module)
    return frozenset(seen)


def modules_under(prefix: str) -> list[str]:
    return [name for name in MODULES if name == prefix or name.startswith(prefix + ".")]


def test_the_module_graph_is_read() -> None:
    """The reader itself: known edges are found (so the rules below cannot pass vacuously)."""
    assert len(modules_under("ipcbus.server")) >= 5
    assert "zmq" in direct_imports("ipcbus.server.relay")
    assert "ipcbus.wire.protocol" in direct_imports("ipcbus.server.relay")
    assert "ipcbus.core.contract" in loads("ipcbus.brokers.memory")
    assert "cloudpickle" in loads("ipcbus.client.broker")
    assert "zmq" in loads("ipcbus.hub")


@pytest.mark.parametrize("module", modules_under("ipcbus.server"))
def test_the_hub_side_imports_only_the_wire_config_and_exceptions(module: str) -> None:
    allowed_inside = ("ipcbus.server", "ipcbus.wire")
    allowed = {"ipcbus", "ipcbus.config", "ipcbus.exceptions"}
    ours = {name for name in loads(module) if name.split(".")[0] == PACKAGE}
    strays = {
        name
        for name in ours - allowed
        if not any(name == p or name.startswith(p + ".") for p in allowed_inside)
    }
    assert strays == set(), f"{module} loads {sorted(strays)}"
    assert "cloudpickle" not in loads(module), (
        f"{module} loads cloudpickle: the hub never unpickles"
    )


@pytest.mark.parametrize("module", modules_under("ipcbus.core") + modules_under("ipcbus.brokers"))
def test_the_core_and_in_process_brokers_never_import_zmq(module: str) -> None:
    loaded = loads(module)
    assert "zmq" not in loaded, f"{module} loads zmq"
    forbidden = {"ipcbus.client", "ipcbus.server", "ipcbus.hub", "ipcbus.wire.keys"}
    assert not {name for name in loaded if name in forbidden or name.startswith("ipcbus.client.")}
    if module.startswith("ipcbus.core"):
        assert not any(name.startswith("ipcbus.brokers") for name in loaded), module


@pytest.mark.parametrize("module", modules_under("ipcbus.client"))
def test_the_client_side_never_imports_the_hub_side(module: str) -> None:
    strays = sorted(name for name in loads(module) if name.startswith("ipcbus.server"))
    assert strays == [], f"{module} loads {strays}"


@pytest.mark.parametrize("module", modules_under("ipcbus.nats"))
def test_the_nats_broker_uses_the_core_and_nothing_of_the_hub_or_zmq(module: str) -> None:
    loaded = loads(module)
    assert "zmq" not in loaded, f"{module} loads zmq"
    allowed_client = {"ipcbus.client", "ipcbus.client.threads"}
    strays = sorted(
        name
        for name in loaded
        if name.startswith(("ipcbus.server", "ipcbus.hub", "ipcbus.wire.keys", "ipcbus.brokers"))
        or (name.startswith("ipcbus.client") and name not in allowed_client)
    )
    assert strays == [], f"{module} loads {strays}"


@pytest.mark.parametrize("module", modules_under("ipcbus.wire"))
def test_the_wire_imports_neither_side(module: str) -> None:
    sides = ("ipcbus.server", "ipcbus.client", "ipcbus.core", "ipcbus.brokers", "ipcbus.hub")
    strays = sorted(name for name in loads(module) if name.startswith(sides))
    assert strays == [], f"{module} loads {strays}"


def test_no_import_cycles() -> None:
    """No module is reachable from itself through direct imports (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in direct_imports(node):
            if target not in MODULES:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert cycles == []


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return set(output.split())


def test_in_process_use_loads_no_zmq() -> None:
    loaded = _loaded_after("from ipcbus import TestBroker, MemoryBroker, Consumer, Message")
    assert "zmq" not in loaded
    assert not any(name.startswith("ipcbus.client") for name in loaded)


def test_the_hub_process_loads_neither_the_client_nor_cloudpickle() -> None:
    """What the hub process imports: the module of its entry point, Hub.start()'s target."""
    loaded = _loaded_after("import ipcbus.server.process")
    assert "zmq" in loaded  # the check is real: the hub side was loaded
    assert "cloudpickle" not in loaded
    assert not any(name.startswith(("ipcbus.client", "ipcbus.core")) for name in loaded)


def test_lazy_exports_resolve_every_public_name() -> None:
    import ipcbus

    for name in ipcbus.__all__:
        assert getattr(ipcbus, name) is not None
    with pytest.raises(AttributeError):
        ipcbus.NoSuchName  # noqa: B018
