"""The layering rule: packages import downward only, and no module imports itself back.

    core                          errors, YAML, spec, workspace, database + tables, clock
    audiences  channels           build on the core
    delivery                      policy, addresses, suppression, render, dispatch, ledger
    reporting                     run views, statistics, HTML, write-back
    flows  journeys               engine, Prefect wiring, CLI (the top)

Every ``import herald.…`` counts, also those inside functions: a lazy import is still a
dependency. Run this file alone to check the rule: ``pytest tests/test_layers.py``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "audiences": {"core"},
    "channels": {"core"},
    "delivery": {"core", "audiences", "channels"},
    "reporting": {"core", "audiences", "delivery"},
    "journeys": {"core", "audiences", "channels", "delivery", "reporting"},
    "flows": {"core", "audiences", "channels", "delivery", "reporting", "journeys"},
}


def modules() -> dict[str, Path]:
    """Every Herald module: ``herald.<package>.<name>`` -> its file."""
    found = {}
    for package in ALLOWED:
        folder = ROOT / package
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join(("herald", package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The Herald modules ``path`` imports (``from herald.x import y`` counts y when it
    is a module, else herald.x)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("herald."))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if not base.startswith("herald"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: {m for m in imports(path, name, known) if m in known or m.count(".") >= 1}
            for name, path in found.items()}


def test_there_are_modules_to_check() -> None:
    found = modules()
    assert "herald.core.workspace" in found and "herald.flows.engine" in found
    assert len(found) > 30


def test_packages_import_downward_only() -> None:
    wrong = []
    for name, targets in sorted(graph().items()):
        package = name.split(".")[1]
        for target in sorted(targets):
            other = target.split(".")[1] if target.count(".") else target
            if other != package and other not in ALLOWED[package]:
                wrong.append(f"{name} imports {target} ({package} may import: "
                             f"{', '.join(sorted(ALLOWED[package])) or 'nothing of Herald'})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in edges:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: an upward import in a core module is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from herald.flows import engine\nimport herald.delivery.ledger\n")
    got = imports(bad, "herald.core.bad", set(modules()))
    assert got == {"herald.flows.engine", "herald.delivery.ledger"}
    assert not {"flows", "delivery"} & ALLOWED["core"]


def test_dependencies_are_listed_per_package() -> None:
    uses: dict[str, set[str]] = defaultdict(set)
    for name, targets in graph().items():
        uses[name.split(".")[1]].update(t.split(".")[1] for t in targets if t.count("."))
    assert uses["core"] <= {"core"}
