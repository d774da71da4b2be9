"""The package's architecture, checked from its source: no import circles, and each package imports
only the layers below it (`wire` nothing of ours, `client` and `worker` only `wire`).

Imports are read with `ast`, those inside functions included; imports under `if TYPE_CHECKING:`
are for annotations only and do not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torchremote"

# what each package may import from torchremote (besides itself)
ALLOWED = {
    "torchremote.wire": set(),
    "torchremote.client": {"torchremote.wire"},
    "torchremote.worker": {"torchremote.wire"},
    "torchremote.testing": None,  # anything
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import node, skipping the bodies of `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (a name imported from a package counts as
    the submodule when one of that name exists, else as the package itself)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    packages = {name for name, p in files.items() if p.name == "__init__.py"}
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        base = name if name in packages else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
                imported = [[] for _ in targets]
            else:
                if node.level:
                    anchor = base.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    target = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets, imported = [target], [[a.name for a in node.names]]
            for target, names in zip(targets, imported):
                if target != top and not target.startswith(top + "."):
                    continue
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in files]
                if subs:
                    edges.update(subs)
                if len(subs) < len(names) or not names:
                    edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a cycle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, edges in sorted(graph.items()):
        layer = next((p for p in ALLOWED if module == p or module.startswith(p + ".")), None)
        if layer is None or ALLOWED[layer] is None:
            continue
        for target in sorted(edges):
            owner = next((p for p in ALLOWED if target == p or target.startswith(p + ".")), target)
            if owner != layer and owner not in ALLOWED[layer]:
                out.append(f"{module} imports {target}")
    return out


def test_the_package_has_no_import_circles():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and graph["torchremote.client.dispatch"], "the graph was not read"
    assert cycles(graph) == []


def test_each_package_imports_only_the_layers_below_it():
    assert layer_violations(import_graph(PACKAGE)) == []


# --- the checks themselves, on a small package written for them -----------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def tiny(tmp_path):
    return _write(tmp_path / "torchremote", {
        "__init__.py": "from .client import api\n",
        "wire/__init__.py": "",
        "wire/codec.py": "import torch\n",
        "client/__init__.py": "",
        "client/api.py": "from . import dispatch\nfrom ..wire import codec\n",
        "client/dispatch.py": "from .tensor import RemoteTensor\n",
        "client/tensor.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .api import Worker\n",
    })


def test_a_clean_package_passes(tiny):
    graph = import_graph(tiny)
    assert graph["torchremote.client.api"] == {"torchremote.client.dispatch", "torchremote.wire.codec"}
    assert cycles(graph) == [] and layer_violations(graph) == []


def test_a_circle_through_an_import_inside_a_function_is_found(tiny):
    (tiny / "client/tensor.py").write_text("def f():\n    from .dispatch import dispatch\n")
    assert cycles(import_graph(tiny)) == [["torchremote.client.dispatch", "torchremote.client.tensor"]]


def test_a_longer_circle_is_found(tiny):
    (tiny / "client/tensor.py").write_text("import torchremote.client.api\n")
    assert cycles(import_graph(tiny)) == [["torchremote.client.api", "torchremote.client.dispatch",
                                           "torchremote.client.tensor"]]


def test_the_wire_importing_the_client_is_a_violation(tiny):
    (tiny / "wire/codec.py").write_text("from ..client.tensor import RemoteTensor\n")
    assert layer_violations(import_graph(tiny)) == ["torchremote.wire.codec imports torchremote.client.tensor"]
