"""The package's layers, checked from its source: no import cycles, and each layer imports only below it.

Layers, lowest first (README "Layout"): the contract at the top of the package (errors, weights,
quantize, hookspecs, registry), then ``model/``, then ``runtime/``, then ``tools/`` and
``conformance/``, then ``commands/`` and ``cli``. Imports inside functions are counted too
(a lazy import still ties two modules together); imports under ``if TYPE_CHECKING:`` are not
(they never run).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "core"
# layer of each top-level name under dsv3 (a module or a folder)
LAYER = {
    "errors": 0,
    "weights": 0,
    "quantize": 0,
    "hookspecs": 0,
    "registry": 0,
    "model": 1,
    "runtime": 2,
    "tools": 3,
    "conformance": 3,
    "commands": 4,
    "cli": 4,
    "__main__": 5,
    "__init__": 5,
    "embedded": 0,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("dsv3", *parts))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The dsv3 modules ``path`` imports (resolved relative imports; ``from . import x`` names module x)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


@functools.cache
def _graph() -> dict[str, frozenset[str]]:
    files = {_module_name(p): p for p in CORE.rglob("*.py")}
    modules = set(files) | {"dsv3"}
    return {name: frozenset(_imports(path, modules)) for name, path in files.items()}


def find_cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> the modules it imports) as a path a -> ... -> a, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER[parts[1]] if len(parts) > 1 else LAYER["__init__"]


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_planted_cycle():
    graph = dict(_graph())
    graph["dsv3.model.config"] = graph["dsv3.model.config"] | {"dsv3.runtime.loading"}  # config -> ... -> config
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


def test_every_module_has_a_layer():
    unknown = sorted(m for m in _graph() if m != "dsv3" and m.split(".")[1] not in LAYER)
    assert not unknown, f"add these to LAYER (and to README's layout): {unknown}"


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_go_down_the_layers(module):
    graph = _graph()
    upward = sorted(dep for dep in graph[module] if dep != "dsv3" and _layer(dep) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports from a higher layer: {upward}"


def test_the_model_graph_and_the_contract_hold_no_hardware():
    """core/ names no device library: hardware lives in the backends (plugins)."""
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert not name.startswith(("triton", "torch_npu", "onnxruntime", "dsv3.backends")), (
                        f"{path.relative_to(CORE.parent)} imports {name}"
                    )
