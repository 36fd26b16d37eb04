"""No import cycle among the project's modules: a module's top-level imports (those that run when it is
imported; ``if TYPE_CHECKING:`` blocks and imports inside functions do not) never lead back to it.

A cycle works until someone reorders two imports; it also means two modules that cannot be understood
apart (the gateway's settings, worker client and channels once imported each other in a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"
ROOTS = [SERVICES / "shared", SERVICES / "gateway", SERVICES / "worker", SERVICES / "client"]


def _modules() -> dict[str, Path]:
    found = {}
    for root in ROOTS:
        for path in root.rglob("*.py"):
            if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
                continue  # generated stubs import only protobuf and each other's messages
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run at import time: module level, including under try/if, except
    ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    return found


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".") if package else []
                    anchor = parts[: len(parts) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # "from pkg import mod" imports pkg.mod when that is a module, else a name in pkg
                targets = [
                    _join(base, a.name) if _join(base, a.name) in modules else base for a in node.names
                ]
            for target in targets:
                while target and target not in modules:  # "import a.b.c" of a name: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _join(package: str, name: str) -> str:
    return f"{package}.{name}" if package else name


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_project_has_no_import_cycle():
    modules = _modules()
    assert {"omnigate_gateway.core", "omnigate_worker.engine.transformers_engine", "omnigate.enums"} <= set(
        modules
    )
    assert _cycles(_graph(modules)) == []


@pytest.mark.parametrize(
    ("sources", "cycle"),
    [
        ({"a": "import b\n", "b": "from a import x\n"}, ["a", "b"]),
        ({"a": "from . import b\n", "b": "import c\n", "c": "import a\n"}, ["a", "b", "c"]),
        (
            {"a": "import b\n", "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"},
            None,
        ),
        ({"a": "import b\n", "b": "def f():\n    import a\n"}, None),
    ],
    ids=["two-modules", "three-modules-relative", "type-checking-only", "inside-a-function"],
)
def test_the_check_sees_a_cycle_and_only_a_runtime_one(tmp_path, sources, cycle):
    for name, text in sources.items():
        (tmp_path / f"{name}.py").write_text(text)
    modules = {name: tmp_path / f"{name}.py" for name in sources}
    assert _cycles(_graph(modules)) == ([cycle] if cycle else [])
