"""The package's import rules (docs/architecture.md), checked on its source.

Every ``import`` in ``lmmjax/``, at module level or inside a function, is an
edge of the module graph. The graph must have no cycle; only ``linalg``
itself may import ``linalg``'s modules or read the block layout; and each
package imports only the packages its row of the table below allows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lmmjax"

# top-level unit -> the units it may import (docs/architecture.md, "What may import what")
ALLOWED = {
    "errors": set(),
    "precision": set(),
    "lapack": set(),
    "memory": set(),
    "cache": {"lapack", "memory"},
    "terms": set(),
    "formula": {"errors"},
    "datasets": {"errors"},
    "design": {"errors", "formula", "terms"},
    "linalg": {"lapack", "terms"},
    "options": {"errors"},
    "methods": {"errors", "memory", "options"},
    "config": {"errors", "methods", "options"},
    "output": {"terms"},
    "reml": {"cache", "design", "errors", "linalg", "options", "output", "precision", "terms"},
    "bayes": {"cache", "errors", "linalg", "memory", "options", "output", "precision", "terms"},
    "em": {"cache", "design", "errors", "linalg", "options", "output", "precision", "terms"},
    "sparse": {"cache", "errors", "methods", "options", "output", "precision"},
    "stream": {"cache", "design", "errors", "formula", "linalg", "precision"},
    "distributed": {"errors"},
    "api": {"config", "datasets", "design", "errors", "memory", "methods", "stream"},
    "cli": {
        "__init__",
        "api",
        "config",
        "datasets",
        "design",
        "errors",
        "memory",
        "methods",
        "output",
        "stream",
        "distributed",
    },
    "fit": {"cli", "memory"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The lmmjax modules ``name`` imports (a ``from pkg import sub`` counts ``pkg.sub``)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    is_package = MODULES[name].name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES}
    out.discard(name)
    return out


GRAPH = {name: imports(name) for name in MODULES}


def unit(name: str) -> str:
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_module_is_parsed():
    assert {"lmmjax.linalg.blocked", "lmmjax.reml.fit", "lmmjax.bayes.fit"} <= set(MODULES)
    assert "lmmjax.linalg" in GRAPH["lmmjax.reml.objective"]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    # a package's own __init__ importing its modules is how packages work, not a cycle:
    # leave out the edge from a module to the package that contains it
    graph = {
        name: {t for t in targets if not name.startswith(t + ".")}
        for name, targets in GRAPH.items()
    }
    assert find_cycle(graph) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_linalg_internals_stay_inside(name):
    if name.startswith("lmmjax.linalg"):
        return
    inner = sorted(t for t in GRAPH[name] if t.startswith("lmmjax.linalg."))
    assert not inner, f"{name} imports linalg internals {inner}; use lmmjax.linalg's exports"
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    layout = [
        n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "layout"
    ]
    assert not layout, f"{name} reads the block layout (.layout) at lines {layout}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layering(name):
    own = unit(name)
    if own == "__init__":
        return
    assert own in ALLOWED, f"{name}: add its package to ALLOWED and docs/architecture.md"
    used = {unit(t) for t in GRAPH[name]} - {own}
    extra = sorted(used - ALLOWED[own])
    assert not extra, f"{name} imports {extra}, which {own!r} may not (docs/architecture.md)"


def test_import_lmmjax_leaves_the_samplers_unloaded():
    import subprocess
    import sys

    code = "import sys, lmmjax; print(sorted({'numpyro', 'blackjax', 'arviz'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
